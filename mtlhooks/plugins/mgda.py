"""MGDA: the minimum-norm point of the convex hull of the task gradients (Sener & Koltun 2018)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks import stats
from mtlhooks.method import MethodSpec, Property, check_gramian, is_finite, nan_weights
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.solvers import min_norm_weights
from mtlhooks.step import Step


def mgda(gramian: Tensor) -> Tensor:
    """MGDA: weights of the minimum-norm point of the convex hull of the gradients.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
    (Désidéri's MGDA, 2012): ``α = argmin_{α ∈ Δ} ‖Σ αᵢ gᵢ‖²``.

    Solved exactly (active set with closed-form steps, :func:`mtlhooks.solvers.simplex_qp`)
    rather than by the reference Frank-Wolfe loop. The KKT conditions ``⟨d, gᵢ⟩ ≥ ‖d‖²``, with
    equality where ``αᵢ > 0``, hold to ~1e-10 relative in float64. No gradient normalisation is
    applied here: normalise the Gramian first (``normalize_gramian``) for the "l2" variant.
    """
    check_gramian(gramian)
    if not is_finite(gramian):
        return nan_weights(gramian)
    return min_norm_weights(gramian)


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
    method = MethodSpec(
        mgda,
        "Sener & Koltun 2018",
        frozenset(
            {
                Property.NON_CONFLICTING,
                Property.SCALE_INVARIANT,
                Property.PERMUTATION_EQUIVARIANT,
                Property.NONNEGATIVE,
            }
        ),
    )

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, MGDAConfig)
        gramian = step.gramian()
        mode = self.config.normalization
        if mode == "none":
            return mgda(gramian)
        norms = stats.norms(gramian)
        losses = (step.losses * step.weights).to(gramian.dtype).abs()
        scales = {"l2": norms, "loss": losses, "loss+": losses * norms}[mode]
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        alphas = mgda(gramian / (scales[:, None] * scales[None, :]))
        return alphas / scales
