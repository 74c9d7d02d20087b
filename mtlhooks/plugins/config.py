"""ConFIG: the update with equal cosine to every task gradient (Liu et al. 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlhooks.method import MethodSpec, Property, check_gramian, is_finite, nan_weights
from mtlhooks.plugin import Family, Need, Plugin, Space, hookimpl
from mtlhooks.solvers import equal_projection_weights, input_eps
from mtlhooks.step import Step


def config(gramian: Tensor) -> Tensor:
    """ConFIG: the direction with equal cosine to every gradient, with length ``Σ gᵢᵀd̂``.

    Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
    ICLR 2025 (arXiv 2408.11104), Eq. 4: ``d̂ = U⁺1 / ‖U⁺1‖`` with U the unit gradients,
    ``d = (Σᵢ gᵢᵀd̂) d̂``. In Gramian form ``U⁺1 = Σ zᵢ uᵢ`` with ``z = Ĝ⁺1`` (pseudo-inverse of the
    cosine matrix, :func:`mtlhooks.solvers.equal_projection_weights`). Zero gradients get
    weight 0, and so do all when ``U⁺1`` vanishes to rounding (``d̂`` undefined, e.g. two
    opposite gradients). The cosines are equal and positive only when the gradients are linearly
    independent; otherwise ``d̂`` is the least-squares compromise, with the rank decided at
    ``64·T·eps`` of the input's precision on the eigenvalues of ``Ĝ`` (singular values of the
    unit gradients below ~2e-6 of the largest in float64 count as zero: the Gramian cannot
    resolve them), so that a common scale of G does not change the answer. TorchJD's
    ``torch.linalg.pinv`` of the unit gradients themselves resolves singular values down to
    ``P·eps``; from the Gramian alone that is out of reach.
    """
    check_gramian(gramian)
    if not is_finite(gramian):
        return nan_weights(gramian)
    raw = equal_projection_weights(gramian)
    matrix = gramian.to(raw.dtype)
    squared_norm = raw @ matrix @ raw
    # ‖U⁺1‖² within its rounding error: U⁺1 vanishes (1 is orthogonal to the span of the
    # unit gradients, e.g. two opposite gradients) and d̂ would be the direction of noise
    rounding = 8 * matrix.shape[0] * input_eps(gramian) * (raw.abs() @ matrix.abs() @ raw.abs())
    if not bool(squared_norm > rounding):
        return torch.zeros_like(gramian[0])
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
