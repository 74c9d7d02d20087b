"""AvgNorm: scale every task so its shared gradient has the same norm (Guo et al. 2025)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from mtlhooks import stats
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Setup, Space, hookimpl
from mtlhooks.step import Step


class AvgNormConfig(PluginConfig):
    target: Literal["mean_norm", "sum_norm"] = Field(
        default="mean_norm",
        description="The common norm S: the mean of the task-gradient norms, or the norm of "
        "their sum.",
    )
    ema: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Exponential moving average of the norms (0: use this step's norms).",
    )
    eps: float = Field(
        default=1e-12,
        gt=0.0,
        description="A task whose gradient norm is below eps·max norm keeps its weight.",
    )


class AvgNorm(Plugin):
    """AvgNorm: scale each task so its shared gradient has the common norm S (seed paper 2).

    wᵢ ← wᵢ · S / ‖gᵢ‖, recomputed every step. Guo et al., "Revisit the Imbalance Optimization
    in Multi-task Learning", 2025: the imbalance between tasks tracks their gradient norms, and
    scaling each loss by its gradient norm matches an expensive grid search of loss weights.
    gᵢ is taken on the last shared layer by default (space ``last_shared``). S is the mean norm
    (1/T)·Σⱼ‖gⱼ‖ (``target: mean_norm``, default) or ‖Σⱼ gⱼ‖ (``sum_norm``). With ``ema`` > 0
    the norms (and S) are smoothed over steps. Weights are detached. A task with a
    (numerically) zero gradient keeps its weight: there is nothing to scale. The direction of
    the update does not depend on the scale of any single loss; its norm is S.
    """

    name = "avgnorm"
    family = Family.NORM_BALANCING
    Config = AvgNormConfig
    spaces = (Space.LAST_SHARED, Space.PARAMS, Space.FEATURES)
    needs = Need.GRAMIAN

    def __init__(self, config: AvgNormConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: AvgNormConfig = config
        self._norms: torch.Tensor | None = None
        self._target: torch.Tensor | None = None

    def _smooth(self, previous: torch.Tensor | None, current: torch.Tensor) -> torch.Tensor:
        if previous is None or self.config.ema == 0.0:
            return current
        return self.config.ema * previous.to(current) + (1.0 - self.config.ema) * current

    @hookimpl
    def mtl_balance(self, step: Step) -> None:
        gramian = step.gramian()
        norms = stats.norms(gramian)
        if self.config.target == "mean_norm":
            target = norms.mean()
        else:
            target = gramian.sum().clamp_min(0).sqrt()
        self._norms = self._smooth(self._norms, norms)
        self._target = self._smooth(self._target, target)
        norms, target = self._norms, self._target
        usable = norms > self.config.eps * norms.max()
        scale = torch.where(usable, target / torch.where(usable, norms, 1.0), 1.0)
        step.weights = step.weights * scale.to(step.weights.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"norms": self._norms, "target": self._target}

    def load_state_dict(self, state: Any) -> None:
        self._norms, self._target = state["norms"], state["target"]
