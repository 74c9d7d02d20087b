"""Loss-scaling plugins: uncertainty, uw_so, dwa, rlw, gls, imtl_l, slaw, famo.

Every expected value is computed in the test itself (plain Python ``math`` or a few lines of
torch), never with the plugins' helpers. Unit tests drive a plugin's hook on a hand-made
:class:`~mtlhooks.Step`; pipeline tests go through :class:`~mtlhooks.MTL`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mtlhooks import MTL, InputError, NonFiniteError, Plugin, Setup, Space, Step, registry

TASKS = ("a", "b", "c")
LOSS_SCALING = ("uncertainty", "uw_so", "dwa", "rlw", "gls", "imtl_l", "slaw", "famo")
LEARNABLE = ("uncertainty", "imtl_l")


# -- helpers ------------------------------------------------------------------------------------


def build(name: str, tasks: Sequence[str] = TASKS, seed: int = 0, **options: object) -> Plugin:
    info = registry.get_plugin(name)
    return info.cls(info.config_model(**options), Setup(tuple(tasks), Space.NONE, seed))


def make_step(
    losses: Sequence[float] | torch.Tensor,
    *,
    tasks: Sequence[str] | None = None,
    index: int = 0,
    weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Step:
    values = torch.as_tensor(losses, dtype=dtype)
    return Step(
        index=index,
        tasks=tuple(tasks or TASKS[: len(values)]),
        losses=values,
        weights=torch.ones_like(values) if weights is None else torch.tensor(weights, dtype=dtype),
        space=Space.NONE,
        generator=generator or torch.Generator().manual_seed(0),
    )


def scale(plugin: Plugin, losses: Sequence[float] | torch.Tensor, **kwargs: object) -> Step:
    step = make_step(losses, tasks=plugin.setup.tasks, **kwargs)  # type: ignore[arg-type]
    plugin.mtl_scale_losses(step)  # type: ignore[attr-defined]
    return step


def drive(plugin: Plugin, history: Sequence[Sequence[float]], dtype=torch.float64) -> torch.Tensor:
    """Feed a loss history (one call per row) the way a training loop would: learnable
    parameters take an SGD step on their auxiliary loss, FAMO gets the next row as its
    post-step losses. Returns the weights of the last call."""
    weights = torch.empty(0)
    for index, losses in enumerate(history):
        step = scale(plugin, losses, index=index, dtype=dtype)
        weights = step.weights
        if step.auxiliary_losses:
            (parameter,) = plugin.parameters()
            parameter.grad = None
            torch.stack(step.auxiliary_losses).sum().backward()
            with torch.no_grad():
                parameter -= 0.1 * parameter.grad
        if plugin.name == "famo" and index + 1 < len(history):
            plugin.mtl_after_step(index + 1, torch.tensor(history[index + 1], dtype=dtype))  # type: ignore[attr-defined]
    return weights


def softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def close(actual: torch.Tensor, expected: Sequence[float], rtol: float = 1e-12) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=actual.dtype), rtol=rtol, atol=0.0
    )


def assert_states_equal(first: object, second: object, where: str = "state") -> None:
    """Bit-for-bit equality of nested state dicts (tensors compared with ``torch.equal``)."""
    assert type(first) is type(second), f"{where}: {type(first)} != {type(second)}"
    if isinstance(first, torch.Tensor):
        assert isinstance(second, torch.Tensor)
        assert first.dtype == second.dtype and torch.equal(first, second), where
    elif isinstance(first, dict):
        assert isinstance(second, dict) and first.keys() == second.keys(), where
        for key in first:
            assert_states_equal(first[key], second[key], f"{where}[{key!r}]")
    elif isinstance(first, (list, tuple)):
        assert isinstance(second, (list, tuple)) and len(first) == len(second), where
        for i, (a, b) in enumerate(zip(first, second)):
            assert_states_equal(a, b, f"{where}[{i}]")
    else:
        assert first == second, f"{where}: {first!r} != {second!r}"


def constant_losses(values: Sequence[float], parameter: torch.Tensor) -> dict[str, torch.Tensor]:
    """Losses with a graph (through ``parameter``, which gets zero gradient) but fixed values."""
    return {t: v + 0.0 * parameter.sum() for t, v in zip(TASKS, values)}


# -- registry -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_SCALING)
def test_plugins_are_registered_with_documented_defaults(name):
    info = registry.get_plugin(name)
    assert info.family.value == "loss_scaling"
    assert "20" in (info.cls.__doc__ or ""), "docstring cites the paper (with its year)"
    for field_name, field in info.config_model.model_fields.items():
        assert field.description, f"{name}.{field_name} has no description"
    MTL({"tasks": TASKS, "plugins": [name]})  # bare name: defaults are valid


# -- uncertainty --------------------------------------------------------------------------------


def test_uncertainty_weights_and_objective_by_hand():
    plugin = build("uncertainty")
    s = [0.0, 0.5, -1.0]
    plugin.load_state_dict({"parameter": torch.tensor(s)})
    losses = [2.0, 0.3, 5.0]
    step = scale(plugin, losses)
    close(step.weights, [0.5 * math.exp(-si) for si in s], rtol=1e-7)
    (objective,) = step.auxiliary_losses
    expected = sum(0.5 * math.exp(-si) * li + 0.5 * si for si, li in zip(s, losses))
    assert objective.item() == pytest.approx(expected, rel=1e-7)
    objective.backward()
    (parameter,) = plugin.parameters()
    close(parameter.grad, [0.5 - 0.5 * math.exp(-si) * li for si, li in zip(s, losses)], 1e-6)


def test_uncertainty_composes_with_earlier_weights():
    """It sees ℓ = w·L: the objective uses the weighted losses, the weights multiply."""
    plugin = build("uncertainty")
    step = scale(plugin, [2.0, 3.0, 4.0], weights=[1.0, 10.0, 0.5])
    close(step.weights, [0.5, 5.0, 0.25])
    assert step.auxiliary_losses[0].item() == pytest.approx(0.5 * (2.0 + 30.0 + 2.0))


def test_uncertainty_learns_log_of_the_loss_through_the_users_optimizer():
    """``mtl.parameters()`` yields the log-variances; the user's optimizer drives them to the
    optimum s = log L (here with constant losses)."""
    anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    mtl = MTL({"tasks": TASKS, "plugins": ["uncertainty"]})
    parameters = list(mtl.parameters())
    assert parameters == list(mtl.plugins["uncertainty"].parameters()) and len(parameters) == 1
    assert parameters[0].dtype == torch.float32 and parameters[0].device.type == "cpu"
    optimizer = torch.optim.SGD([anchor, *mtl.parameters()], lr=0.5)
    values = [0.2, 3.0, 40.0]
    for _ in range(300):
        optimizer.zero_grad()
        report = mtl.backward(constant_losses(values, anchor))
        optimizer.step()
    torch.testing.assert_close(
        parameters[0].detach(), torch.tensor([math.log(v) for v in values]), atol=1e-5, rtol=0
    )
    # at the optimum each weighted loss is ½: the weights are 1/(2L)
    close(report.weights, [1 / (2 * v) for v in values], rtol=1e-4)


def test_learnable_parameters_follow_loss_dtype_and_move_in_place():
    plugin = build("uncertainty")
    (parameter,) = plugin.parameters()
    step = scale(plugin, [2.0, 3.0, 4.0], dtype=torch.float64)
    assert step.weights.dtype == torch.float64
    step.auxiliary_losses[0].backward()
    assert parameter.grad is not None and parameter.grad.dtype == torch.float32
    optimizer = torch.optim.SGD(plugin.parameters(), lr=0.1)
    assert plugin.to(dtype=torch.float64) is plugin  # type: ignore[attr-defined]
    assert next(plugin.parameters()) is parameter and parameter.dtype == torch.float64
    parameter.grad = None
    scale(plugin, [2.0, 3.0, 4.0]).auxiliary_losses[0].backward()
    optimizer.step()  # the optimizer built before the move still updates the same object
    assert parameter.dtype == torch.float64 and bool((parameter != 0).all())


# -- imtl_l -------------------------------------------------------------------------------------


def test_imtl_l_weights_and_objective_by_hand():
    plugin = build("imtl_l")
    s = [0.25, -0.5, 1.5]
    plugin.load_state_dict({"parameter": torch.tensor(s)})
    losses = [2.0, 0.3, 5.0]
    step = scale(plugin, losses)
    close(step.weights, [math.exp(si) for si in s], rtol=1e-7)
    (objective,) = step.auxiliary_losses
    expected = sum(math.exp(si) * li - si for si, li in zip(s, losses))
    assert objective.item() == pytest.approx(expected, rel=1e-7)
    objective.backward()
    close(
        next(plugin.parameters()).grad, [math.exp(si) * li - 1 for si, li in zip(s, losses)], 1e-6
    )


@pytest.mark.parametrize(
    ("name", "options"),
    [("imtl_l", {}), ("dwa", {"period_steps": 3}), ("static", {})],
)
def test_equal_weights_reproduce_a_plain_backward_exactly(make_problem, name, options):
    """imtl_l at its initialisation and dwa in its first two periods give weights exactly 1:
    the gradients are bit-for-bit those of ``sum(losses).backward()``."""
    ours, plain = make_problem(), make_problem()
    mtl = MTL({"tasks": ours.tasks, "plugins": [{"name": name, **options}]})
    _, losses = ours.losses()
    report = mtl.backward(losses)
    assert torch.equal(report.weights, torch.ones(3, dtype=torch.float64))
    _, reference = plain.losses()
    sum(reference.values()).backward()
    for a, b in zip(ours.model.parameters(), plain.model.parameters()):
        assert torch.equal(a.grad, b.grad)


def positive_losses(max_exponent: int = 12) -> st.SearchStrategy[float]:
    """Positive floats m·10^k, 1 ≤ m < 10, |k| ≤ max_exponent (1e-12 … 1e13 by default)."""
    return st.builds(
        lambda mantissa, exponent: mantissa * 10.0**exponent,
        st.floats(1.0, 9.99),
        st.integers(-max_exponent, max_exponent),
    )


def loss_vectors(size: int, max_exponent: int = 12) -> st.SearchStrategy[list[float]]:
    return st.lists(positive_losses(max_exponent), min_size=size, max_size=size)


@given(
    data=st.data(),
    name=st.sampled_from(LEARNABLE),
    factor=st.sampled_from([1e-6, 0.3, 7.0, 1e6]),
)
def test_learnable_weights_at_their_optimum_are_loss_scale_invariant(data, name, factor):
    """At the optimum of its own objective (uncertainty: s = log ℓ, imtl_l: s = −log ℓ, both
    convex in s) the multiplier of ∇ℓᵢ does not change when ℓᵢ is scaled by c:
    c·w(c·ℓ) = w(ℓ)."""
    losses = data.draw(loss_vectors(3, max_exponent=5))
    sign = 1.0 if name == "uncertainty" else -1.0

    def at_optimum(values: list[float]) -> torch.Tensor:
        plugin = build(name)
        plugin.load_state_dict({"parameter": torch.tensor([sign * math.log(v) for v in values])})
        step = scale(plugin, values)
        step.auxiliary_losses[0].backward()
        gradient = next(plugin.parameters()).grad
        scale_of_gradient = 0.5 if name == "uncertainty" else 1.0
        assert gradient.abs().max() <= 1e-5 * scale_of_gradient, "not a stationary point"
        return step.weights

    base = at_optimum(losses)
    scaled = at_optimum([factor * v for v in losses])
    torch.testing.assert_close(scaled * factor, base, rtol=1e-5, atol=0.0)


# -- uw_so --------------------------------------------------------------------------------------


def test_uw_so_weights_by_hand():
    plugin = build("uw_so", temperature=0.5)
    losses = [0.5, 2.0, 4.0]
    step = scale(plugin, losses)
    close(step.weights, softmax([(1 / (v + 1e-8)) / 0.5 for v in losses]))
    assert step.weights.sum().item() == pytest.approx(1.0, abs=1e-15)


def test_uw_so_zero_loss_is_finite_and_negative_loss_is_refused():
    plugin = build("uw_so")
    weights = scale(plugin, [0.0, 1.0, 2.0]).weights
    assert torch.isfinite(weights).all() and weights[0] == pytest.approx(1.0)
    with pytest.raises(InputError, match=r"uw_so: loss of task 'b' = -0\.5 < 0.*non-negative"):
        scale(plugin, [1.0, -0.5, 2.0])


# -- dwa ----------------------------------------------------------------------------------------


def test_dwa_uses_period_means_two_periods_back():
    plugin = build("dwa", period_steps=2, temperature=2.0)
    history = [
        [4.0, 2.0, 1.0],
        [2.0, 2.0, 1.0],  # period 0 means: 3, 2, 1
        [1.5, 1.0, 1.0],
        [1.5, 3.0, 1.0],  # period 1 means: 1.5, 2, 1
        [1.0, 1.0, 0.5],
        [0.5, 1.0, 0.5],  # period 2 means: 0.75, 1, 0.5
        [1.0, 1.0, 1.0],
    ]
    got = [scale(plugin, losses, index=i).weights for i, losses in enumerate(history)]
    for weights in got[:4]:
        assert torch.equal(weights, torch.ones(3, dtype=torch.float64))
    period_2 = [3 * w for w in softmax([1.5 / 3 / 2, 2 / 2 / 2, 1 / 1 / 2])]
    close(got[4], period_2)
    close(got[5], period_2)
    close(got[6], [3 * w for w in softmax([0.75 / 1.5 / 2, 1 / 2 / 2, 0.5 / 1 / 2])])


def test_dwa_zero_period_mean_counts_as_no_change():
    plugin = build("dwa", temperature=1.0)
    got = [scale(plugin, losses).weights for losses in ([0.0, 1.0], [0.0, 2.0], [5.0, 5.0])]
    close(got[2], [2 * w for w in softmax([1.0, 2.0])])


# -- rlw ----------------------------------------------------------------------------------------


def test_rlw_draws_softmax_of_normal_from_the_step_generator():
    plugin = build("rlw")
    generator = torch.Generator().manual_seed(123)
    first = scale(plugin, [1.0, 2.0, 3.0], generator=generator).weights
    second = scale(plugin, [1e6, 1e-6, 3.0], generator=generator).weights
    reference = torch.Generator().manual_seed(123)
    draws = [torch.randn(3, generator=reference).tolist() for _ in range(2)]
    close(first, softmax(draws[0]), rtol=1e-6)
    close(second, softmax(draws[1]), rtol=1e-6)
    assert not torch.equal(first, second)


@given(losses=loss_vectors(4), permutation=st.permutations(range(4)))
def test_rlw_weights_do_not_depend_on_the_losses(losses, permutation):
    """Task i gets the i-th draw whatever the losses: with the same draw, permuting the losses
    leaves the weights in place (and permuting the draw would permute them)."""
    plugin = build("rlw", tasks=("a", "b", "c", "d"))
    base = scale(plugin, losses, generator=torch.Generator().manual_seed(5)).weights
    shuffled = [losses[i] for i in permutation]
    again = scale(plugin, shuffled, generator=torch.Generator().manual_seed(5)).weights
    assert torch.equal(base, again)


# -- gls ----------------------------------------------------------------------------------------


def test_gls_weights_by_hand():
    step = scale(build("gls"), [1.0, 4.0, 16.0])  # geometric mean 4
    close(step.weights, [4 / (3 * 1), 4 / (3 * 4), 4 / (3 * 16)])


def test_gls_gradient_equals_that_of_the_geometric_mean(make_problem):
    ours, plain = make_problem(), make_problem()
    mtl = MTL({"tasks": ours.tasks, "plugins": ["gls"]})
    _, losses = ours.losses()
    mtl.backward(losses)
    _, reference = plain.losses()
    torch.stack(list(reference.values())).prod().pow(1 / 3).backward()
    for a, b in zip(ours.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)


# -- bad input for methods that take logs --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "values", "message"),
    [
        ("gls", [1.0, 0.0, 2.0], r"gls: loss of task 'b' = 0 ≤ 0.*geometric mean.*offset"),
        ("gls", [-1.0, 1.0, 2.0], r"gls: loss of task 'a' = -1 ≤ 0"),
        ("famo", [1.0, 1.0, -0.25], r"famo: loss of task 'c' = -0\.25 < 0.*min_losses"),
        ("uw_so", [1.0, 1.0, -3.0], r"uw_so: loss of task 'c' = -3 < 0"),
    ],
)
def test_bad_losses_raise_before_anything_is_written(problem, name, values, message):
    mtl = MTL({"tasks": problem.tasks, "plugins": [name]})
    state = copy.deepcopy(mtl.state_dict())
    _, losses = problem.losses()
    shifted = {t: loss - loss.detach() + v for (t, loss), v in zip(losses.items(), values)}
    with pytest.raises(InputError, match=message):
        mtl.backward(shifted)
    assert all(p.grad is None for p in problem.model.parameters())
    after = mtl.state_dict()
    assert after["index"] == state["index"]
    assert_states_equal(after["plugins"], state["plugins"])


# -- slaw ---------------------------------------------------------------------------------------


def slaw_reference(history: list[list[float]], beta: float, eps: float) -> list[float]:
    """SLAW by the paper's description and the author's code (meta/train/loss.py, CLAW, with
    meta/utils/estimate.py): arithmetic means for the first 1/(1−β) steps, then exponential
    moving averages; the standard deviation is floored at eps."""
    warmup = round(1 / (1 - beta))
    count = len(history)
    tasks = len(history[0])
    first = history[: min(count, warmup)]
    a = [sum(row[i] ** 2 for row in first) / len(first) for i in range(tasks)]
    b = [sum(row[i] for row in first) / len(first) for i in range(tasks)]
    for row in history[warmup:]:
        a = [beta * a[i] + (1 - beta) * row[i] ** 2 for i in range(tasks)]
        b = [beta * b[i] + (1 - beta) * row[i] for i in range(tasks)]
    inverse = [1 / max(math.sqrt(max(a[i] - b[i] ** 2, 0.0)), eps) for i in range(tasks)]
    return [tasks * v / sum(inverse) for v in inverse]


@pytest.mark.parametrize(("beta", "count"), [(0.75, 3), (0.75, 4), (0.75, 7), (0.99, 130)])
def test_slaw_by_hand(beta, count):
    generator = torch.Generator().manual_seed(count)
    scales = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    history = (torch.rand(count, 3, generator=generator, dtype=torch.float64) * scales).tolist()
    plugin = build("slaw", beta=beta)
    weights = [scale(plugin, row, index=i).weights for i, row in enumerate(history)][-1]
    close(weights, slaw_reference(history, beta, 1e-5), rtol=1e-9)


def test_slaw_floors_the_standard_deviation_at_eps_as_the_authors_code():
    """A constant loss has std 0: floored at ε = 1e-5 (not the variance: that would floor the
    std at 3.2e-3 and give a task of std 1e-3 the same weight)."""
    plugin = build("slaw", tasks=("a", "b"), beta=0.5)
    history = [[1.0, 1.0 + 1e-3], [1.0, 1.0 - 1e-3]]  # stds 0 and 1e-3
    weights = [scale(plugin, row, index=i).weights for i, row in enumerate(history)][-1]
    inverse = [1 / 1e-5, 1 / 1e-3]
    close(weights, [2 * v / sum(inverse) for v in inverse], rtol=1e-6)


def test_slaw_first_step_gives_equal_weights():
    weights = scale(build("slaw"), [1e-3, 5.0, 1e4]).weights
    close(weights, [1.0, 1.0, 1.0], rtol=1e-15)


@given(
    history=st.lists(loss_vectors(3, max_exponent=3), min_size=2, max_size=8),
    task=st.integers(0, 2),
    shift=st.sampled_from([-0.5, 0.25, 3.0, 100.0]),
)
def test_slaw_is_invariant_to_a_constant_shift_of_one_loss_history(history, task, shift):
    """aᵢ − bᵢ² is a variance (the averaging weights always sum to 1), so adding a constant to
    every loss of one task changes nothing. Shifts keep the losses positive."""
    shift = shift * min(row[task] for row in history) if shift < 0 else shift
    shifted = [[v + shift if i == task else v for i, v in enumerate(row)] for row in history]
    base = drive(build("slaw", beta=0.5), history)
    moved = drive(build("slaw", beta=0.5), shifted)
    torch.testing.assert_close(moved, base, rtol=1e-6, atol=0.0)


# -- famo ---------------------------------------------------------------------------------------


def test_famo_weights_divide_by_c():
    """wᵢ = (zᵢ/Dᵢ)/Σⱼ(zⱼ/Dⱼ), Dᵢ = Lᵢ − L*ᵢ + ε: they sum to 1, whatever the loss scale (the
    c-multiplied bug gives zᵢ/Dᵢ·Σⱼ zⱼ/Dⱼ, which does not)."""
    plugin = build("famo", min_losses={"b": 1.0})
    plugin.load_state_dict(
        {**plugin.state_dict(), "logits": torch.tensor([0.0, math.log(2.0), 0.0])}
    )
    losses = [1.0, 2.0, 4.0]
    z = [0.25, 0.5, 0.25]
    gaps = [1.0 + 1e-8, 1.0 + 1e-8, 4.0 + 1e-8]
    inverse = [zi / di for zi, di in zip(z, gaps)]
    step = scale(plugin, losses)
    close(step.weights, [v / sum(inverse) for v in inverse], rtol=1e-7)
    assert step.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    big = scale(build("famo"), [1e6 * v for v in losses]).weights
    small = scale(build("famo"), losses).weights
    torch.testing.assert_close(big, small, rtol=1e-6, atol=0.0)


def adam_reference(grads: list[list[float]], lr: float, decay: float) -> list[float]:
    """torch.optim.Adam's documented update (L2 decay, betas 0.9/0.999, eps 1e-8), by hand."""
    xi = [0.0] * len(grads[0])
    m = [0.0] * len(xi)
    v = [0.0] * len(xi)
    for t, grad in enumerate(grads, start=1):
        g = [gi + decay * x for gi, x in zip(grad, xi)]
        m = [0.9 * mi + 0.1 * gi for mi, gi in zip(m, g)]
        v = [0.999 * vi + 0.001 * gi**2 for vi, gi in zip(v, g)]
        xi = [
            x - lr * (mi / (1 - 0.9**t)) / (math.sqrt(vi / (1 - 0.999**t)) + 1e-8)
            for x, mi, vi in zip(xi, m, v)
        ]
    return xi


def famo_gradient(xi: list[float], before: list[float], after: list[float]) -> list[float]:
    """Jᵀδ for z = softmax(ξ), δ = log(before) − log(after) (min losses 0, ε = 1e-8)."""
    z = softmax(xi)
    delta = [math.log(b + 1e-8) - math.log(a + 1e-8) for b, a in zip(before, after)]
    mean = sum(zi * di for zi, di in zip(z, delta))
    return [zi * (di - mean) for zi, di in zip(z, delta)]


def test_famo_post_step_update_by_hand():
    plugin = build("famo", lr=0.1, weight_decay=0.01)
    history = [([1.0, 2.0, 4.0], [0.5, 1.9, 4.0]), ([0.6, 1.8, 3.0], [0.55, 1.0, 2.0])]
    grads, xi = [], [0.0, 0.0, 0.0]
    for index, (before, after) in enumerate(history):
        step = scale(plugin, before, index=index)
        z = softmax(xi)
        inverse = [zi / (b + 1e-8) for zi, b in zip(z, before)]
        close(step.weights, [v / sum(inverse) for v in inverse], rtol=1e-6)
        plugin.mtl_after_step(index + 1, torch.tensor(after, dtype=torch.float64))
        grads.append(famo_gradient(xi, before, after))
        xi = adam_reference(grads, lr=0.1, decay=0.01)
        torch.testing.assert_close(
            plugin.state_dict()["logits"],
            torch.tensor(xi, dtype=torch.float32),
            rtol=1e-5,
            atol=1e-7,
        )
        if index == 0:  # a's log-loss fell the most over the first step: it lost weight
            assert softmax(xi)[0] < min(softmax(xi)[1:])


def test_famo_next_call_uses_the_next_backwards_losses():
    after_step = build("famo")
    next_call = build("famo", update="next_call")
    first, second = [1.0, 2.0, 4.0], [0.5, 1.9, 4.0]
    scale(after_step, first)
    after_step.mtl_after_step(1, torch.tensor(second, dtype=torch.float64))
    expected = scale(after_step, second, index=1).weights
    scale(next_call, first)
    next_call.mtl_after_step(1, torch.tensor([9.0, 9.0, 9.0]))  # ignored in next_call mode
    got = scale(next_call, second, index=1).weights
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_famo_without_after_step_is_a_clear_error(problem):
    mtl = MTL({"tasks": problem.tasks, "plugins": ["famo"]})
    _, losses = problem.losses()
    mtl.backward(losses)
    with pytest.raises(InputError, match=r"after_step.*update: next_call"):
        mtl.backward(problem.losses()[1])
    with pytest.raises(InputError, match="no backward"):
        fresh = MTL({"tasks": problem.tasks, "plugins": ["famo"]})
        fresh.after_step({t: v.detach() for t, v in losses.items()})


def test_famo_after_step_goes_through_the_pipeline_and_skipped_steps_teach_nothing(problem):
    mtl = MTL({"tasks": problem.tasks, "plugins": ["famo"], "on_nonfinite": "skip"})
    plugin = mtl.plugins["famo"]
    _, losses = problem.losses()
    mtl.backward(losses)
    mtl.after_step({t: v.detach() * (0.5 if t == "a" else 1.0) for t, v in losses.items()})
    z = plugin.task_weights()
    assert z[0] < z[1] and z[1] == pytest.approx(z[2])  # a improved most: less weight
    _, losses = problem.losses()
    losses["b"] = losses["b"] * float("nan")
    assert mtl.backward(losses).skipped
    with pytest.raises(NonFiniteError):  # non-finite losses are refused, and change nothing
        mtl.after_step({t: v.detach() for t, v in losses.items()})
    mtl.after_step({t: v.detach() for t, v in problem.losses()[1].items()})  # no-op after a skip
    assert torch.equal(plugin.task_weights(), z)
    mtl.backward(problem.losses()[1])  # no pending record left by the skipped step


def test_famo_loss_at_its_bound_is_finite(problem):
    plugin = build("famo", min_losses={"a": 2.0})
    weights = scale(plugin, [2.0, 1.0, 1.0]).weights
    assert torch.isfinite(weights).all() and weights[0] > 0.99
    with pytest.raises(InputError, match=r"famo: loss of task 'a' = 1\.5 < 2"):
        plugin.mtl_after_step(1, torch.tensor([1.5, 1.0, 1.0], dtype=torch.float64))


def test_famo_unknown_task_in_min_losses_is_a_config_error():
    with pytest.raises(Exception, match=r"min_losses.*unknown task\(s\) \['d'\]"):
        MTL({"tasks": TASKS, "plugins": [{"name": "famo", "min_losses": {"d": 1.0}}]})


# -- properties over all loss-scaling plugins ----------------------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> list[list[float]]:
    size = draw(st.integers(1, 5))
    return draw(st.lists(loss_vectors(size), min_size=1, max_size=5))


@given(
    name=st.sampled_from(LOSS_SCALING),
    history=histories(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_weights_are_finite_and_nonnegative_for_any_positive_losses(name, history, dtype):
    plugin = build(name, tasks=[f"t{i}" for i in range(len(history[0]))])
    weights = drive(plugin, history, dtype=dtype)
    assert weights.dtype == dtype
    assert torch.isfinite(weights).all(), weights
    assert (weights >= 0).all(), weights


DETERMINISTIC = tuple(name for name in LOSS_SCALING if name != "rlw")


@given(
    name=st.sampled_from(DETERMINISTIC),
    history=st.lists(loss_vectors(4, max_exponent=5), min_size=1, max_size=5),
    permutation=st.permutations(range(4)),
)
def test_permuting_the_tasks_permutes_the_weights(name, history, permutation):
    tasks = ("a", "b", "c", "d")
    base = drive(build(name, tasks=tasks), history)
    permuted_history = [[row[i] for i in permutation] for row in history]
    permuted = drive(build(name, tasks=[tasks[i] for i in permutation]), permuted_history)
    # float32 state (famo's logits, learnable vectors) rounds differently when summed in
    # another order; float64 statistics agree to ~1e-15
    rtol = 1e-6 if name in ("famo", *LEARNABLE) else 1e-9
    torch.testing.assert_close(permuted, base[list(permutation)], rtol=rtol, atol=0.0)


# -- resume -------------------------------------------------------------------------------------


def _train(mtl: MTL, problem, optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        _, losses = problem.losses()
        mtl.backward(losses)
        optimizer.step()
        if "famo" in mtl.plugins and mtl.plugins["famo"].config.update == "after_step":
            with torch.no_grad():
                _, after = problem.losses()
            mtl.after_step(after)


@pytest.mark.parametrize(
    "plugins",
    [
        ["uncertainty"],
        ["imtl_l"],
        [{"name": "dwa", "period_steps": 2}],
        ["rlw"],
        ["slaw", "uw_so", "gls"],
        ["famo"],
        [{"name": "famo", "update": "next_call"}],
    ],
    ids=["uncertainty", "imtl_l", "dwa", "rlw", "slaw+uw_so+gls", "famo", "famo-next_call"],
)
def test_resume_continues_bit_for_bit(make_problem, plugins):
    config = {"tasks": TASKS, "plugins": plugins, "seed": 3}

    def optimizer_for(problem, mtl):
        return torch.optim.Adam([*problem.model.parameters(), *mtl.parameters()], lr=0.01)

    straight = make_problem()
    mtl = MTL(config)
    _train(mtl, straight, optimizer_for(straight, mtl), 7)

    resumed = make_problem()
    first = MTL(config)
    optimizer = optimizer_for(resumed, first)
    _train(first, resumed, optimizer, 3)
    saved = copy.deepcopy({"mtl": first.state_dict(), "optimizer": optimizer.state_dict()})
    second = MTL(config)
    optimizer = optimizer_for(resumed, second)
    second.load_state_dict(saved["mtl"])
    optimizer.load_state_dict(saved["optimizer"])
    _train(second, resumed, optimizer, 4)

    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(mtl.parameters(), second.parameters()):
        assert torch.equal(a, b)
    assert_states_equal(mtl.state_dict(), second.state_dict())


def test_famo_to_moves_logits_and_optimizer_state():
    plugin = build("famo")
    scale(plugin, [1.0, 2.0, 4.0])
    plugin.mtl_after_step(1, torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64))
    assert plugin.to(dtype=torch.float64) is plugin  # type: ignore[attr-defined]
    state = plugin.state_dict()
    assert state["logits"].dtype == torch.float64
    moments = state["optimizer"]["state"][0]
    assert moments["exp_avg"].dtype == moments["exp_avg_sq"].dtype == torch.float64
    scale(plugin, [0.5, 2.0, 4.0], index=1)
    plugin.mtl_after_step(2, torch.tensor([0.4, 1.0, 4.0], dtype=torch.float64))
    assert torch.isfinite(plugin.task_weights()).all()
