"""Nash-MTL: the Nash bargaining solution between the tasks (Navon et al. 2022)."""

from __future__ import annotations

import torch
from pydantic import Field

from mtlhooks import functional
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.step import Step


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
    Newton's method in torch on the Gramian (:func:`mtlhooks.functional.nash_mtl`) instead of the
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

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, NashMTLConfig)
        return functional.nash_mtl(
            step.gramian(), max_iter=self.config.max_iter, tol=self.config.tol
        )
