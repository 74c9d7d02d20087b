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

    @property
    def rank(self) -> int: ...

    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        """Return ``tensor`` reduced over all processes (on the tensor's device); ``op`` is
        ``"sum"``, ``"mean"`` or ``"max"``."""
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
        if op not in ("sum", "mean", "max"):
            raise ValueError(f"op must be 'sum', 'mean' or 'max', got {op!r}")
        device = self._device(tensor)
        reduced = tensor.detach().to(device, copy=True)
        ops = torch.distributed.ReduceOp
        torch.distributed.all_reduce(
            reduced, op=ops.MAX if op == "max" else ops.SUM, group=self.group
        )
        if op == "mean":
            reduced /= self.world_size
        return reduced.to(tensor.device)

    def _device(self, tensor: Tensor) -> torch.device:
        """Where the backend can reduce ``tensor``: NCCL only on CUDA (small host tensors such
        as the pipeline's status go through the current CUDA device), gloo anywhere."""
        if tensor.device.type == "cpu" and torch.distributed.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return tensor.device


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
