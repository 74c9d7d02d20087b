"""IMTL-G: weights whose update projects equally on every task's unit gradient (Liu et al. 2021)."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import SolverError
from mtlhooks.method import (
    IfUndefined,
    MethodSpec,
    Property,
    check_gramian,
    is_finite,
    mean,
    nan_weights,
)
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.solvers import equal_projection_weights, min_norm_weights
from mtlhooks.step import Step


def imtl_g(gramian: Tensor, *, if_undefined: IfUndefined = "raise") -> Tensor:
    """IMTL-G: weights summing to 1 whose update has equal projections on every unit gradient.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Sec. 3.2. With ``uᵢ = gᵢ/‖gᵢ‖``
    the conditions ``dᵀuᵢ = dᵀuⱼ`` and ``Σα = 1`` give ``α ∝ S⁻¹ Ĝ⁻¹ 1`` in terms of the cosine
    matrix ``Ĝ`` (equivalent to the paper's ``g₁Uᵀ(DUᵀ)⁻¹``). For linearly dependent gradients
    ``Ĝ⁻¹`` is the pseudo-inverse, ``d ∝ U⁺1`` (with the rank decided scale-invariantly,
    :func:`mtlhooks.solvers.equal_projection_weights`); TorchJD's generalisation (Quinton &
    Rey, arXiv 2406.16232) takes ``d ∝ J⁺s`` instead: both have equal projections whenever such
    a direction exists, and differ only in how a least-squares compromise weighs the tasks
    (ours does not depend on the gradients' norms, as IMTL intends):
    no ridge, so the projections are equal to rounding (~1e-12 relative on full-rank inputs) and
    a rank-deficient input does not shrink the update. Zero gradients get weight 0.

    :param if_undefined: when ``Σα = 1`` cannot be met with a positive common projection (the
        unnormalised weights sum to ≤ 0, e.g. at a Pareto-stationary point, where the only
        equal projection is 0): the paper's normalisation would flip the update against every
        task or divide by zero. ``"raise"``: :class:`~mtlhooks.errors.SolverError`;
        ``"mgda"``: MGDA's min-norm weights (an update of ~0 at a Pareto-stationary point,
        IMTL-G's own answer there).
    """
    check_gramian(gramian)
    if not is_finite(gramian):
        return nan_weights(gramian)
    raw = equal_projection_weights(gramian)
    # the normalisation on the host copy: a few T-sized reductions, cheaper than torch dispatches
    host = raw.detach().cpu().numpy()
    if not host.any() and not bool((gramian.diagonal() > 0).any()):
        return mean(gramian)  # every gradient is zero
    total = float(host.sum())
    rounding = 4 * gramian.shape[0] * float(np.finfo(host.dtype).eps) * float(np.abs(host).sum())
    if not total > rounding:
        if if_undefined == "mgda":
            return min_norm_weights(gramian)
        raise SolverError(
            "imtl_g: the equal-projection direction has weights summing to ≤ 0, so Σα = 1 would "
            "make the update conflict with every task; use upgrad or config for such gradients"
        )
    return torch.from_numpy(host / total).to(gramian.device, gramian.dtype)


class IMTLGConfig(PluginConfig):
    if_undefined: IfUndefined = Field(
        default="mgda",
        description="Where the equal-projection weights sum to ≤ 0: 'mgda' uses MGDA's weights "
        "(noted in report.notes), 'raise' stops with a SolverError.",
    )


class IMTLG(Plugin):
    """IMTL-G: weights summing to 1 whose update has equal projections on all unit gradients.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Sec. 3.2: α with Σα = 1 such
    that ``d = Σ αᵢ gᵢ`` satisfies ``dᵀuᵢ = dᵀuⱼ`` for ``uᵢ = gᵢ/‖gᵢ‖`` (closed form
    ``α₂..T = g₁Uᵀ(DUᵀ)⁻¹``, computed from the Gramian by
    :func:`imtl_g`; linearly dependent gradients by the pseudo-inverse, as TorchJD's
    generalisation, not by a ridge). Zero gradients get weight 0. Where the equal-projection
    weights sum to ≤ 0 (Σα = 1 would flip the update against every task; at a Pareto-stationary
    point the only equal projection is 0) the plugin uses MGDA's min-norm weights and says so in
    ``report.notes`` (``if_undefined: mgda``, default), or raises a
    :class:`~mtlhooks.errors.SolverError` and writes nothing (``if_undefined: raise``).
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
        may_raise="when the equal-projection weights sum to ≤ 0; the plugin then uses MGDA's "
        "weights",
    )

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, IMTLGConfig)
        gramian = step.gramian()
        try:
            return imtl_g(gramian)
        except SolverError as error:
            if self.config.if_undefined == "raise":
                raise
            step.note(f"{error}; used MGDA's min-norm weights")
            return min_norm_weights(gramian)
