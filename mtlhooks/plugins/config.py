"""ConFIG: the update with equal cosine to every task gradient (Liu et al. 2024)."""

from __future__ import annotations

import torch

from mtlhooks import functional
from mtlhooks.plugin import Family, Need, Plugin, Space, hookimpl
from mtlhooks.step import Step


class ConFIG(Plugin):
    """ConFIG: the direction at equal angles to every task gradient, of length Σ gᵢᵀd̂.

    Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
    ICLR 2025 (arXiv 2408.11104), Eq. 4: ``d̂ = U⁺1/‖U⁺1‖`` with U the unit gradients and
    ``d = (Σᵢ gᵢᵀd̂)·d̂`` (:func:`mtlhooks.functional.config`). The cosines are equal and
    positive when the gradients are linearly independent; otherwise d̂ is the least-squares
    compromise. Zero gradients get weight 0.
    """

    name = "config"
    family = Family.AGGREGATOR
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        return functional.config(step.gramian())
