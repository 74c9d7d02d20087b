"""IMTL-G: weights whose update projects equally on every task's unit gradient (Liu et al. 2021)."""

from __future__ import annotations

import torch
from pydantic import Field

from mtlhooks import functional
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.step import Step


class IMTLGConfig(PluginConfig):
    eps: float = Field(
        default=1e-8,
        ge=0.0,
        description="Ridge added to the cosine matrix so that collinear gradients give finite "
        "weights (at least the dtype's own resolution is used).",
    )


class IMTLG(Plugin):
    """IMTL-G: weights summing to 1 whose update has equal projections on all unit gradients.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Sec. 3.2: α with Σα = 1 such
    that ``d = Σ αᵢ gᵢ`` satisfies ``dᵀuᵢ = dᵀuⱼ`` for ``uᵢ = gᵢ/‖gᵢ‖`` (closed form
    ``α₂..T = g₁Uᵀ(DUᵀ)⁻¹``, computed from the Gramian by
    :func:`mtlhooks.functional.imtl_g`). Zero gradients get weight 0. Raises
    :class:`~mtlhooks.errors.SolverError`, never substituting other weights, when the
    equal-projection weights sum to ≤ 0.
    """

    name = "imtl_g"
    family = Family.AGGREGATOR
    Config = IMTLGConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, IMTLGConfig)
        return functional.imtl_g(step.gramian(), eps=self.config.eps)
