"""ConFIG: the update with equal cosine to every task gradient (Liu et al. 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlhooks.method import MethodSpec, Property, check_gramian, is_finite, nan_weights
from mtlhooks.plugin import Family, Need, Plugin, Space, hookimpl
from mtlhooks.solvers import gramian_scales, normalize_gramian, psd_pinv_solve, working_dtype
from mtlhooks.step import Step


def config(gramian: Tensor) -> Tensor:
    """ConFIG: the direction with equal cosine to every gradient, with length ``Σ gᵢᵀd̂``.

    Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
    ICLR 2025 (arXiv 2408.11104), Eq. 4: ``d̂ = U⁺1 / ‖U⁺1‖`` with U the unit gradients,
    ``d = (Σᵢ gᵢᵀd̂) d̂``. In Gramian form ``U⁺1 = Σ zᵢ uᵢ`` with ``z = Ĝ⁺1`` (pseudo-inverse of the
    cosine matrix). Zero gradients get weight 0. The cosines are equal and positive only when the
    gradients are linearly independent; otherwise ``d̂`` is the least-squares compromise.
    """
    check_gramian(gramian)
    if not is_finite(gramian):
        return nan_weights(gramian)
    dtype = working_dtype(gramian)
    matrix = gramian.to(dtype)
    scales = gramian_scales(matrix)
    nonzero = scales > 0
    cosine = normalize_gramian(matrix, scales)
    coefficients = psd_pinv_solve(cosine, nonzero.to(dtype))
    raw = torch.where(nonzero, coefficients / torch.where(nonzero, scales, 1.0), 0.0)
    squared_norm = (raw @ matrix @ raw).clamp_min(0)
    if not bool(squared_norm > 0):
        return torch.zeros_like(raw).to(gramian.dtype)
    length = (matrix @ raw).sum()
    return (length / squared_norm * raw).to(gramian.dtype)


class ConFIG(Plugin):
    """ConFIG: the direction at equal angles to every task gradient, of length Σ gᵢᵀd̂.

    Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
    ICLR 2025 (arXiv 2408.11104), Eq. 4: ``d̂ = U⁺1/‖U⁺1‖`` with U the unit gradients and
    ``d = (Σᵢ gᵢᵀd̂)·d̂`` (:func:`config`). The cosines are equal and
    positive when the gradients are linearly independent; otherwise d̂ is the least-squares
    compromise. Zero gradients get weight 0.
    """

    name = "config"
    family = Family.AGGREGATOR
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN
    method = MethodSpec(
        config,
        "Liu et al. 2024",
        frozenset({Property.SCALE_INVARIANT, Property.PERMUTATION_EQUIVARIANT}),
        notes="equal positive cosines (non-conflicting) only for linearly independent gradients",
    )

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        return config(step.gramian())
