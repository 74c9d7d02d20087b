"""PCD: follow the first task's gradient, guaranteeing every other task a share of progress
(priority-constrained descent, TorchJD 0.18)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.method import MethodSpec, Property, check_gramian, is_finite, nan_weights
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Setup, Space, hookimpl
from mtlhooks.solvers import input_eps, nonnegative_qp, working_dtype
from mtlhooks.step import Step


class PCDState(NamedTuple):
    """PCD's memory: the moving average of the squared gradient norms and the step count."""

    squared_norms: Tensor  # (T,) float64
    steps: int


def pcd(
    gramian: Tensor,
    state: PCDState | None,
    *,
    tau: float = 0.02,
    beta: float = 0.999,
    eps: float = 1e-8,
) -> tuple[Tensor, PCDState]:
    """Priority-constrained descent: the update closest to the first (primary) task's normalised
    gradient that gives every other task at least ``τ`` of its own normalised progress.

    "Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
    Multi-Objective Optimization", TMLR 2026 (arXiv 2606.29521), as TorchJD 0.18's ``PCD``:
    with ``g̃ᵢ = sᵢgᵢ``, ``sᵢ = 1/√(v̂ᵢ + ε)`` and v̂ the bias-corrected EMA (decay β) of
    ``‖gᵢ‖²`` over the calls, ``d̃ = argmin ½‖d − g̃₁‖²`` s.t. ``g̃ⱼᵀd ≥ τ‖g̃ⱼ‖²`` for j ≥ 2,
    rescaled to the norm of g₁. Solved in the dual from the Gramian: ``d̃ = g̃₁ + Σⱼ μⱼg̃ⱼ``
    with ``μ = argmin_{μ≥0} ½μᵀG̃ₛₛμ + (G̃ₛ₁ − τ·diag G̃ₛₛ)ᵀμ`` (an exact active-set QP; TorchJD
    uses Goldfarb–Idnani's dual method, the reference enumerates the active sets).

    Special cases, as TorchJD: g₁ = 0, or ``d̃`` zero to rounding, gives zero weights; when the
    constraints cannot all hold (e.g. two opposite secondary gradients) they are dropped and the
    update is g₁; a non-finite Gramian gives NaN weights and leaves the state unchanged. The
    first row of G is the primary task (the first task of the config). Returns
    ``(weights, new_state)``; ``state = None`` starts afresh.
    """
    check_gramian(gramian)
    if not 0.0 <= tau <= 1.0 or not 0.0 <= beta < 1.0 or eps < 0:
        raise InputError(f"pcd: needs τ in [0, 1], β in [0, 1), ε ≥ 0; got {tau}, {beta}, {eps}")
    num_tasks = gramian.shape[0]
    dtype = working_dtype(gramian)
    if state is None:
        state = PCDState(torch.zeros(num_tasks, dtype=torch.float64, device=gramian.device), 0)
    if state.squared_norms.shape != (num_tasks,):
        raise InputError(f"pcd: the state is for {state.squared_norms.shape[0]} tasks")
    if not is_finite(gramian):
        return nan_weights(gramian), state
    matrix = gramian.to(dtype)
    squared = matrix.diagonal().clamp_min(0)
    steps = state.steps + 1
    average = beta * state.squared_norms.to(squared) + (1 - beta) * squared
    new_state = PCDState(average.to(torch.float64), steps)
    denominators = (average / (1 - beta**steps) + eps).sqrt()
    scales = torch.where(denominators > 0, 1 / torch.where(denominators > 0, denominators, 1), 0)
    zero = torch.zeros(num_tasks, dtype=gramian.dtype, device=gramian.device)
    if not bool(squared[0] > 0):
        return zero, new_state
    scaled = matrix * scales.unsqueeze(0) * scales.unsqueeze(1)
    coefficients = torch.zeros(num_tasks, dtype=dtype, device=matrix.device)
    coefficients[0] = 1.0
    if num_tasks > 1:
        secondary = scaled[1:, 1:]
        required = tau * secondary.diagonal()
        linear = scaled[1:, 0] - required
        multipliers = nonnegative_qp(secondary, linear)
        # primal feasibility g̃ⱼᵀd̃ ≥ τ‖g̃ⱼ‖², to the rounding of G̃ (an empty polyhedron makes
        # the dual unbounded: the ridge keeps μ finite, the constraints then fail)
        progress = scaled[1:, 0] + secondary @ multipliers
        size = scaled[1:].abs() @ torch.cat([coefficients[:1], multipliers.abs()])
        slack = 64 * num_tasks * input_eps(gramian) * size + 1e-9 * required
        if bool((progress >= required - slack).all()):
            coefficients[1:] = multipliers
    direction = coefficients @ scaled @ coefficients
    magnitude = (coefficients.abs() @ scaled.diagonal().clamp_min(0).sqrt()) ** 2
    if not bool(direction > 10 * input_eps(gramian) * magnitude):
        return zero, new_state
    weights = coefficients * scales * (squared[0] / direction).sqrt()
    return weights.to(gramian.dtype), new_state


class PCDConfig(PluginConfig):
    tau: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="τ: the fraction of its own normalised first-order progress every other "
        "task is guaranteed (TorchJD's default 0.02).",
    )
    beta: float = Field(
        default=0.999,
        ge=0.0,
        lt=1.0,
        description="Decay of the moving average of the squared gradient norms (bias-corrected).",
    )
    eps: float = Field(
        default=1e-8, ge=0.0, le=1.0, description="ε added to that average before √."
    )


class PCD(Plugin):
    """PCD: follow the first task's gradient, guaranteeing every other task a share τ of the
    progress its own normalised gradient would make.

    Priority-constrained descent ("Not All Objectives Are Born Equal", TMLR 2026; TorchJD 0.18's
    ``PCD``; :func:`pcd`): the first task of the config is the primary one. The gradients are
    normalised by a bias-corrected moving average of their squared norms (the plugin's state,
    with the step count), so τ is scale-free; the update is rescaled to the norm of the primary
    gradient. As weights on the Gramian, so the task-specific parameters receive them too.
    """

    name = "pcd"
    family = Family.AGGREGATOR
    Config = PCDConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN
    method = MethodSpec(
        pcd,
        "PCD, TMLR 2026 (TorchJD 0.18)",
        frozenset({Property.NONNEGATIVE}),
        stateful=True,
        initial_state=lambda gramian: None,
        notes="not symmetric: the first task is the primary one; scale-invariant up to ε",
    )

    def __init__(self, config: PCDConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: PCDConfig = config
        self._state = PCDState(torch.zeros(setup.num_tasks, dtype=torch.float64), 0)

    @hookimpl
    def mtl_aggregate(self, step: Step) -> Tensor:
        gramian = step.gramian()
        state = PCDState(self._state.squared_norms.to(gramian.device), self._state.steps)
        weights, self._state = pcd(
            gramian, state, tau=self.config.tau, beta=self.config.beta, eps=self.config.eps
        )
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {"squared_norms": self._state.squared_norms.clone(), "steps": self._state.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._state = PCDState(
            state["squared_norms"].to(torch.float64).clone(), int(state["steps"])
        )
