"""FairGrad: α-fair weights between the tasks (Ban & Ji 2024)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.method import MethodSpec, Property
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.solvers import fair_weights
from mtlhooks.step import Step


def fairgrad(
    gramian: Tensor, *, alpha: float = 1.0, max_iter: int = 100, tol: float | None = None
) -> Tensor:
    """FairGrad: α-fair weights, ``w > 0`` with ``(Gw)ᵢ = wᵢ^{-1/α}``.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, Eq. (8). Solved by
    a damped Newton method in log space on a strictly convex potential (the reference uses
    scipy's least_squares); reliable to ~1e-9 for gradient norms within ~1e4 of each other; with
    α ≠ 1 and norms spread much wider it may raise :class:`SolverError` (never a fallback).
    ``alpha = 1`` is Nash-MTL. ``G → cG`` gives ``w → c^{-α/(1+α)} w``.

    :raises SolverError: as :func:`nash_mtl` (no solution, or no convergence).
    """
    if alpha <= 0:
        raise InputError(f"fairgrad: alpha must be > 0, got {alpha}")
    return fair_weights(gramian, alpha, max_iter, tol, "fairgrad")


class FairGradConfig(PluginConfig):
    alpha: float = Field(
        default=1.0,
        gt=0.0,
        description="Fairness exponent α: 1 is Nash-MTL's proportional fairness, larger is "
        "closer to max-min fairness (the reference's run scripts use 2.0).",
    )
    max_iter: int = Field(
        default=100, ge=1, description="Newton iterations before the solver reports failure."
    )
    tol: float | None = Field(
        default=None,
        gt=0.0,
        description="Tolerance of the solver; default 1e-9 in float64, 1e-4 in lower precision.",
    )


class FairGrad(Plugin):
    """FairGrad: weights w > 0 with (Gw)ᵢ = wᵢ^(−1/α), the α-fair allocation of progress.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, Eq. (8). Solved by
    Newton's method in torch on the Gramian (:func:`fairgrad`) instead of the
    reference's scipy ``least_squares``; ``alpha = 1`` gives Nash-MTL's weights. When no solution
    exists or the solver does not converge a :class:`~mtlhooks.errors.SolverError` is raised and
    nothing is written. Default α = 1, the reference class's default (its run scripts tune α
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
            "when no solution exists (zero gradient, Pareto-stationary gradients) or when "
            "Newton's method does not converge (norms spread over more than ~1e4 with α ≠ 1)"
        ),
        notes="α = 1 (Nash-MTL's equations); weights(cG) = c^(−α/(1+α))·weights(G) in general",
    )

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, FairGradConfig)
        return fairgrad(
            step.gramian(),
            alpha=self.config.alpha,
            max_iter=self.config.max_iter,
            tol=self.config.tol,
        )
