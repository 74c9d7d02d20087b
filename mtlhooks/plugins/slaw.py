"""SLAW: weights inversely proportional to each loss's estimated standard deviation
(Crawshaw & Košecká 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field

from mtlhooks.plugin import Family, Plugin, PluginConfig, Setup, hookimpl
from mtlhooks.step import Step
from mtlhooks.weighting_utils import effective_losses, moving_average, statistics_dtype


class SLAWConfig(PluginConfig):
    beta: float = Field(
        default=0.99,
        ge=0.0,
        lt=1.0,
        description="Decay β of the moving averages of ℓ and ℓ²; arithmetic means are used for "
        "the first 1/(1−β) steps.",
    )
    eps: float = Field(
        default=1e-5,
        gt=0.0,
        le=1e30,
        description="Floor ε of the standard deviation estimate: sᵢ = max(√(aᵢ − bᵢ²), ε), "
        "as in the author's code.",
    )


class SLAW(Plugin):
    """SLAW: wᵢ = T·(1/sᵢ) / Σⱼ(1/sⱼ), sᵢ the estimated standard deviation of ℓᵢ.

    Crawshaw & Košecká, "SLAW: Scaled Loss Approximate Weighting for Efficient Multi-Task
    Learning", 2021: approximates the gradient-norm balancing of GradNorm-like methods with
    loss statistics only, at no extra backward. aᵢ ← βₜaᵢ + (1−βₜ)ℓᵢ², bᵢ ← βₜbᵢ + (1−βₜ)ℓᵢ,
    sᵢ = max(√(aᵢ − bᵢ²), ε), with βₜ = min(β, (t−1)/t) at the t-th call: aᵢ and bᵢ are arithmetic
    means for the first 1/(1−β) calls, then exponential moving averages (seamlessly: the two
    coincide at t = 1/(1−β)). The statistics include the current loss. The first call gives
    w = 1 (up to rounding). As aᵢ − bᵢ² is a variance, the weights do not change when a constant
    is added to one task's whole loss history. ε floors the standard deviation, as the author's
    code does (``max(stdev, 1e-5)`` in mtcrawshaw/meta, where SLAW was first called CLAW); an
    earlier version here floored the variance, i.e. the std at √ε ≈ 3e-3. A variance that
    rounding makes slightly negative counts as 0 (the author's code skips the update on the
    NaN it gives).

    State (``state_dict``): aᵢ, bᵢ (float64) and the call count.
    """

    name = "slaw"
    family = Family.LOSS_SCALING
    Config = SLAWConfig

    def __init__(self, config: SLAWConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: SLAWConfig = config
        self._squares: torch.Tensor | None = None
        self._means: torch.Tensor | None = None
        self._count = 0

    @hookimpl
    def mtl_scale_losses(self, step: Step) -> None:
        losses = effective_losses(step)
        values = losses.to(statistics_dtype(losses.device))
        self._count += 1
        beta = min(self.config.beta, (self._count - 1) / self._count)
        previous_squares = torch.zeros_like(values) if self._squares is None else self._squares
        previous_means = torch.zeros_like(values) if self._means is None else self._means
        self._squares = moving_average(previous_squares, values.square(), beta)
        self._means = moving_average(previous_means, values, beta)
        spread = (self._squares - self._means.square()).clamp_min(0).sqrt()
        inverse_std = 1.0 / spread.clamp_min(self.config.eps)
        weights = len(step.tasks) * inverse_std / inverse_std.sum()
        step.weights = step.weights * weights.to(losses.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"squares": self._squares, "means": self._means, "count": self._count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._squares, self._means = state["squares"], state["means"]
        self._count = state["count"]
