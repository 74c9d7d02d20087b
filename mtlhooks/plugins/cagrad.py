"""CAGrad: the update near the mean gradient that best helps the worst task (Liu et al. 2021)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.method import MethodSpec, Property, Variant, check_gramian, is_finite, nan_weights
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.solvers import conflict_averse_weights, mean_gradient, worst_case_weights
from mtlhooks.step import Step


def cagrad(gramian: Tensor, *, c: float = 0.4) -> Tensor:
    """CAGrad: the update in the ball of radius ``c‖g₀‖`` around the mean that helps the worst task.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021, Alg. 1:
    ``w = argmin_{w∈Δ} g_wᵀg₀ + c‖g₀‖‖g_w‖``, ``d = (g₀ + c‖g₀‖/‖g_w‖ · g_w) / (1 + c²)``
    (the reference code's ``rescale=1``). ``c = 0`` gives the mean. When ``g_w = 0`` the
    second term is dropped, as the reference's ``+1e-8`` effectively does.
    """
    check_gramian(gramian)
    if not 0 <= c <= 1e6:
        raise InputError(f"cagrad: c must be in [0, 1e6], got {c}")
    if not is_finite(gramian):
        return nan_weights(gramian)
    matrix, uniform, norm_mean = mean_gradient(gramian)
    if c == 0 or norm_mean == 0:
        return (uniform / (1 + c**2)).to(gramian.dtype)
    worst = worst_case_weights(matrix, matrix @ uniform, c * norm_mean)
    return conflict_averse_weights(matrix, worst, c, norm_mean).to(gramian.dtype)


class CAGradConfig(PluginConfig):
    c: float = Field(
        default=0.4,
        ge=0.0,
        le=1e6,
        description="Radius of the ball around the mean gradient, relative to its norm (the "
        "reference uses 0.4 or 0.5); 0 gives the mean gradient; ≥ 1 never conflicts; at most "
        "1e6 (beyond, the update is the same and c² overflows).",
    )


class CAGrad(Plugin):
    """CAGrad: the update within c‖g₀‖ of the mean gradient g₀ that maximises the worst task's gain.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021,
    Algorithm 1: ``w = argmin_{w∈Δ} g_wᵀg₀ + c‖g₀‖‖g_w‖`` and
    ``d = (g₀ + c‖g₀‖/‖g_w‖ · g_w) / (1 + c²)`` (the reference code's ``rescale=1``), solved on
    the Gramian as weights (:func:`cagrad`), so the task-specific parameters
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
    method = MethodSpec(
        cagrad,
        "Liu et al. 2021",
        frozenset(
            {Property.SCALE_INVARIANT, Property.PERMUTATION_EQUIVARIANT, Property.NONNEGATIVE}
        ),
        variants=(
            Variant(
                "c ≥ 1",
                ({"c": 1.0}, {"c": 2.5}),
                frozenset(
                    {
                        Property.NON_CONFLICTING,
                        Property.SCALE_INVARIANT,
                        Property.PERMUTATION_EQUIVARIANT,
                        Property.NONNEGATIVE,
                    }
                ),
            ),
        ),
        notes="c = 0.4; c = 0 is the mean; with c ≥ 1 the ball around g₀ holds d = 0, so the "
        "best worst-case gain is ≥ 0: non-conflicting (for c < 1 it can conflict)",
    )

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, CAGradConfig)
        return cagrad(step.gramian(), c=self.config.c)
