"""GradVac: raise pairwise gradient cosines towards their running averages (Wang et al. 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field

from mtlhooks import functional
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Setup, Space, hookimpl
from mtlhooks.step import Step


class GradVacConfig(PluginConfig):
    beta: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="EMA rate of the cosine targets: φ̂ ← (1−β)φ̂ + βφ (the reference "
        "implementation's 0.5).",
    )


class GradVac(Plugin):
    """GradVac: pull every pairwise gradient cosine up to an EMA target, PCGrad-style.

    Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models", ICLR 2021, Algorithm 1: for each task i and every other task
    j, in an order drawn from the pipeline's seeded generator, with ``φ = cos(g̃ᵢ, gⱼ)``: if
    ``φ < φ̂ᵢⱼ``, ``g̃ᵢ += ‖g̃ᵢ‖(φ̂√(1−φ²) − φ√(1−φ̂²)) / (‖gⱼ‖√(1−φ̂²)) · gⱼ``; then
    ``φ̂ᵢⱼ ← (1−β)φ̂ᵢⱼ + βφ``. The update is ``Σ g̃ᵢ``, computed on the Gramian as weights
    (:func:`mtlhooks.functional.gradvac`), so the task-specific parameters receive the same
    weights. The targets start at 0 and are the plugin's state (``state_dict``): a resumed run
    continues bit-for-bit. They are updated at every ``backward()`` that aggregates.
    """

    name = "gradvac"
    family = Family.AGGREGATOR
    Config = GradVacConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN

    def __init__(self, config: GradVacConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        size = setup.num_tasks
        # Moved to the Gramian's device and dtype at the first step, then kept there.
        self.targets = torch.zeros(size, size, dtype=torch.float64)

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, GradVacConfig)
        gramian = step.gramian()
        targets = self.targets.to(device=gramian.device, dtype=gramian.dtype)
        weights, self.targets = functional.gradvac(
            gramian, targets, beta=self.config.beta, generator=step.generator
        )
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {"targets": self.targets.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        targets = state.get("targets")
        size = self.setup.num_tasks
        if set(state) != {"targets"} or not isinstance(targets, torch.Tensor):
            raise ValueError(f"gradvac: expected state {{'targets': Tensor}}, got {sorted(state)}")
        if targets.shape != (size, size):
            raise ValueError(
                f"gradvac: targets have shape {tuple(targets.shape)}, expected ({size}, {size})"
            )
        self.targets = targets.clone()
