"""CAGrad: the update near the mean gradient that best helps the worst task (Liu et al. 2021)."""

from __future__ import annotations

import torch
from pydantic import Field

from mtlhooks import functional
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.step import Step


class CAGradConfig(PluginConfig):
    c: float = Field(
        default=0.4,
        ge=0.0,
        description="Radius of the ball around the mean gradient, relative to its norm (the "
        "reference uses 0.4 or 0.5); 0 gives the mean gradient.",
    )


class CAGrad(Plugin):
    """CAGrad: the update within c‖g₀‖ of the mean gradient g₀ that maximises the worst task's gain.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021,
    Algorithm 1: ``w = argmin_{w∈Δ} g_wᵀg₀ + c‖g₀‖‖g_w‖`` and
    ``d = (g₀ + c‖g₀‖/‖g_w‖ · g_w) / (1 + c²)`` (the reference code's ``rescale=1``), solved on
    the Gramian as weights (:func:`mtlhooks.functional.cagrad`), so the task-specific parameters
    receive the same weights. ``c = 0`` gives the mean of the task gradients. The update is on
    the scale of the mean gradient, as in the paper; the reference code multiplies it by T
    ("to match the sum loss"): under SGD, a T times larger learning rate for the shared
    parameters matches it.
    """

    name = "cagrad"
    family = Family.AGGREGATOR
    Config = CAGradConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, CAGradConfig)
        return functional.cagrad(step.gramian(), c=self.config.c)
