"""DB-MTL: log-transformed losses and gradients rescaled to the largest (EMA) norm
(Lin et al. 2023)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field

from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Setup, Space, hookimpl
from mtlhooks.step import Step
from mtlhooks.weighting_utils import (
    check_lower_bound,
    effective_losses,
    moving_average,
    statistics_dtype,
)


class DBMTLConfig(PluginConfig):
    beta: float = Field(
        default=0.9, ge=0.0, lt=1.0, description="EMA decay β of the gradient norms."
    )
    sigma: float = Field(
        default=0.0,
        ge=0.0,
        description="Decay schedule βₜ = β / t^σ (t = 1, 2, ...); 0 keeps β constant.",
    )
    eps: float = Field(
        default=1e-8, gt=0.0, description="ε in log(ℓᵢ + ε): a zero loss stays finite."
    )


class DBMTL(Plugin):
    """DB-MTL: loss balancing by log(ℓᵢ + ε), then gradient-magnitude balancing: every task's
    gradient is rescaled to the largest (moving-average) gradient norm.

    Lin, Ye, Xu, Shi, Zhang & Kwok, "Dual-Balancing for Multi-Task Learning", 2023. Defaults
    β = 0.9, σ = 0 (some reference code defaults σ to 0.5).

    What is implemented. gᵢ = ∇log(ℓᵢ + ε) = ∇ℓᵢ/(ℓᵢ + ε), so ‖gᵢ‖ = ‖∇ℓᵢ‖/(ℓᵢ + ε) comes from
    the Gramian. With t the call count and βₜ = β/t^σ:

        n̂ᵢ ← βₜ·n̂ᵢ + (1 − βₜ)·‖gᵢ‖        (n̂ starts at 0)
        wᵢ = (maxⱼ n̂ⱼ / n̂ᵢ) / (ℓᵢ + ε)      update Σ wᵢ∇ℓᵢ = Σ (maxⱼ n̂ⱼ/n̂ᵢ)·gᵢ

    **Approximation.** The paper keeps an EMA of the gradient *vectors*, ĝᵢ ← βₜĝᵢ + (1−βₜ)gᵢ,
    and steps along Σ (maxⱼ‖ĝⱼ‖/‖ĝᵢ‖)·ĝᵢ. A norm-balancing plugin only sets weights on the
    current gradients (and sees their Gramian), so here (1) the EMA is of the norms ‖gᵢ‖, not
    of the vectors: n̂ᵢ ≥ ‖ĝᵢ‖ (triangle inequality), with equality while a task's gradient
    keeps its direction; and (2) the update uses the current gᵢ, not ĝᵢ: the momentum part of
    the paper's EMA is left to the user's optimizer. With β = 0 both coincide with the paper.
    The zero initialisation of n̂ scales every task alike, so it cancels in the ratio.

    Task-specific parameters receive the same weights (the pipeline's contract; LibMTL's
    implementation gives them the unscaled ∇log(ℓᵢ + ε)). A task with a zero norm estimate
    keeps the factor 1. Losses must be ≥ 0 (:class:`~mtlhooks.errors.InputError` otherwise);
    a zero loss is finite thanks to ε. ℓᵢ are the losses as weighted so far (see
    :mod:`mtlhooks.weighting_utils`). State: n̂ (float64) and t.
    """

    name = "db_mtl"
    family = Family.NORM_BALANCING
    Config = DBMTLConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN

    def __init__(self, config: DBMTLConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: DBMTLConfig = config
        self._norms: torch.Tensor | None = None
        self._count = 0

    @hookimpl
    def mtl_balance(self, step: Step) -> None:
        losses = effective_losses(step)
        check_lower_bound(
            losses,
            0.0,
            step.tasks,
            method=self.name,
            strict=False,
            why="takes log(loss + ε), defined only for losses ≥ 0",
            fix="Use a non-negative loss (e.g. add a constant offset), or another method.",
        )
        dtype = statistics_dtype(losses.device)
        log_scale = 1.0 / (losses.to(dtype) + self.config.eps)
        norms = step.grad_norms().detach().to(dtype) * log_scale
        self._count += 1
        beta = self.config.beta / self._count**self.config.sigma
        previous = torch.zeros_like(norms) if self._norms is None else self._norms
        self._norms = moving_average(previous, norms, beta)
        largest = self._norms.max()
        ratio = largest / torch.where(self._norms > 0, self._norms, 1.0)
        usable = (self._norms > 0) & torch.isfinite(ratio)
        factors = log_scale * torch.where(usable, ratio, 1.0)
        step.weights = step.weights * factors.to(step.weights.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"norms": self._norms, "count": self._count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._norms, self._count = state["norms"], state["count"]
