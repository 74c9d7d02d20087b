"""Talking to the other processes of a distributed run (core: no integration specifics).

:class:`mtlhooks.MTL` takes a :class:`Communicator`; with more than one process it averages the
loss values (so loss-level plugins see the same values on every rank) and synchronises the
per-task gradients or Gramians as :mod:`mtlhooks.engine` describes. Every rank then runs the
same deterministic aggregation with the same seeded generator, so weights agree bit-for-bit.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Communicator(Protocol):
    """What the pipeline needs from a process group."""

    @property
    def world_size(self) -> int: ...

    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        """Return ``tensor`` reduced over all processes; ``op`` is ``"sum"`` or ``"mean"``."""
        ...


class TorchDistributed:
    """A :class:`Communicator` over ``torch.distributed`` (any backend: gloo, nccl, ...).

    :param group: the process group; default: the whole world.
    """

    def __init__(self, group: Any = None) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(
                "torch.distributed is not initialised: call init_process_group() first "
                "(torchrun does it for you through the environment)"
            )
        self.group = group

    @property
    def world_size(self) -> int:
        return int(torch.distributed.get_world_size(self.group))

    @property
    def rank(self) -> int:
        return int(torch.distributed.get_rank(self.group))

    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        if op not in ("sum", "mean"):
            raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
        reduced = tensor.detach().clone()
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM, group=self.group)
        if op == "mean":
            reduced /= self.world_size
        return reduced


def default_communicator() -> Communicator | None:
    """A :class:`TorchDistributed` when a multi-process group is initialised, else None."""
    distributed = torch.distributed
    if (
        distributed.is_available()
        and distributed.is_initialized()
        and distributed.get_world_size() > 1
    ):
        return TorchDistributed()
    return None
