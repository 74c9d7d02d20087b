"""IMGrad: CAGrad whose conflict aversion is set by the MGDA direction (Zhou et al. 2025)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.method import MethodSpec, Property, check_gramian, is_finite, nan_weights
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.solvers import (
    cancellation_level,
    conflict_averse_weights,
    gramian_scales,
    mean_gradient,
    min_norm_weights,
    worst_case_weights,
)
from mtlhooks.step import Step


def imgrad(gramian: Tensor, *, alpha: float = 0.8) -> Tensor:
    """IMGrad: CAGrad-style update whose conflict aversion is set by the MGDA direction.

    Zhou et al., "IMGrad" (2025), as summarised in METHODS.md: ``ρ = cos(g₀, g_MGDA)``,
    ``w* = argmin_{w∈Δ} (1.5 − ρ) g_wᵀg₀ + ρ c‖g_w‖`` with ``c = α‖g₀‖``, and
    ``d = (g₀ + c/‖g_w*‖ · g_w*) / (1 + α²)``. ``ρ ∈ [0, 1]`` because MGDA's direction has a
    nonnegative inner product with every gradient; ``ρ = 0`` when either direction is zero.
    """
    check_gramian(gramian)
    if not 0 <= alpha <= 1e6:
        raise InputError(f"imgrad: alpha must be in [0, 1e6], got {alpha}")
    if not is_finite(gramian):
        return nan_weights(gramian)
    matrix, uniform, norm_mean = mean_gradient(gramian)
    if norm_mean == 0:
        return (uniform / (1 + alpha**2)).to(gramian.dtype)
    descent = min_norm_weights(matrix)
    norm_descent = float((descent @ matrix @ descent).clamp_min(0).sqrt())
    cosine = 0.0
    # a min-norm point within rounding of 0 (Pareto-stationary gradients) has no direction
    level = cancellation_level(matrix) * float((gramian_scales(matrix) * descent).sum())
    if norm_descent > level:
        cosine = min(1.0, max(0.0, float(uniform @ matrix @ descent) / (norm_mean * norm_descent)))
    radius = cosine * alpha * norm_mean / (1.5 - cosine)
    worst = worst_case_weights(matrix, matrix @ uniform, radius)
    return conflict_averse_weights(matrix, worst, alpha, norm_mean).to(gramian.dtype)


class IMGradConfig(PluginConfig):
    alpha: float = Field(
        default=0.8,
        ge=0.0,
        le=1e6,
        description="Radius α of the ball around the mean gradient, relative to its norm "
        "(the paper's 0.8).",
    )


class IMGrad(Plugin):
    """IMGrad: a CAGrad-style update made sensitive to imbalance through the MGDA direction.

    Zhou et al., "Injecting Imbalance Sensitivity for Multi-Task Learning", arXiv 2503.08006
    (2025): with g₀ the mean gradient and ``ρ = cos(g₀, g_MGDA)``,
    ``w* = argmin_{w∈Δ} (1.5 − ρ)·g_wᵀg₀ + ρ·c‖g_w‖`` with ``c = α‖g₀‖``, and
    ``d = (g₀ + c/‖g_w*‖ · g_w*) / (1 + α²)``. Solved on the Gramian as weights
    (:func:`imgrad`), so the task-specific parameters receive the same
    weights.
    """

    name = "imgrad"
    family = Family.AGGREGATOR
    Config = IMGradConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN
    method = MethodSpec(
        imgrad,
        "Zhou et al. 2025",
        frozenset(
            {Property.SCALE_INVARIANT, Property.PERMUTATION_EQUIVARIANT, Property.NONNEGATIVE}
        ),
        notes="α = 0.8; conflict aversion set by cos(g₀, g_MGDA)",
    )

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, IMGradConfig)
        return imgrad(step.gramian(), alpha=self.config.alpha)
