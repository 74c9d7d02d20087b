"""UW-SO: analytical (soft-optimal) uncertainty weights, softmax of inverse losses
(Kirchdorfer et al. 2024)."""

from __future__ import annotations

from pydantic import Field

from mtlhooks.plugin import Family, Plugin, PluginConfig, Setup, hookimpl
from mtlhooks.step import Step
from mtlhooks.weighting_utils import (
    check_lower_bound,
    effective_losses,
    softmax_with_temperature,
)


class UWSOConfig(PluginConfig):
    temperature: float = Field(
        default=1.0,
        gt=0.0,
        description="Softmax temperature τ; the paper tunes it per dataset (its code's "
        "default is 1). Smaller τ concentrates the weight on the smallest loss.",
    )
    eps: float = Field(
        default=1e-8, gt=0.0, description="ε in 1/(ℓᵢ + ε): a zero loss gets a finite weight."
    )


class UWSO(Plugin):
    """UW-SO: wᵢ = softmax((1/(ℓᵢ + ε)) / τ)ᵢ, recomputed every step, detached.

    Kirchdorfer et al., "Analytical Uncertainty-Based Loss Weighting in Multi-Task Learning",
    GCPR 2024: the optimum of uncertainty weighting is wᵢ ∝ 1/ℓᵢ; normalising these with a
    softmax of temperature τ ("soft optimal") works better than the raw inverse. The weights
    sum to 1 (times the weights of earlier plugins). Losses must be ≥ 0 (a negative loss near
    −ε would make 1/(ℓ + ε) blow up): :class:`~mtlhooks.errors.InputError` otherwise.
    """

    name = "uw_so"
    family = Family.LOSS_SCALING
    Config = UWSOConfig

    def __init__(self, config: UWSOConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: UWSOConfig = config

    @hookimpl
    def mtl_scale_losses(self, step: Step) -> None:
        losses = effective_losses(step)
        check_lower_bound(
            losses,
            0.0,
            step.tasks,
            method=self.name,
            strict=False,
            why="weights tasks by 1/(loss + ε)",
            fix="Use a non-negative loss (e.g. add a constant offset), or another method.",
        )
        inverse = 1.0 / (losses + self.config.eps)
        step.weights = step.weights * softmax_with_temperature(inverse, self.config.temperature)
