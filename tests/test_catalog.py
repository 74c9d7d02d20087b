"""MoCo, STCH, ExcessMTL, MoDo, SDMGrad and the scale-invariant loss Σ log Lᵢ.

Each rule is checked against a hand-written version of the paper's algorithm (explicit loops over
tasks, coordinates and iterations, an independent simplex projection by bisection, or autograd
on the objective itself), its invariants are property-tested with hypothesis through the shared
helpers of ``properties.py``, and each stateful plugin is checked to resume bit for bit from its
``state_dict`` and to keep every mutable thing in it. The generic property tests of
``test_functional.py`` cover MoDo and SDMGrad (Gramian methods) as declared; the declared
properties of gradient-input methods (MoCo) are checked here.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Sequence

import pytest
import torch
from families import FAMILIES, FLOAT32_FAMILIES, family_gramian
from hypothesis import given, settings
from hypothesis import strategies as st
from properties import (
    assert_finite,
    assert_nonnegative,
    assert_permutation_equivariant,
    assert_scale_invariant,
)
from strategies import gramian_of, gramians, jacobians, scale_factors
from test_aggregators import assert_grads_close, reference_grads
from test_aggregators import jacobian as space_jacobian
from test_loss_scaling import assert_states_equal
from torch import Tensor

from mtlhooks import MTL, InputError, Plugin, Setup, Space, Step, TaskGradients, registry
from mtlhooks import functional as F
from mtlhooks.cli import main
from mtlhooks.errors import ConfigError
from mtlhooks.functional import METHODS, Property
from mtlhooks.plugins.excess_mtl import excess_mtl, initial_excess_mtl_state
from mtlhooks.plugins.moco import initial_moco_state
from mtlhooks.solvers import project_onto_simplex

TASKS = ("a", "b", "c")
NEW_PLUGINS = ("moco", "modo", "sdmgrad", "excess_mtl", "stch", "scale_invariant")
few = settings(max_examples=15)


# -- independent references ---------------------------------------------------------------------


def simplex_projection(point: Sequence[float]) -> list[float]:
    """Euclidean projection onto the simplex by bisection on the threshold θ of
    ``Σ max(xᵢ − θ, 0) = 1`` (an algorithm independent of the sort-based one under test)."""
    low, high = min(point) - 1.0, max(point)
    for _ in range(120):
        middle = (low + high) / 2
        if sum(max(x - middle, 0.0) for x in point) > 1.0:
            low = middle
        else:
            high = middle
    theta = (low + high) / 2
    return [max(x - theta, 0.0) for x in point]


def f64(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def dot(first: Sequence[float], second: Sequence[float]) -> float:
    return math.fsum(a * b for a, b in zip(first, second))


def rows(matrix: Tensor) -> list[list[float]]:
    return matrix.tolist()  # type: ignore[no-any-return]


def combine(weights: Sequence[float], vectors: Sequence[Sequence[float]]) -> list[float]:
    return [math.fsum(w * v[k] for w, v in zip(weights, vectors)) for k in range(len(vectors[0]))]


def modo_reference(gradients: list[list[float]], weights: list[float], gamma: float, rho: float):
    """Chen et al. 2023, Algorithm 1 with z₁ = z₂ = z₃: λ ← Π_Δ(λ − γ(∇Fᵀ∇F λ + ρλ))."""
    num = len(gradients)
    step = [
        math.fsum(dot(gradients[i], gradients[j]) * weights[j] for j in range(num))
        + rho * weights[i]
        for i in range(num)
    ]
    return simplex_projection([weights[i] - gamma * step[i] for i in range(num)])


def sdmgrad_reference(
    gradients: list[list[float]],
    weights: list[float],
    lam: float,
    iterations: int,
    lr: float,
    momentum: float,
):
    """Xiao et al. 2023, Algorithm 1, as the authors' code runs it: SGD with momentum on
    ½‖g_w + λg₀‖² (Gramian scaled by the squared mean norm), projected after every step."""
    num = len(gradients)
    gram = [[dot(gi, gj) for gj in gradients] for gi in gradients]
    mean_norm = math.fsum(math.sqrt(max(gram[i][i], 0.0)) for i in range(num)) / num
    if mean_norm > 0:
        gram = [[g / mean_norm**2 for g in row] for row in gram]
    w = list(weights)
    buffer: list[float] | None = None
    for _ in range(iterations):
        shifted = [w[j] + lam / num for j in range(num)]
        grad = [math.fsum(gram[i][j] * shifted[j] for j in range(num)) for i in range(num)]
        buffer = grad if buffer is None else [momentum * b + g for b, g in zip(buffer, grad)]
        w = simplex_projection([w[i] - lr * buffer[i] for i in range(num)])
    alphas = [(w[i] + lam / num) / (1 + lam) for i in range(num)]
    return alphas, w


def moco_reference(history: list[list[list[float]]], beta=0.5, bs=0.5, gamma=0.1, gs=0.5, rho=0.0):
    """Fernando et al. 2023, Algorithm 1: the updates Y_{k+1}λ_{k+1} of a run, by loops."""
    num, width = len(history[0]), len(history[0][0])
    tracked = [[0.0] * width for _ in range(num)]
    weights = [1.0 / num] * num
    updates = []
    for k, gradients in enumerate(history, start=1):
        beta_k, gamma_k = beta / k**bs, gamma / k**gs
        tracked = [
            [y - beta_k * (y - g) for y, g in zip(tracked[i], gradients[i])] for i in range(num)
        ]
        step = [
            math.fsum(dot(tracked[i], tracked[j]) * weights[j] for j in range(num))
            + rho * weights[i]
            for i in range(num)
        ]
        weights = simplex_projection([weights[i] - gamma_k * step[i] for i in range(num)])
        updates.append(combine(weights, tracked))
    return updates


def excess_mtl_reference(history: list[list[list[float]]], step_size=1e-2, eps=1e-7):
    """LibMTL / the authors' code: squared sums, rᵢ = gᵢ·(1/√(S + ε))·gᵢ, the first call's r as
    baseline, then loss_weight ← loss_weight·exp(η r/r₀), renormalised to sum T."""
    num, width = len(history[0]), len(history[0][0])
    squares = [[0.0] * width for _ in range(num)]
    loss_weight = [1.0] * num
    initial: list[float] | None = None
    out = []
    for gradients in history:
        risks = []
        for i in range(num):
            for k in range(width):
                squares[i][k] += gradients[i][k] ** 2
            risks.append(
                math.fsum(g * g / math.sqrt(s + eps) for g, s in zip(gradients[i], squares[i]))
            )
        if initial is None:
            initial = risks
        else:
            loss_weight = [
                w * math.exp(step_size * r / r0) for w, r, r0 in zip(loss_weight, risks, initial)
            ]
            total = math.fsum(loss_weight)
            loss_weight = [w / total * num for w in loss_weight]
        out.append(list(loss_weight))
    return out


# -- small helpers ------------------------------------------------------------------------------


def build(
    name: str, tasks: Sequence[str] = TASKS, space: Space = Space.PARAMS, **options
) -> Plugin:
    info = registry.get_plugin(name)
    return info.cls(info.config_model(**options), Setup(tuple(tasks), space, 0))


def gradient_step(jacobian: Tensor, losses: Sequence[float] | None = None, **kwargs) -> Step:
    """A hand-made step of the gradient stage: J as one block, its Gramian, the losses."""
    num = jacobian.shape[0]
    values = torch.tensor(losses if losses is not None else [1.0] * num, dtype=torch.float64)
    return Step(
        index=0,
        tasks=TASKS[:num] if num <= 3 else tuple(f"t{i}" for i in range(num)),
        losses=values,
        weights=torch.ones_like(values),
        space=Space.PARAMS,
        generator=torch.Generator().manual_seed(0),
        gradients=TaskGradients.from_blocks(Space.PARAMS, ["w"], [jacobian]),
        **kwargs,
    )


def loss_step(losses: Sequence[float], weights: Sequence[float] | None = None) -> Step:
    values = torch.tensor(losses, dtype=torch.float64)
    return Step(
        index=0,
        tasks=TASKS[: len(values)],
        losses=values,
        weights=torch.ones_like(values) if weights is None else f64(weights),
        space=Space.NONE,
        generator=torch.Generator().manual_seed(0),
    )


def run_hook(plugin: Plugin, step: Step) -> Tensor:
    """Fire the plugin's hook of its family; return what it produced (weights or update)."""
    for hook in ("mtl_scale_losses", "mtl_balance"):
        if hasattr(plugin, hook):
            getattr(plugin, hook)(step)
            return step.weights.clone()
    if hasattr(plugin, "mtl_aggregate"):
        return plugin.mtl_aggregate(step).clone()  # type: ignore[attr-defined]
    return plugin.mtl_combine(step).clone()  # type: ignore[attr-defined]


def batches(problem, calls: int, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(problem.x.shape, generator=gen, dtype=torch.float64) for _ in range(calls)]


def losses_on(model, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
    """The conftest problem's losses on another batch (task i scaled by 10**i)."""
    _, outputs = model(x)
    return {t: (outputs[t] - 0.5 * (i + 1)).pow(2).mean() * 10.0**i for i, t in enumerate(tasks)}


def encoder_jacobian(model, x: Tensor, tasks: Sequence[str]) -> Tensor:
    params = list(model.encoder.parameters())
    losses = losses_on(model, x, tasks)
    flat = []
    for task in tasks:
        grads = torch.autograd.grad(losses[task], params, retain_graph=True)
        flat.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(flat)


def encoder_grad(model) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.encoder.parameters()])


def heads_grads(model) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.heads.named_parameters()}


def heads_reference(model, x: Tensor, tasks: Sequence[str], coefficients: Sequence[float]):
    clone = copy.deepcopy(model)
    clone.zero_grad(set_to_none=True)
    losses = losses_on(clone, x, tasks)
    sum(c * losses[t] for c, t in zip(coefficients, tasks)).backward()
    return {n: p.grad.clone() for n, p in clone.heads.named_parameters()}


# -- the simplex projection the new methods share ------------------------------------------------


@few
@given(
    point=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=8),
    offset=st.sampled_from([0.0, 1e12, -1e15, 1e20]),
)
def test_simplex_projection_matches_bisection_and_survives_large_offsets(point, offset):
    # Π(x + c·1) = Π(x): before the fix a common offset ≳ 1e16 left no support (all zeros)
    expected = torch.tensor(simplex_projection(point), dtype=torch.float64)
    shifted = torch.tensor(point, dtype=torch.float64) + offset
    projected = project_onto_simplex(shifted)
    assert abs(projected.sum().item() - 1) < 1e-9
    assert_nonnegative(projected)
    if abs(offset) < 1e12:  # beyond, the offset itself rounds the point away
        torch.testing.assert_close(projected, expected, rtol=0, atol=1e-9)


# -- MoDo ---------------------------------------------------------------------------------------


@given(jacobian=jacobians(max_exponent=2), steps=st.integers(1, 4))
def test_modo_matches_the_paper_loop(jacobian: Tensor, steps: int) -> None:
    gramian = gramian_of(jacobian)
    num = jacobian.shape[0]
    gamma, rho = 0.05, 0.1
    weights = F.mean(gramian)
    expected = [1.0 / num] * num
    for _ in range(steps):
        alphas, weights = F.modo(gramian, weights, gamma=gamma, rho=rho)
        expected = modo_reference(rows(jacobian), expected, gamma, rho)
        assert torch.equal(alphas, weights)
    torch.testing.assert_close(weights, f64(expected), rtol=0, atol=1e-10)


def test_modo_two_tasks_by_hand() -> None:
    # g₁ = (1, 0), g₂ = (0, 2): Gλ = (½, 2) at λ = (½, ½); γ = 0.1, ρ = 0:
    # λ − γGλ = (0.45, 0.3) → projection adds 0.125 to both: (0.575, 0.425)
    gramian = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    weights, _ = F.modo(gramian, F.mean(gramian), gamma=0.1, rho=0.0)
    torch.testing.assert_close(weights, torch.tensor([0.575, 0.425], dtype=torch.float64))


def test_modo_keeps_its_state_on_a_non_finite_gramian() -> None:
    gramian = torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=torch.float64)
    state = torch.tensor([0.3, 0.7], dtype=torch.float64)
    weights, new = F.modo(gramian, state)
    assert torch.isnan(weights).all() and torch.equal(new, state)
    with pytest.raises(InputError, match="shape"):
        F.modo(torch.eye(3, dtype=torch.float64), state)


# -- SDMGrad ------------------------------------------------------------------------------------


@few
@given(
    jacobian=jacobians(max_exponent=2),
    lam=st.sampled_from([0.0, 0.3, 2.0]),
    momentum=st.sampled_from([0.0, 0.5]),
)
def test_sdmgrad_matches_the_authors_loop(jacobian: Tensor, lam: float, momentum: float) -> None:
    gramian = gramian_of(jacobian)
    num = jacobian.shape[0]
    start = [1.0 / num] * num
    # lr 0.5: a contracting inner loop, so that the comparison is not dominated by the
    # projection's tie-breaking (the default lr bounces between faces, see the next test)
    alphas, state = F.sdmgrad(gramian, f64(start), lam=lam, iterations=7, lr=0.5, momentum=momentum)
    expected_alphas, expected_state = sdmgrad_reference(
        rows(jacobian), start, lam, 7, 0.5, momentum
    )
    torch.testing.assert_close(alphas, f64(expected_alphas), rtol=0, atol=1e-9)
    torch.testing.assert_close(state, f64(expected_state), rtol=0, atol=1e-9)
    assert abs(alphas.sum().item() - 1) < 1e-12


def test_sdmgrad_defaults_match_the_authors_loop_on_a_fixed_case() -> None:
    gen = torch.Generator().manual_seed(3)
    jacobian = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    jacobian[1] *= 10
    start = [0.2, 0.5, 0.3]
    alphas, state = F.sdmgrad(gramian_of(jacobian), f64(start))
    expected_alphas, expected_state = sdmgrad_reference(rows(jacobian), start, 0.3, 20, 10.0, 0.5)
    torch.testing.assert_close(alphas, f64(expected_alphas), rtol=0, atol=1e-12)
    torch.testing.assert_close(state, f64(expected_state), rtol=0, atol=1e-12)


def test_sdmgrad_without_pull_and_many_steps_approaches_mgda() -> None:
    # λ = 0: the inner problem is MGDA's min-norm problem; small steps converge to its solution
    jacobian = torch.tensor([[1.0, 0.0], [-0.5, 1.0], [0.2, 2.0]], dtype=torch.float64)
    gramian = gramian_of(jacobian)
    alphas, _ = F.sdmgrad(gramian, F.mean(gramian), lam=0.0, iterations=4000, lr=0.05, momentum=0.5)
    expected = F.mgda(gramian)
    assert (alphas - expected) @ gramian @ (alphas - expected) < 1e-16


@pytest.mark.parametrize("space", [Space.PARAMS, Space.LAST_SHARED, Space.FEATURES], ids=str)
@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_gramian_methods_write_their_weights_in_every_space(problem, name, space) -> None:
    # first call: the state is 1/T each; weights from the Gramian built here by autograd
    jac = space_jacobian(problem, space)
    gramian = gramian_of(jac)
    alphas, _ = METHODS[name].function(gramian, F.mean(gramian))  # type: ignore[misc]
    config = {"tasks": problem.tasks, "space": space.value, "plugins": [name]}
    mtl = MTL(config, shared=problem.model.encoder)
    z, losses = problem.losses()
    report = mtl.backward(losses, features=z)
    torch.testing.assert_close(report.weights, alphas, rtol=1e-9, atol=1e-12)
    assert_grads_close(problem.grads(), reference_grads(problem, alphas))


# -- hard families: finite, and the declared properties --------------------------------------------


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
@few
@given(
    family=st.sampled_from(FAMILIES),
    size=st.sampled_from([2, 3, 5, 8, 16]),
    seed=st.integers(0, 10**6),
)
def test_gramian_methods_on_hard_families(name: str, family: str, size: int, seed: int) -> None:
    if family == "norm_spread_float32" and size > 16:
        return
    spec = METHODS[name]
    gramian = family_gramian(family, size, seed)
    weights, state = spec.function(gramian, spec.initial_state(gramian))  # type: ignore[misc]
    assert weights.dtype == gramian.dtype
    assert_finite(weights)
    assert_finite(state)
    assert_nonnegative(weights)
    assert abs(weights.double().sum().item() - 1) < (1e-5 if family in FLOAT32_FAMILIES else 1e-12)

    def weighting(g: Tensor) -> Tensor:
        return spec.function(g, spec.initial_state(g))[0]  # type: ignore[misc,index]

    # these Gramians are ill-conditioned: compare updates, at the degenerate tolerance
    rtol = 1e-3 if family in FLOAT32_FAMILIES else 1e-5
    assert_permutation_equivariant(
        weighting, gramian.double(), list(range(size))[::-1], rtol, check_weights=False
    )
    if Property.SCALE_INVARIANT in spec.properties:
        assert_scale_invariant(weighting, gramian.double(), 4.0, rtol, check_weights=False)


# -- MoCo ---------------------------------------------------------------------------------------


GRADIENT_METHODS = {n: s for n, s in METHODS.items() if s.input == "gradients" and s.stateful}


def run_stateful(spec, history: Sequence[Tensor]) -> list[Tensor]:
    state = spec.initial_state(history[0])
    outputs = []
    for gradients in history:
        output, state = spec.function(gradients, state)
        outputs.append(output)
    return outputs


def same_task_histories(max_tasks: int, width: int, **kwargs: object):
    """1 to 4 calls' (T, width) gradients, T the same for every call."""
    return st.integers(1, max_tasks).flatmap(
        lambda num: st.lists(
            jacobians(min_tasks=num, max_tasks=num, min_params=width, max_params=width, **kwargs),
            min_size=1,
            max_size=4,
        )
    )


histories = same_task_histories(5, 4, max_exponent=3)


def tracked_scale(history: Sequence[Tensor]) -> float:
    """The natural scale of a combination of the tracked gradients: Σ of every norm seen."""
    return sum(j.norm(dim=1).sum().item() for j in history) + 1e-300


@few
@given(history=histories)
def test_moco_matches_the_paper_loop(history: list[Tensor]) -> None:
    updates = run_stateful(METHODS["moco"], history)
    expected = moco_reference([rows(j) for j in history])
    for call, (update, reference) in enumerate(zip(updates, expected)):
        assert (update - f64(reference)).norm() <= 1e-12 * tracked_scale(history[: call + 1])


@pytest.mark.parametrize(
    "name",
    [n for n, s in GRADIENT_METHODS.items() if Property.PERMUTATION_EQUIVARIANT in s.properties],
)
@few
@given(data=st.data(), history=histories)
def test_stateful_gradient_methods_permutation_equivariant(name, data, history) -> None:
    # relabelling the tasks of every call (the state starts symmetric) leaves the update
    spec = METHODS[name]
    permutation = torch.tensor(data.draw(st.permutations(range(history[0].shape[0]))))
    base = run_stateful(spec, history)
    permuted = run_stateful(spec, [j[permutation] for j in history])
    for call, (first, second) in enumerate(zip(base, permuted)):
        assert (first - second).norm() <= 1e-12 * tracked_scale(history[: call + 1])


@pytest.mark.parametrize("name", list(GRADIENT_METHODS))
@few
@given(
    history=st.lists(
        jacobians(min_tasks=3, max_tasks=3, min_params=5, max_params=5), min_size=3, max_size=3
    )
)
def test_stateful_gradient_methods_finite_on_degenerate_gradients(name, history) -> None:
    for output in run_stateful(METHODS[name], history):
        assert output.shape == (5,)
        assert_finite(output)


def test_moco_refuses_a_state_of_another_shape() -> None:
    state = initial_moco_state(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(InputError, match="another model"):
        F.moco(torch.zeros(2, 5, dtype=torch.float64), state)


def test_moco_under_a_loss_scale_tracks_the_unscaled_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    history = [torch.randn(3, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    plain, scaled = build("moco"), build("moco")
    for jacobian in history:
        update = run_hook(plain, gradient_step(jacobian))
        factor = torch.tensor(1024.0)
        scaled_update = run_hook(scaled, gradient_step(jacobian * 1024.0, loss_scale=factor))
        assert torch.equal(scaled_update, update * 1024.0)
    assert_states_equal(plain.state_dict(), scaled.state_dict())


def test_moco_loss_normalization_is_libmtl_s() -> None:
    # LibMTL tracks gᵢ/‖gᵢ‖·Lᵢ: with one call, Y = β·that and λ one step from 1/T
    jacobian = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
    losses = [2.0, 5.0, 0.5]
    plugin = build("moco", normalization="loss")
    update = run_hook(plugin, gradient_step(jacobian, losses))
    normalized = [[2.0 * 3 / 5, 2.0 * 4 / 5], [0.0, 0.0], [0.0, -0.5]]
    expected = moco_reference([normalized])[0]
    torch.testing.assert_close(update, f64(expected), rtol=1e-12, atol=1e-15)


def test_moco_through_the_pipeline_matches_the_paper_loop(problem) -> None:
    xs = batches(problem, 3)
    mtl = MTL({"tasks": problem.tasks, "plugins": ["moco"]}, shared=problem.model.encoder)
    assert mtl.space is Space.PARAMS
    history = [rows(encoder_jacobian(problem.model, x, problem.tasks)) for x in xs]
    expected = moco_reference(history)
    for x, reference in zip(xs, expected):
        problem.zero_grad()
        mtl.backward(losses_on(problem.model, x, problem.tasks))
        torch.testing.assert_close(
            encoder_grad(problem.model), f64(reference), rtol=1e-10, atol=1e-13
        )
        # task-specific parameters: Σ ∇Lᵢ (the weights before the aggregator are all 1)
        expected_heads = heads_reference(problem.model, x, problem.tasks, [1.0, 1.0, 1.0])
        for name, grad in heads_grads(problem.model).items():
            torch.testing.assert_close(grad, expected_heads[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["moco", "excess_mtl"])
def test_jacobian_plugins_keep_a_float32_model_in_float32(make_problem, name) -> None:
    problem = make_problem()
    problem.model.float()
    mtl = MTL({"tasks": problem.tasks, "plugins": [name]}, shared=problem.model.encoder)
    for x in batches(problem, 3):
        problem.zero_grad()
        mtl.backward(losses_on(problem.model, x.float(), problem.tasks))
        for grad in problem.grads().values():
            assert grad.dtype == torch.float32
            assert_finite(grad)
    state = mtl.plugins[name].state_dict()
    tracked = state["tracked" if name == "moco" else "squares"]
    assert tracked.dtype == torch.float32


class EchoCommunicator:
    """Two 'processes' holding the same values (all_reduce returns its input)."""

    rank, world_size = 0, 2

    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        return tensor.clone()


def test_moco_refuses_sync_gramian_across_processes(problem) -> None:
    # with sync: gramian each rank would track its own gradients: refused, nothing written
    config = {"tasks": problem.tasks, "plugins": ["moco"], "sync": "gramian"}
    with pytest.raises(ConfigError, match=r"'moco'.*sync: exact"):
        MTL(config, shared=problem.model.encoder, communicator=EchoCommunicator())


@pytest.mark.parametrize(
    ("plugin", "refused"),
    [
        ({"name": "trimmed_mean", "trim": 1}, True),
        ({"name": "gradvac", "granularity": "all_layer"}, True),
        ("gradvac", False),  # whole model: from the Gramian, which sync: gramian makes global
        ("upgrad", False),
    ],
)
def test_sync_gramian_refuses_exactly_the_plugins_that_combine_j(problem, plugin, refused) -> None:
    config = {"tasks": problem.tasks, "space": "params", "plugins": [plugin], "sync": "gramian"}
    if refused:
        with pytest.raises(ConfigError, match="sync: exact"):
            MTL(config, shared=problem.model.encoder, communicator=EchoCommunicator())
    else:
        MTL(config, shared=problem.model.encoder, communicator=EchoCommunicator())


@pytest.mark.parametrize("space", ["last_shared", "features"])
def test_moco_refuses_spaces_without_the_parameters_it_tracks(problem, space) -> None:
    config = {"tasks": problem.tasks, "space": space, "plugins": ["moco"]}
    with pytest.raises(ConfigError, match="moco"):
        MTL(config, shared=problem.model.encoder)


# -- ExcessMTL ----------------------------------------------------------------------------------


def run_excess(history: Sequence[Tensor], **options) -> list[Tensor]:
    state = initial_excess_mtl_state(history[0].shape[0])
    out = []
    for gradients in history:
        weights, state = excess_mtl(gradients, state, **options)
        out.append(weights)
    return out


def excess_history_strategy(max_exponent: int):
    return same_task_histories(4, 6, max_exponent=max_exponent, degenerate=False)


# per-call scales spread over 1e±3: excess ratios up to ~1e6
excess_histories = excess_history_strategy(3)


@few
@given(history=excess_history_strategy(0), step_size=st.sampled_from([1e-2, 1.0]))
def test_excess_mtl_matches_the_reference_loop(history, step_size) -> None:
    weights = run_excess(history, step_size=step_size)
    expected = excess_mtl_reference([rows(j) for j in history], step_size=step_size)
    for actual, reference in zip(weights, expected):
        torch.testing.assert_close(actual, f64(reference), rtol=1e-10, atol=0)


def test_excess_mtl_stays_finite_where_the_multiplicative_update_overflows() -> None:
    # a task whose gradient grows 1000× after the baseline call: exp(η·r/r₀) overflows in the
    # reference's multiplicative form (math.exp raises; torch gives inf, then NaN weights)
    small = torch.tensor([[0.01, -0.02, 0.03], [0.01, 0.01, 0.01]], dtype=torch.float64)
    history = [small, small * torch.tensor([[1e4], [1.0]], dtype=torch.float64)]
    with pytest.raises(OverflowError):
        excess_mtl_reference([rows(j) for j in history], step_size=1.0)
    weights = run_excess(history, step_size=1.0)[-1]
    assert_finite(weights)
    torch.testing.assert_close(weights, f64([2.0, 0.0]), rtol=0, atol=1e-12)


def test_excess_mtl_warmup_averages_the_baseline() -> None:
    gen = torch.Generator().manual_seed(1)
    history = [torch.randn(2, 4, generator=gen, dtype=torch.float64) for _ in range(4)]
    weights = run_excess(history, warmup_steps=2, step_size=0.5, eps=0.0)
    squares = torch.zeros(2, 4, dtype=torch.float64)
    risks = []
    for gradients in history:
        squares = squares + gradients**2
        risks.append((gradients**2 / squares.sqrt()).sum(1))
    baseline = (risks[0] + risks[1]) / 2
    assert torch.equal(weights[0], torch.ones(2, dtype=torch.float64))
    assert torch.equal(weights[1], torch.ones(2, dtype=torch.float64))
    logits = 0.5 * risks[2] / baseline
    torch.testing.assert_close(weights[2], 2 * torch.softmax(logits, 0))
    torch.testing.assert_close(weights[3], 2 * torch.softmax(logits + 0.5 * risks[3] / baseline, 0))


@few
@given(data=st.data(), history=excess_histories)
def test_excess_mtl_permutation_equivariant(data, history) -> None:
    permutation = torch.tensor(data.draw(st.permutations(range(history[0].shape[0]))))
    base = run_excess(history)
    permuted = run_excess([j[permutation] for j in history])
    for first, second in zip(base, permuted):
        torch.testing.assert_close(first[permutation], second, rtol=1e-12, atol=0)


@few
@given(history=excess_histories, factor=scale_factors, data=st.data())
def test_excess_mtl_ignores_the_scale_of_one_task(history, factor, data) -> None:
    # rᵢ scales like one task's gradient scale c, and so does its baseline: rᵢ/bᵢ does not
    # depend on c (ε = 0 here: an absolute ε breaks this for tiny gradients, as documented)
    task = data.draw(st.integers(0, history[0].shape[0] - 1))
    scaled = []
    for gradients in history:
        copy_ = gradients.clone()
        copy_[task] *= factor
        scaled.append(copy_)
    for first, second in zip(run_excess(history, eps=0.0), run_excess(scaled, eps=0.0)):
        torch.testing.assert_close(first, second, rtol=1e-10, atol=0)


def test_excess_mtl_zero_baseline_task_gets_no_push() -> None:
    history = [torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)] + [
        torch.tensor([[1.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
    ] * 2
    for weights in run_excess(history, step_size=1.0):
        assert_finite(weights)
        assert weights[0] >= weights[1]


class ScriptedCommunicator:
    """Two 'processes' whose averages are given: all_reduce returns the next scripted value."""

    rank, world_size = 0, 2

    def __init__(self, values: list[Tensor]) -> None:
        self.values = values
        self.seen: list[Tensor] = []

    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        assert op == "mean"
        self.seen.append(tensor.clone())
        return self.values.pop(0)


def test_excess_mtl_uses_the_estimates_averaged_over_processes() -> None:
    # the weights come from the ranks' mean estimates (baseline and update alike), so every
    # rank uses the same weights whatever its own gradients
    plugin = build("excess_mtl", step_size=0.5)
    first, second = f64([1.0, 2.0, 4.0]), f64([3.0, 2.0, 1.0])
    communicator = ScriptedCommunicator([first, second])
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        step = gradient_step(torch.randn(3, 4, generator=gen, dtype=torch.float64))
        step.communicator = communicator  # type: ignore[assignment]
        weights = run_hook(plugin, step)
    assert len(communicator.seen) == 2
    torch.testing.assert_close(weights, 3 * torch.softmax(0.5 * second / first, 0))


def test_excess_mtl_through_the_pipeline_composes_with_an_aggregator(problem) -> None:
    xs = batches(problem, 3, seed=4)
    history = [rows(encoder_jacobian(problem.model, x, problem.tasks)) for x in xs]
    expected = excess_mtl_reference(history, step_size=0.5)
    config = {
        "tasks": problem.tasks,
        "plugins": [{"name": "excess_mtl", "step_size": 0.5}, "upgrad"],
    }
    mtl = MTL(config, shared=problem.model.encoder)
    for x, jac, weights in zip(xs, history, expected):
        problem.zero_grad()
        report = mtl.backward(losses_on(problem.model, x, problem.tasks))
        w = f64(weights)
        jacobian = f64(jac)
        alphas = F.upgrad(gramian_of(jacobian * w[:, None]))
        torch.testing.assert_close(report.weights, alphas * w, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(encoder_grad(problem.model), (alphas * w) @ jacobian)


def test_excess_mtl_refuses_space_features(problem) -> None:
    with pytest.raises(ConfigError, match="excess_mtl"):
        MTL({"tasks": problem.tasks, "space": "features", "plugins": ["excess_mtl"]})


# -- STCH and the scale-invariant loss ------------------------------------------------------------


def stch_objective(losses: dict[str, Tensor], tasks, ideal: Tensor, mu: float, prefs: Tensor):
    """The STCH objective itself, for autograd: T·μ·log Σ exp(λ(log L − z)/μ)."""
    values = torch.stack([losses[t] for t in tasks])
    return len(tasks) * mu * torch.logsumexp(prefs * (values.log() - ideal) / mu, dim=0)


def test_stch_gradients_are_those_of_its_objective(problem) -> None:
    # warm-up 1 call, ideal point from the mean losses of the next 2, then STCH with λ, μ
    xs = batches(problem, 5, seed=2)
    prefs = {"a": 1.0, "b": 2.0, "c": 0.5}
    config = {
        "tasks": problem.tasks,
        "plugins": [
            {"name": "stch", "mu": 0.7, "warmup_steps": 1, "nadir_steps": 2, "preferences": prefs}
        ],
    }
    mtl = MTL(config)
    values = []
    for call, x in enumerate(xs):
        problem.zero_grad()
        losses = losses_on(problem.model, x, problem.tasks)
        values.append(torch.stack([losses[t].detach() for t in problem.tasks]))
        mtl.backward(losses)
        clone = copy.deepcopy(problem.model)
        clone.zero_grad(set_to_none=True)
        reference_losses = losses_on(clone, x, problem.tasks)
        if call < 3:
            objective = sum(reference_losses[t].log() for t in problem.tasks)
        else:
            ideal = ((values[1] + values[2]) / 2).log()
            lam = torch.tensor([prefs[t] for t in problem.tasks], dtype=torch.float64)
            objective = stch_objective(reference_losses, problem.tasks, ideal, 0.7, lam)
        objective.backward()
        for (name, p), (_, q) in zip(problem.model.named_parameters(), clone.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14, msg=name)


@given(
    losses=st.lists(st.floats(1e-6, 1e6), min_size=3, max_size=3),
    mu=st.sampled_from([1e-3, 0.5, 1.0, 1e3]),
)
def test_stch_weights_match_the_objective_derivative(losses, mu) -> None:
    plugin = build("stch", nadir_steps=0, mu=mu)
    weights = run_hook(plugin, loss_step(losses))
    values = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
    objective = 3 * mu * torch.logsumexp(values.log() / mu, dim=0)
    (expected,) = torch.autograd.grad(objective, values)
    # the weight of a task far below the max underflows differently in the two computations
    torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12 * expected.abs().max())


def test_stch_limits_of_the_smoothing() -> None:
    losses = [0.5, 4.0, 2.0]
    sharp = run_hook(build("stch", nadir_steps=0, mu=1e-3), loss_step(losses))
    # μ → 0: the Tchebycheff max, all weight on the largest log loss (T/ℓ_max)
    torch.testing.assert_close(sharp, f64([0.0, 3 / 4.0, 0.0]), atol=1e-12, rtol=0)
    smooth = run_hook(build("stch", nadir_steps=0, mu=1e6), loss_step(losses))
    # μ → ∞: the sum of log losses, weights 1/ℓ
    torch.testing.assert_close(smooth, f64([2.0, 0.25, 0.5]), rtol=1e-5, atol=0)


@given(
    history=st.lists(
        st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=3), min_size=3, max_size=5
    ),
    factors=st.lists(st.sampled_from([1e-6, 0.3, 4.0, 1e6]), min_size=3, max_size=3),
    name=st.sampled_from(["stch", "scale_invariant"]),
)
def test_loss_methods_ignore_the_scale_of_each_loss(history, factors, name) -> None:
    # the update Σ wᵢ∇(cᵢLᵢ) = Σ (wᵢcᵢ)∇Lᵢ does not change when task i's loss is scaled by cᵢ
    options = {"warmup_steps": 1, "nadir_steps": 1} if name == "stch" else {}
    plain, scaled = build(name, **options), build(name, **options)
    c = torch.tensor(factors, dtype=torch.float64)
    for losses in history:
        base = run_hook(plain, loss_step(losses))
        other = run_hook(scaled, loss_step((f64(losses) * c).tolist()))
        torch.testing.assert_close(other * c, base, rtol=1e-9, atol=0)


def test_scale_invariant_gradients_are_those_of_sum_log(problem) -> None:
    mtl = MTL({"tasks": problem.tasks, "plugins": ["scale_invariant"]})
    _, losses = problem.losses()
    mtl.backward(losses)
    clone = copy.deepcopy(problem.model)
    clone.zero_grad(set_to_none=True)
    _, reference = problem.losses(clone)
    sum(reference[t].log() for t in problem.tasks).backward()
    for p, q in zip(problem.model.parameters(), clone.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)


def test_scale_invariant_composes_with_static_weights() -> None:
    # static after it: Σ cᵢ log Lᵢ (weights cᵢ/Lᵢ); static before it cancels (weights 1/Lᵢ)
    losses = [2.0, 4.0, 0.5]
    after = loss_step(losses)
    build("scale_invariant").mtl_scale_losses(after)  # type: ignore[attr-defined]
    build("static", weights={"a": 3.0}).mtl_scale_losses(after)  # type: ignore[attr-defined]
    torch.testing.assert_close(after.weights, f64([1.5, 0.25, 2.0]))
    before = loss_step(losses, weights=[3.0, 1.0, 1.0])
    build("scale_invariant").mtl_scale_losses(before)  # type: ignore[attr-defined]
    torch.testing.assert_close(before.weights, f64([0.5, 0.25, 2.0]))


@pytest.mark.parametrize("name", ["stch", "scale_invariant"])
def test_log_methods_refuse_non_positive_losses(name) -> None:
    with pytest.raises(InputError, match="'b' = 0"):
        run_hook(build(name), loss_step([1.0, 0.0, 2.0]))


def test_stch_refuses_unknown_or_bad_preferences() -> None:
    with pytest.raises(ConfigError, match="unknown task"):
        MTL({"tasks": TASKS, "plugins": [{"name": "stch", "preferences": {"z": 1.0}}]})
    with pytest.raises(ConfigError, match="> 0"):
        MTL({"tasks": TASKS, "plugins": [{"name": "stch", "preferences": {"a": 0.0}}]})


# -- state: everything mutable in state_dict, resumed bit for bit ---------------------------------

STATEFUL = {
    "moco": {},
    # small steps, so that the weights depend on the previous ones (with large steps they jump
    # to a vertex whatever the state, and the resume test could not tell a lost state)
    "modo": {"gamma": 1e-5},
    "sdmgrad": {"lr": 0.1, "iterations": 3},
    "excess_mtl": {"step_size": 0.5},
    "stch": {"warmup_steps": 1, "nadir_steps": 1},
}


def stateful_step(name: str, call: int) -> Step:
    gen = torch.Generator().manual_seed(call)
    if name == "stch":
        return loss_step((torch.rand(3, generator=gen, dtype=torch.float64) + 0.1).tolist())
    return gradient_step(torch.randn(3, 5, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("name", list(STATEFUL))
def test_state_dict_holds_everything_mutable(name) -> None:
    # what the pipeline does around every call: snapshot, run, restore on failure: a call run
    # again from the restored state gives the same result and the same state, bit for bit
    plugin = build(name, **STATEFUL[name])
    for call in range(4):
        snapshot = copy.deepcopy(plugin.state_dict())
        keys = set(snapshot)
        first = run_hook(plugin, stateful_step(name, call))
        after = copy.deepcopy(plugin.state_dict())
        assert set(after) == keys, "state keys must not change between calls"
        plugin.load_state_dict(copy.deepcopy(snapshot))
        again = run_hook(plugin, stateful_step(name, call))
        assert torch.equal(first, again)
        assert_states_equal(plugin.state_dict(), after)
        for key, value in snapshot.items():
            if isinstance(value, Tensor) and isinstance(after[key], Tensor):
                assert (value.shape, value.dtype) == (after[key].shape, after[key].dtype), key


@pytest.mark.parametrize("name", list(STATEFUL))
def test_resume_through_torch_save_is_bit_for_bit(make_problem, name) -> None:
    spec = {"name": name, **STATEFUL[name]}
    config = {"tasks": TASKS, "plugins": [spec]}
    calls, split = 4, 2

    def train(mtl: MTL, problem, optimizer, xs) -> list[dict[str, Tensor]]:
        written = []
        for x in xs:
            optimizer.zero_grad(set_to_none=True)
            mtl.backward(losses_on(problem.model, x, TASKS))
            written.append(problem.grads())
            optimizer.step()
        return written

    straight = make_problem()
    xs = batches(straight, calls, seed=9)
    mtl = MTL(config, shared=straight.model.encoder)
    through = train(mtl, straight, torch.optim.SGD(straight.model.parameters(), lr=0.01), xs)

    problem = make_problem()
    first = MTL(config, shared=problem.model.encoder)
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=0.01)
    train(first, problem, optimizer, xs[:split])
    buffer = io.BytesIO()
    torch.save({"mtl": first.state_dict(), "model": problem.model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    fresh = make_problem()
    fresh.model.load_state_dict(saved["model"])
    second = MTL(config, shared=fresh.model.encoder)
    second.load_state_dict(saved["mtl"])
    resumed = train(second, fresh, torch.optim.SGD(fresh.model.parameters(), lr=0.01), xs[split:])
    for expected, actual in zip(through[split:], resumed):
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), key
    assert_states_equal(mtl.state_dict()["plugins"], second.state_dict()["plugins"])

    # the state matters: a fresh plugin state gives other gradients
    other = make_problem()
    other.model.load_state_dict(saved["model"])
    third = MTL(config, shared=other.model.encoder)
    restarted = train(third, other, torch.optim.SGD(other.model.parameters(), lr=0.01), xs[split:])
    assert any(
        not torch.equal(a[key], b[key]) for a, b in zip(restarted, through[split:]) for key in a
    )


# -- listed, documented, declared ---------------------------------------------------------------


def test_new_methods_are_listed_by_the_cli(capsys) -> None:
    import json

    assert main(["plugins", "--json"]) == 0
    rows_ = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    for name in NEW_PLUGINS:
        assert name in rows_, name
    assert rows_["moco"]["family"] == "aggregator"
    assert rows_["excess_mtl"]["family"] == "norm_balancing"
    assert rows_["stch"]["family"] == rows_["scale_invariant"]["family"] == "loss_scaling"


def test_declarations_of_the_new_aggregators() -> None:
    assert METHODS["moco"].input == "gradients" and METHODS["moco"].stateful
    for name in ("modo", "sdmgrad"):
        assert METHODS[name].stateful and METHODS[name].initial_state is F.mean
        assert Property.NON_CONFLICTING not in METHODS[name].properties
    assert Property.SCALE_INVARIANT in METHODS["sdmgrad"].properties
    assert Property.SCALE_INVARIANT not in METHODS["modo"].properties


def test_modo_is_not_scale_invariant() -> None:
    # the step acts on the raw Gramian (as in the paper): a common scale changes the weights
    gramian = gramian_of(torch.tensor([[1.0, 0.0], [0.3, 1.0]], dtype=torch.float64))
    first, _ = F.modo(gramian, F.mean(gramian), gamma=0.1)
    second, _ = F.modo(100 * gramian, F.mean(gramian), gamma=0.1)
    assert not torch.allclose(first, second)


@given(gramian=gramians(min_tasks=2, max_tasks=5, degenerate=False, max_exponent=2))
def test_modo_and_sdmgrad_weights_sum_to_one(gramian: Tensor) -> None:
    for name in ("modo", "sdmgrad"):
        weights, _ = METHODS[name].function(gramian, F.mean(gramian))  # type: ignore[misc]
        assert abs(weights.sum().item() - 1) < 1e-12
