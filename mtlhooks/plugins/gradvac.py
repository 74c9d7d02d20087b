"""GradVac: raise pairwise gradient cosines towards their running averages (Wang et al. 2021)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import ConfigError, InputError
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
    """GradVac with every task's order over the others drawn from ``generator``; see
    :func:`gradvac_from_orders`."""
    check_gramian(gramian)
    return gradvac_from_orders(gramian, targets, _orders(gramian, generator), beta=beta)


def _orders(gramian: Tensor, generator: torch.Generator | None) -> Tensor:
    num_tasks = gramian.shape[0]
    return uniform_draws((num_tasks, num_tasks), generator, gramian.device).argsort(1)


def gradvac_from_orders(
    gramian: Tensor, targets: Tensor, orders: Tensor, *, beta: float = 0.5
) -> tuple[Tensor, Tensor]:
    """GradVac: raise every pairwise cosine towards an EMA target.

    Wang et al., "Gradient Vaccine", ICLR 2021, Alg. 1: for each task i and every other task j
    in a random order, with ``φ = cos(g̃ᵢ, gⱼ)`` and target ``φ̂ᵢⱼ``: if ``φ < φ̂``,
    ``g̃ᵢ += ‖g̃ᵢ‖(φ̂√(1−φ²) − φ√(1−φ̂²)) / (‖gⱼ‖√(1−φ̂²)) · gⱼ``; then
    ``φ̂ᵢⱼ ← (1−β)φ̂ᵢⱼ + βφ``. Update ``Σ g̃ᵢ``. Pure: returns ``(weights, new_targets)``.

    Zero gradients give ``φ = 0`` and are never added. Targets are clipped to
    ``[-1, 1 − √eps]`` inside the formula (a target of exactly 1 asks for an infinite step).
    Initialise ``targets`` with zeros, as the reference does. ``orders[i]`` is task i's order
    over all tasks (entries equal to i are skipped), as in
    :func:`mtlhooks.plugins.pcgrad.pcgrad_from_orders`. Every pair's target is updated, whether
    it was corrected or not, as in the paper's Algorithm 1 and TorchJD (LibMTL updates only the
    corrected pairs).
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
    rounds = orders.to(device).T  # round k pairs task i with partner rounds[k, i]
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


Granularity = Literal["whole_model", "all_layer", "all_matrix"]


class GradVacConfig(PluginConfig):
    beta: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="EMA rate of the cosine targets: φ̂ ← (1−β)φ̂ + βφ (the reference "
        "implementation's 0.5).",
    )
    granularity: Granularity = Field(
        default="whole_model",
        description="Where cosines are taken and corrected (the paper's and LibMTL's "
        "options): the whole gradient ('whole_model'), or per layer ('all_layer': the "
        "parameters of one module) or per parameter tensor ('all_matrix'), each group with its "
        "own targets and weights; the grouped modes work in space 'params' only.",
    )


def parameter_groups(names: Sequence[str], granularity: Granularity) -> list[list[int]]:
    """Indices of the parameter blocks of each group, in order of first appearance:
    ``all_matrix`` one per block, ``all_layer`` one per module (the name without its last
    component, so ``enc.0.weight`` and ``enc.0.bias`` form a group)."""
    if granularity == "all_matrix":
        return [[index] for index in range(len(names))]
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(name.rpartition(".")[0], []).append(index)
    return list(groups.values())


class GradVac(Plugin):
    """GradVac: pull every pairwise gradient cosine up to an EMA target, PCGrad-style.

    Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models", ICLR 2021, Algorithm 1: for each task i and every other task
    j, in an order drawn from the pipeline's seeded generator, with ``φ = cos(g̃ᵢ, gⱼ)``: if
    ``φ < φ̂ᵢⱼ``, ``g̃ᵢ += ‖g̃ᵢ‖(φ̂√(1−φ²) − φ√(1−φ̂²)) / (‖gⱼ‖√(1−φ̂²)) · gⱼ``; then
    ``φ̂ᵢⱼ ← (1−β)φ̂ᵢⱼ + βφ``. The update is ``Σ g̃ᵢ``, computed on the Gramian as weights
    (:func:`gradvac`), so the task-specific parameters receive the same weights. The targets
    start at 0 and are the plugin's state (``state_dict``, float64): a resumed run continues
    bit-for-bit. They are updated at every ``backward()`` that aggregates.

    ``granularity: all_layer | all_matrix`` applies the rule per group of shared parameters
    (per module, or per parameter tensor, as the paper's and LibMTL's options): each group has
    its own targets and gives its own weights on its own gradient blocks (the orders are drawn
    once per step and shared by the groups, as in LibMTL). The result is then not one
    weighting: it is written to the shared parameters as a combined gradient (space ``params``
    only; the task-specific parameters receive ``Σ wᵢ∇Lᵢ``, as for GradDrop).
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
        self.config: GradVacConfig = config
        size = setup.num_tasks
        self._groups: list[list[int]] | None = None
        if config.granularity != "whole_model":
            if setup.space is not Space.PARAMS:
                raise ConfigError(
                    f"gradvac: granularity {config.granularity!r} needs space 'params' (the "
                    f"per-group updates are written to the shared parameters), not "
                    f"{setup.space.value!r}; set space: params or granularity: whole_model"
                )
            self._groups = parameter_groups(setup.parameter_names, config.granularity)
            self.needs = Need.JACOBIAN  # the per-group blocks of J are combined
        count = 1 if self._groups is None else len(self._groups)
        # Moved to the Gramian's device at the first step, then kept there; always float64.
        self.targets = torch.zeros(count, size, size, dtype=torch.float64)

    @hookimpl
    def mtl_aggregate(self, step: Step) -> Tensor | None:
        if self._groups is not None:
            return None  # grouped: mtl_combine
        gramian = step.gramian()
        targets = self.targets[0].to(device=gramian.device)
        weights, new_targets = gradvac(
            gramian, targets, beta=self.config.beta, generator=step.generator
        )
        self.targets = new_targets.unsqueeze(0)
        return weights

    @hookimpl
    def mtl_combine(self, step: Step) -> Tensor | None:
        if self._groups is None:
            return None
        gradients = step.gradients
        assert gradients is not None
        scale = step.weights.to(gradients.gramian.dtype)
        orders = _orders(gradients.gramian, step.generator)
        targets = self.targets.to(device=gradients.gramian.device)
        pieces: list[Tensor | None] = [None] * len(gradients.blocks)
        updated = []
        for group, blocks in enumerate(self._groups):
            gramian = torch.stack([gradients.block_gramians[k] for k in blocks]).sum(0)
            gramian = gramian * scale[:, None] * scale[None, :]
            weights, new_targets = gradvac_from_orders(
                gramian, targets[group], orders, beta=self.config.beta
            )
            updated.append(new_targets)
            for k in blocks:
                block = gradients.blocks[k]
                pieces[k] = (weights * scale).to(block.dtype) @ block
        self.targets = torch.stack(updated)
        assert all(piece is not None for piece in pieces)
        return torch.cat([piece for piece in pieces if piece is not None])

    def state_dict(self) -> dict[str, Any]:
        return {"targets": self.targets.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        targets = state.get("targets")
        expected = tuple(self.targets.shape)
        if set(state) != {"targets"} or not isinstance(targets, torch.Tensor):
            raise ValueError(f"gradvac: expected state {{'targets': Tensor}}, got {sorted(state)}")
        if tuple(targets.shape) != expected:
            raise ValueError(
                f"gradvac: targets have shape {tuple(targets.shape)}, expected {expected} "
                "(groups, tasks, tasks)"
            )
        self.targets = targets.to(torch.float64).clone()
