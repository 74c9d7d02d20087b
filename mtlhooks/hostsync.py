"""The points where one ``backward()`` call waits for the device: its host-sync budget.

On CUDA every read of a device value by the host (``bool(t)``, ``t.item()``, ``t.cpu()``)
stalls the host until the queued kernels have run. The pipeline does that in exactly these
places, all through this module, so they can be counted (and tested, on CPU as on CUDA):

- space ``none`` (and every call that takes no per-task gradient): **one**, the finiteness
  check of the losses, the loss weights and the written gradients together (skipped only under
  a ``loss_scale``, whose GradScaler checks the gradients itself, and then it checks the
  losses and weights alone);
- a call that takes per-task gradients: **two**, one copy of the T×T Gramian, the losses and
  the loss weights to the host (the norm-balancing and aggregation stages then run on the host:
  a solver's loop never waits for the device), and the finiteness check of what was written;
- an accumulation micro-step of space ``params`` (``sync=False``): **one**, the finiteness check
  of its losses.

Across processes the ranks' status travels with the losses (mtlhooks.ranks) and is read in the
first of these points, except where a collective would come before it: under FSDP2
(:mod:`mtlhooks.fsdp`) a call that takes per-task gradients reads it before them (FSDP's
backward passes are collectives), **three** syncs in all. A ``backward_fn`` that applies the
optimizer step (``steps_in_backward``, DeepSpeed) is preceded by the check of the losses and
weights, and nothing is read after it.

Failure paths (a non-finite value found, an error) may read more to say what went wrong. Plugins
that read device values themselves add their own waits (a loss-scaling plugin runs on the
device, before the first of these points).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed support
    DTensor = None  # type: ignore[assignment,misc]

_local = threading.local()


def _count() -> None:
    _local.count = getattr(_local, "count", 0) + 1


def host_flag(flag: Tensor) -> bool:
    """Read a device-side boolean: one host sync."""
    _count()
    return bool(flag)


def to_host(tensor: Tensor) -> Tensor:
    """A detached CPU copy of ``tensor`` (the tensor itself when already on the CPU): one host
    sync on an accelerator."""
    _count()
    return tensor.detach().to("cpu")


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` (host weights) on ``device`` without a sync: from pinned memory,
    asynchronously, to CUDA (a copy from pageable memory would wait for the device)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def count() -> int:
    """How many host syncs the pipeline made on this thread so far."""
    return int(getattr(_local, "count", 0))


@contextmanager
def counting() -> Iterator[list[int]]:
    """``with counting() as syncs:`` ... then ``syncs[0]`` is the number of host syncs the
    pipeline made inside the block (on this thread)."""
    result = [0]
    start = count()
    try:
        yield result
    finally:
        result[0] = count() - start


def all_finite(tensors: list[Tensor]) -> Tensor:
    """One device-side flag, True when every entry of every tensor is finite; no host sync.

    It reads each tensor once. On CUDA through the fused kernel GradScaler uses to look for
    infs (one launch per dtype; it multiplies by 1 in place, which changes no value). On the
    CPU, where that kernel is a slow scalar loop, through each tensor's sum: a NaN or an
    infinity makes the sum non-finite, so a finite sum proves every entry finite; a sum that
    overflows although every entry is finite (entries near the dtype's largest value) is only
    a suspicion, which :func:`confirm_nonfinite` settles on the failure path.

    A sharded tensor (FSDP2's ``DTensor`` gradients) is checked on this rank's shard: agreeing
    with the other ranks is the caller's (one all-reduce of the flag, no host sync).
    """
    fused: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    sums: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        if DTensor is not None and isinstance(tensor, DTensor):
            tensor = tensor.to_local()
        if not tensor.is_floating_point():
            continue
        device = tensor.device
        key = (device, tensor.dtype)
        if device.type == "cuda" and tensor.numel() > _SMALL and tensor.is_contiguous():
            fused.setdefault(key, []).append(tensor)
        else:
            sums.setdefault(key, []).append(tensor.sum())  # an empty tensor sums to 0
    # The sum of the sums is non-finite exactly when one of them is (or it overflows: then
    # confirm_nonfinite decides).
    flags = [torch.isfinite(torch.stack(parts).sum()) for parts in sums.values()]
    for (device, _), group in fused.items():
        found = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones(1, device=device))
        flags.append(found.reshape(()) == 0)
    if not flags:
        return torch.ones((), dtype=torch.bool)
    if len(flags) == 1:
        return flags[0]
    first = flags[0].device
    return torch.stack([flag.to(first) for flag in flags]).all()


def confirm_nonfinite(tensors: list[Tensor]) -> bool:
    """Whether some entry really is NaN or infinite (the failure path after
    :func:`all_finite` said no: reads every tensor entry by entry)."""
    local = [_shard(tensor) for tensor in tensors]
    return any(
        tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()) for tensor in local
    )


def _shard(tensor: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor``; any other tensor as it is."""
    return tensor.to_local() if DTensor is not None and isinstance(tensor, DTensor) else tensor


_SMALL = 4096
