"""The state of one ``backward()`` call, as the hooks see it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mtlhooks.distributed import Communicator
from mtlhooks.errors import PluginError
from mtlhooks.plugin import Space
from mtlhooks.stats import norms


@dataclass
class TaskGradients:
    """Per-task gradients of the *unweighted* losses ``∇L_i`` in one gradient space.

    ``blocks`` are T×n matrices whose columns, concatenated, form the T×P matrix J (one block per
    parameter, or one for the features), named by ``names``; under mixed precision they are the
    gradients of the scaled losses, while every Gramian is unscaled. ``block_gramians`` holds each
    block's T×T Gramian and ``gramian`` their sum, J Jᵀ (in float32 at least).
    """

    space: Space
    names: Sequence[str]
    blocks: Sequence[Tensor]
    block_gramians: Sequence[Tensor]
    gramian: Tensor

    @classmethod
    def from_blocks(
        cls, space: Space, names: Sequence[str], blocks: Sequence[Tensor]
    ) -> TaskGradients:
        """Compute the per-block Gramians and their sum."""
        parts = []
        for block in blocks:
            if block.dtype in (torch.float16, torch.bfloat16):
                block = block.float()
            parts.append(block @ block.T)
        total = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
        return cls(space, names, blocks, parts, total)

    def matrix(self) -> Tensor:
        """The T×P matrix J (concatenates the blocks: a copy when there is more than one)."""
        if len(self.blocks) != len(self.names):
            raise PluginError(
                "the per-task gradients were not materialised (layerwise Gramian): a plugin "
                "that reads J must declare needs = Need.JACOBIAN"
            )
        if len(self.blocks) == 1:
            return self.blocks[0]
        return torch.cat(list(self.blocks), dim=1)


@dataclass
class Step:
    """Mutable state of one ``backward()`` call, handed to every hook.

    Plugins read everything and assign ``weights``; they add learnable objectives with
    :meth:`add_auxiliary_loss`. Everything else is maintained by the pipeline.
    """

    index: int
    """How many ``backward()`` calls came before this one."""
    tasks: tuple[str, ...]
    losses: Tensor
    """Detached loss values, shape ``(T,)``, in the order of ``tasks``."""
    weights: Tensor
    """Current per-task multipliers, shape ``(T,)``: assign a new tensor to change them."""
    space: Space
    generator: torch.Generator
    """The pipeline's seeded generator: every random choice draws from it."""
    loss_tensors: tuple[Tensor, ...] = ()
    """The losses with their graph, in task order: read them, never call backward on them."""
    features: Tensor | None = None
    sync: bool = True
    """False on the micro-steps of gradient accumulation before an optimizer step."""
    loss_scale: Tensor | None = None
    """The mixed-precision loss scale of this call, if any (Gramians are already unscaled)."""
    gradients: TaskGradients | None = None
    """Per-task gradients; ``None`` before the gradient stage and in space ``none``."""
    auxiliary_losses: list[Tensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Remarks of plugins on this call (``report.notes``), see :meth:`note`."""
    communicator: Communicator | None = None
    """The other processes of a data-parallel run (``None`` with one process)."""

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """``tensor`` reduced over the processes of a data-parallel run (``"sum"`` or
        ``"mean"``); ``tensor`` itself with one process. For plugins whose statistics are sums
        over the batch (GradDrop's purity): summing them over ranks gives the global batch's."""
        if self.communicator is None or self.communicator.world_size == 1:
            return tensor
        return self.communicator.all_reduce(tensor, op)

    def note(self, text: str) -> None:
        """Record a remark on this call for the report (``report.notes``), e.g. that a method
        met a point where its rule is undefined and returned its documented fallback update."""
        self.notes.append(text)

    def add_auxiliary_loss(self, loss: Tensor) -> None:
        """Add a scalar objective of a plugin's own learnable parameters (UW's ½·s, GradNorm's
        L_grad). It is back-propagated once, after the model's gradients are written, and must
        not depend on the model's parameters."""
        if loss.ndim != 0:
            raise PluginError(f"auxiliary loss must be a scalar, got shape {tuple(loss.shape)}")
        self.auxiliary_losses.append(loss)

    def _require_gradients(self) -> TaskGradients:
        if self.gradients is None:
            raise PluginError(
                "per-task gradients are not available at this point: they exist from the "
                "norm-balancing stage on, and only in a gradient space other than 'none'"
            )
        return self.gradients

    def gramian(self) -> Tensor:
        """Gramian of the weighted task gradients ``weights[i] * ∇L_i`` (T×T)."""
        gradients = self._require_gradients()
        w = self.weights.to(gradients.gramian.dtype)
        return gradients.gramian * w[:, None] * w[None, :]

    def grad_norms(self) -> Tensor:
        """Norms of the weighted task gradients, shape ``(T,)``."""
        gradients = self._require_gradients()
        unweighted = norms(gradients.gramian)
        return unweighted * self.weights.abs().to(unweighted.dtype)
