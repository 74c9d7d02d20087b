"""The scale-invariant loss Σ log Lᵢ (the "SI" baseline of Navon et al. 2022)."""

from __future__ import annotations

from mtlhooks.plugin import Family, Plugin, hookimpl
from mtlhooks.step import Step
from mtlhooks.weighting_utils import check_lower_bound, effective_losses


class ScaleInvariant(Plugin):
    """Scale-invariant loss: minimise ``Σᵢ log ℓᵢ``, i.e. weights ``wᵢ = 1/ℓᵢ`` (detached).

    The scale-invariant baseline ("SI") of Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik
    & Fetaya, "Multi-Task Learning as a Bargaining Game", ICML 2022 (Section 6; their code's
    ``ScaleInvariantLinearScalarization``): multiplying one task's loss by any c > 0 adds the
    constant log c to the objective and leaves the update unchanged. It is also the warm-up
    objective of STCH's reference code.

    ℓᵢ are the losses as weighted by earlier plugins (:mod:`mtlhooks.weighting_utils`), so
    ``static`` before this plugin cancels, after it gives ``Σ cᵢ log Lᵢ`` (the reference's
    ``task_weights``). Every loss must be > 0: :class:`~mtlhooks.errors.InputError` names the
    task otherwise (the reference takes ``log`` of whatever it gets; STCH's adds 1e-20).
    """

    name = "scale_invariant"
    family = Family.LOSS_SCALING

    @hookimpl
    def mtl_scale_losses(self, step: Step) -> None:
        losses = effective_losses(step)
        check_lower_bound(
            losses,
            0.0,
            step.tasks,
            method=self.name,
            strict=True,
            why="takes log(loss), defined only for losses > 0",
            fix="Add a small positive offset to that loss, or use another method.",
        )
        step.weights = step.weights / losses
