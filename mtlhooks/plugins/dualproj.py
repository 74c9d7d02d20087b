"""DualProj: the mean gradient projected onto the dual cone (Quinton & Rey 2024)."""

from __future__ import annotations

import torch

from mtlhooks import functional
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.plugins.upgrad import PreferenceConfig, check_preferences
from mtlhooks.step import Step


class DualProj(Plugin):
    """DualProj: project the (preference-weighted) mean gradient onto the dual cone.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232 (2024),
    the DualProj baseline: ``α = argmin_{v ≥ pref} vᵀGv`` (:func:`mtlhooks.functional.dualproj`),
    the closest point to the mean gradient (in weight space) that conflicts with no task. Equals
    the mean when the mean gradient already conflicts with no task.
    """

    name = "dualproj"
    family = Family.AGGREGATOR
    Config = PreferenceConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN

    @classmethod
    def check_config(cls, config: PluginConfig, tasks: tuple[str, ...]) -> None:
        check_preferences(config, tasks)

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, PreferenceConfig)
        gramian = step.gramian()
        return functional.dualproj(gramian, pref=self.config.vector(step.tasks, gramian))
