"""The engine × space declaration (mtlhooks.support) against the code and the test suite."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mtlhooks import ConfigError
from mtlhooks.support import SPACES, SUPPORT, Engine, Verdict, lookup

sys.path.insert(0, str(Path(__file__).resolve().parent))

TASKS = ("t0", "t1", "t2")
CONFIGS = {
    "none": {"plugins": [{"name": "static", "weights": {"t0": 1.0, "t1": 2.0, "t2": 3.0}}]},
    "features": {"plugins": ["mgda"], "space": "features"},
    "last_shared": {"plugins": ["avgnorm"], "space": "last_shared"},
    "params": {"plugins": ["pcgrad"], "space": "params"},
    "params, sync: gramian": {"plugins": ["pcgrad"], "space": "params", "sync": "gramian"},
}


def test_every_engine_and_space_is_declared_once() -> None:
    pairs = [(row.engine, row.space) for row in SUPPORT]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == {(engine, space) for engine in Engine for space in SPACES}


def _scenarios(module_name: str) -> set[str]:
    module = importlib.import_module(module_name)
    names: set[str] = set()
    for attribute in ("SCENARIOS", "DDP_SCENARIOS", "ACCELERATE_SCENARIOS"):
        names |= set(getattr(module, attribute, {}))
    return names


def test_every_exact_or_approximate_row_names_scenarios_that_exist() -> None:
    """The scenarios compare with one process on the global batch; the declaration must not name
    one that is not run (a row without any says why in its reason)."""
    for row in SUPPORT:
        if row.verdict is Verdict.REFUSED:
            assert row.reason and not row.checked_by
            continue
        assert row.checked_by or row.reason, row
        for name in row.checked_by:
            module, scenario = name.split("::")
            assert scenario in _scenarios(module.removesuffix(".py")), name


def _stub(engine: Engine) -> Any:
    from accelerate.utils import DistributedType

    if engine in (Engine.ZERO12, Engine.ZERO3):
        kind = DistributedType.DEEPSPEED
        state = SimpleNamespace(
            deepspeed_plugin=SimpleNamespace(zero_stage=3 if engine is Engine.ZERO3 else 2)
        )
    else:
        kind = DistributedType.FSDP
        version = 2 if engine is Engine.FSDP2 else 1
        state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version))
    return SimpleNamespace(
        distributed_type=kind,
        num_processes=1,
        device=torch.device("cpu"),
        state=state,
        register_for_checkpointing=lambda *objects: None,
        register_save_state_pre_hook=lambda hook: None,
    )


@pytest.mark.parametrize(
    ("engine", "space"),
    [
        (engine, space)
        for engine in (Engine.ZERO12, Engine.ZERO3, Engine.FSDP1, Engine.FSDP2)
        for space in SPACES
    ],
)
def test_accelerate_refuses_exactly_the_declared_rows(engine: Engine, space: str) -> None:
    """Built under each Accelerate engine, an AcceleratedMTL raises the declared refusal, and only
    where the table says refused (plain fully_shard gets the same refusal from the pipeline once
    the parameters are sharded: tests/test_fsdp.py)."""
    pytest.importorskip("accelerate")
    from mtlhooks.integrations.accelerate import AcceleratedMTL
    from mtlhooks.problems import MultiTaskMLP

    model = MultiTaskMLP(4, 6, {t: 1 for t in TASKS}, depth=2)
    config = {"tasks": TASKS, **CONFIGS[space]}
    row = lookup(engine, space)
    build = lambda: AcceleratedMTL(  # noqa: E731
        _stub(engine), config, shared=model.encoder, model=model
    )
    if row.verdict is Verdict.REFUSED:
        with pytest.raises(ConfigError) as raised:
            build()
        assert row.reason in str(raised.value)
    else:
        build()
