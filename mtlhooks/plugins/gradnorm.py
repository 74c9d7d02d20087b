"""GradNorm: learn loss weights so that gradient norms follow each task's training rate
(Chen et al. 2018)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field

from mtlhooks.plugin import Family, Need, PluginConfig, Setup, Space, hookimpl
from mtlhooks.step import Step
from mtlhooks.weighting_utils import LearnablePlugin, check_lower_bound, effective_losses


class GradNormConfig(PluginConfig):
    alpha: float = Field(
        default=1.5,
        ge=0.0,
        le=10.0,
        description="Asymmetry α: how strongly slow tasks are pulled up (the paper explores "
        "0…3; at most 10, so that the targets rᵢ^α stay finite in float32).",
    )
    min_weight: float = Field(
        default=1e-6,
        gt=0.0,
        description="Floor applied to the weights before renormalising (not in the paper: "
        "keeps a large optimizer step from making a weight ≤ 0).",
    )


class GradNorm(LearnablePlugin):
    """GradNorm: weights wᵢ learned by L_grad = Σᵢ |Gᵢ − sg(Ḡ·rᵢ^α)|, renormalised to Σw = T.

    Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018. With gᵢ the gradient of
    ℓᵢ on the last shared layer W (space ``last_shared``):

    - Gᵢ = ‖∇_W wᵢℓᵢ‖ = wᵢ‖gᵢ‖, Ḡ = meanⱼ Gⱼ;
    - r̃ᵢ = ℓᵢ/ℓᵢ(0) (ℓ(0): the losses of the first call), rᵢ = r̃ᵢ / meanⱼ r̃ⱼ;
    - the target Ḡ·rᵢ^α is a constant (stop-gradient) and L_grad is differentiated w.r.t. w
      only: ∂L_grad/∂wᵢ = sign(Gᵢ − Ḡrᵢ^α)·‖gᵢ‖. The model gets the detached weights.

    Several public implementations deviate from this rule; the test suite checks the rule on
    hand-computed numbers and rules out the easy deviations (differentiating through Ḡ, raw
    ratios r̃ instead of rᵢ, no renormalisation).

    **Optimizer.** The weights are a learnable vector (float32 on the CPU, initialised to 1)
    in ``mtl.parameters()``: the user's optimizer takes the gradient step (give it its own
    param group with the learning rate of your choice, without weight decay). Because that
    step happens outside the plugin, the renormalisation w ← T·w/Σw (after flooring at
    ``min_weight``) is applied in place at the start of the next ``backward()``, before the
    weights are used: the weights used at each step are the renormalised ones, as in the paper.

    ℓᵢ are the losses as weighted by earlier plugins and ‖gᵢ‖ the norms of the gradients as
    weighted so far (``step.grad_norms()``). ℓᵢ(0) must be > 0 and ℓᵢ ≥ 0 afterwards
    (:class:`~mtlhooks.errors.InputError` otherwise). State: w and ℓ(0).
    """

    name = "gradnorm"
    family = Family.NORM_BALANCING
    Config = GradNormConfig
    spaces = (Space.LAST_SHARED, Space.PARAMS, Space.FEATURES)
    needs = Need.GRAMIAN

    def __init__(self, config: GradNormConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: GradNormConfig = config
        self._init_learnable(1.0)
        self._initial: torch.Tensor | None = None

    def _renormalize(self) -> None:
        with torch.no_grad():
            weights = self._learnable
            weights.clamp_(min=self.config.min_weight)
            weights.mul_(self.setup.num_tasks / weights.sum())

    @hookimpl
    def mtl_balance(self, step: Step) -> None:
        losses = effective_losses(step)
        check_lower_bound(
            losses,
            0.0,
            step.tasks,
            method=self.name,
            strict=self._initial is None,
            why="divides each loss by its value at the first step (which must be > 0), and "
            "raises loss ratios to the power α (which needs losses ≥ 0)",
            fix="Use a non-negative loss that is not 0 at the first step.",
        )
        self._renormalize()
        norms = step.grad_norms().detach()
        if self._initial is None:
            self._initial = losses.clone()
        ratios = (losses / self._initial.to(losses)).to(norms.dtype)
        mean_ratio = ratios.mean()
        relative = ratios / mean_ratio if bool(mean_ratio > 0) else torch.ones_like(ratios)
        weights = self.learnable_like(norms)
        scaled_norms = weights * norms
        target = (scaled_norms.mean() * relative.pow(self.config.alpha)).detach()
        step.add_auxiliary_loss((scaled_norms - target).abs().sum())
        step.weights = step.weights * weights.detach().to(step.weights.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial": self._initial}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._initial = state["initial"]
