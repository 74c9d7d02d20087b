"""RLW: random loss weights drawn afresh at every step (Lin et al. 2022)."""

from __future__ import annotations

import torch

from mtlhooks.plugin import Family, Plugin, hookimpl
from mtlhooks.step import Step
from mtlhooks.weighting_utils import softmax_with_temperature


class RLW(Plugin):
    """Random loss weighting: w = softmax(ε), ε ~ N(0, I), drawn at every ``backward()``.

    Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
    Learning", TMLR 2022 (the normal-distribution variant). ε is drawn in float32 on the CPU
    from the pipeline's seeded generator (``step.generator``), so runs are reproducible and
    every distributed rank draws the same weights; they are then moved to the losses' device.
    The weights sum to 1 (times the weights of earlier plugins) and do not depend on the
    losses: task i gets the i-th draw.
    """

    name = "rlw"
    family = Family.LOSS_SCALING

    @hookimpl
    def mtl_scale_losses(self, step: Step) -> None:
        draw = torch.randn(len(step.tasks), generator=step.generator, dtype=torch.float32)
        weights = softmax_with_temperature(draw).to(step.weights.device, step.weights.dtype)
        step.weights = step.weights * weights
