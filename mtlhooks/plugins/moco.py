"""MoCo: multi-objective gradient correction with tracked gradients (Fernando et al. 2023)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.method import MethodSpec, Property
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Setup, Space, hookimpl
from mtlhooks.solvers import project_onto_simplex, working_dtype
from mtlhooks.step import Step


class MoCoState(NamedTuple):
    """What MoCo carries from one call to the next."""

    tracked: Tensor
    """Y, the (T, P) tracked task gradients (zeros at the start)."""
    weights: Tensor
    """λ, the (T,) weights on the simplex (``1/T`` each at the start)."""
    calls: int
    """k, the calls so far (the step sizes decay as k^−σ)."""


def initial_moco_state(gradients: Tensor) -> MoCoState:
    """The state of a fresh MoCo for (T, P) gradients: Y = 0, λ = 1/T, k = 0."""
    num_tasks = gradients.shape[0]
    weights = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
    return MoCoState(torch.zeros_like(gradients), weights, 0)


def moco(
    gradients: Tensor,
    state: MoCoState,
    *,
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
) -> tuple[Tensor, MoCoState]:
    """MoCo: track every task gradient, step the weights on the tracked Gramian, return
    ``Yᵀλ``.

    Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023, Algorithm 1, at call
    k = 1, 2, …::

        Y ← Y − βₖ(Y − J)                 βₖ = β / k^σ_β   (J: this call's (T, P) gradients)
        λ ← Π_Δ(λ − γₖ(Y Yᵀ + ρI)λ)       γₖ = γ / k^σ_γ
        update = Yᵀλ

    ``Π_Δ`` is the Euclidean projection onto the simplex, as in the paper and the authors' code
    (LibMTL and TorchJD apply a softmax instead). The paper also projects each row of Y onto a
    ball of radius Lᵢ (a bound on the gradient norms); no reference does, nor does this. Y is
    kept in the gradients' dtype (at least float32) and device, λ in float64 on the CPU, the
    Gramian ``YYᵀ`` is formed on Y's device and solved in float64.

    Pure: returns ``(update, new_state)``, the update of shape (P,) in the dtype of Y. Non-finite
    gradients give a NaN update and leave the state as it was.
    """
    if gradients.dim() != 2:
        raise InputError(f"moco: expected (T, P) gradients, got {tuple(gradients.shape)}")
    num_tasks = gradients.shape[0]
    if state.tracked.shape != gradients.shape or state.weights.shape != (num_tasks,):
        raise InputError(
            f"moco: the state holds Y of shape {tuple(state.tracked.shape)} and λ of shape "
            f"{tuple(state.weights.shape)}, the gradients have shape {tuple(gradients.shape)}: "
            "the state is from another model, space or set of tasks"
        )
    dtype = torch.promote_types(
        torch.promote_types(gradients.dtype, torch.float32), state.tracked.dtype
    )
    if not bool(torch.isfinite(gradients).all()):
        nan = torch.full(gradients.shape[1:], float("nan"), dtype=dtype, device=gradients.device)
        return nan, state
    count = state.calls + 1
    beta_k = beta / count**beta_sigma
    gamma_k = gamma / count**gamma_sigma
    previous = state.tracked.to(device=gradients.device, dtype=dtype)
    tracked = previous - beta_k * (previous - gradients.to(dtype))
    product = tracked @ tracked.T
    solve_dtype = working_dtype(product)
    gramian = product.to(device="cpu", dtype=solve_dtype)
    current = state.weights.to(dtype=solve_dtype)
    updated = project_onto_simplex(current - gamma_k * (gramian @ current + rho * current))
    update = updated.to(device=tracked.device, dtype=dtype) @ tracked
    return update, MoCoState(tracked, updated.to(state.weights.dtype), count)


class MoCoConfig(PluginConfig):
    beta: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Tracking rate β of the gradients, βₖ = β/k^σ_β (LibMTL's and TorchJD's 0.5).",
    )
    beta_sigma: float = Field(default=0.5, ge=0.0, description="Decay exponent σ_β of βₖ.")
    gamma: float = Field(
        default=0.1, gt=0.0, description="Step size γ of the weights, γₖ = γ/k^σ_γ (0.1)."
    )
    gamma_sigma: float = Field(default=0.5, ge=0.0, description="Decay exponent σ_γ of γₖ.")
    rho: float = Field(
        default=0.0, ge=0.0, description="ℓ2 regularisation ρ of the weight step (0)."
    )
    normalization: Literal["none", "loss"] = Field(
        default="none",
        description="'none': track the gradients gᵢ (the paper). 'loss': track gᵢ·ℓᵢ/‖gᵢ‖ "
        "(LibMTL's variant; a zero gradient stays zero).",
    )


class MoCo(Plugin):
    """MoCo: the update is ``Yᵀλ``, Y a running average of the task gradients and λ one
    projected step of the min-norm problem on Y's Gramian per call.

    Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023, Algorithm 1
    (:func:`moco`). The tracking of Y is what corrects the bias of MGDA-like methods with small
    batches; it needs one batch per step, so one ``backward()`` call is one iteration.

    The update is built from Y, not from this call's gradients: it is not a weighting of them
    and is returned as a combined gradient (``mtl_combine``) in space ``params`` (sync
    ``exact`` under data parallelism, where every rank tracks the same all-reduced gradients).
    Task-specific parameters receive ``Σ wᵢ∇Lᵢ`` (the weights of earlier plugins), as in LibMTL,
    which writes Yᵀλ to the shared parameters only. gᵢ are the task gradients as weighted by
    earlier plugins; under mixed precision they are unscaled before tracking and the update is
    scaled back, so Y does not change when the loss scale does. Under gradient accumulation the
    per-task gradients are summed over the micro-steps and MoCo runs once per optimizer step.

    Choices where the references differ: the simplex projection of the paper and the authors'
    code (LibMTL and TorchJD: softmax); the step-size schedule and defaults of LibMTL and TorchJD
    (β = 0.5, σ_β = 0.5, γ = 0.1, σ_γ = 0.5, ρ = 0); no gradient normalisation by default
    (LibMTL always tracks gᵢ·ℓᵢ/‖gᵢ‖: ``normalization: loss``). The update is not multiplied by
    T (λ sums to 1, like the references).

    State (``state_dict``): Y, as large as T copies of the shared parameters, kept on their
    device (and copied again by the pipeline's snapshot of each call); λ (float64) and k.
    """

    name = "moco"
    family = Family.AGGREGATOR
    replaces_state = True  # moco() is pure: Y and λ are new tensors every call
    Config = MoCoConfig
    spaces = (Space.PARAMS,)
    needs = Need.JACOBIAN
    method = MethodSpec(
        moco,
        "Fernando et al. 2023",
        frozenset({Property.PERMUTATION_EQUIVARIANT}),
        input="gradients",
        stateful=True,
        initial_state=initial_moco_state,
        notes="returns Yᵀλ from tracked gradients Y, not a weighting of this call's gradients; "
        "stateful; permuting the tasks (and the state) leaves the update unchanged",
    )

    def __init__(self, config: MoCoConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: MoCoConfig = config
        self._tracked: Tensor | None = None
        self._weights = torch.full((setup.num_tasks,), 1.0 / setup.num_tasks, dtype=torch.float64)
        self._calls = 0

    @hookimpl
    def mtl_combine(self, step: Step) -> Tensor:
        assert step.gradients is not None
        matrix = step.gradients.matrix()
        factors = step.weights.to(device=matrix.device, dtype=torch.float64)
        if self.config.normalization == "loss":
            # ‖weights[i]·∇Lᵢ‖ = |weights[i]|·‖∇Lᵢ‖; the Gramian is already unscaled
            norms = step.gradients.gramian.diagonal().clamp_min(0).sqrt().to(factors)
            norms = norms * factors.abs()
            losses = (step.weights * step.losses).to(factors).abs()
            factors = factors * torch.where(
                norms > 0, losses / torch.where(norms > 0, norms, 1.0), 0.0
            )
        scale = None
        if step.loss_scale is not None:
            scale = step.loss_scale.to(device=matrix.device, dtype=torch.float64)
            factors = factors / scale
        gradients = matrix * factors.to(matrix.dtype)[:, None]
        tracked = torch.zeros_like(gradients) if self._tracked is None else self._tracked
        update, state = moco(
            gradients,
            MoCoState(tracked, self._weights, self._calls),
            beta=self.config.beta,
            beta_sigma=self.config.beta_sigma,
            gamma=self.config.gamma,
            gamma_sigma=self.config.gamma_sigma,
            rho=self.config.rho,
        )
        self._tracked, self._weights, self._calls = state
        if scale is not None:
            update = update * scale.to(update.dtype)
        return update.to(matrix.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"tracked": self._tracked, "weights": self._weights, "calls": self._calls}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        tracked = state["tracked"]
        self._tracked = None if tracked is None else tracked.clone()
        self._weights = state["weights"].clone()
        self._calls = int(state["calls"])
