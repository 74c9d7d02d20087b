"""ExcessMTL: task weights driven by estimated excess risks (He et al. 2024)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Setup, Space, hookimpl
from mtlhooks.step import Step


class ExcessMTLState(NamedTuple):
    """What ExcessMTL carries from one call to the next."""

    squares: Tensor | None
    """(T, P) running sum of the squared gradients (the diagonal curvature estimate); ``None``
    before the first call."""
    baseline: Tensor
    """(T,) sum of the excess-risk estimates of the warm-up calls (float64)."""
    log_weights: Tensor
    """(T,) logarithms of the task weights, up to a common constant (float64)."""
    calls: int
    """Calls so far."""


def initial_excess_mtl_state(num_tasks: int) -> ExcessMTLState:
    """The state of a fresh plugin: no curvature yet, equal weights."""
    zeros = torch.zeros(num_tasks, dtype=torch.float64)
    return ExcessMTLState(None, zeros, zeros.clone(), 0)


def excess_mtl(
    gradients: Tensor,
    state: ExcessMTLState,
    *,
    step_size: float = 1e-2,
    warmup_steps: int = 1,
    eps: float = 1e-7,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, ExcessMTLState]:
    """ExcessMTL's weights for the (T, P) task gradients of one call; returns
    ``(weights, new_state)``, the weights summing to T (float64, on the CPU).

    ``reduce``, if given, is applied to the (T,) excess-risk estimates before they are used
    (the plugin averages them over the processes of a data-parallel run).

    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with Excess
    Risks", ICML 2024, the ExcessMTL algorithm (equation numbers as TorchJD's implementation
    cites them):

    1. curvature: ``Sᵢ ← Sᵢ + gᵢ²`` (coordinate-wise, over all calls: the AdaGrad-style diagonal
       of the empirical Fisher, their Eq. 7);
    2. excess risk: ``rᵢ = Σₖ gᵢₖ² / √(Sᵢₖ + ε)``, the second-order Taylor estimate
       ``gᵢᵀHᵢ⁻¹gᵢ`` (their Eq. 6; the factor ½ cancels in step 3);
    3. for the first ``warmup_steps`` calls the weights stay equal and the rᵢ are averaged into a
       baseline bᵢ (the scale normalisation that makes tasks comparable); afterwards
       ``wᵢ ← wᵢ·exp(η·rᵢ/bᵢ)``, renormalised (the exponentiated-gradient step, their Eq. 9),
       computed on log-weights so that it never overflows.

    A task whose baseline is 0 (its gradient was zero throughout the warm-up) gets no push
    (``rᵢ/bᵢ`` counts as 0) where the reference divides by zero. Non-finite gradients or
    curvature (squares beyond the dtype's range) raise :class:`~mtlhooks.errors.InputError`.
    """
    if gradients.dim() != 2:
        raise InputError(f"excess_mtl: expected (T, P) gradients, got {tuple(gradients.shape)}")
    num_tasks = gradients.shape[0]
    if warmup_steps < 1:
        raise InputError(f"excess_mtl: warmup_steps must be ≥ 1, got {warmup_steps}")
    dtype = torch.promote_types(gradients.dtype, torch.float32)
    squared = gradients.to(dtype).square()
    if state.squares is None:
        squares = squared
    elif state.squares.shape != gradients.shape:
        raise InputError(
            f"excess_mtl: the curvature state has shape {tuple(state.squares.shape)}, the "
            f"gradients {tuple(gradients.shape)}: the state is from another model or space"
        )
    else:
        squares = state.squares.to(device=gradients.device, dtype=dtype) + squared
    curvature = (squares + eps).sqrt()
    # with ε = 0 a coordinate every call left at 0 contributes 0, not 0/0
    terms = torch.where(curvature > 0, squared / curvature, 0.0)
    risks = terms.sum(1).to(device="cpu", dtype=torch.float64)
    if reduce is not None:
        risks = reduce(risks)
    if not bool(torch.isfinite(risks).all()):
        raise InputError(
            f"excess_mtl: non-finite excess-risk estimates {risks.tolist()}: the gradients or "
            f"their squares are not finite in {dtype}"
        )
    baseline, log_weights = state.baseline.clone(), state.log_weights.clone()
    if state.calls < warmup_steps:
        baseline = baseline + risks
    else:
        mean_baseline = baseline / warmup_steps
        usable = mean_baseline > 0
        ratios = torch.where(usable, risks / torch.where(usable, mean_baseline, 1.0), 0.0)
        log_weights = log_weights + step_size * ratios
        # only differences matter: keep the largest at 0 so the values stay bounded
        log_weights = log_weights - log_weights.max()
    weights = num_tasks * torch.softmax(log_weights, dim=0)
    return weights, ExcessMTLState(squares, baseline, log_weights, state.calls + 1)


class ExcessMTLConfig(PluginConfig):
    step_size: float = Field(
        default=1e-2,
        gt=0.0,
        description="η of the exponentiated weight update (robust_step_size: 1e-2 in the "
        "authors' code and LibMTL; TorchJD's default is 1).",
    )
    warmup_steps: int = Field(
        default=1,
        ge=1,
        description="Calls with equal weights whose mean excess-risk estimates become the "
        "baseline. 1 is the authors' code and LibMTL (the first call); the paper's appendix "
        "suggests 3 epochs (3 × your steps per epoch).",
    )
    eps: float = Field(
        default=1e-7,
        gt=0.0,
        description="ε in √(Σg² + ε), the curvature floor (the reference's 1e-7). It is "
        "absolute: for gradients with Σg² ≲ ε the estimates lose their scale invariance.",
    )


class ExcessMTL(Plugin):
    """ExcessMTL: loss weights that grow with each task's estimated excess risk (its distance
    to convergence), not with its loss.

    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with Excess
    Risks", ICML 2024 (:func:`excess_mtl`): rᵢ = gᵢᵀHᵢ⁻¹gᵢ with the diagonal
    curvature ``Hᵢ = √(Σ_calls gᵢ² + ε)`` accumulated coordinate-wise, normalised by a baseline
    from the first ``warmup_steps`` calls, then ``wᵢ ∝ wᵢ·exp(η rᵢ/bᵢ)``. Normalising by the
    baseline makes the weights independent of a constant scale of any one task's loss (up to ε).

    A norm-balancing plugin: it multiplies ``step.weights`` by its weights, so it combines with
    an aggregator; alone, the update is ``Σ wᵢ∇Lᵢ`` as in the reference (``Σ wᵢLᵢ`` backward).
    gᵢ are the task gradients as weighted by earlier plugins (``weights[i]·∇Lᵢ``, unscaled under
    mixed precision). The weights sum to T (the reference's; TorchJD's sum to 1).

    It reads the gradient coordinates (``needs = jacobian``), so it works in spaces ``params``
    and ``last_shared`` (not ``features``: the coordinates of a representation's gradient are
    other samples at every call). Under gradient accumulation in space ``last_shared`` every
    micro-step is one call. Under data parallelism the T excess-risk estimates are averaged
    over the processes, so every rank uses the same weights: with ``sync: exact`` (the default)
    the gradients, hence the estimates, are already the global batch's on every rank and the
    average changes nothing; with ``sync: gramian`` each rank's curvature state comes from its
    own gradients and the weights use the mean of the ranks' estimates (an approximation, like
    the rest of that mode).

    State (``state_dict``): the (T, P) sum of squared gradients (in the gradients' dtype, at
    least float32, on their device: as large as T copies of the space's parameters, and copied
    again by the pipeline's snapshot of each call), the baseline, the log-weights (float64) and
    the call count.
    """

    name = "excess_mtl"
    family = Family.NORM_BALANCING
    replaces_state = True  # excess_mtl() is pure: its state tensors are new every call
    Config = ExcessMTLConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED)
    needs = Need.JACOBIAN

    def __init__(self, config: ExcessMTLConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: ExcessMTLConfig = config
        self._state = initial_excess_mtl_state(setup.num_tasks)

    @hookimpl
    def mtl_balance(self, step: Step) -> None:
        assert step.gradients is not None
        matrix = step.gradients.matrix()
        factors = step.weights.to(device=matrix.device, dtype=matrix.dtype)
        if step.loss_scale is not None:
            factors = factors / step.loss_scale.to(device=matrix.device, dtype=matrix.dtype)
        weights, self._state = excess_mtl(
            matrix * factors[:, None],
            self._state,
            step_size=self.config.step_size,
            warmup_steps=self.config.warmup_steps,
            eps=self.config.eps,
            reduce=lambda risks: step.all_reduce(risks, "mean"),
        )
        step.weights = step.weights * weights.to(step.weights.device, step.weights.dtype)

    def state_dict(self) -> dict[str, Any]:
        return self._state._asdict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        squares = state["squares"]
        self._state = ExcessMTLState(
            None if squares is None else squares.clone(),
            state["baseline"].clone(),
            state["log_weights"].clone(),
            int(state["calls"]),
        )
