"""Krum and Multi-Krum: the gradients closest to their neighbours (Blanchard et al. 2017)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.method import MethodSpec, Property, check_gramian, is_finite, nan_weights
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.solvers import working_dtype
from mtlhooks.step import Step


def krum(gramian: Tensor, *, n_byzantine: int = 1, n_selected: int = 1) -> Tensor:
    """Krum (``n_selected = 1``) and Multi-Krum: the mean of the gradients whose neighbours are
    closest.

    Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS 2017, Sec. 4: with f = ``n_byzantine``, the score of
    gradient i is ``Σⱼ ‖gᵢ − gⱼ‖²`` over its T − f − 2 nearest other gradients; Krum selects
    the gradient of least score, Multi-Krum the m = ``n_selected`` of least scores and averages
    them (weights 1/m on those, 0 elsewhere). Squared distances as in the paper
    (``‖gᵢ − gⱼ‖² = Gᵢᵢ + Gⱼⱼ − 2Gᵢⱼ``, from the Gramian); TorchJD 0.18 sums the distances
    themselves, which can select differently. Ties are broken by the lower task index.

    :raises InputError: unless ``T ≥ f + 3`` and ``1 ≤ m ≤ T``.
    """
    check_gramian(gramian)
    num_tasks = gramian.shape[0]
    if n_byzantine < 0 or num_tasks < n_byzantine + 3:
        raise InputError(
            f"krum: needs at least n_byzantine + 3 = {n_byzantine + 3} tasks (n_byzantine ≥ 0), "
            f"got {num_tasks}"
        )
    if not 1 <= n_selected <= num_tasks:
        raise InputError(f"krum: n_selected must be in [1, {num_tasks}], got {n_selected}")
    if not is_finite(gramian):
        return nan_weights(gramian)
    matrix = gramian.to(working_dtype(gramian))
    diag = matrix.diagonal()
    squared = (diag.unsqueeze(0) + diag.unsqueeze(1) - 2 * matrix).clamp_min(0)
    squared.fill_diagonal_(torch.inf)  # a gradient is not its own neighbour
    nearest = squared.sort(dim=1).values[:, : num_tasks - n_byzantine - 2]
    scores = nearest.sum(1)
    # stable sort: equal scores keep the task order (the lower index wins)
    chosen = torch.sort(scores, stable=True).indices[:n_selected]
    weights = torch.zeros_like(scores).index_fill_(0, chosen, 1.0 / n_selected)
    return weights.to(gramian.dtype)


class KrumConfig(PluginConfig):
    n_byzantine: int = Field(
        default=1,
        ge=0,
        description="f: how many task gradients may be adversarial (outliers); Krum needs "
        "at least f + 3 tasks.",
    )
    n_selected: int = Field(
        default=1,
        ge=1,
        description="m: how many of the best-scored gradients are averaged (1: Krum; more: "
        "Multi-Krum).",
    )


class Krum(Plugin):
    """Krum / Multi-Krum: average the m task gradients closest to their T − f − 2 neighbours.

    Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
    NeurIPS 2017 (:func:`krum`): robust aggregation from federated learning, where up to f of the
    gradients may be arbitrary; as weights on the Gramian (1/m on the selected tasks), so the
    task-specific parameters receive the same weights. Needs ``T ≥ f + 3`` tasks and
    ``n_selected ≤ T`` (checked against the configured tasks).
    """

    name = "krum"
    family = Family.AGGREGATOR
    Config = KrumConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN
    method = MethodSpec(
        krum,
        "Blanchard et al. 2017",
        frozenset({Property.NONNEGATIVE}),
        min_tasks=4,
        notes="f = 1, m = 1; scale-invariant and permutation-equivariant except where scores "
        "tie (the lower index wins, and rounding decides ties); squared distances as in the "
        "paper (TorchJD: distances)",
    )

    @classmethod
    def check_config(cls, config: PluginConfig, tasks: tuple[str, ...]) -> None:
        assert isinstance(config, KrumConfig)
        if len(tasks) < config.n_byzantine + 3:
            raise ValueError(
                f"krum needs at least n_byzantine + 3 = {config.n_byzantine + 3} tasks, got "
                f"{len(tasks)}; lower n_byzantine"
            )
        if config.n_selected > len(tasks):
            raise ValueError(
                f"field 'n_selected': {config.n_selected} is more than the {len(tasks)} tasks"
            )

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, KrumConfig)
        return krum(
            step.gramian(),
            n_byzantine=self.config.n_byzantine,
            n_selected=self.config.n_selected,
        )
