"""Nash-MTL: the Nash bargaining solution between the tasks (Navon et al. 2022)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.method import MethodSpec, Property
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.solvers import fair_weights
from mtlhooks.step import Step


def nash_mtl(gramian: Tensor, *, max_iter: int = 100, tol: float | None = None) -> Tensor:
    """Nash-MTL: the Nash bargaining solution, ``α > 0`` with ``(Gα)ᵢ = 1/αᵢ``.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Thm. 5.1. Instead of the
    reference's cvxpy CCP loop, a damped Newton method on the strictly convex
    ``½αᵀGα − Σ log αᵢ`` in log space (torch-native, in scaled coordinates; see
    :func:`_fair_weights`). Not scale-invariant: ``G → cG`` gives ``α → α/√c``,
    so unscale AMP-scaled gradients first. The reference's update-norm clipping is not part of
    the weighting.

    :param tol: on ``max |αᵢ(Gα)ᵢ − 1|``; default 1e-9 (float64) or 1e-4 (lower precision).
    :raises SolverError: when Newton's method does not converge in ``max_iter`` iterations,
        which happens exactly when no solution exists (a zero gradient, or gradients with a
        vanishing nonnegative combination). Never falls back to other weights.
    """
    return fair_weights(gramian, 1.0, max_iter, tol, "nash_mtl")


class NashMTLConfig(PluginConfig):
    max_iter: int = Field(
        default=100, ge=1, description="Newton iterations before the solver reports failure."
    )
    tol: float | None = Field(
        default=None,
        gt=0.0,
        description="Tolerance on max |αᵢ(Gα)ᵢ − 1|; default 1e-9 in float64, 1e-4 in lower "
        "precision.",
    )


class NashMTL(Plugin):
    """Nash-MTL: weights α > 0 with (Gα)ᵢ = 1/αᵢ, the Nash bargaining solution.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Theorem 5.1. Solved by
    Newton's method in torch on the Gramian (:func:`nash_mtl`) instead of the
    reference's cvxpy loop. When no solution exists (a zero task gradient, or gradients with a
    vanishing nonnegative combination) or Newton's method does not converge, a
    :class:`~mtlhooks.errors.SolverError` is raised and nothing is written: the reference's
    silent fall-back to earlier or equal weights is never taken.

    The update always has norm ‖d‖ = √T in the gradient space (αᵀGα = Σ αᵢ(Gα)ᵢ = T), whatever
    the scale of the gradients. The reference then clips the shared parameters' gradient to norm
    ``max_norm = 1`` with ``torch.nn.utils.clip_grad_norm_``; that is deliberately not an option
    here: expressed as a factor on α it would also shrink the task-specific parameters' gradients,
    which the reference leaves alone. To reproduce the reference, call
    ``torch.nn.utils.clip_grad_norm_(shared.parameters(), 1.0)`` after ``mtl.backward``.
    """

    name = "nash_mtl"
    family = Family.AGGREGATOR
    Config = NashMTLConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN
    method = MethodSpec(
        nash_mtl,
        "Navon et al. 2022",
        frozenset(
            {Property.NON_CONFLICTING, Property.PERMUTATION_EQUIVARIANT, Property.NONNEGATIVE}
        ),
        scale_exponent=-0.5,
        may_raise="when no solution exists (zero gradient, Pareto-stationary gradients)",
    )

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, NashMTLConfig)
        return nash_mtl(step.gramian(), max_iter=self.config.max_iter, tol=self.config.tol)
