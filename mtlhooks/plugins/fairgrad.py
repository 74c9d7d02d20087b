"""FairGrad: α-fair weights between the tasks (Ban & Ji 2024)."""

from __future__ import annotations

import torch
from pydantic import Field

from mtlhooks import functional
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.step import Step


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
    Newton's method in torch on the Gramian (:func:`mtlhooks.functional.fairgrad`) instead of the
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

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, FairGradConfig)
        return functional.fairgrad(
            step.gramian(),
            alpha=self.config.alpha,
            max_iter=self.config.max_iter,
            tol=self.config.tol,
        )
