"""Aligned-MTL: weights that make the task gradients' condition number 1 (Senushkin et al. 2023)."""

from __future__ import annotations

import torch

from mtlhooks import functional
from mtlhooks.plugin import Family, Need, Plugin, Space, hookimpl
from mtlhooks.step import Step


class AlignedMTL(Plugin):
    """Aligned-MTL: rescale the principal directions of the task gradients to one common norm.

    Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023,
    Algorithm 1: ``G = VΛVᵀ`` truncated to its numerical rank, ``B = √λ_min · V Λ^{-1/2} Vᵀ``,
    ``α = B·1`` (:func:`mtlhooks.functional.aligned_mtl`). Like the official code, no
    preference weights. An all-zero Gramian gives zero weights.
    """

    name = "aligned_mtl"
    family = Family.AGGREGATOR
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        return functional.aligned_mtl(step.gramian())
