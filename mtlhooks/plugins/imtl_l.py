"""IMTL-L: learned loss scales that make every scaled loss equal to 1 (Liu et al. 2021)."""

from __future__ import annotations

import torch
from pydantic import Field

from mtlhooks.plugin import Family, PluginConfig, Setup, hookimpl
from mtlhooks.step import Step
from mtlhooks.weighting_utils import LOG_WEIGHT_BOUND, LearnablePlugin, effective_losses


class IMTLLConfig(PluginConfig):
    init: float = Field(
        default=0.0,
        ge=-LOG_WEIGHT_BOUND,
        le=LOG_WEIGHT_BOUND,
        description="Initial log-scale sᵢ of every task (0: weights 1).",
    )


class IMTLL(LearnablePlugin):
    """IMTL-L: Σ e^{sᵢ}ℓᵢ − sᵢ with learned log-scales sᵢ.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (the loss-balance part
    of IMTL). The model receives the detached weights e^{sᵢ}; the objective of sᵢ,
    Σ e^{sᵢ}·sg(ℓᵢ) − sᵢ, is added with ``step.add_auxiliary_loss``. **The user must hand
    ``mtl.parameters()`` to an optimizer.** sᵢ is float32 on the CPU (cast where used;
    ``plugin.to(device)`` moves it).

    The objective is convex in sᵢ with its minimum at sᵢ = −log ℓᵢ, where every scaled loss
    e^{sᵢ}ℓᵢ equals 1 and the update ∇ℓᵢ/ℓᵢ does not depend on the scale of ℓᵢ. At the default
    initialisation the weights are exactly 1 (a plain sum). ℓᵢ are the losses as weighted by
    earlier plugins (see :mod:`mtlhooks.weighting_utils`).
    """

    name = "imtl_l"
    family = Family.LOSS_SCALING
    Config = IMTLLConfig

    def __init__(self, config: IMTLLConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: IMTLLConfig = config
        self._init_learnable(config.init)

    @hookimpl
    def mtl_scale_losses(self, step: Step) -> None:
        losses = effective_losses(step)
        log_scale = self.learnable_like(losses)
        scale = torch.exp(log_scale)
        step.add_auxiliary_loss((scale * losses - log_scale).sum())
        step.weights = step.weights * scale.detach()
