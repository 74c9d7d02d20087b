"""DualProj: the mean gradient projected onto the dual cone (Quinton & Rey 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlhooks.method import MethodSpec, Property, check_gramian, is_finite, nan_weights
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.plugins.upgrad import PreferenceConfig, check_preferences, preference_vector
from mtlhooks.solvers import dual_cone_qp
from mtlhooks.step import Step


def dualproj(gramian: Tensor, *, pref: Tensor | None = None) -> Tensor:
    """DualProj: projection of the (preference-weighted) mean gradient onto the dual cone.

    Quinton & Rey, arXiv 2406.16232 (2024), Sec. 5 (baseline built from the same projection):
    ``α = argmin_{v ≥ pref} vᵀGv`` with ``pref = 1/T`` by default.
    """
    check_gramian(gramian)
    if not is_finite(gramian):
        return nan_weights(gramian)
    return dual_cone_qp(gramian, preference_vector(gramian, pref))


class DualProj(Plugin):
    """DualProj: project the (preference-weighted) mean gradient onto the dual cone.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232 (2024),
    the DualProj baseline: ``α = argmin_{v ≥ pref} vᵀGv`` (:func:`dualproj`),
    the closest point to the mean gradient (in weight space) that conflicts with no task. Equals
    the mean when the mean gradient already conflicts with no task.
    """

    name = "dualproj"
    family = Family.AGGREGATOR
    Config = PreferenceConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN
    method = MethodSpec(
        dualproj,
        "Quinton & Rey 2024",
        frozenset(
            {
                Property.NON_CONFLICTING,
                Property.SCALE_INVARIANT,
                Property.PERMUTATION_EQUIVARIANT,
                Property.NONNEGATIVE,
            }
        ),
    )

    @classmethod
    def check_config(cls, config: PluginConfig, tasks: tuple[str, ...]) -> None:
        check_preferences(config, tasks)

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, PreferenceConfig)
        gramian = step.gramian()
        return dualproj(gramian, pref=self.config.vector(step.tasks, gramian))
