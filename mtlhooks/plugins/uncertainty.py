"""Uncertainty weighting: learned homoscedastic task uncertainty (Kendall et al. 2018)."""

from __future__ import annotations

import torch
from pydantic import Field

from mtlhooks.plugin import Family, PluginConfig, Setup, hookimpl
from mtlhooks.step import Step
from mtlhooks.weighting_utils import LOG_WEIGHT_BOUND, LearnablePlugin, effective_losses


class UncertaintyConfig(PluginConfig):
    init: float = Field(
        default=0.0,
        ge=-LOG_WEIGHT_BOUND,
        le=LOG_WEIGHT_BOUND,
        description="Initial log-variance sᵢ = log σᵢ² of every task (0: weights ½).",
    )


class Uncertainty(LearnablePlugin):
    """Uncertainty weighting: Σ ½e^{−sᵢ}ℓᵢ + ½sᵢ with learned log-variances sᵢ = log σᵢ².

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018, with sᵢ = log σᵢ² learned for stability.

    The model receives the detached weights ½e^{−sᵢ}; the objective of sᵢ,
    Σ ½e^{−sᵢ}·sg(ℓᵢ) + ½sᵢ, is added with ``step.add_auxiliary_loss`` so only sᵢ learns from
    it. **The user must hand ``mtl.parameters()`` to an optimizer** (e.g.
    ``Adam([*model.parameters(), *mtl.parameters()])``), otherwise sᵢ never moves. sᵢ is float32
    on the CPU (cast where used; ``plugin.to(device)`` moves it).

    The objective is convex in sᵢ with its minimum at sᵢ = log ℓᵢ, where the weight is 1/(2ℓᵢ)
    and the update ½∇ℓᵢ/ℓᵢ does not depend on the scale of ℓᵢ. ℓᵢ are the losses as weighted by
    earlier plugins (see :mod:`mtlhooks.weighting_utils`). Some implementations drop the ½
    factors (e^{−s}L + s): same optimum weight up to a factor 2.
    """

    name = "uncertainty"
    family = Family.LOSS_SCALING
    Config = UncertaintyConfig

    def __init__(self, config: UncertaintyConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: UncertaintyConfig = config
        self._init_learnable(config.init)

    @hookimpl
    def mtl_scale_losses(self, step: Step) -> None:
        losses = effective_losses(step)
        log_variance = self.learnable_like(losses)
        precision = 0.5 * torch.exp(-log_variance)
        step.add_auxiliary_loss((precision * losses + 0.5 * log_variance).sum())
        step.weights = step.weights * precision.detach()
