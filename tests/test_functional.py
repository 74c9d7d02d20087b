"""Tests of the functional aggregation core (:mod:`mtlhooks.functional`).

Generic tests are parametrised over the declaration :data:`mtlhooks.functional.METHODS`: every
property a method claims is checked on hypothesis-generated Gramians with the shared helpers of
``properties.py``. Method-specific exactness checks and small cases computed independently follow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pytest
import torch
from families import FAMILIES, FLOAT32_FAMILIES, family_gramian
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from properties import (
    Weighting,
    assert_finite,
    assert_non_conflicting,
    assert_nonnegative,
    assert_permutation_equivariant,
    assert_scale_law,
    assert_updates_close,
    assert_weights_close,
    inner_product_scale,
)
from strategies import family_gramians, gramian_of, gramians, jacobians, scale_factors
from torch import Tensor

from mtlhooks import functional as F
from mtlhooks.errors import SolverError
from mtlhooks.functional import METHODS, MethodSpec, Property

GRAMIAN_METHODS = {name: spec for name, spec in METHODS.items() if spec.input == "gramian"}
SEED = 1234


@dataclass(frozen=True, repr=False)
class Case:
    """One method under one set of options, with the properties declared for them."""

    name: str
    spec: MethodSpec
    options: Mapping[str, object]
    properties: frozenset[Property]

    def __str__(self) -> str:
        options = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}[{options}]" if options else self.name

    __repr__ = __str__


DEFAULTS = [Case(name, spec, {}, spec.properties) for name, spec in GRAMIAN_METHODS.items()]
VARIANTS = [
    Case(name, spec, options, variant.properties)
    for name, spec in GRAMIAN_METHODS.items()
    for variant in spec.variants
    for options in variant.options
]
CASES = DEFAULTS + VARIANTS
"""Every declaration the property tests check: each method with its defaults, then each
declared variant (e.g. CAGrad with c ≥ 1), the latter for the properties it adds."""


def weighting_of(spec: MethodSpec, options: Mapping[str, object] | None = None) -> Weighting:
    """The method as a function of G alone; random methods get the same fresh draw every call,
    stateful ones the state of a fresh plugin."""

    def weighting(gramian: Tensor) -> Tensor:
        args: list[object] = [gramian]
        if spec.stateful:
            initial = spec.initial_state or torch.zeros_like
            args.append(initial(gramian))
        kwargs: dict[str, object] = {**spec.options, **(options or {})}
        if spec.random:
            kwargs["generator"] = torch.Generator(device=gramian.device).manual_seed(SEED)
        result = spec.function(*args, **kwargs)
        return result[0] if spec.stateful else result  # type: ignore[index,return-value]

    return weighting


def call_or_reject(case: Case, gramian: Tensor) -> Tensor:
    """Call the method; a documented SolverError rejects the example instead of failing."""
    try:
        return weighting_of(case.spec, case.options)(gramian)
    except SolverError:
        if not case.spec.may_raise:
            raise
        assume(False)
        raise  # unreachable: assume(False) raises


def with_property(prop: Property) -> list[Case]:
    """The default cases that claim ``prop``, and the variants that add it."""
    return [case for case in DEFAULTS if prop in case.properties] + [
        case for case in VARIANTS if prop in case.properties and prop not in case.spec.properties
    ]


def fits(case: Case, gramian: Tensor) -> bool:
    return gramian.shape[0] >= case.spec.min_tasks


# --------------------------------------------------------------------------- generic properties

# Relative accuracies (see properties.inner_product_scale). On Gramians of full rank the solvers
# are accurate to the ridge level; when several gradients combine to (almost) zero and their
# norms differ by many orders of magnitude, the optimal weights are ill-determined and the
# solvers only reach ~1e-6 (a backward error of that size in the cosines).
FULL_RANK_RTOL = 1e-9
DEGENERATE_RTOL = 1e-5
# weights of a full-rank problem, compared across G → cG or a relabelling of the tasks
WEIGHTS_RTOL = 1e-7
full_rank_gramians = gramians(kinds=("dense", "nonnegative"), degenerate=False, min_params=8)

relaxed = settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
by_case = pytest.mark.parametrize("case", DEFAULTS, ids=str)


def by_property(prop: Property) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("case", with_property(prop), ids=str)


@by_case
@relaxed
@given(gramian=gramians())
def test_output_is_finite_with_one_weight_per_task(case: Case, gramian: Tensor) -> None:
    assume(fits(case, gramian))
    weights = call_or_reject(case, gramian)
    assert weights.shape == gramian.shape[:1]
    assert weights.dtype == gramian.dtype
    assert_finite(weights)


@by_case
@relaxed
@given(gramian=gramians(degenerate=False, max_exponent=3))
def test_float32_output_is_finite(case: Case, gramian: Tensor) -> None:
    assume(fits(case, gramian))
    weights = call_or_reject(case, gramian.float())
    assert weights.dtype == torch.float32
    assert_finite(weights)


@pytest.mark.parametrize("case", CASES, ids=str)
@relaxed
@given(gramian=family_gramians())
def test_finite_weights_or_a_documented_error_on_every_hard_family(
    case: Case, gramian: Tensor
) -> None:
    """The contract, on the families that broke solvers: finite weights of the input's dtype,
    or a SolverError from a method that declares when it raises — nothing else."""
    assume(fits(case, gramian))
    try:
        weights = weighting_of(case.spec, case.options)(gramian)
    except SolverError:
        assert case.spec.may_raise, f"{case} raised a SolverError it does not declare"
        return
    assert weights.shape == gramian.shape[:1]
    assert weights.dtype == gramian.dtype
    assert_finite(weights)
    if Property.NONNEGATIVE in case.properties:
        assert_nonnegative(weights)
    if Property.NON_CONFLICTING in case.properties:
        assert_non_conflicting(gramian.double(), weights.double(), DEGENERATE_RTOL)


@by_property(Property.NON_CONFLICTING)
@relaxed
@given(gramian=gramians())
def test_non_conflicting(case: Case, gramian: Tensor) -> None:
    assume(fits(case, gramian))
    weights = call_or_reject(case, gramian)
    assert_non_conflicting(gramian, weights, DEGENERATE_RTOL)


@by_property(Property.NON_CONFLICTING)
@relaxed
@given(gramian=full_rank_gramians)
def test_non_conflicting_full_rank(case: Case, gramian: Tensor) -> None:
    assume(fits(case, gramian))
    weights = call_or_reject(case, gramian)
    assert_non_conflicting(gramian, weights, FULL_RANK_RTOL)


@by_property(Property.NONNEGATIVE)
@relaxed
@given(gramian=gramians())
def test_nonnegative(case: Case, gramian: Tensor) -> None:
    assume(fits(case, gramian))
    assert_nonnegative(call_or_reject(case, gramian))


def _scale_law_case(
    case: Case, gramian: Tensor, factor: float, exponent: float, rtol: float, check_weights: bool
) -> None:
    assume(fits(case, gramian))
    call_or_reject(case, gramian)
    call_or_reject(case, factor * gramian)
    weighting = weighting_of(case.spec, case.options)
    assert_scale_law(weighting, gramian, factor, exponent, rtol, check_weights=check_weights)


@by_property(Property.SCALE_INVARIANT)
@relaxed
@given(gramian=gramians(), factor=scale_factors)
def test_scale_invariant_update(case: Case, gramian: Tensor, factor: float) -> None:
    _scale_law_case(case, gramian, factor, 0.0, DEGENERATE_RTOL, check_weights=False)


@by_property(Property.SCALE_INVARIANT)
@relaxed
@given(gramian=full_rank_gramians, factor=scale_factors)
def test_scale_invariant_weights(case: Case, gramian: Tensor, factor: float) -> None:
    _scale_law_case(case, gramian, factor, 0.0, WEIGHTS_RTOL, check_weights=True)


SCALE_LAW_CASES = [case for case in CASES if case.spec.scale_exponent is not None]


@pytest.mark.parametrize("case", SCALE_LAW_CASES, ids=str)
@relaxed
@given(gramian=full_rank_gramians, factor=scale_factors)
def test_declared_scale_law(case: Case, gramian: Tensor, factor: float) -> None:
    exponent = case.spec.scale_exponent
    assert exponent is not None
    _scale_law_case(case, gramian, factor, exponent, WEIGHTS_RTOL, check_weights=True)


EQUIVARIANT = [
    case for case in with_property(Property.PERMUTATION_EQUIVARIANT) if not case.spec.random
]


def _permutation_case(
    case: Case, data: st.DataObject, gramian: Tensor, rtol: float, check_weights: bool
) -> None:
    assume(fits(case, gramian))
    permutation = data.draw(st.permutations(range(gramian.shape[0])))
    index = torch.tensor(permutation)
    call_or_reject(case, gramian)
    call_or_reject(case, gramian[index][:, index])
    weighting = weighting_of(case.spec, case.options)
    assert_permutation_equivariant(
        weighting, gramian, permutation, rtol, check_weights=check_weights
    )


@pytest.mark.parametrize("case", EQUIVARIANT, ids=str)
@relaxed
@given(data=st.data(), gramian=gramians())
def test_permutation_equivariant_update(case: Case, data: st.DataObject, gramian: Tensor) -> None:
    _permutation_case(case, data, gramian, DEGENERATE_RTOL, check_weights=False)


@pytest.mark.parametrize("case", EQUIVARIANT, ids=str)
@relaxed
@given(data=st.data(), gramian=full_rank_gramians)
def test_permutation_equivariant_weights(case: Case, data: st.DataObject, gramian: Tensor) -> None:
    _permutation_case(case, data, gramian, WEIGHTS_RTOL, check_weights=True)


@pytest.mark.parametrize("case", [case for case in CASES if case.spec.random], ids=str)
@relaxed
@given(gramian=gramians())
def test_random_methods_are_reproducible(case: Case, gramian: Tensor) -> None:
    assume(fits(case, gramian))
    first = call_or_reject(case, gramian)
    second = call_or_reject(case, gramian)
    assert torch.equal(first, second)


def test_property_table_lists_every_method_and_variant() -> None:
    table = F.property_table_markdown()
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(METHODS)
    for name, spec in METHODS.items():
        row = next(line for line in lines if line.startswith(f"| `{name}` |"))
        extra = {p for v in spec.variants for p in v.properties - spec.properties}
        assert row.count("✔") == len(spec.properties) + len(extra)
        for variant in spec.variants:
            assert f"✔ for {variant.label}" in row


# --------------------------------------------------------------------------- mean / sum


@given(gramian=gramians())
def test_mean_and_sum(gramian: Tensor) -> None:
    num_tasks = gramian.shape[0]
    assert torch.equal(F.sum(gramian), torch.ones(num_tasks, dtype=gramian.dtype))
    torch.testing.assert_close(F.mean(gramian), torch.full((num_tasks,), 1 / num_tasks).double())


# --------------------------------------------------------------------------- MGDA


def mgda_kkt_violation(gramian: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """(stationarity gap, complementarity residual), each relative to its natural scale."""
    margin = gramian @ weights - weights @ gramian @ weights  # ⟨d, gᵢ⟩ − ‖d‖²
    scale = inner_product_scale(gramian, weights)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    gap = (-margin / scale).clamp_min(0).max()
    complementarity = (weights * margin.abs() / scale).max()
    return gap, complementarity


@given(gramian=gramians())
def test_mgda_satisfies_kkt(gramian: Tensor) -> None:
    weights = F.mgda(gramian)
    assert abs(weights.sum().item() - 1) < 1e-12
    assert_nonnegative(weights)
    gap, complementarity = mgda_kkt_violation(gramian, weights)
    assert gap <= DEGENERATE_RTOL
    assert complementarity <= DEGENERATE_RTOL


@given(gramian=full_rank_gramians)
def test_mgda_satisfies_kkt_exactly_on_full_rank(gramian: Tensor) -> None:
    gap, complementarity = mgda_kkt_violation(gramian, F.mgda(gramian))
    assert gap <= FULL_RANK_RTOL
    assert complementarity <= FULL_RANK_RTOL


@given(jacobian=jacobians(min_tasks=2, max_tasks=2, degenerate=False, max_exponent=4))
def test_mgda_two_tasks_matches_closed_form(jacobian: Tensor) -> None:
    # Sener & Koltun, Algorithm 1: α = clip(⟨g₂ − g₁, g₂⟩ / ‖g₁ − g₂‖², 0, 1)
    first, second = jacobian
    difference = second - first
    assume(difference.norm() > 1e-6 * (first.norm() + second.norm()))
    alpha = ((difference @ second) / (difference @ difference)).clamp(0, 1)
    expected = alpha * first + (1 - alpha) * second
    weights = F.mgda(gramian_of(jacobian))
    assert (weights @ jacobian - expected).norm() <= 1e-9 * (first.norm() + second.norm())


@given(jacobian=jacobians(max_tasks=1))
def test_mgda_single_task_returns_it(jacobian: Tensor) -> None:
    assert torch.equal(F.mgda(gramian_of(jacobian)), torch.ones(1, dtype=torch.float64))


def test_mgda_zero_gradient_means_pareto_stationary() -> None:
    jacobian = torch.tensor([[1.0, 2.0], [0.0, 0.0], [-3.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    weights = F.mgda(gramian_of(jacobian))
    assert torch.equal(weights, torch.tensor([0.0, 0.5, 0.0, 0.5], dtype=torch.float64))


def test_mgda_propagates_non_finite_gramian() -> None:
    gramian = torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]])
    assert torch.isnan(F.mgda(gramian)).all()


# --------------------------------------------------------------------------- PCGrad


def textbook_pcgrad(jacobian: Tensor, orders: Tensor) -> Tensor:
    """Yu et al. 2020, Algorithm 1, on the gradient vectors themselves (sum reduction)."""
    projected = []
    for task, row in enumerate(jacobian):
        current = row.clone()
        for other in orders[task].tolist():
            if other == task:
                continue
            partner = jacobian[other]
            dot = current @ partner
            if dot < 0:
                current = current - dot / (partner @ partner) * partner
        projected.append(current)
    return torch.stack(projected).sum(0)


@given(jacobian=jacobians(max_exponent=3), seed=st.integers(0, 2**31 - 1))
def test_pcgrad_matches_textbook_algorithm(jacobian: Tensor, seed: int) -> None:
    num_tasks = jacobian.shape[0]
    gen = torch.Generator().manual_seed(seed)
    orders = torch.stack([torch.randperm(num_tasks, generator=gen) for _ in range(num_tasks)])
    weights = F.pcgrad_from_orders(gramian_of(jacobian), orders)
    expected = textbook_pcgrad(jacobian, orders)
    gramian = gramian_of(jacobian)
    # compare updates in the metric of G, at the rounding level of the projections
    scale = (gramian.diagonal().sqrt() * weights.abs()).sum()
    assert (weights @ jacobian - expected).norm() <= 1e-9 * scale


def test_pcgrad_two_tasks_by_hand() -> None:
    first = torch.tensor([1.0, 0.0], dtype=torch.float64)
    second = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    # textbook: g̃₁ = g₁ − (g₁·g₂/‖g₂‖²) g₂ = (1,0) + ½(-1,1) = (½, ½);
    #           g̃₂ = g₂ − (g₂·g₁/‖g₁‖²) g₁ = (-1,1) + (1,0) = (0, 1)
    expected = torch.tensor([0.5, 1.5], dtype=torch.float64)
    jacobian = torch.stack([first, second])
    for reduction, divisor in (("sum", 1.0), ("mean", 2.0)):
        weights = F.pcgrad(gramian_of(jacobian), reduction=reduction)
        torch.testing.assert_close(weights @ jacobian, expected / divisor)


@given(gramian=gramians(kinds=("nonnegative",)))
def test_pcgrad_without_conflict_is_the_sum(gramian: Tensor) -> None:
    weights = F.pcgrad(gramian, generator=torch.Generator().manual_seed(0))
    assert torch.equal(weights, torch.ones_like(weights))


@given(data=st.data(), gramian=gramians(), seed=st.integers(0, 2**31 - 1))
def test_pcgrad_permutation_equivariant_with_same_orders(
    data: st.DataObject, gramian: Tensor, seed: int
) -> None:
    num_tasks = gramian.shape[0]
    permutation = torch.tensor(data.draw(st.permutations(range(num_tasks))))
    inverse = permutation.argsort()
    gen = torch.Generator().manual_seed(seed)
    orders = torch.rand(num_tasks, num_tasks, generator=gen).argsort(1)
    # new task k is old task permutation[k]; its order is the old order, relabelled
    permuted_orders = inverse[orders[permutation]]
    base = F.pcgrad_from_orders(gramian, orders)
    permuted = F.pcgrad_from_orders(gramian[permutation][:, permutation], permuted_orders)
    assert_weights_close(base[permutation], permuted, 1e-9)
    assert_updates_close(gramian[permutation][:, permutation], base[permutation], permuted, 1e-9)


def test_pcgrad_rejects_unknown_reduction() -> None:
    with pytest.raises(ValueError, match="reduction"):
        F.pcgrad(torch.eye(2), reduction="max")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- other exactness checks


def _projections_spread(gramian: Tensor, weights: Tensor) -> float:
    """max |dᵀuᵢ − mean| relative to the scale of dᵀuᵢ (d = Jᵀα, uᵢ = gᵢ/‖gᵢ‖)."""
    norms = gramian.diagonal().sqrt()
    projections = (gramian @ weights) / norms
    scale = inner_product_scale(gramian, weights) / norms
    return float((projections - projections.mean()).abs().max() / scale.max())


@given(gramian=full_rank_gramians)
def test_imtl_g_projections_are_equal(gramian: Tensor) -> None:
    try:
        weights = F.imtl_g(gramian)
    except SolverError:
        assume(False)
        raise
    assert abs(weights.sum().item() - 1) < 1e-9
    # no ridge: equal to rounding (the 1e-8 ridge of earlier versions stopped at ~1e-4)
    assert _projections_spread(gramian, weights) <= 1e-10


@given(
    jacobian=jacobians(min_tasks=2, max_tasks=5, min_params=8, kinds=("dense",), degenerate=False)
)
def test_imtl_g_duplicated_gradients_keep_equal_projections(jacobian: Tensor) -> None:
    """A gradient repeated at twice its norm makes the Gramian singular; the pseudo-inverse
    still finds the equal-projection direction, of the same size as without the duplicate."""
    doubled = torch.cat([jacobian, 2 * jacobian[:1]])
    try:
        weights = F.imtl_g(gramian_of(doubled))
        reference = F.imtl_g(gramian_of(jacobian))
    except SolverError:
        assume(False)
        raise
    assert _projections_spread(gramian_of(doubled), weights) <= 1e-10
    update, expected = weights @ doubled, reference @ jacobian
    unit = jacobian[0] / jacobian[0].norm()
    # same direction; the projection dᵀu₁ fixes the scale (Σα = 1 counts the duplicate twice)
    torch.testing.assert_close(
        update / (update @ unit), expected / (expected @ unit), rtol=1e-8, atol=1e-10
    )


@given(gramian=full_rank_gramians)
def test_nash_mtl_solves_bargaining_equations(gramian: Tensor) -> None:
    weights = F.nash_mtl(gramian)
    assert (weights > 0).all()
    assert ((gramian @ weights) * weights - 1).abs().max() <= 1e-9


moderate_gramians = gramians(
    kinds=("dense", "nonnegative"), degenerate=False, min_params=8, max_exponent=2
)


@given(gramian=moderate_gramians, alpha=st.sampled_from([0.5, 2.0, 5.0]))
def test_fairgrad_solves_fairness_equations(gramian: Tensor, alpha: float) -> None:
    weights = F.fairgrad(gramian, alpha=alpha)
    torch.testing.assert_close(gramian @ weights, weights ** (-1 / alpha), rtol=1e-7, atol=0)
    factor = 4.0
    scaled = F.fairgrad(factor * gramian, alpha=alpha)
    torch.testing.assert_close(
        scaled, weights * factor ** (-alpha / (1 + alpha)), rtol=1e-7, atol=0
    )


@pytest.mark.xfail(
    raises=(SolverError, AssertionError),
    strict=False,
    reason="known limitation: with α ≠ 1 and norms spread over up to 24 orders of magnitude, "
    "Newton's method may stop (SolverError, never a silent fallback) or reach only ~1e-6",
)
@settings(max_examples=10, report_multiple_bugs=False)
@given(gramian=full_rank_gramians, alpha=st.sampled_from([0.5, 2.0, 5.0]))
def test_fairgrad_with_widely_spread_norms(gramian: Tensor, alpha: float) -> None:
    weights = F.fairgrad(gramian, alpha=alpha)
    torch.testing.assert_close(gramian @ weights, weights ** (-1 / alpha), rtol=1e-7, atol=0)


@given(gramian=full_rank_gramians)
def test_fairgrad_with_alpha_one_is_nash_mtl(gramian: Tensor) -> None:
    try:
        expected = F.nash_mtl(gramian)
    except SolverError:
        with pytest.raises(SolverError):
            F.fairgrad(gramian, alpha=1.0)
        return
    torch.testing.assert_close(F.fairgrad(gramian, alpha=1.0), expected)


def test_nash_mtl_raises_without_solution() -> None:
    opposite = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    with pytest.raises(SolverError):
        F.nash_mtl(opposite)
    with pytest.raises(SolverError):
        F.nash_mtl(torch.zeros(2, 2, dtype=torch.float64))


@given(gramian=gramians())
def test_cagrad_with_zero_c_is_the_mean(gramian: Tensor) -> None:
    torch.testing.assert_close(F.cagrad(gramian, c=0.0), F.mean(gramian))


@settings(max_examples=20)
@given(jacobian=jacobians(degenerate=False, max_exponent=2), c=st.sampled_from([0.2, 0.5, 0.9]))
def test_cagrad_maximises_worst_improvement_in_the_ball(jacobian: Tensor, c: float) -> None:
    # Liu et al. 2021, Eq. 5: d maximises minᵢ⟨gᵢ, d⟩ over ‖d − g₀‖ ≤ c‖g₀‖; compare with random
    # points of that ball (the reference scale (1 + c²) is undone first)
    gramian = gramian_of(jacobian)
    update = (1 + c**2) * F.cagrad(gramian, c=c) @ jacobian
    mean_gradient = jacobian.mean(0)
    radius = c * mean_gradient.norm()
    assert (update - mean_gradient).norm() <= radius * (1 + 1e-6) + 1e-12
    best = (jacobian @ update).min()
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(256, jacobian.shape[1], generator=gen, dtype=torch.float64)
    points = mean_gradient + radius * directions / directions.norm(dim=1, keepdim=True)
    others = (points @ jacobian.T).min(1).values
    tol = 1e-6 * jacobian.norm(dim=1).max() * mean_gradient.norm()
    assert (others <= best + tol).all()


@given(gramian=gramians())
def test_dual_cone_methods_give_mean_without_conflict(gramian: Tensor) -> None:
    assume(bool((gramian >= 0).all()))
    torch.testing.assert_close(F.upgrad(gramian), F.mean(gramian))
    torch.testing.assert_close(F.dualproj(gramian), F.mean(gramian))


@given(gramian=gramians(), seed=st.integers(0, 2**31 - 1))
def test_gradvac_with_zero_targets_is_pcgrad(gramian: Tensor, seed: int) -> None:
    # a zero target asks for cos ≥ 0, which is exactly PCGrad's projection
    targets = torch.zeros_like(gramian)
    weights, new_targets = F.gradvac(
        gramian, targets, generator=torch.Generator().manual_seed(seed)
    )
    reference = F.pcgrad(gramian, generator=torch.Generator().manual_seed(seed))
    assert_updates_close(gramian, weights, reference, 1e-6)
    assert torch.equal(targets, torch.zeros_like(gramian)), "gradvac must not mutate its input"
    assert new_targets.abs().max() <= 0.5 + 1e-12  # β · cos with β = 0.5


def test_gradvac_reaches_target_cosine_for_two_tasks() -> None:
    jacobian = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)  # cos = 1/√2
    target = 0.9
    targets = torch.full((2, 2), target, dtype=torch.float64)
    weights, _ = F.gradvac(gramian_of(jacobian), targets, generator=torch.Generator())
    # task 0's projected gradient is moved to cosine 0.9 with g₁ (Wang et al. 2021, Eq. 4)
    gram = gramian_of(jacobian)
    coefficients_first = torch.tensor([1.0, 0.0], dtype=torch.float64)
    phi = gram[0, 1] / (gram[0, 0] * gram[1, 1]).sqrt()
    amount = (target * (1 - phi**2).sqrt() - phi * (1 - target**2) ** 0.5) / (1 - target**2) ** 0.5
    coefficients_first[1] = gram[0, 0].sqrt() * amount / gram[1, 1].sqrt()
    moved = coefficients_first @ jacobian
    cosine = moved @ jacobian[1] / (moved.norm() * jacobian[1].norm())
    assert abs(cosine.item() - target) < 1e-12
    assert weights[1] >= coefficients_first[1]


def graddrop_by_hand(
    grads: Tensor, activations: Tensor, draws: Tensor, leak: float = 0.0
) -> Tensor:
    """Chen et al. 2020, Alg. 1, as LibMTL computes it, feature by feature with Python loops:
    Sᵢ = Σ_b sign(z_b)·gᵢ,b, P = ½(1 + ΣSᵢ/Σ|Sᵢ|), a task keeps its gradient where its Sᵢ has
    the sign the draw picks."""
    num_tasks, batch, width = grads.shape
    combined = torch.zeros(batch, width, dtype=grads.dtype)
    for feature in range(width):
        sums = [
            sum(float(activations[b, feature].sign() * grads[i, b, feature]) for b in range(batch))
            for i in range(num_tasks)
        ]
        magnitude = sum(abs(value) for value in sums)
        purity = 0.5 * (1 + sum(sums) / magnitude) if magnitude > 0 else 0.5
        for i in range(num_tasks):
            draw = float(draws[feature])
            kept = (purity > draw and sums[i] > 0) or (purity < draw and sums[i] < 0)
            combined[:, feature] += grads[i, :, feature] * (1.0 if kept else leak)
    return combined


representations = st.tuples(
    st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**31 - 1)
)


def _graddrop_case(shape: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
    num_tasks, batch, width, seed = shape
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(num_tasks, batch, width, generator=gen, dtype=torch.float64)
    activations = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    return grads, activations


@given(shape=representations, leak=st.sampled_from([0.0, 0.3]))
def test_graddrop_matches_the_per_feature_rule_by_hand(
    shape: tuple[int, int, int, int], leak: float
) -> None:
    grads, activations = _graddrop_case(shape)
    seed = shape[-1]
    combined = F.graddrop(
        grads, generator=torch.Generator().manual_seed(seed), leak=leak, activations=activations
    )
    # one float32 draw per feature from the generator, as the pipeline's
    draws = torch.rand(grads.shape[2], generator=torch.Generator().manual_seed(seed))
    expected = graddrop_by_hand(grads, activations, draws.double(), leak)
    torch.testing.assert_close(combined, expected, rtol=1e-12, atol=1e-12)


@given(shape=representations)
def test_graddrop_split_batch_with_summed_purities_equals_the_whole_batch(
    shape: tuple[int, int, int, int],
) -> None:
    """What data parallelism does: each part of the batch reduces its batch sums with the
    others' (here by hand) and draws the same uniforms: the parts' results are the whole's."""
    grads, activations = _graddrop_case(shape)
    assume(grads.shape[1] >= 2)
    cut = grads.shape[1] // 2
    whole = F.graddrop(grads, generator=torch.Generator().manual_seed(1), activations=activations)
    parts = []
    for own, other in ((slice(0, cut), slice(cut, None)), (slice(cut, None), slice(0, cut))):
        others = (grads[:, other] * activations[other].sign()).sum(1)
        parts.append(
            F.graddrop(
                2.0 * grads[:, own],  # a mean over half the samples: twice the gradient
                generator=torch.Generator().manual_seed(1),
                activations=activations[own],
                reduce=lambda sums, rest=others: sums + 2.0 * rest,
            )
            / 2.0
        )
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-15)


@given(shape=representations)
def test_graddrop_keeps_one_sign_per_feature_and_leak_one_is_the_sum(
    shape: tuple[int, int, int, int],
) -> None:
    grads, activations = _graddrop_case(shape)
    generator = torch.Generator().manual_seed(shape[-1])
    combined = F.graddrop(grads, generator=generator, activations=activations)
    sums = (grads * activations.sign()).sum(1)  # (T, features)
    for feature in range(grads.shape[2]):
        positive = grads[sums[:, feature] > 0, :, feature].sum(0)
        negative = grads[sums[:, feature] < 0, :, feature].sum(0)
        column = combined[:, feature]
        assert torch.allclose(column, positive) or torch.allclose(column, negative)
    full_leak = F.graddrop(grads, generator=generator, activations=activations, leak=1.0)
    torch.testing.assert_close(full_leak, grads.sum(0))


def test_graddrop_without_sign_conflict_is_the_sum() -> None:
    grads = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    combined = F.graddrop(grads, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(combined, grads.sum(0))


# --------------------------------------------------------------------------- solver cross-checks


@settings(max_examples=25)
@given(gramian=gramians(max_tasks=6, max_exponent=4))
def test_face_enumeration_and_pivoting_agree(gramian: Tensor) -> None:
    # two independent algorithms for the same QPs: every face at once vs block pivoting
    from mtlhooks import solvers

    num_tasks = gramian.shape[0]
    lower = torch.eye(num_tasks, dtype=gramian.dtype) / num_tasks
    uniform = F.mean(gramian)
    norm_mean = float((uniform @ gramian @ uniform).clamp_min(0).sqrt())
    enumerated = (
        F.mgda(gramian),
        solvers.dual_cone_qp(gramian, lower),
        F.cagrad(gramian, c=0.5),
    )
    limit = solvers._ENUMERATION_LIMIT
    solvers._ENUMERATION_LIMIT = 0
    try:
        pivoted = (
            F.mgda(gramian),
            solvers.dual_cone_qp(gramian, lower),
            F.cagrad(gramian, c=0.5),
        )
    finally:
        solvers._ENUMERATION_LIMIT = limit
    assert_updates_close(gramian, enumerated[0], pivoted[0], 1e-7)
    for first, second in zip(enumerated[1], pivoted[1]):
        assert_updates_close(gramian, first, second, 1e-7)
    if norm_mean > 0:
        assert_updates_close(gramian, enumerated[2], pivoted[2], 1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_dual_cone_qp_alone_and_in_a_batch_agree(family: str) -> None:
    # two code paths for the same QP: alone it is solved on its gathered free indices, in a
    # batch on the batch's padded systems (T ≥ 16: gathered; T < 16: masked to size T)
    from mtlhooks import solvers

    for num_tasks in (8, 16):
        gramian = family_gramian(family, num_tasks, 0)
        dtype = gramian.dtype
        mean_row = torch.full((num_tasks,), 1.0 / num_tasks, dtype=dtype)
        rows = torch.cat([mean_row[None], torch.eye(num_tasks, dtype=dtype)[:3] / num_tasks])
        batch = solvers.dual_cone_qp(gramian, rows)
        alone = solvers.dual_cone_qp(gramian, mean_row)
        rtol = 1e-5 if family in FLOAT32_FAMILIES else 1e-9
        assert_updates_close(gramian.double(), alone.double(), batch[0].double(), rtol)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_warm_started_simplex_qp_finds_the_cold_starts_solution(family: str) -> None:
    # CAGrad's homotopy warm starts each QP from the previous one's solution: from there the
    # monotone active-set method must reach the same optimum as block pivoting from scratch
    from mtlhooks import solvers

    num_tasks = 16 if family == "norm_spread_float32" else 24
    gramian = family_gramian(family, num_tasks, 1).double()
    problem = solvers._scaled_problem(gramian, None)
    unit = 1 / problem.scales
    # CAGrad's linear term t·Gg₀ in scaled coordinates, at two points of its path
    linear = (gramian @ F.mean(gramian)).numpy()[None] * unit / problem.scales.max()
    cold = solvers._solve_lcp(problem, None, linear, unit, 1, "test")
    for nearby in (1.3 * linear, 0.2 * linear):
        start = solvers._solve_lcp(problem, None, nearby, unit, 1, "test")
        warm = solvers._solve_lcp(problem, None, linear, unit, 1, "test", start=start)
        cosine = torch.from_numpy(problem.cosine)
        assert_updates_close(cosine, torch.from_numpy(cold[0]), torch.from_numpy(warm[0]), 1e-9)


@given(gramian=full_rank_gramians, c=st.sampled_from([0.1, 0.4, 2.0]))
def test_cagrad_inner_problem_satisfies_kkt(gramian: Tensor, c: float) -> None:
    # w = argmin_{w∈Δ} bᵀw + r‖g_w‖: b + (r/‖g_w‖)Gw ≥ ν with equality on the support
    from mtlhooks import solvers

    uniform = F.mean(gramian)
    linear = gramian @ uniform
    radius = c * float((uniform @ gramian @ uniform).sqrt())
    weights = solvers.penalized_simplex_weights(gramian, linear, radius)
    assert abs(weights.sum().item() - 1) < 1e-12
    assert_nonnegative(weights)
    norm = (weights @ gramian @ weights).sqrt()
    gradient = linear + radius * (gramian @ weights) / norm
    level = (gradient * weights).sum()  # ν
    scale = inner_product_scale(gramian, weights) * radius / norm + linear.abs()
    assert ((level - gradient) / scale).max() <= 1e-7
    support = weights > 1e-9 * weights.max()
    assert ((gradient - level).abs()[support] / scale[support]).max() <= 1e-7
