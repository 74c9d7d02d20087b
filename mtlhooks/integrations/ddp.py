"""Plain ``torch.distributed`` / ``DistributedDataParallel`` (DDP) support.

The core does the distributed work: an :class:`mtlhooks.MTL` built after
``init_process_group`` finds the process group itself, averages the loss values before any
plugin reads them and synchronises per-task gradients or Gramians (``docs/distributed.md``).
What is left to the loop is the forward pass, which must run under ``model.no_sync()`` when the
pipeline writes ``.grad`` itself (space ``params`` with ``sync: exact``: ``mtl.needs_no_sync``)
and, as with any DDP loop, on the micro-steps of gradient accumulation that do not synchronise::

    from mtlhooks.integrations import ddp as mtl_ddp

    torch.distributed.init_process_group("gloo")       # torchrun sets the environment
    model = DDP(model)
    mtl = MTL(config, shared=model.module.encoder)      # after init_process_group
    mtl_ddp.check(mtl, model)
    for step, (x, y) in enumerate(loader):
        sync = (step + 1) % accumulation_steps == 0
        with mtl_ddp.forward_context(mtl, model, sync=sync):
            z, outputs = model(x)
        losses = {t: loss_fn(outputs[t], y[t]) for t in tasks}
        mtl_ddp.backward(mtl, losses, features=z, sync=sync,
                         accumulation_steps=accumulation_steps, loss_scale=scaler)
        if sync:
            scaler.step(optimizer)                      # or optimizer.step()
            scaler.update()
            optimizer.zero_grad()

Every helper also works with one process and with a model that is not wrapped in DDP (they then
do nothing more than the plain calls), so one script serves both.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import NoReturn

import torch
from torch import Tensor, nn

from mtlhooks.core import MTL, GradScalerLike
from mtlhooks.errors import InputError
from mtlhooks.plugin import Space
from mtlhooks.report import StepReport

__all__ = [
    "backward",
    "check",
    "check_static_graph",
    "exit_together",
    "forward_context",
    "parameter_divergence",
]


def _world_size() -> int:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return int(distributed.get_world_size())
    return 1


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


@contextmanager
def forward_context(mtl: MTL, *models: nn.Module, sync: bool = True) -> Iterator[None]:
    """Context for the forward pass of one (micro-)step.

    Enters ``model.no_sync()`` on every DDP-wrapped model when the pipeline writes ``.grad``
    from all-reduced per-task gradients (``mtl.needs_no_sync``), or when this micro-step does
    not synchronise (``sync=False``); otherwise does nothing. DDP decides at the forward whether
    the following backward is synchronised, so only the forward needs to be inside; putting the
    backward inside too is harmless.
    """
    with ExitStack() as stack:
        if mtl.needs_no_sync or not sync:
            for model in models:
                if isinstance(model, nn.parallel.DistributedDataParallel):
                    stack.enter_context(model.no_sync())
        yield


def backward(
    mtl: MTL,
    losses: Mapping[str, Tensor],
    *,
    features: Tensor | None = None,
    sync: bool = True,
    accumulation_steps: int = 1,
    loss_scale: float | Tensor | GradScalerLike | None = None,
    batch_size: int | None = None,
) -> StepReport:
    """``mtl.backward`` for one micro-step of a loop that accumulates ``accumulation_steps``
    micro-steps per optimizer step: divides every loss by ``accumulation_steps`` (as
    ``Accelerator.backward`` does), so that the accumulated gradient is the mean over the
    micro-batches, and passes ``sync`` and ``loss_scale`` (a ``torch.amp.GradScaler``) on.
    """
    if isinstance(accumulation_steps, bool) or not (
        isinstance(accumulation_steps, int) and accumulation_steps >= 1
    ):
        raise InputError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
    if accumulation_steps > 1:
        losses = {task: loss / accumulation_steps for task, loss in losses.items()}
    return mtl.backward(
        losses, features=features, sync=sync, loss_scale=loss_scale, batch_size=batch_size
    )


def check(mtl: MTL, *models: nn.Module) -> None:
    """Raise :class:`mtlhooks.InputError` on a setup that would let the ranks drift apart.

    - The process group has several processes but ``mtl`` has no communicator (built before
      ``init_process_group``, or with ``communicator=False``), or one of another size: loss-level
      plugins would see per-rank losses and every rank would aggregate its own gradients.
    - A model that receives gradients is not wrapped in DDP while the pipeline leaves the final
      backward to DDP (every configuration except ``params`` with ``sync: exact``).
    - A DDP model built with ``static_graph=True`` while plugins take per-task gradients.
    """
    check_static_graph(mtl, *models)
    world = _world_size()
    if world == 1:
        return
    communicator = mtl.communicator
    if communicator is None:
        raise InputError(
            f"torch.distributed has {world} processes but this MTL has no communicator: build "
            "MTL after init_process_group() (or pass communicator=TorchDistributed()), or each "
            "rank aggregates its own gradients and the ranks drift apart"
        )
    if communicator.world_size != world:
        raise InputError(
            f"MTL's communicator spans {communicator.world_size} processes, the default process "
            f"group {world}: gradients would be averaged over a different set of ranks"
        )
    if mtl.needs_no_sync:
        return
    for model in models:
        if not _is_ddp(model) and any(p.requires_grad for p in model.parameters()):
            raise InputError(
                f"{type(model).__name__} is not wrapped in DistributedDataParallel: in gradient "
                f"space {mtl.space.value!r} the final backward is synchronised by DDP, so wrap "
                "the model (DDP(model)) or the ranks drift apart"
            )


def check_static_graph(mtl: MTL, *models: nn.Module) -> None:
    """Refuse ``DistributedDataParallel(static_graph=True)`` with per-task gradients: its
    delayed all-reduce hooks into every backward pass through the model's outputs, including
    the per-task ``autograd.grad`` calls (and fails inside ``no_sync``)."""
    if mtl.space is Space.NONE:
        return
    for model in models:
        if _is_ddp(model) and getattr(model, "static_graph", False):
            raise InputError(
                "DistributedDataParallel(static_graph=True) does not work with plugins that take "
                f"per-task gradients (space {mtl.space.value!r}): wrap the model without "
                "static_graph"
            )


def parameter_divergence(parameters: nn.Module | Iterable[Tensor]) -> float:
    """The largest ``|p - mean over ranks of p|`` over every parameter and rank: 0.0 when
    the replicas agree bit for bit. A collective: call it on every rank (it returns the same
    value on each). With one process, 0.0."""
    tensors = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    world = _world_size()
    if world == 1 or not tensors:
        return 0.0
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    mean = flat.clone()
    torch.distributed.all_reduce(mean)
    mean /= world
    deviation = (flat - mean).abs().max()
    torch.distributed.all_reduce(deviation, op=torch.distributed.ReduceOp.MAX)
    return float(deviation)


def exit_together(code: int = 0) -> NoReturn:
    """End this process of a multi-process run: leave together (a barrier, when a process
    group is initialised), flush stdout/stderr, then ``os._exit(code)``.

    Call it at the end of ``main()``, while the model and the process group are still alive.
    Freeing gloo objects (the DDP wrapper and its reducer, the group) near the exit aborts now
    and then (SIGABRT, "terminate called without an active exception": gloo's threads still
    hold objects with Python references, pytorch#179291) or hangs, even after
    ``destroy_process_group()`` has returned: about once in a dozen runs on a loaded CPU
    machine. Write and close everything first (checkpoints, trackers): nothing runs after it.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
