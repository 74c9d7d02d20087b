"""PCGrad: project each task gradient off the others it conflicts with (Yu et al. 2020)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mtlhooks import functional
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.step import Step


class PCGradConfig(PluginConfig):
    reduction: Literal["sum", "mean"] = Field(
        default="sum", description="Combine the projected gradients by their sum or mean."
    )


class PCGrad(Plugin):
    """PCGrad: project each task gradient off the task gradients it conflicts with.

    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1. For each
    task i, in an order drawn from the pipeline's seeded generator, whenever
    ⟨g̃ᵢ, gⱼ⟩ < 0 the projection onto gⱼ's normal plane is removed; the update is the sum (or
    mean) of the projected gradients. Computed on the Gramian as weights, so the task-specific
    parameters receive the same weights.
    """

    name = "pcgrad"
    family = Family.AGGREGATOR
    Config = PCGradConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, PCGradConfig)
        return functional.pcgrad(
            step.gramian(), generator=step.generator, reduction=self.config.reduction
        )
