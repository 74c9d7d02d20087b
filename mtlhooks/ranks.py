"""Data parallelism: the ranks agree, or they fail together (never hang).

Every rank runs the same deterministic pipeline on the all-reduced values, so the ranks stay
identical as long as they start identical and none of them fails alone. This module holds the
three mechanisms that make sure of it:

- **one pipeline** (:meth:`Ranks.check_same_pipeline`, once, when the pipeline is built): a
  fingerprint of each resolved setting (tasks, plugins and options, space, seed, sync mode,
  on_nonfinite, the shared parameters' names and shapes, ...) is compared across ranks; every
  rank raises the same :class:`~mtlhooks.errors.ConfigError`, naming what differs.
- **the losses' all-reduce carries a status** (:meth:`Ranks.reduce`): the one collective every
  call makes for the loss values also carries, per rank, whether that rank failed before it
  (bad input, an error while taking its per-task gradients), its sample count (uneven shards)
  and a signature of its task-specific parameters. A rank that fails still joins that
  collective (and the gradient synchronisation that follows it in the same call, with zeros:
  :meth:`mtlhooks.engine.GradientEngine.join_gradient_sync`) and then raises its own error;
  every other rank reads the status before any further collective and raises a
  :class:`~mtlhooks.errors.DistributedError` naming the failed rank, within the time of that
  collective instead of a process-group timeout.
- **uneven shards** (``backward(..., batch_size=n)``): the global loss is the mean over all
  samples, ``Σ_r n_r L_r / Σ_r n_r``; each rank's losses are multiplied by ``R n_r / Σ n``, so
  that the averages the engine and DDP take over ranks are exactly that mean.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mtlhooks.distributed import Communicator
from mtlhooks.errors import ConfigError, DistributedError, InputError

_HEADER = 5  # signature of the task-specific leaves: [foreign, n, n², h, h²]


def _digest(value: Any) -> float:
    """52 bits of a hash of ``value``'s JSON form: exact in float64."""
    text = json.dumps(value, sort_keys=True, default=str)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return float(int.from_bytes(digest, "big") >> 12)


def leaves_signature(shapes: list[tuple[int, ...]], foreign: bool) -> Tensor:
    """What the ranks compare of their task-specific leaves (space params, exact): how many,
    and a 20-bit hash of their ordered shapes; ``foreign``: a leaf outside ``model=``."""
    count = float(len(shapes))
    digest = float(int(_digest(shapes)) % (1 << 20))
    return torch.tensor(
        [1.0 if foreign else 0.0, count, count * count, digest, digest * digest],
        dtype=torch.float64,
    )


@dataclass
class Reduced:
    """The losses' all-reduce of one call."""

    values: Tensor
    """The global loss values (the mean over every sample, or over ranks without batch sizes)."""
    factor: Tensor | None
    """What this rank's losses are multiplied by (``R n_r / Σ n``), or None (equal shards)."""
    status: Tensor
    """Per rank: failed before the collective (R entries), then the batch-size and leaf checks;
    read it with :meth:`Ranks.check` before any further collective."""


class Ranks:
    """The agreement protocol of one pipeline's ranks (see the module docstring)."""

    def __init__(self, communicator: Communicator, tasks: tuple[str, ...]) -> None:
        self.comm = communicator
        self.tasks = tasks
        self.world = communicator.world_size
        self.rank = communicator.rank

    # -- construction ---------------------------------------------------------------------------

    def check_same_pipeline(self, settings: dict[str, Any]) -> None:
        """Raise the same :class:`ConfigError` on every rank when a setting differs."""
        names = list(settings)
        digests = torch.tensor([_digest(settings[name]) for name in names], dtype=torch.float64)
        extremes = self.comm.all_reduce(torch.cat([digests, -digests]), "max")
        highest, lowest = extremes[: len(names)], -extremes[len(names) :]
        differ = [name for name, a, b in zip(names, highest.tolist(), lowest.tolist()) if a != b]
        if differ:
            mine = "; ".join(f"{name} = {settings[name]!r}" for name in differ)
            raise ConfigError(
                f"the {self.world} ranks built different pipelines: {', '.join(differ)} "
                f"differ (on rank {self.rank}: {mine}). Build the same MTL on every rank: the "
                "same config (seed included), the same shared= and last_shared= modules"
            )

    # -- every call -----------------------------------------------------------------------------

    def reduce(
        self,
        values: Tensor | None,
        *,
        batch_size: int | None,
        failed: bool,
        leaves: Tensor | None = None,
        device: torch.device | None = None,
    ) -> Reduced:
        """The losses' all-reduce (one collective); ``values`` None on a rank that failed."""
        count = len(self.tasks)
        if values is not None:
            device = values.device
        payload = torch.zeros(count + 2 + self.world + _HEADER, dtype=torch.float64, device=device)
        samples = 1.0 if batch_size is None else float(batch_size)
        if values is not None and not failed:
            payload[:count] = values.to(torch.float64) * samples
        payload[count] = samples
        payload[count + 1] = 0.0 if batch_size is None else 1.0
        payload[count + 2 + self.rank] = 1.0 if failed else 0.0
        if leaves is not None:
            payload[count + 2 + self.world :] = leaves.to(payload.device)
        total = self.comm.all_reduce(payload, "sum")
        dtype = values.dtype if values is not None else torch.float64
        mean = (total[:count] / total[count]).to(dtype)
        factor = None
        if batch_size is not None:
            factor = (self.world * samples / total[count]).to(dtype)
        return Reduced(mean, factor, total[count + 1 :])

    def check(self, status: Tensor) -> None:
        """Raise on every rank when some rank failed or the ranks' inputs disagree. ``status``
        is :attr:`Reduced.status` on the host."""
        given = float(status[0])
        failed = [r for r in range(self.world) if float(status[1 + r]) > 0]
        if failed:
            raise DistributedError(
                f"backward() failed on rank(s) {failed} (their own error says why); rank "
                f"{self.rank} stops too, so that no rank waits for the others"
            )
        if given not in (0.0, float(self.world)):
            raise InputError(
                f"batch_size= was given on {int(given)} of {self.world} ranks: give it on every "
                "rank or on none"
            )
        foreign, count, squares, digest, digest_squares = status[1 + self.world :].tolist()
        if foreign > 0:
            raise InputError(
                "a tensor outside model= receives a task-specific gradient on some rank: pass "
                "the whole model as model= (every parameter outside shared= is then reduced by "
                "name), or make that tensor not require grad"
            )
        # Σx² · R = (Σx)² exactly when every rank has the same x (Cauchy–Schwarz).
        if count * count != squares * self.world or digest * digest != digest_squares * self.world:
            raise InputError(
                "the ranks' losses reach different task-specific parameters in this step "
                "(rank-dependent branches or routing) and space params writes them from "
                "all-reduced per-task gradients: pass the whole model as MTL(..., model=model) "
                "so that they are reduced by name, exactly"
            )
