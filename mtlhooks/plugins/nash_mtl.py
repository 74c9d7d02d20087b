"""Nash-MTL: the Nash bargaining solution between the tasks (Navon et al. 2022)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.method import IfUndefined, MethodSpec, Property
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Setup, Space, hookimpl
from mtlhooks.solvers import fair_weights, fair_weights_or_fallback
from mtlhooks.step import Step


def nash_mtl(
    gramian: Tensor,
    *,
    max_iter: int = 100,
    tol: float | None = None,
    if_undefined: IfUndefined = "raise",
) -> Tensor:
    """Nash-MTL: the Nash bargaining solution, ``α > 0`` with ``(Gα)ᵢ = 1/αᵢ``.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Thm. 5.1. Instead of the
    reference's cvxpy CCP loop, a damped Newton method on the strictly convex
    ``½αᵀGα − Σ log αᵢ`` in log space (torch-native, in scaled coordinates, float64; see
    :func:`mtlhooks.solvers.fair_weights`). Not scale-invariant: ``G → cG`` gives
    ``α → α/√c``, so unscale AMP-scaled gradients first. The reference's update-norm clipping
    is not part of the weighting.

    The weights are returned only when they provably solve the equations: to ``tol`` (default
    1e-9), or, where rounding keeps Newton's method from getting there, to 1e-4 including the
    rounding error of ``(Gα)ᵢ``.

    :param if_undefined: what to do where no solution exists or none can be verified (a zero
        gradient; gradients with a vanishing nonnegative combination, or so nearly that
        ``(Gα)ᵢ`` is lost in rounding): ``"raise"`` a :class:`~mtlhooks.errors.SolverError`, or
        ``"mgda"``: zero-gradient tasks get weight 0 and the others are solved for; where the
        others are Pareto-stationary, MGDA's min-norm weights (an update of ~0 on the shared
        parameters) — the plugin's default, see :class:`NashMTL`.
    """
    if if_undefined == "raise":
        return fair_weights(gramian, 1.0, max_iter, tol, "nash_mtl")
    return fair_weights_or_fallback(gramian, 1.0, max_iter, tol, "nash_mtl")[0]


class NashMTLConfig(PluginConfig):
    max_iter: int = Field(
        default=100, ge=1, description="Newton iterations before the solver reports failure."
    )
    tol: float | None = Field(
        default=None,
        gt=0.0,
        le=1e-2,
        description="Tolerance on max |αᵢ(Gα)ᵢ − 1|; default 1e-9 (1e-4 on MPS, which has no "
        "float64).",
    )
    update_weights_every: int = Field(
        default=1,
        ge=1,
        description="Solve for new weights at every N-th aggregation only and reuse the last "
        "ones in between, as the reference's option (default 1, the paper; the gradients are "
        "still taken at every step, only the solve is saved).",
    )
    if_undefined: IfUndefined = Field(
        default="mgda",
        description="Where no bargaining solution exists (Pareto-stationary gradients, a zero "
        "gradient): 'mgda' gives zero-gradient tasks weight 0 and uses MGDA's min-norm weights "
        "for Pareto-stationary ones (noted in report.notes); 'raise' stops with a SolverError.",
    )


class NashMTL(Plugin):
    """Nash-MTL: weights α > 0 with (Gα)ᵢ = 1/αᵢ, the Nash bargaining solution.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Theorem 5.1. Solved by
    Newton's method in torch on the Gramian (:func:`nash_mtl`) instead of the reference's cvxpy
    loop.

    Where no bargaining solution exists — the gradients are Pareto-stationary (a nonnegative
    combination of them vanishes, which is what training converges to) or nearly so, or a
    task's gradient is zero — training goes on with a defined update (``if_undefined: mgda``,
    default): zero-gradient tasks get weight 0 and the bargaining is solved for the others;
    Pareto-stationary gradients get MGDA's min-norm weights, a convex combination whose update
    on the shared parameters is (about) zero, the limit the bargaining solution diverges
    towards. The step says so in ``report.notes``. With ``if_undefined: raise`` a
    :class:`~mtlhooks.errors.SolverError` is raised instead and nothing is written. The
    reference's silent fall-back to the previous weights is never taken.

    The update always has norm ‖d‖ = √T in the gradient space (αᵀGα = Σ αᵢ(Gα)ᵢ = T), whatever
    the scale of the gradients. The reference then clips the shared parameters' gradient to norm
    ``max_norm = 1`` with ``torch.nn.utils.clip_grad_norm_``; that is deliberately not an option
    here: expressed as a factor on α it would also shrink the task-specific parameters' gradients,
    which the reference leaves alone. To reproduce the reference, call
    ``torch.nn.utils.clip_grad_norm_(shared.parameters(), 1.0)`` after ``mtl.backward``.
    ``update_weights_every: N`` reuses the weights of every N-th aggregation in between, as the
    reference's option of that name (state: the last weights and the count of aggregations).
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
        may_raise="where no solution exists or none can be verified (a zero gradient, "
        "Pareto-stationary gradients or nearly so); the plugin then uses MGDA's weights",
    )

    def __init__(self, config: NashMTLConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: NashMTLConfig = config
        self._weights: Tensor | None = None
        self._count = 0

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        gramian = step.gramian()
        due = self._count % self.config.update_weights_every == 0 or self._weights is None
        self._count += 1
        if due:
            self._weights = bargaining_weights(
                step,
                gramian,
                1.0,
                max_iter=self.config.max_iter,
                tol=self.config.tol,
                if_undefined=self.config.if_undefined,
                name=self.name,
            )
        assert self._weights is not None
        return self._weights.to(gramian)

    def state_dict(self) -> dict[str, Any]:
        weights = None if self._weights is None else self._weights.clone()
        return {"weights": weights, "count": self._count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        weights = state["weights"]
        self._weights = None if weights is None else weights.clone()
        self._count = int(state["count"])


def bargaining_weights(
    step: Step,
    gramian: Tensor,
    power: float,
    *,
    max_iter: int,
    tol: float | None,
    if_undefined: IfUndefined,
    name: str,
) -> Tensor:
    """The α-fair weights of Nash-MTL (``power`` 1) and FairGrad for ``step``, with their
    ``if_undefined`` rule (a remark in ``report.notes`` when the fallback applies)."""
    if if_undefined == "raise":
        return fair_weights(gramian, power, max_iter, tol, name)
    weights, remark = fair_weights_or_fallback(gramian, power, max_iter, tol, name, step.tasks)
    if remark is not None:
        step.note(remark)
    return weights
