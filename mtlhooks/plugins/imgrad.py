"""IMGrad: CAGrad whose conflict aversion is set by the MGDA direction (Zhou et al. 2025)."""

from __future__ import annotations

import torch
from pydantic import Field

from mtlhooks import functional
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.step import Step


class IMGradConfig(PluginConfig):
    alpha: float = Field(
        default=0.8,
        ge=0.0,
        description="Radius α of the ball around the mean gradient, relative to its norm "
        "(the paper's 0.8).",
    )


class IMGrad(Plugin):
    """IMGrad: a CAGrad-style update made sensitive to imbalance through the MGDA direction.

    Zhou et al., "Injecting Imbalance Sensitivity for Multi-Task Learning", arXiv 2503.08006
    (2025): with g₀ the mean gradient and ``ρ = cos(g₀, g_MGDA)``,
    ``w* = argmin_{w∈Δ} (1.5 − ρ)·g_wᵀg₀ + ρ·c‖g_w‖`` with ``c = α‖g₀‖``, and
    ``d = (g₀ + c/‖g_w*‖ · g_w*) / (1 + α²)``. Solved on the Gramian as weights
    (:func:`mtlhooks.functional.imgrad`), so the task-specific parameters receive the same
    weights.
    """

    name = "imgrad"
    family = Family.AGGREGATOR
    Config = IMGradConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, IMGradConfig)
        return functional.imgrad(step.gramian(), alpha=self.config.alpha)
