"""Aligned-MTL: weights that make the task gradients' condition number 1 (Senushkin et al. 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlhooks.method import MethodSpec, check_gramian, is_finite, nan_weights
from mtlhooks.plugin import Family, Need, Plugin, Space, hookimpl
from mtlhooks.solvers import input_eps, working_dtype
from mtlhooks.step import Step


def aligned_mtl(gramian: Tensor) -> Tensor:
    """Aligned-MTL: weights that make the gradient system's condition number 1.

    Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023,
    Alg. 1: ``G = VΛVᵀ`` truncated to its numerical rank (eigenvalues above ``T·eps·λ_max``),
    ``B = √λ_min · V Λ^{-1/2} Vᵀ``, ``α = B·1`` (the official code drops preference weights, so
    do we). An all-zero Gramian gives zero weights.
    """
    check_gramian(gramian)
    if not is_finite(gramian):
        return nan_weights(gramian)
    dtype = working_dtype(gramian)
    values, vectors = torch.linalg.eigh(gramian.to(dtype))
    threshold = gramian.shape[0] * input_eps(gramian) * values.max().clamp_min(0)
    keep = values > threshold
    safe = torch.where(keep, values, torch.ones_like(values))
    smallest = torch.where(keep, values, torch.full_like(values, float("inf"))).min()
    smallest = torch.where(torch.isfinite(smallest), smallest, torch.zeros_like(smallest))
    inv_sqrt = torch.where(keep, safe.rsqrt(), torch.zeros_like(values))
    ones = torch.ones_like(values)
    weights = smallest.sqrt() * (vectors @ (inv_sqrt * (vectors.T @ ones)))
    return weights.to(gramian.dtype)


class AlignedMTL(Plugin):
    """Aligned-MTL: rescale the principal directions of the task gradients to one common norm.

    Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023,
    Algorithm 1: ``G = VΛVᵀ`` truncated to its numerical rank, ``B = √λ_min · V Λ^{-1/2} Vᵀ``,
    ``α = B·1`` (:func:`aligned_mtl`). Like the official code, no
    preference weights. An all-zero Gramian gives zero weights.
    """

    name = "aligned_mtl"
    family = Family.AGGREGATOR
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN
    method = MethodSpec(
        aligned_mtl,
        "Senushkin et al. 2023",
        frozenset(),
        notes=(
            "scale-invariant and permutation-equivariant in exact arithmetic only: the "
            "eigendecomposition of G loses λ_min when gradient norms differ by >1e4"
        ),
    )

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        return aligned_mtl(step.gramian())
