"""MoDo: multi-objective gradient descent with double-sampled weight steps (Chen et al. 2023)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.method import MethodSpec, Property, check_gramian, is_finite, mean, nan_weights
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Setup, Space, hookimpl
from mtlhooks.solvers import project_onto_simplex, working_dtype
from mtlhooks.step import Step


def modo(
    gramian: Tensor, weights: Tensor, *, gamma: float = 1e-3, rho: float = 0.1
) -> tuple[Tensor, Tensor]:
    """MoDo: one projected gradient step of the weights λ, then the update ``Σ λᵢ gᵢ``.

    Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance", NeurIPS 2023 (JMLR 2024), Algorithm 1:
    ``λ ← Π_Δ(λ − γ(∇F_{z₁}ᵀ∇F_{z₂} + ρI)λ)`` and the model moves along ``∇F_{z₃} λ`` (the new λ).
    Here the three samples are one batch, so ``∇F_{z₁}ᵀ∇F_{z₂}`` is the Gramian ``G`` of this
    call (see :class:`MoDo` for what that changes). ``Π_Δ`` is the Euclidean projection onto the
    simplex (:func:`mtlhooks.solvers.project_onto_simplex`), as in the paper and the authors' code.

    Pure: takes the previous weights (start: ``1/T`` each, :func:`mtlhooks.method.mean`) and
    returns ``(weights, new_state)``, both the new λ (in G's dtype and the state's dtype). The step
    is computed in float64. A non-finite Gramian gives NaN weights and leaves the state as it was.
    """
    check_gramian(gramian)
    if weights.shape != gramian.shape[:1]:
        raise InputError(f"modo: weights must have shape {tuple(gramian.shape[:1])}")
    if not is_finite(gramian):
        return nan_weights(gramian), weights.clone()
    dtype = working_dtype(gramian)
    matrix = gramian.to(dtype)
    current = weights.to(device=matrix.device, dtype=dtype)
    updated = project_onto_simplex(current - gamma * (matrix @ current + rho * current))
    return updated.to(gramian.dtype), updated.to(weights.dtype)


class MoDoConfig(PluginConfig):
    gamma: float = Field(
        default=1e-3,
        gt=0.0,
        description="Step size γ of the weight update (LibMTL's default 1e-3; TorchJD uses 0.1). "
        "The step acts on the raw Gramian, so it depends on the gradients' scale.",
    )
    rho: float = Field(
        default=0.1,
        ge=0.0,
        description="ℓ2 regularisation ρ of the weight update (LibMTL's default 0.1; TorchJD 0).",
    )


class MoDo(Plugin):
    """MoDo: the weights λ take one projected gradient step on ``½‖Σλᵢgᵢ‖² + ½ρ‖λ‖²`` per call
    and the update is ``Σ λᵢ gᵢ`` with the new λ.

    Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance", NeurIPS 2023 (JMLR 2024), Algorithm 1 (:func:`modo`).
    λ starts at ``1/T`` each and is the plugin's state (``state_dict``, float64).

    **One batch instead of three (deviation).** The paper draws three independent batches per
    step: z₁ and z₂ for the λ step (``∇F_{z₁}ᵀ∇F_{z₂}λ`` is then an unbiased estimate of
    ``∇Fᵀ∇Fλ``) and z₃ for the model update. One ``backward()`` call sees one batch, so here
    z₁ = z₂ = z₃: the λ step uses the Gramian ``G = J Jᵀ`` of this call, whose expectation exceeds
    the product of the expected gradients by their covariance (the bias the double sampling
    removes), and λ depends on the gradients it weights. Reference code differs too: the
    authors' repository uses two batches and moves along the sum of their gradients; LibMTL
    takes ``losses`` of three batches. Training with this plugin is MoDo's single-sample variant;
    the exact algorithm needs the gradients of two batches at the same parameters, which the
    pipeline does not take.

    Other choices: projection onto the simplex as in the paper, LibMTL and the authors' code
    (TorchJD applies a softmax instead); LibMTL's defaults γ = 1e-3, ρ = 0.1. The update's
    weights sum to 1 (a mean-like scale, like LibMTL); task-specific parameters receive the same
    weights.
    """

    name = "modo"
    family = Family.AGGREGATOR
    Config = MoDoConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN
    method = MethodSpec(
        modo,
        "Chen et al. 2023",
        frozenset({Property.PERMUTATION_EQUIVARIANT, Property.NONNEGATIVE}),
        stateful=True,
        initial_state=mean,
        notes="stateful (λ in, new λ out); one batch per call: the paper's double sampling is "
        "not reproduced",
    )

    def __init__(self, config: MoDoConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: MoDoConfig = config
        self._weights = torch.full((setup.num_tasks,), 1.0 / setup.num_tasks, dtype=torch.float64)

    @hookimpl
    def mtl_aggregate(self, step: Step) -> Tensor:
        gramian = step.gramian()
        weights, state = modo(
            gramian,
            self._weights.to(gramian.device),
            gamma=self.config.gamma,
            rho=self.config.rho,
        )
        self._weights = state
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self._weights.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._weights = state["weights"].clone()
