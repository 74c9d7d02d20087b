"""UPGrad: average of the task gradients projected onto the dual cone (Quinton & Rey 2024)."""

from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.method import MethodSpec, Property, check_gramian, is_finite, mean, nan_weights
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.solvers import dual_cone_qp
from mtlhooks.step import Step


def preference_vector(gramian: Tensor, pref: Tensor | None) -> Tensor:
    if pref is None:
        return mean(gramian)
    if pref.shape != gramian.shape[:1] or bool((pref < 0).any()):
        raise InputError(f"pref must be a nonnegative vector of length {gramian.shape[0]}")
    return pref.to(gramian)


def upgrad(gramian: Tensor, *, pref: Tensor | None = None) -> Tensor:
    """UPGrad: average of the projections of the (preference-weighted) gradients onto the dual cone.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232 (2024),
    Sec. 4: ``vᵢ = argmin_{v ≥ prefᵢ eᵢ} vᵀGv`` and ``α = Σᵢ vᵢ``. With the default
    ``pref = 1/T`` the result equals the mean when no gradient conflicts with the others. All T
    QPs are solved together (:func:`mtlhooks.solvers.dual_cone_qp`).
    """
    check_gramian(gramian)
    if not is_finite(gramian):
        return nan_weights(gramian)
    lower = torch.diag(preference_vector(gramian, pref))
    return dual_cone_qp(gramian, lower).sum(0)


class PreferenceConfig(PluginConfig):
    """Options of the dual-cone methods (UPGrad, DualProj): an optional preference vector."""

    pref: dict[str, float] | None = Field(
        default=None,
        description="Preference weight per task, every task listed (≥ 0); default: 1/T each, "
        "so that non-conflicting gradients give their mean.",
    )

    @field_validator("pref")
    @classmethod
    def _finite_nonnegative(cls, pref: dict[str, float] | None) -> dict[str, float] | None:
        if pref is not None:
            bad = {task: w for task, w in pref.items() if not (math.isfinite(w) and w >= 0)}
            if bad:
                raise ValueError(f"preference weights must be finite and >= 0, got {bad}")
        return pref

    def vector(self, tasks: tuple[str, ...], like: torch.Tensor) -> torch.Tensor | None:
        """The preferences in task order, in the dtype and on the device of ``like``."""
        if self.pref is None:
            return None
        return torch.tensor([self.pref[t] for t in tasks], dtype=like.dtype, device=like.device)


def check_preferences(config: PluginConfig, tasks: tuple[str, ...]) -> None:
    """``pref`` must name exactly the configured tasks."""
    assert isinstance(config, PreferenceConfig)
    if config.pref is None:
        return
    unknown = sorted(set(config.pref) - set(tasks))
    missing = [t for t in tasks if t not in config.pref]
    if unknown or missing:
        raise ValueError(
            f"field 'pref' must list every task {list(tasks)}; unknown: {unknown}, "
            f"missing: {missing}"
        )


class UPGrad(Plugin):
    """UPGrad: project each task gradient onto the dual cone and average the projections.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232 (2024),
    Sec. 4: ``vᵢ = argmin_{v ≥ prefᵢ eᵢ} vᵀGv`` and ``α = Σᵢ vᵢ``; all T QPs are solved
    together on the Gramian (:func:`upgrad`). The update never conflicts
    with a task (``⟨d, gᵢ⟩ ≥ 0``), scales linearly with the gradients, and equals the
    preference-weighted sum (the mean by default) when no two gradients conflict.
    """

    name = "upgrad"
    family = Family.AGGREGATOR
    Config = PreferenceConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN
    method = MethodSpec(
        upgrad,
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
        return upgrad(gramian, pref=self.config.vector(step.tasks, gramian))
