"""IMTL-G: weights whose update projects equally on every task's unit gradient (Liu et al. 2021)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import SolverError
from mtlhooks.method import MethodSpec, Property, check_gramian, is_finite, mean, nan_weights
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.solvers import default_ridge, gramian_scales, normalize_gramian, working_dtype
from mtlhooks.step import Step


def imtl_g(gramian: Tensor, *, eps: float = 1e-8) -> Tensor:
    """IMTL-G: weights summing to 1 whose update has equal projections on every unit gradient.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Sec. 3.2. With ``uᵢ = gᵢ/‖gᵢ‖``
    the conditions ``dᵀuᵢ = dᵀuⱼ`` and ``Σα = 1`` give ``α ∝ S⁻¹ Ĝ⁻¹ 1`` in terms of the cosine
    matrix ``Ĝ`` (equivalent to the paper's ``g₁Uᵀ(DUᵀ)⁻¹``). ``Ĝ`` is regularised as
    ``Ĝ + eps·I`` so collinear gradients give finite weights. Zero gradients get weight 0.

    :raises SolverError: when ``Σα = 1`` cannot be met with a positive common projection (the
        unnormalised weights sum to ≤ 0): the paper's normalisation would then flip the update
        against every task or divide by zero.
    """
    check_gramian(gramian)
    if not is_finite(gramian):
        return nan_weights(gramian)
    dtype = working_dtype(gramian)
    matrix = gramian.to(dtype)
    scales = gramian_scales(matrix)
    nonzero = scales > 0
    if not bool(nonzero.any()):
        return mean(gramian)
    cosine = normalize_gramian(matrix, scales)
    both = nonzero.unsqueeze(0) & nonzero.unsqueeze(1)
    eye = torch.eye(matrix.shape[0], dtype=dtype, device=matrix.device)
    # below the dtype's resolution the ridge would not regularise anything (float32)
    ridge = max(eps, default_ridge(dtype))
    system = torch.where(both, cosine, eye) + ridge * eye
    solution = torch.linalg.solve(system, nonzero.to(dtype))
    raw = torch.where(nonzero, solution / torch.where(nonzero, scales, 1.0), 0.0)
    total = raw.sum()
    if not bool(total > 4 * matrix.shape[0] * torch.finfo(dtype).eps * raw.abs().sum()):
        raise SolverError(
            "imtl_g: the equal-projection direction has weights summing to ≤ 0, so Σα = 1 would "
            "make the update conflict with every task; use upgrad or config for such gradients"
        )
    return (raw / total).to(gramian.dtype)


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
    :func:`imtl_g`). Zero gradients get weight 0. Raises
    :class:`~mtlhooks.errors.SolverError`, never substituting other weights, when the
    equal-projection weights sum to ≤ 0.
    """

    name = "imtl_g"
    family = Family.AGGREGATOR
    Config = IMTLGConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN
    method = MethodSpec(
        imtl_g,
        "Liu et al. 2021",
        frozenset({Property.SCALE_INVARIANT, Property.PERMUTATION_EQUIVARIANT}),
        may_raise="when the equal-projection weights sum to ≤ 0",
    )

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, IMTLGConfig)
        return imtl_g(step.gramian(), eps=self.config.eps)
