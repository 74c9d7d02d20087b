"""DWA: weights from the rate at which each loss decreases (Liu et al. 2019)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field

from mtlhooks.plugin import Family, Plugin, PluginConfig, Setup, hookimpl
from mtlhooks.step import Step
from mtlhooks.weighting_utils import (
    effective_losses,
    softmax_with_temperature,
    statistics_dtype,
)


class DWAConfig(PluginConfig):
    temperature: float = Field(
        default=2.0, gt=0.0, description="Softmax temperature τ (the paper's T = 2)."
    )
    period_steps: int = Field(
        default=1,
        ge=1,
        description="Length of a period, in backward() calls. The paper's period is an epoch: "
        "mtlhooks does not see epochs, so set this to your steps per epoch (backward() calls, "
        "micro-steps included). The default 1 updates the weights at every step.",
    )


class DWA(Plugin):
    """Dynamic Weight Average: w = T·softmax(r/τ), rᵢ = ℓ̄ᵢ(e−1) / ℓ̄ᵢ(e−2).

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019.
    ℓ̄ᵢ(e) is the mean loss of task i over period e, a period being ``period_steps``
    ``backward()`` calls (the paper uses epochs: set ``period_steps`` to your steps per epoch).
    The weights are constant within a period; w = 1 during the first two periods. A task whose
    mean over period e−2 is 0 gets rᵢ = 1 (no change measured); the ratio is clamped to the
    largest finite float so the weights stay finite. Meant for non-negative losses.

    State (``state_dict``): the running sum and count of the current period and the means of
    the last two completed periods, in float64.
    """

    name = "dwa"
    family = Family.LOSS_SCALING
    Config = DWAConfig

    def __init__(self, config: DWAConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: DWAConfig = config
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._means: list[torch.Tensor] = []  # last two completed periods, oldest first

    def _current_weights(self, like: torch.Tensor) -> torch.Tensor:
        if len(self._means) < 2:
            return torch.ones_like(like)
        older, newer = self._means
        ratio = torch.where(older != 0, newer / torch.where(older != 0, older, 1.0), 1.0)
        ratio = ratio.clamp(-torch.finfo(ratio.dtype).max, torch.finfo(ratio.dtype).max)
        weights = len(like) * softmax_with_temperature(ratio, self.config.temperature)
        return weights.to(like.device, like.dtype)

    @hookimpl
    def mtl_scale_losses(self, step: Step) -> None:
        losses = effective_losses(step)
        weights = self._current_weights(losses)
        values = losses.to(statistics_dtype(losses.device))
        self._sum = values if self._sum is None else self._sum + values
        self._count += 1
        if self._count == self.config.period_steps:
            self._means = [*self._means, self._sum / self._count][-2:]
            self._sum, self._count = None, 0
        step.weights = step.weights * weights

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self._sum, "count": self._count, "means": list(self._means)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._sum, self._count, self._means = state["sum"], state["count"], list(state["means"])
