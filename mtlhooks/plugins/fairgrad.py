"""FairGrad: α-fair weights between the tasks (Ban & Ji 2024)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.method import IfUndefined, MethodSpec, Property
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.plugins.nash_mtl import bargaining_weights
from mtlhooks.solvers import fair_weights, fair_weights_or_fallback
from mtlhooks.step import Step


def fairgrad(
    gramian: Tensor,
    *,
    alpha: float = 1.0,
    max_iter: int = 100,
    tol: float | None = None,
    if_undefined: IfUndefined = "raise",
) -> Tensor:
    """FairGrad: α-fair weights, ``w > 0`` with ``(Gw)ᵢ = wᵢ^{-1/α}``.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, Eq. (8). Solved by
    a damped Newton method in log space on a strictly convex potential (the reference uses
    scipy's least_squares), with the acceptance rule of :func:`nash_mtl`. ``alpha = 1`` is
    Nash-MTL. ``G → cG`` gives ``w → c^{-α/(1+α)} w``. Known limitation: with α ≠ 1 and
    gradient norms spread over many orders of magnitude (≳ 1e8), the equations are so badly
    conditioned (a tiny task conflicting with a huge one needs an enormous weight whose progress
    is a cancellation) that no solution can be verified, or Newton's method stalls:
    :class:`SolverError` (``if_undefined="mgda"``: MGDA's weights), never unverified weights.

    :param if_undefined: as :func:`nash_mtl`.
    """
    if alpha <= 0:
        raise InputError(f"fairgrad: alpha must be > 0, got {alpha}")
    if if_undefined == "raise":
        return fair_weights(gramian, alpha, max_iter, tol, "fairgrad")
    return fair_weights_or_fallback(gramian, alpha, max_iter, tol, "fairgrad")[0]


class FairGradConfig(PluginConfig):
    alpha: float = Field(
        default=1.0,
        gt=0.0,
        le=1e3,
        description="Fairness exponent α: 1 is Nash-MTL's proportional fairness, larger is "
        "closer to max-min fairness (the reference's run scripts use 2.0).",
    )
    max_iter: int = Field(
        default=100, ge=1, description="Newton iterations before the solver reports failure."
    )
    tol: float | None = Field(
        default=None,
        gt=0.0,
        le=1e-2,
        description="Tolerance of the solver; default 1e-9 (1e-4 on MPS, which has no float64).",
    )
    if_undefined: IfUndefined = Field(
        default="mgda",
        description="Where no solution exists or none can be verified: 'mgda' (zero-gradient "
        "tasks get weight 0, Pareto-stationary gradients MGDA's weights; noted in "
        "report.notes) or 'raise' (SolverError), as for nash_mtl.",
    )


class FairGrad(Plugin):
    """FairGrad: weights w > 0 with (Gw)ᵢ = wᵢ^(−1/α), the α-fair allocation of progress.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, Eq. (8). Solved by
    Newton's method in torch on the Gramian (:func:`fairgrad`) instead of the
    reference's scipy ``least_squares``; ``alpha = 1`` gives Nash-MTL's weights. Where no
    solution exists or none can be verified (Pareto-stationary gradients, a zero gradient, or
    with α ≠ 1 gradient norms spread too widely) the update follows ``if_undefined`` exactly
    as for :class:`~mtlhooks.plugins.nash_mtl.NashMTL` (default: MGDA's weights, noted in
    ``report.notes``; ``raise``: a :class:`~mtlhooks.errors.SolverError` and nothing is
    written). Default α = 1, the reference class's default (its run scripts tune α
    per benchmark, e.g. 2.0 on QM9). The reference code then multiplies the shared update by T
    and clips its norm to 1 (``max_norm``); neither is part of the weighting, so neither is done
    here: call ``torch.nn.utils.clip_grad_norm_(shared.parameters(), 1.0)`` after
    ``mtl.backward`` to clip.
    """

    name = "fairgrad"
    family = Family.AGGREGATOR
    Config = FairGradConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN
    method = MethodSpec(
        fairgrad,
        "Ban & Ji 2024",
        frozenset(
            {Property.NON_CONFLICTING, Property.PERMUTATION_EQUIVARIANT, Property.NONNEGATIVE}
        ),
        scale_exponent=-0.5,
        may_raise=(
            "where no solution exists or none can be verified (a zero gradient, "
            "Pareto-stationary gradients or nearly so; with α ≠ 1, norms spread over ≳ 1e8); "
            "the plugin then uses MGDA's weights"
        ),
        notes="α = 1 (Nash-MTL's equations); weights(cG) = c^(−α/(1+α))·weights(G) in general",
    )

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, FairGradConfig)
        return bargaining_weights(
            step,
            step.gramian(),
            self.config.alpha,
            max_iter=self.config.max_iter,
            tol=self.config.tol,
            if_undefined=self.config.if_undefined,
            name=self.name,
        )
