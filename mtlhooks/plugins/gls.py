"""GLS: the geometric mean of the task losses (Chennupati et al. 2019)."""

from __future__ import annotations

from mtlhooks.plugin import Family, Plugin, hookimpl
from mtlhooks.step import Step
from mtlhooks.weighting_utils import check_lower_bound, effective_losses


class GLS(Plugin):
    """GLS: minimise (Πᵢ ℓᵢ)^{1/T}; as weights, wᵢ = (Πⱼ ℓⱼ)^{1/T} / (T·ℓᵢ), detached.

    Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy
    for Multi-Task Learning", CVPR Workshops 2019. The gradient of the geometric mean is
    Σᵢ (GM/(T ℓᵢ)) ∇ℓᵢ, so these weights reproduce ``GM.backward()`` exactly; they are
    computed in log space (no overflow of the product for losses spanning 1e-12…1e12).
    Every loss must be > 0: :class:`~mtlhooks.errors.InputError` names the task otherwise.
    """

    name = "gls"
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
            why="takes the geometric mean (log) of the losses, defined only for losses > 0",
            fix="Add a small positive offset to that loss, or use another method.",
        )
        logs = losses.log()
        step.weights = step.weights * (logs.mean() - logs).exp() / len(step.tasks)
