"""The read-only record of one ``backward()`` call, handed to observers and kept as
``mtl.last_report``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import Tensor

from mtlhooks.plugin import Space
from mtlhooks.stats import norms


@dataclass(frozen=True)
class StepReport:
    """What happened in one ``backward()`` call. Tensors are detached copies owned by the report.

    - ``losses``: loss values, shape ``(T,)``.
    - ``loss_weights``: the weights after loss scaling (before norm balancing).
    - ``weights``: the effective multiplier of each unweighted task gradient in the written
      update, ``α_i · weights[i]``; ``None`` for a coordinate-wise aggregator or a skipped step.
    - ``gramian``: Gramian of the unweighted task gradients ``∇L_i`` (``None`` in space ``none``).
    - ``block_gramians``: the Gramian of each block of the space (each shared parameter by name,
      or ``"features"``); they sum to ``gramian``. Per-layer statistics come from these.
    - ``timings``: seconds per stage, host wall-clock (on CUDA, launch time, not kernel time).
    """

    index: int
    tasks: tuple[str, ...]
    space: Space
    losses: Tensor
    loss_weights: Tensor | None
    weights: Tensor | None
    gramian: Tensor | None
    block_gramians: Mapping[str, Tensor] = field(default_factory=lambda: MappingProxyType({}))
    accumulating: bool = False
    """A micro-step of gradient accumulation whose gradients wait for the ``sync=True`` call."""
    skipped: bool = False
    reason: str | None = None
    notes: tuple[str, ...] = ()
    """Remarks of plugins on this call (:meth:`mtlhooks.Step.note`): e.g. a method that met a
    Pareto-stationary point and returned its documented update there."""
    timings: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def grad_norms(self) -> Tensor | None:
        """Norms of the unweighted task gradients (from the Gramian's diagonal)."""
        if self.gramian is None:
            return None
        return norms(self.gramian)

    def as_dict(self) -> dict[str, object]:
        """Plain Python values (floats and lists), e.g. for JSON. Synchronises with the device."""

        def to_list(t: Tensor | None) -> object:
            return None if t is None else t.detach().cpu().tolist()

        return {
            "step": self.index,
            "tasks": list(self.tasks),
            "space": self.space.value,
            "skipped": self.skipped,
            "reason": self.reason,
            "notes": list(self.notes),
            "losses": to_list(self.losses),
            "loss_weights": to_list(self.loss_weights),
            "weights": to_list(self.weights),
            "gramian": to_list(self.gramian),
            "timings": dict(self.timings),
        }
