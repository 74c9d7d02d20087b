"""PCGrad: project each task gradient off the others it conflicts with (Yu et al. 2020)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.method import MethodSpec, Property, check_gramian, uniform_draws
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.solvers import input_eps, working_dtype
from mtlhooks.step import Step


def pcgrad_from_orders(
    gramian: Tensor, orders: Tensor, *, reduction: Literal["sum", "mean"] = "sum"
) -> Tensor:
    """PCGrad with explicit projection orders: ``orders[i]`` is task i's order over all tasks.

    Entries equal to ``i`` in ``orders[i]`` are skipped (a task never projects onto itself), so a
    permutation of ``range(T)`` per row is a valid input. See :func:`pcgrad`.
    """
    check_gramian(gramian)
    if reduction not in ("sum", "mean"):
        raise InputError(f"pcgrad: reduction must be 'sum' or 'mean', got {reduction!r}")
    dtype = working_dtype(gramian)
    matrix = gramian.to(dtype)
    num_tasks = matrix.shape[0]
    device = matrix.device
    tasks = torch.arange(num_tasks, device=device)
    diag = matrix.diagonal()
    scales = diag.clamp_min(0).sqrt()
    rounding = 4 * num_tasks * input_eps(gramian)
    # everything a round needs, gathered once: round k pairs task i with partner rounds[k, i]
    rounds = orders.T.to(device)
    partner_rows = matrix[rounds].unbind(0)  # rows[k][i] = G[rounds[k, i]]
    partner_sq = diag[rounds]
    valid = (rounds != tasks) & (partner_sq > 0)
    neg_inverse = torch.where(valid, -1 / torch.where(valid, partner_sq, 1.0), 0.0).unbind(0)
    # an inner product within its own rounding error is no conflict: projecting on noise
    # would make the result depend on the last bits of G (e.g. of a common scale)
    neg_noise = (-rounding * scales[rounds]).unbind(0)
    partner_scales = scales[rounds].unbind(0)
    flat_index = (tasks * num_tasks + rounds).unbind(0)
    # row i holds the coefficients of the projected gradient g̃ᵢ = Σₖ Cᵢₖ gₖ; they are ≥ 0
    # off the diagonal (a projection adds a positive multiple), so Σₖ|Cᵢₖ|sₖ = (C s)ᵢ
    coefficients = torch.eye(num_tasks, dtype=dtype, device=device)
    flat = coefficients.view(-1)
    magnitude = scales.clone()
    zero = torch.zeros((), dtype=dtype, device=device)
    for step in range(rounds.shape[0]):
        dots = (coefficients * partner_rows[step]).sum(1)  # ⟨g̃ᵢ, g_partner⟩
        conflict = dots < neg_noise[step] * magnitude
        amount = torch.where(conflict, dots * neg_inverse[step], zero)
        flat.index_add_(0, flat_index[step], amount)
        magnitude.addcmul_(amount, partner_scales[step])
    weights = coefficients.sum(0)
    if reduction == "mean":
        weights = weights / num_tasks
    return weights.to(gramian.dtype)


def pcgrad(
    gramian: Tensor,
    *,
    generator: torch.Generator | None = None,
    reduction: Literal["sum", "mean"] = "sum",
) -> Tensor:
    """PCGrad ("gradient surgery") expressed as weights on the Gramian.

    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1: for each
    task i, ``g̃ᵢ = gᵢ``; for every other task j in a random order, if ``⟨g̃ᵢ, gⱼ⟩ < 0`` then
    ``g̃ᵢ ← g̃ᵢ − ⟨g̃ᵢ, gⱼ⟩/‖gⱼ‖² gⱼ``; the update is ``Σ g̃ᵢ`` (``reduction="mean"``: the mean).

    Every g̃ᵢ is tracked as a row of coefficients on the original gradients, so the weights are
    ``αⱼ = Σᵢ Cᵢⱼ``. All tasks advance together: T rounds of (T, T) tensor operations. Each task
    has its own order, a random permutation drawn from ``generator`` (the official TF code never
    really shuffled). Zero gradients are never projected onto. Weights are ≥ 1 (sum) because a
    projection only ever adds a positive multiple of a conflicting gradient.
    """
    check_gramian(gramian)
    num_tasks = gramian.shape[0]
    draws = uniform_draws((num_tasks, num_tasks), generator, gramian.device)
    orders = draws.argsort(dim=1)
    return pcgrad_from_orders(gramian, orders, reduction=reduction)


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
    method = MethodSpec(
        pcgrad,
        "Yu et al. 2020",
        frozenset(
            {Property.SCALE_INVARIANT, Property.PERMUTATION_EQUIVARIANT, Property.NONNEGATIVE}
        ),
        random=True,
        notes="permutation-equivariant given the same projection orders",
    )

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, PCGradConfig)
        return pcgrad(step.gramian(), generator=step.generator, reduction=self.config.reduction)
