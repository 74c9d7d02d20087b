"""Trimmed mean: per coordinate, the mean of the task gradients without the extremes
(Yin et al. 2018)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.method import MethodSpec
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.step import Step


def trimmed_mean(grads: Tensor, *, trim: int = 1) -> Tensor:
    """Coordinate-wise trimmed mean of the (T, ...) task gradients.

    Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018, Def. 2: per coordinate, drop the ``trim`` largest and the
    ``trim`` smallest of the T values and average the other T − 2·trim. ``trim = 0`` is the
    mean. Ties are immaterial (equal values are interchangeable).

    :raises InputError: unless ``T ≥ 2·trim + 1``.
    """
    if grads.dim() < 1 or grads.shape[0] == 0:
        raise InputError("trimmed_mean: expected gradients of shape (T, ...) with T ≥ 1")
    num_tasks = grads.shape[0]
    if trim < 0 or num_tasks < 2 * trim + 1:
        raise InputError(
            f"trimmed_mean: needs at least 2·trim + 1 = {2 * trim + 1} tasks (trim ≥ 0), got "
            f"{num_tasks}"
        )
    ordered = grads.sort(dim=0).values
    return ordered[trim : num_tasks - trim].mean(0)


class TrimmedMeanConfig(PluginConfig):
    trim: int = Field(
        default=1,
        ge=0,
        description="How many of the largest and of the smallest values are dropped per "
        "coordinate (needs at least 2·trim + 1 tasks; 0 is the mean).",
    )


class TrimmedMean(Plugin):
    """Trimmed mean: per coordinate of the shared gradient, average the task gradients without
    the ``trim`` largest and ``trim`` smallest values.

    Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
    ICML 2018 (:func:`trimmed_mean`; TorchJD 0.18's ``TrimmedMean``). Coordinate-wise, so not a
    weighting: the trimmed mean of the weighted task gradients is written to the shared
    parameters (space ``params``) or to the features (space ``features``), while the
    task-specific parameters receive ``Σ wᵢ∇Lᵢ`` as for every coordinate-wise method — a sum, where
    the shared part is a mean: give the tasks weights ``1/T`` (``static: {normalize: true}``)
    to put both on the same scale. Under data parallelism it is exact: each coordinate's values
    are local to a sample (features) or all-reduced first (params, sync exact).
    """

    name = "trimmed_mean"
    family = Family.AGGREGATOR
    Config = TrimmedMeanConfig
    spaces = (Space.PARAMS, Space.FEATURES)
    needs = Need.JACOBIAN
    method = MethodSpec(
        trimmed_mean,
        "Yin et al. 2018",
        frozenset(),
        input="gradients",
        min_tasks=3,
        notes="coordinate-wise: returns the combined gradient, not weights; trim = 1",
    )

    @classmethod
    def check_config(cls, config: PluginConfig, tasks: tuple[str, ...]) -> None:
        assert isinstance(config, TrimmedMeanConfig)
        if len(tasks) < 2 * config.trim + 1:
            raise ValueError(
                f"trimmed_mean needs at least 2·trim + 1 = {2 * config.trim + 1} tasks, got "
                f"{len(tasks)}; lower trim"
            )

    @hookimpl
    def mtl_combine(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, TrimmedMeanConfig)
        assert step.gradients is not None
        matrix = step.gradients.matrix()
        weighted = matrix * step.weights.to(matrix.device, matrix.dtype)[:, None]
        return trimmed_mean(weighted, trim=self.config.trim)
