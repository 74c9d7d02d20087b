"""SDMGrad: stochastic direction-oriented multi-objective gradient descent (Xiao et al. 2023)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.method import MethodSpec, Property, check_gramian, is_finite, mean, nan_weights
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Setup, Space, hookimpl
from mtlhooks.solvers import gramian_scales, project_onto_simplex, working_dtype
from mtlhooks.step import Step


def sdmgrad(
    gramian: Tensor,
    weights: Tensor,
    *,
    lam: float = 0.3,
    iterations: int = 20,
    lr: float = 10.0,
    momentum: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """SDMGrad: a few projected SGD steps on ``w ↦ ½‖g_w + λg₀‖²`` over the simplex, then the
    update ``(g_w + λ g₀)/(1 + λ)``.

    Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms", NeurIPS 2023, Algorithm 1 (SDMGrad), with the target direction g₀ the mean
    gradient: ``iterations`` steps ``w ← Π_Δ(w − lr·v)``, v the heavy-ball velocity
    (``v ← momentum·v + Ĝ(w + λ/T·1)``, v = 0 before the first step, as torch's SGD), warm-started
    from the previous call's w. ``Ĝ = G / s̄²`` with s̄ the mean gradient norm, so the weights do
    not depend on a common scale of the gradients (the authors' code; TorchJD places it in
    Section 6.1 of the paper); the authors add 1e-4 to each ``Gᵢᵢ`` and LibMTL/TorchJD 1e-8 to
    ``s̄²``, which breaks that invariance for small gradients: here the division is exact, and an
    all-zero Gramian is left as it is. Returned weights: ``α = (w + λ/T·1)/(1 + λ)`` (sum 1).

    Pure: takes the previous w (start: ``1/T`` each) and returns ``(α, new_w)``. Computed in
    float64. A non-finite Gramian gives NaN weights and leaves the state as it was.
    """
    check_gramian(gramian)
    num_tasks = gramian.shape[0]
    if weights.shape != (num_tasks,):
        raise InputError(f"sdmgrad: weights must have shape ({num_tasks},)")
    if iterations < 1:
        raise InputError(f"sdmgrad: iterations must be ≥ 1, got {iterations}")
    if not is_finite(gramian):
        return nan_weights(gramian), weights.clone()
    dtype = working_dtype(gramian)
    matrix = gramian.to(dtype)
    mean_norm = gramian_scales(matrix).mean()
    if mean_norm > 0:
        # dividing twice: s̄² may underflow where s̄ does not
        matrix = matrix / mean_norm / mean_norm
    target = torch.full((num_tasks,), lam / num_tasks, dtype=dtype, device=matrix.device)
    current = weights.to(device=matrix.device, dtype=dtype)
    velocity = torch.zeros_like(current)
    for _ in range(iterations):
        velocity = momentum * velocity + matrix @ (current + target)
        current = project_onto_simplex(current - lr * velocity)
    alphas = (current + target) / (1 + lam)
    return alphas.to(gramian.dtype), current.to(weights.dtype)


class SDMGradConfig(PluginConfig):
    lam: float = Field(
        default=0.3,
        ge=0.0,
        description="λ: how strongly the update is pulled towards the mean gradient (0: the "
        "MGDA-like direction only). The authors' experiments and LibMTL use 0.3 (their class "
        "default is 0.6).",
    )
    iterations: int = Field(
        default=20, ge=1, description="Projected SGD steps on the weights per call (niter)."
    )
    lr: float = Field(
        default=10.0,
        gt=0.0,
        description="Step size of those steps on the normalised Gramian (authors' code and "
        "TorchJD: 10; LibMTL: 5).",
    )
    momentum: float = Field(
        default=0.5, ge=0.0, lt=1.0, description="Heavy-ball momentum of those steps."
    )


class SDMGrad(Plugin):
    """SDMGrad: weights from projected SGD on ``½‖g_w + λg₀‖²`` over the simplex, warm-started
    across calls; the update is ``(g_w + λg₀)/(1 + λ)``, g₀ the mean gradient.

    Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms", NeurIPS 2023, Algorithm 1 (:func:`sdmgrad`). The inner weights w start at
    ``1/T`` and are the plugin's state (``state_dict``, float64); the momentum buffer starts
    afresh at every call, as in the authors' code (they build a new SGD optimizer each call).

    **One batch instead of three (deviation).** The algorithm uses independent batches ξ, ξ′ for
    the weight steps (``∇L_ξᵀ∇L_ξ′``) and ζ for the update; one ``backward()`` call sees one
    batch, so all three are this call's and the weight steps use its Gramian (biased by the
    gradient covariance, which the double sampling removes). The authors' NYUv2 code computes the
    gradients of three batches but stores them in one tensor three times over (``[tensor] * 3``),
    so it also runs on a single batch (the last one). LibMTL takes ``losses`` of three batches.

    Other choices: the update is not multiplied by T and not clipped (the authors' code does
    both: ``× n_tasks``, ``clip_grad_norm_(…, 1)``); weights sum to 1, like LibMTL and TorchJD.
    Task-specific parameters receive the same weights.
    """

    name = "sdmgrad"
    family = Family.AGGREGATOR
    Config = SDMGradConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN
    method = MethodSpec(
        sdmgrad,
        "Xiao et al. 2023",
        frozenset(
            {Property.SCALE_INVARIANT, Property.PERMUTATION_EQUIVARIANT, Property.NONNEGATIVE}
        ),
        stateful=True,
        initial_state=mean,
        notes="stateful (inner weights in, new inner weights out); one batch per call: the "
        "paper's double sampling is not reproduced",
    )

    def __init__(self, config: SDMGradConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: SDMGradConfig = config
        self._weights = torch.full((setup.num_tasks,), 1.0 / setup.num_tasks, dtype=torch.float64)

    @hookimpl
    def mtl_aggregate(self, step: Step) -> Tensor:
        gramian = step.gramian()
        options = self.config
        weights, state = sdmgrad(
            gramian,
            self._weights.to(gramian.device),
            lam=options.lam,
            iterations=options.iterations,
            lr=options.lr,
            momentum=options.momentum,
        )
        self._weights = state
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self._weights.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._weights = state["weights"].clone()
