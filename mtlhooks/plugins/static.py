"""Static loss weights: equal weights by default, or fixed per-task weights."""

from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator

from mtlhooks.plugin import Family, Plugin, PluginConfig, Setup, hookimpl
from mtlhooks.step import Step


class StaticConfig(PluginConfig):
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Weight per task; tasks not listed get `default`.",
    )
    default: float = Field(default=1.0, ge=0.0, description="Weight of tasks not in `weights`.")
    normalize: bool = Field(
        default=False, description="Divide the weights by the number of tasks (a mean, not a sum)."
    )

    @field_validator("weights")
    @classmethod
    def _finite_nonnegative(cls, weights: dict[str, float]) -> dict[str, float]:
        bad = {task: w for task, w in weights.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ValueError(f"weights must be finite and >= 0, got {bad}")
        return weights


class Static(Plugin):
    """Fixed loss weights Σ wᵢLᵢ: equal weights (a plain sum) unless configured.

    Equal weighting is the baseline every multi-task paper compares against; with the default
    options it reproduces ``sum(losses).backward()`` exactly.
    """

    name = "static"
    family = Family.LOSS_SCALING
    Config = StaticConfig

    def __init__(self, config: StaticConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        values = [config.weights.get(task, config.default) for task in setup.tasks]
        scale = 1.0 / setup.num_tasks if config.normalize else 1.0
        self._weights = torch.tensor(values, dtype=torch.float64) * scale
        self._converted = self._weights

    @classmethod
    def check_config(cls, config: PluginConfig, tasks: tuple[str, ...]) -> None:
        assert isinstance(config, StaticConfig)
        unknown = sorted(set(config.weights) - set(tasks))
        if unknown:
            raise ValueError(f"field 'weights': unknown task(s) {unknown}; tasks are {list(tasks)}")

    def constant_weights(self) -> torch.Tensor:
        return self._weights

    @hookimpl
    def mtl_scale_losses(self, step: Step) -> None:
        weights = self._converted
        if weights.dtype != step.weights.dtype or weights.device != step.weights.device:
            # Kept converted (from the float64 original): the losses keep their dtype and
            # device from step to step.
            weights = self._converted = self._weights.to(step.weights.device, step.weights.dtype)
        step.weights = step.weights * weights
