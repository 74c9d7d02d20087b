"""What mtlhooks does under each distributed engine, in each gradient space: the declaration.

One row per engine × space says whether the result equals one process on the global batch
(exact), follows a documented approximation, or is refused when the pipeline is built; what
mtlhooks synchronises per call; the traffic and the per-task gradients held per step; and which
test scenarios prove it. The refusals raise :func:`refusal`'s error (the Accelerate integration
and the pipeline call it), ``docs/distributed.md``'s table is generated from :data:`SUPPORT`
(``python -m mtlhooks.docs``), and ``tests/test_support.py`` checks that every scenario named
here exists and every refusal is raised.

Symbols: T tasks, R processes, P shared parameters, h task-specific parameters, p parameters of
the last shared layer, N·d the size of z on one process, n the number of shared tensors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mtlhooks.errors import ConfigError


class Verdict(str, enum.Enum):
    EXACT = "exact"
    APPROXIMATE = "approximate"
    REFUSED = "refused"


class Engine(str, enum.Enum):
    DDP = "DDP (torch, Accelerate)"
    FSDP2 = "FSDP2 (fully_shard, Accelerate fsdp_version=2)"
    ZERO12 = "DeepSpeed ZeRO-1/2 (Accelerate)"
    ZERO3 = "DeepSpeed ZeRO-3 (Accelerate)"
    FSDP1 = "FSDP1 (Accelerate fsdp_version=1)"


SPACES = ("none", "features", "last_shared", "params", "params, sync: gramian")
"""The space keys of the table (``params`` is ``sync: exact``, the default)."""


@dataclass(frozen=True)
class Support:
    engine: Engine
    space: str
    verdict: Verdict
    synchronised: str = "—"
    """What mtlhooks synchronises per call, beyond the T loss values (always all-reduced)."""
    traffic: str = "—"
    """Per optimizer step, besides the engine's own traffic where it runs its usual backward."""
    memory: str = "—"
    """Per-task gradients held per process."""
    checked_by: tuple[str, ...] = ()
    """Test scenarios (``file::scenario``) that compare with one process on the global batch."""
    reason: str = ""
    """For a refusal: why, and what to use instead (the error's message)."""


_FSDP2_RUN = "FSDP2's all-gathers and reduce-scatters"
_DDP_RUN = "DDP's P + h"
_DS_RUN = "DeepSpeed's reduction"

SUPPORT: tuple[Support, ...] = (
    # -- DDP ------------------------------------------------------------------------------------
    Support(
        Engine.DDP,
        "none",
        Verdict.EXACT,
        traffic=_DDP_RUN,
        checked_by=("test_distributed.py::static", "test_distributed.py::dwa"),
    ),
    Support(
        Engine.DDP,
        "features",
        Verdict.EXACT,
        "the T×T Gramian, summed (Σᵣ Gᵣ / R²)",
        f"{_DDP_RUN} + T²",
        "T·N·d",
        (
            "test_distributed.py::mgda_features",
            "test_distributed.py::acc_mgda_features_accumulate",
            "test_distributed_seams.py::find_unused_features",
        ),
    ),
    Support(
        Engine.DDP,
        "last_shared",
        Verdict.EXACT,
        "the T×p per-task gradients, averaged",
        f"{_DDP_RUN} + T·p",
        "T·p",
        (
            "test_distributed.py::avgnorm_last_shared",
            "test_distributed.py::acc_avgnorm_mgda_last_shared",
        ),
    ),
    Support(
        Engine.DDP,
        "params",
        Verdict.EXACT,
        "the T×P per-task gradients and the weighted task-specific ones, averaged; "
        "mtlhooks writes .grad (forward under no_sync)",
        "T·P + h (instead of P + h)",
        "T·P (+ T·h)",
        (
            "test_distributed.py::pcgrad_params",
            "test_distributed.py::pcgrad_params_accumulate",
            "test_distributed_seams.py::routed_with_model",
        ),
    ),
    Support(
        Engine.DDP,
        "params, sync: gramian",
        Verdict.APPROXIMATE,
        "each shared tensor's T×T Gramian, averaged (the mean of the per-rank Gramians, not "
        "the Gramian of the global batch)",
        f"{_DDP_RUN} + n·T²",
        "T·P",
        ("test_distributed.py::mgda_params_gramian",),
    ),
    # -- FSDP2 ----------------------------------------------------------------------------------
    Support(
        Engine.FSDP2,
        "none",
        Verdict.EXACT,
        traffic=_FSDP2_RUN,
        checked_by=("test_fsdp.py::none_dwa",),
    ),
    Support(
        Engine.FSDP2,
        "features",
        Verdict.EXACT,
        "the T×T Gramian, summed (Σᵣ Gᵣ / R²)",
        f"{_FSDP2_RUN} + T²",
        "T·N·d",
        ("test_fsdp.py::features_mgda", "test_fsdp.py::acc_features_mgda"),
    ),
    Support(
        Engine.FSDP2,
        "last_shared",
        Verdict.EXACT,
        "the T×p per-task gradients of the unsharded layer, averaged",
        f"{_FSDP2_RUN} + T·p",
        "T·p",
        ("test_fsdp.py::last_shared_avgnorm_pcgrad", "test_fsdp.py::acc_last_shared_avgnorm"),
    ),
    Support(
        Engine.FSDP2,
        "params",
        Verdict.EXACT,
        "one backward per task (FSDP reduce-scatters each: every rank holds its shard of each "
        "task's global gradient); the per-shard T×T Gramians, summed; each rank writes its "
        "own shards",
        "T reduce-scatters of P + h (and FSDP's all-gathers in each backward) + n·T²",
        "T·(P + h)/R",
        (
            "test_fsdp.py::params_pcgrad",
            "test_fsdp.py::params_avgnorm_mgda_accumulate",
            "test_fsdp.py::params_uneven",
            "test_fsdp.py::params_mixed_precision",
            "test_fsdp.py::acc_params_pcgrad_accumulate",
        ),
    ),
    Support(
        Engine.FSDP2,
        "params, sync: gramian",
        Verdict.REFUSED,
        reason="sync: gramian is DDP's approximation; under FSDP2 space 'params' is exact at "
        "the same Gramian traffic (the per-shard Gramians sum to the global one): use "
        "sync: exact",
    ),
    # -- DeepSpeed ------------------------------------------------------------------------------
    Support(
        Engine.ZERO12,
        "none",
        Verdict.EXACT,
        traffic=_DS_RUN,
        checked_by=("test_deepspeed.py::zero2_static", "test_deepspeed.py::zero2_dwa"),
    ),
    Support(
        Engine.ZERO12,
        "features",
        Verdict.EXACT,
        "the T×T Gramian, summed (Σᵣ Gᵣ / R²); one engine.backward of the weighted losses",
        f"{_DS_RUN} + T²",
        "T·N·d",
        (
            "test_deepspeed.py::zero2_mgda_features",
            "test_deepspeed.py::zero2_pcgrad_features_accumulate",
            "test_deepspeed.py::zero1_upgrad_features",
        ),
    ),
    Support(
        Engine.ZERO12,
        "last_shared",
        Verdict.EXACT,
        "the T×p per-task gradients, averaged; one engine.backward of the weighted losses",
        f"{_DS_RUN} + T·p",
        "T·p",
        ("test_deepspeed.py::zero2_avgnorm_mgda_last_shared",),
    ),
    *(
        Support(
            engine,
            space,
            Verdict.REFUSED,
            reason="space 'params' is not supported under DeepSpeed: DeepSpeed reduces and "
            "partitions the gradients inside its own backward, where no per-task gradient of "
            "the parameters can be combined. Use space 'features' or 'last_shared' under "
            "DeepSpeed ZeRO 1-2, or FSDP2 (FullyShardedDataParallelPlugin(fsdp_version=2)) "
            "for exact surgery in 'params'",
        )
        for engine in (Engine.ZERO12, Engine.ZERO3)
        for space in ("params", "params, sync: gramian")
    ),
    Support(
        Engine.ZERO3,
        "none",
        Verdict.EXACT,
        traffic=_DS_RUN,
        checked_by=("test_deepspeed.py::zero3_static",),
    ),
    *(
        Support(
            Engine.ZERO3,
            space,
            Verdict.REFUSED,
            reason="DeepSpeed ZeRO-3 is not supported with plugins that read per-task "
            "gradients: ZeRO-3 gathers and releases the parameters in hooks of its own "
            "backward, which the per-task gradients would run without it. Use ZeRO stage 1 "
            "or 2, or FSDP2 (FullyShardedDataParallelPlugin(fsdp_version=2)), which shards "
            "like ZeRO-3",
        )
        for space in ("features", "last_shared")
    ),
    # -- FSDP1 ----------------------------------------------------------------------------------
    Support(
        Engine.FSDP1,
        "none",
        Verdict.EXACT,
        traffic="FSDP's",
        reason="not run by the test suite: Accelerate enables FSDP1 on accelerators only",
    ),
    *(
        Support(
            Engine.FSDP1,
            space,
            Verdict.REFUSED,
            reason="FSDP1 is not supported with plugins that read per-task gradients: it "
            "flattens the parameters into shards that no per-task gradient can be read from. "
            "Use FSDP2: FullyShardedDataParallelPlugin(fsdp_version=2)",
        )
        for space in SPACES[1:]
    ),
)


def lookup(engine: Engine, space: str) -> Support:
    """The row of ``engine`` × ``space`` (one per pair)."""
    for row in SUPPORT:
        if row.engine is engine and row.space == space:
            return row
    raise KeyError((engine, space))  # pragma: no cover - the table covers every pair


def space_key(space: str, sync: str) -> str:
    """The table's space key of a resolved space and ``sync`` mode."""
    return "params, sync: gramian" if space == "params" and sync == "gramian" else space


def check(engine: Engine, space: str, plugins: list[str] | None = None) -> None:
    """Raise the row's :class:`ConfigError` when ``engine`` × ``space`` is refused."""
    row = lookup(engine, space)
    if row.verdict is Verdict.REFUSED:
        named = f" (plugins {plugins}, space {space!r})" if plugins else ""
        raise ConfigError(f"{engine.value}{named}: {row.reason}")


def table_markdown() -> str:
    """The table of ``docs/distributed.md``."""
    lines = [
        "| engine | space | vs one process on the global batch | mtlhooks synchronises per "
        "call (besides the T loss values) | traffic per optimizer step | per-task gradients "
        "held per process | checked by |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in SUPPORT:
        verdict = f"**{row.verdict.value}**" if row.verdict is not Verdict.EXACT else "exact"
        if row.verdict is Verdict.REFUSED:
            cells = [row.reason, "—", "—", "—"]
        else:
            checked = ", ".join(f"`{name}`" for name in row.checked_by) or row.reason
            cells = [row.synchronised, row.traffic, row.memory, checked]
        lines.append(
            f"| {row.engine.value} | `{row.space}` | {verdict} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)
