"""GradVac: raise pairwise gradient cosines towards their running averages (Wang et al. 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.method import MethodSpec, Property, check_gramian, uniform_draws
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Setup, Space, hookimpl
from mtlhooks.solvers import working_dtype
from mtlhooks.step import Step


def gradvac(
    gramian: Tensor,
    targets: Tensor,
    *,
    beta: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """GradVac: raise every pairwise cosine towards an EMA target.

    Wang et al., "Gradient Vaccine", ICLR 2021, Alg. 1: for each task i and every other task j
    in a random order, with ``φ = cos(g̃ᵢ, gⱼ)`` and target ``φ̂ᵢⱼ``: if ``φ < φ̂``,
    ``g̃ᵢ += ‖g̃ᵢ‖(φ̂√(1−φ²) − φ√(1−φ̂²)) / (‖gⱼ‖√(1−φ̂²)) · gⱼ``; then
    ``φ̂ᵢⱼ ← (1−β)φ̂ᵢⱼ + βφ``. Update ``Σ g̃ᵢ``. Pure: returns ``(weights, new_targets)``.

    Zero gradients give ``φ = 0`` and are never added. Targets are clipped to
    ``[-1, 1 − √eps]`` inside the formula (a target of exactly 1 asks for an infinite step).
    Initialise ``targets`` with zeros, as the reference does.
    """
    check_gramian(gramian)
    num_tasks = gramian.shape[0]
    if targets.shape != gramian.shape:
        raise InputError(f"gradvac: targets must have shape {tuple(gramian.shape)}")
    dtype = working_dtype(gramian)
    matrix = gramian.to(dtype)
    device = matrix.device
    ema = targets.to(dtype)
    diag = matrix.diagonal().clamp_min(0)
    scales = diag.sqrt()
    eps = torch.finfo(dtype).eps
    tasks = torch.arange(num_tasks, device=device)
    orders = uniform_draws((num_tasks, num_tasks), generator, device).argsort(1)
    rounds = orders.T  # round k pairs task i with partner rounds[k, i]
    # everything a round needs, gathered once
    partner_rows = matrix[rounds].unbind(0)
    partner_scales = scales[rounds]
    valid = (rounds != tasks) & (partner_scales > 0)
    target = ema[tasks, rounds].clamp(-1.0, 1.0 - eps**0.5)  # (rounds, tasks)
    # with θ = acos φ and θ̂ = acos φ̂ the step (φ̂√(1−φ²) − φ√(1−φ̂²))/√(1−φ̂²) is
    # sin(θ − θ̂)/sin θ̂; an invalid pair gets the target −2, which no cosine is below
    target_angle = target.acos().unbind(0)
    ratio = torch.where(valid, 1 / (partner_scales * target.acos().sin()), 0.0).unbind(0)
    threshold = torch.where(valid, target, -2.0).unbind(0)
    inverse_scales = torch.where(valid, 1 / torch.where(valid, partner_scales, 1.0), 0.0)
    inverse_scales_list = inverse_scales.unbind(0)
    partner_sq = diag[rounds].unbind(0)
    flat_index = (tasks * num_tasks + rounds).unbind(0)
    coefficients = torch.eye(num_tasks, dtype=dtype, device=device)
    flat = coefficients.view(-1)
    own_sq = diag.clone()  # ‖g̃ᵢ‖², updated as g̃ᵢ moves
    zero = torch.zeros((), dtype=dtype, device=device)
    cosines = []
    for step in range(num_tasks):
        dots = (coefficients * partner_rows[step]).sum(1)
        own = own_sq.clamp_min(0).sqrt()
        # zero gradients give φ = 0: their inner products are exactly 0
        cos = (dots * inverse_scales_list[step] / own.clamp_min(1e-300)).clamp(-1.0, 1.0)
        cosines.append(cos)
        amount = (cos.acos() - target_angle[step]).sin() * ratio[step] * own
        amount = torch.where(cos < threshold[step], amount, zero)
        flat.index_add_(0, flat_index[step], amount)
        own_sq = own_sq + amount * (2 * dots + amount * partner_sq[step])
    # every pair is visited once: the EMA reads the targets before this call, then updates
    phi = torch.stack(cosines)
    updated = torch.where(valid, (1 - beta) * ema[tasks, rounds] + beta * phi, ema[tasks, rounds])
    new_ema = ema.clone()
    new_ema[tasks, rounds] = updated
    return coefficients.sum(0).to(gramian.dtype), new_ema.to(targets.dtype)


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
    (:func:`gradvac`), so the task-specific parameters receive the same
    weights. The targets start at 0 and are the plugin's state (``state_dict``): a resumed run
    continues bit-for-bit. They are updated at every ``backward()`` that aggregates.
    """

    name = "gradvac"
    family = Family.AGGREGATOR
    Config = GradVacConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN
    method = MethodSpec(
        gradvac,
        "Wang et al. 2021",
        frozenset(
            {Property.SCALE_INVARIANT, Property.PERMUTATION_EQUIVARIANT, Property.NONNEGATIVE}
        ),
        random=True,
        stateful=True,
        notes="stateful (EMA targets in, new targets out); equivariant given the same orders",
    )

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
        weights, self.targets = gradvac(
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
