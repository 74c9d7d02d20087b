"""STCH: smooth Tchebycheff scalarisation of the (log) task losses (Lin et al. 2024)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, field_validator

from mtlhooks.plugin import Family, Plugin, PluginConfig, Setup, hookimpl
from mtlhooks.step import Step
from mtlhooks.weighting_utils import check_lower_bound, effective_losses, statistics_dtype


def stch_weights(
    losses: torch.Tensor, ideal: torch.Tensor, preferences: torch.Tensor, mu: float
) -> torch.Tensor:
    """Weights whose weighted sum has the gradient of ``T·μ·log Σᵢ exp(λᵢ(log ℓᵢ − zᵢ)/μ)``:
    ``wᵢ = T·softmax(λ(log ℓ − z)/μ)ᵢ·λᵢ/ℓᵢ`` (``z = ideal``, ``λ = preferences``)."""
    scaled = preferences * (losses.log() - ideal) / mu
    return len(losses) * torch.softmax(scaled, dim=-1) * preferences / losses


class STCHConfig(PluginConfig):
    mu: float = Field(
        default=1.0,
        gt=0.0,
        description="Smoothing μ (the reference's STCH_mu = 1): μ → 0 gives the Tchebycheff "
        "max, large μ the preference-weighted sum of log losses.",
    )
    preferences: dict[str, float] = Field(
        default_factory=dict,
        description="Preference λᵢ > 0 per task; tasks not listed get 1 (the reference's).",
    )
    warmup_steps: int = Field(
        default=0,
        ge=0,
        description="backward() calls trained with Σ log ℓᵢ before the ideal point is "
        "estimated. The reference uses 4 epochs: set this to 4 × your steps per epoch.",
    )
    nadir_steps: int = Field(
        default=1,
        ge=0,
        description="Further calls (still Σ log ℓᵢ) whose mean loss n̄ᵢ becomes the ideal point "
        "z = log n̄ (the reference: one epoch, after the warm-up). 0: z = 0 (no normalisation).",
    )

    @field_validator("preferences")
    @classmethod
    def _positive(cls, preferences: dict[str, float]) -> dict[str, float]:
        bad = {task: p for task, p in preferences.items() if not (math.isfinite(p) and p > 0)}
        if bad:
            raise ValueError(f"preferences must be finite and > 0, got {bad}")
        return preferences


class STCH(Plugin):
    """STCH: minimise ``T·μ·log Σᵢ exp(λᵢ(log ℓᵢ − zᵢ)/μ)`` after a warm-up on ``Σ log ℓᵢ``.

    Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization", ICML 2024: the smooth Tchebycheff scalarisation
    ``g_μ(x|λ) = μ log Σᵢ exp(λᵢ(fᵢ(x) − zᵢ*)/μ)`` of objectives fᵢ with ideal point z*. As in the
    authors' multi-task code (also LibMTL's), the objectives are the log losses fᵢ = log ℓᵢ, the
    ideal point z = log n̄ comes from the mean losses n̄ᵢ over ``nadir_steps`` calls (the
    reference calls n̄ the nadir vector: ``log(L/n̄) = log L − log n̄``), and the scalarisation is
    multiplied by T. Until z is known (``warmup_steps + nadir_steps`` calls) the objective is the
    scale-invariant ``Σᵢ log ℓᵢ``.

    As weights (detached), the gradient of the STCH objective is ``Σᵢ wᵢ∇ℓᵢ`` with
    ``wᵢ = T·softmax(λ(log ℓ − z)/μ)ᵢ·λᵢ/ℓᵢ`` (:func:`stch_weights`), and ``1/ℓᵢ`` during the
    warm-up. ℓᵢ are the losses as weighted by earlier plugins (:mod:`mtlhooks.weighting_utils`).

    Differences from the reference: warm-up and averaging are counted in ``backward()`` calls,
    not epochs (mtlhooks does not see epochs); preferences λ are an option (the reference fixes
    λ = 1); losses must be > 0 (:class:`~mtlhooks.errors.InputError`; the reference adds 1e-20
    inside the log).

    State (``state_dict``): the call count and the running sum of the losses being averaged
    (float64).
    """

    name = "stch"
    family = Family.LOSS_SCALING
    Config = STCHConfig

    def __init__(self, config: STCHConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: STCHConfig = config
        self._preferences = torch.tensor(
            [config.preferences.get(task, 1.0) for task in setup.tasks], dtype=torch.float64
        )
        self._count = 0
        self._loss_sum: torch.Tensor | None = None

    @classmethod
    def check_config(cls, config: PluginConfig, tasks: tuple[str, ...]) -> None:
        assert isinstance(config, STCHConfig)
        unknown = sorted(set(config.preferences) - set(tasks))
        if unknown:
            raise ValueError(
                f"field 'preferences': unknown task(s) {unknown}; tasks are {list(tasks)}"
            )

    @hookimpl
    def mtl_scale_losses(self, step: Step) -> None:
        losses = effective_losses(step)
        check_lower_bound(
            losses,
            0.0,
            step.tasks,
            method=self.name,
            strict=True,
            why="takes log(loss), defined only for losses > 0",
            fix="Add a small positive offset to that loss, or use another method.",
        )
        values = losses.to(statistics_dtype(losses.device))
        warmup, averaged = self.config.warmup_steps, self.config.nadir_steps
        if self._count < warmup + averaged:
            if self._count >= warmup:
                self._loss_sum = values if self._loss_sum is None else self._loss_sum + values
            factors = 1.0 / values
        else:
            if self._loss_sum is None:
                ideal = torch.zeros_like(values)
            else:
                ideal = (self._loss_sum.to(values.device) / averaged).log()
            factors = stch_weights(
                values, ideal, self._preferences.to(values.device), self.config.mu
            )
        self._count += 1
        step.weights = step.weights * factors.to(step.weights.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self._count, "loss_sum": self._loss_sum}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._count = int(state["count"])
        loss_sum = state["loss_sum"]
        self._loss_sum = None if loss_sum is None else loss_sum.clone()
