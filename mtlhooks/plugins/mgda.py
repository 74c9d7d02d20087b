"""MGDA: the minimum-norm point of the convex hull of the task gradients (Sener & Koltun 2018)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mtlhooks import functional, stats
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.step import Step


class MGDAConfig(PluginConfig):
    normalization: Literal["none", "l2", "loss", "loss+"] = Field(
        default="none",
        description="Divide each gᵢ before solving by 1, ‖gᵢ‖, Lᵢ or Lᵢ·‖gᵢ‖ (Sener & Koltun's "
        "options).",
    )


class MGDA(Plugin):
    """MGDA: the minimum-norm convex combination of the task gradients, solved exactly.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018:
    α = argmin_{α∈Δ} ‖Σ αᵢ gᵢ‖², solved on the Gramian. The update d = Σ αᵢ gᵢ satisfies
    ⟨d, gᵢ⟩ ≥ ‖d‖² for every task (equality where αᵢ > 0).
    With a normalisation, the problem is solved for gᵢ/sᵢ and the weights mapped back (αᵢ/sᵢ);
    a zero scale counts as 1. In space ``features`` this is MGDA-UB.
    """

    name = "mgda"
    family = Family.AGGREGATOR
    Config = MGDAConfig
    spaces = (Space.PARAMS, Space.FEATURES, Space.LAST_SHARED)
    needs = Need.GRAMIAN

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, MGDAConfig)
        gramian = step.gramian()
        mode = self.config.normalization
        if mode == "none":
            return functional.mgda(gramian)
        norms = stats.norms(gramian)
        losses = (step.losses * step.weights).to(gramian.dtype).abs()
        scales = {"l2": norms, "loss": losses, "loss+": losses * norms}[mode]
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        alphas = functional.mgda(gramian / (scales[:, None] * scales[None, :]))
        return alphas / scales
