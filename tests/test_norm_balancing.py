"""Norm-balancing plugins (gradnorm, db_mtl), composition with loss scaling and an aggregator,
and what AvgNorm's loss-scale claim really is.

Expected values are computed in the tests (plain Python or a few lines of torch.autograd),
never with the plugins' helpers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import gramian_of, jacobians
from test_loss_scaling import assert_states_equal
from torch import nn

from mtlhooks import MTL, InputError, Plugin, Setup, Space, Step, TaskGradients, registry

TASKS = ("a", "b", "c")
NORM_BALANCING = ("gradnorm", "db_mtl")


# -- helpers ------------------------------------------------------------------------------------


def build(name: str, tasks: Sequence[str] = TASKS, **options: object) -> Plugin:
    info = registry.get_plugin(name)
    return info.cls(info.config_model(**options), Setup(tuple(tasks), Space.LAST_SHARED, 0))


def balance(
    plugin: Plugin,
    losses: Sequence[float],
    gramian: torch.Tensor | Sequence[Sequence[float]],
    *,
    weights: Sequence[float] | None = None,
    index: int = 0,
) -> Step:
    values = torch.tensor(losses, dtype=torch.float64)
    gramian = torch.as_tensor(gramian, dtype=torch.float64)
    step = Step(
        index=index,
        tasks=plugin.setup.tasks,
        losses=values,
        weights=torch.ones_like(values) if weights is None else torch.tensor(weights).double(),
        space=Space.LAST_SHARED,
        generator=torch.Generator().manual_seed(0),
        gradients=TaskGradients(
            space=Space.LAST_SHARED, names=[], blocks=[], block_gramians=[gramian], gramian=gramian
        ),
    )
    plugin.mtl_balance(step)  # type: ignore[attr-defined]
    return step


def diagonal(norms: Sequence[float]) -> list[list[float]]:
    """A Gramian of orthogonal gradients with the given norms."""
    return [[n * n if i == j else 0.0 for j in range(len(norms))] for i, n in enumerate(norms)]


def sign(x: float) -> float:
    return (x > 0) - (x < 0)


def flat_grads(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("name", NORM_BALANCING)
def test_plugins_are_registered_with_documented_defaults(problem, name):
    info = registry.get_plugin(name)
    assert info.family.value == "norm_balancing"
    assert "20" in (info.cls.__doc__ or ""), "docstring cites the paper (with its year)"
    for field_name, field in info.config_model.model_fields.items():
        assert field.description, f"{name}.{field_name} has no description"
    MTL({"tasks": TASKS, "plugins": [name]}, shared=problem.model.encoder)


# -- gradnorm -----------------------------------------------------------------------------------


def gradnorm_gradients(
    weights: list[float], norms: list[float], ratios: list[float], alpha: float
) -> dict[str, list[float]]:
    """∂L_grad/∂w by the paper's rule, and by two wrong variants seen in public code."""
    scaled = [w * n for w, n in zip(weights, norms)]
    mean = sum(scaled) / len(scaled)
    relative = [r / (sum(ratios) / len(ratios)) for r in ratios]
    right = [sign(g - mean * r**alpha) * n for g, n, r in zip(scaled, norms, relative, strict=True)]
    raw = [sign(g - mean * r**alpha) * n for g, n, r in zip(scaled, norms, ratios, strict=True)]
    # differentiating through Ḡ adds -(1/T)·nⱼ·Σᵢ sign(Gᵢ − Ḡrᵢ^α)·rᵢ^α to every ∂/∂wⱼ
    signs = [sign(g - mean * r**alpha) for g, r in zip(scaled, relative)]
    coupling = sum(s * r**alpha for s, r in zip(signs, relative)) / len(scaled)
    through_mean = [g - coupling * n for g, n in zip(right, norms)]
    return {"right": right, "raw_ratios": raw, "through_mean": through_mean}


def test_gradnorm_rule_by_hand():
    """Two calls, an SGD step between them: the gradient on w follows the paper's rule (not
    the raw-ratio or through-the-mean variants), and the weights used at the next call are
    the stepped weights renormalised to Σw = T."""
    plugin = build("gradnorm", alpha=1.5)
    (w,) = plugin.parameters()
    optimizer = torch.optim.SGD([w], lr=0.1)

    losses0, norms0 = [2.0, 1.0, 0.5], [1.0, 2.0, 4.0]
    step = balance(plugin, losses0, diagonal(norms0))
    assert torch.equal(step.weights, torch.ones(3, dtype=torch.float64))
    torch.stack(step.auxiliary_losses).sum().backward()
    expected = gradnorm_gradients([1.0, 1.0, 1.0], norms0, [1.0, 1.0, 1.0], 1.5)["right"]
    torch.testing.assert_close(w.grad, torch.tensor(expected, dtype=torch.float32))
    optimizer.step()
    stepped = [1.0 - 0.1 * g for g in expected]
    renormalised = [3 * v / sum(stepped) for v in stepped]

    losses1, norms1 = [1.0, 0.95, 0.15], [1.5, 2.0, 3.0]
    optimizer.zero_grad()
    step = balance(plugin, losses1, diagonal(norms1), index=1)
    torch.testing.assert_close(step.weights, torch.tensor(renormalised, dtype=torch.float64))
    assert w.detach().sum().item() == pytest.approx(3.0, rel=1e-6)
    torch.stack(step.auxiliary_losses).sum().backward()
    ratios = [l1 / l0 for l1, l0 in zip(losses1, losses0)]
    variants = gradnorm_gradients(renormalised, norms1, ratios, 1.5)
    assert variants["right"] != variants["raw_ratios"], "numbers chosen to tell them apart"
    assert variants["right"] != variants["through_mean"]
    torch.testing.assert_close(w.grad, torch.tensor(variants["right"], dtype=torch.float32))


def test_gradnorm_reads_the_last_shared_layer_and_trains_through_the_users_optimizer(problem):
    mtl = MTL({"tasks": problem.tasks, "plugins": ["gradnorm"]}, shared=problem.model.encoder)
    assert mtl.space is Space.LAST_SHARED
    (w,) = mtl.parameters()
    optimizer = torch.optim.SGD(
        [{"params": problem.model.parameters()}, {"params": mtl.parameters(), "lr": 0.001}],
        lr=0.01,
    )
    layer = list(problem.model.encoder[2].parameters())
    expected_weights = [1.0, 1.0, 1.0]
    initial = None
    for _ in range(3):
        optimizer.zero_grad()
        _, losses = problem.losses()
        values = [losses[t].item() for t in problem.tasks]
        norms = [flat_grads(losses[t], layer).norm().item() for t in problem.tasks]
        initial = initial or values
        report = mtl.backward(losses)
        torch.testing.assert_close(
            report.weights, torch.tensor(expected_weights, dtype=torch.float64), rtol=1e-6, atol=0
        )
        ratios = [v / v0 for v, v0 in zip(values, initial)]
        rule = gradnorm_gradients(expected_weights, norms, ratios, 1.5)["right"]
        torch.testing.assert_close(
            w.grad, torch.tensor(rule, dtype=torch.float32), rtol=1e-5, atol=0
        )
        # the model receives the detached weights: Σ wᵢ ∇Lᵢ
        reference = problem.reference_grads(report.weights)
        for name, grad in problem.grads().items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-10, atol=1e-12)
        optimizer.step()
        stepped = [e - 0.001 * g for e, g in zip(expected_weights, rule)]
        assert min(stepped) > 0, "stay away from the floor (tested separately)"
        expected_weights = [3 * v / sum(stepped) for v in stepped]


def test_gradnorm_floors_weights_before_renormalising():
    plugin = build("gradnorm", min_weight=1e-3)
    (w,) = plugin.parameters()
    plugin.load_state_dict({"parameter": torch.tensor([-0.5, 1.0, 2.0]), "initial": None})
    step = balance(plugin, [1.0, 1.0, 1.0], diagonal([1.0, 1.0, 1.0]))
    floored = [1e-3, 1.0, 2.0]
    torch.testing.assert_close(
        step.weights, torch.tensor([3 * v / sum(floored) for v in floored], dtype=torch.float64)
    )
    assert w.detach().sum().item() == pytest.approx(3.0)  # renormalised in place


def test_gradnorm_refuses_a_zero_initial_loss_and_negative_losses():
    plugin = build("gradnorm")
    with pytest.raises(InputError, match=r"gradnorm: loss of task 'b' = 0 ≤ 0"):
        balance(plugin, [1.0, 0.0, 1.0], diagonal([1.0, 1.0, 1.0]))
    balance(plugin, [1.0, 2.0, 1.0], diagonal([1.0, 1.0, 1.0]))
    balance(plugin, [1.0, 0.0, 1.0], diagonal([1.0, 1.0, 1.0]), index=1)  # 0 is fine later
    with pytest.raises(InputError, match=r"gradnorm: loss of task 'c' = -1 < 0"):
        balance(plugin, [1.0, 1.0, -1.0], diagonal([1.0, 1.0, 1.0]), index=2)


def test_gradnorm_at_initialisation_reproduces_a_plain_backward_exactly(make_problem):
    ours, plain = make_problem(), make_problem()
    mtl = MTL({"tasks": ours.tasks, "plugins": ["gradnorm"]}, shared=ours.model.encoder)
    _, losses = ours.losses()
    mtl.backward(losses)
    _, reference = plain.losses()
    sum(reference.values()).backward()
    for a, b in zip(ours.model.parameters(), plain.model.parameters()):
        assert torch.equal(a.grad, b.grad)


# -- db_mtl -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("beta", "sigma"), [(0.9, 0.0), (0.9, 0.5), (0.0, 0.0)])
def test_db_mtl_weights_by_hand(beta, sigma):
    plugin = build("db_mtl", beta=beta, sigma=sigma)
    history = [
        ([2.0, 0.5, 10.0], [1.0, 3.0, 0.5]),
        ([1.0, 0.4, 8.0], [2.0, 1.0, 0.25]),
        ([0.5, 0.0, 8.0], [0.5, 2.0, 1.0]),
    ]
    ema = [0.0, 0.0, 0.0]
    for t, (losses, norms) in enumerate(history, start=1):
        step = balance(plugin, losses, diagonal(norms), index=t - 1)
        log_norms = [n / (v + 1e-8) for n, v in zip(norms, losses)]
        beta_t = beta / t**sigma
        ema = [beta_t * e + (1 - beta_t) * n for e, n in zip(ema, log_norms)]
        expected = [max(ema) / e / (v + 1e-8) for e, v in zip(ema, losses)]
        torch.testing.assert_close(step.weights, torch.tensor(expected, dtype=torch.float64))
    assert torch.isfinite(step.weights).all()  # the zero loss of the last call is finite


def test_db_mtl_without_ema_is_the_papers_update(problem):
    """With β = 0 the approximation vanishes: the shared gradient is
    Σ (maxⱼ‖gⱼ‖/‖gᵢ‖)·gᵢ with gᵢ = ∇log(Lᵢ + ε) on all shared parameters (autograd)."""
    mtl = MTL(
        {"tasks": problem.tasks, "plugins": [{"name": "db_mtl", "beta": 0.0}]},
        shared=problem.model.encoder,
    )
    assert mtl.space is Space.PARAMS
    shared = list(problem.model.encoder.parameters())
    _, reference = problem.losses()
    rows = torch.stack([flat_grads(torch.log(reference[t] + 1e-8), shared) for t in problem.tasks])
    norms = rows.norm(dim=1)
    expected = ((norms.max() / norms)[:, None] * rows).sum(0)
    _, losses = problem.losses()
    mtl.backward(losses)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # the rescaled log-gradients all have the largest norm
    weights = mtl.last_report.weights
    plain_rows = torch.stack([flat_grads(reference[t], shared) for t in problem.tasks])
    torch.testing.assert_close(
        (weights[:, None] * plain_rows).norm(dim=1), norms.max().expand(3), rtol=1e-10, atol=0
    )


def test_db_mtl_refuses_negative_losses(problem):
    mtl = MTL({"tasks": problem.tasks, "plugins": ["db_mtl"]}, shared=problem.model.encoder)
    _, losses = problem.losses()
    losses["b"] = losses["b"] - losses["b"].detach() - 2.0
    with pytest.raises(InputError, match=r"db_mtl: loss of task 'b' = -2 < 0.*log\(loss \+ ε\)"):
        mtl.backward(losses)
    assert all(p.grad is None for p in problem.model.parameters())
    assert mtl.state_dict()["plugins"]["db_mtl"] == {"norms": None, "count": 0}


# -- composition --------------------------------------------------------------------------------


class TwoTaskNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 3).double()
        self.head_a = nn.Linear(3, 1).double()
        self.head_b = nn.Linear(3, 1).double()
        self.x = torch.randn(8, 4, dtype=torch.float64)

    def losses(self) -> dict[str, torch.Tensor]:
        z = torch.tanh(self.trunk(self.x))
        return {
            "a": ((self.head_a(z) - 1) ** 2).mean(),
            "b": ((self.head_b(z) + 1) ** 2).mean() * 5,
        }


def test_uncertainty_then_avgnorm_then_pcgrad_equals_a_hand_computed_step():
    """Config order is application order: u = ½e^{−s} scales the losses, AvgNorm rescales the
    weighted gradients uᵢgᵢ to their mean norm, PCGrad projects the conflicting pair; shared and
    task-specific gradients and s.grad are compared with a computation by plain autograd."""
    net = TwoTaskNet()
    mtl = MTL(
        {
            "tasks": ("a", "b"),
            "space": "params",
            "plugins": ["uncertainty", "avgnorm", "pcgrad"],
        },
        shared=net.trunk,
    )
    s = torch.tensor([0.3, -0.7])
    mtl.plugins["uncertainty"].load_state_dict({"parameter": s})

    reference = net.losses()
    trunk = list(net.trunk.parameters())
    g = [flat_grads(reference[t], trunk) for t in ("a", "b")]
    u = [0.5 * math.exp(-si) for si in s.tolist()]
    h = [ui * gi for ui, gi in zip(u, g)]
    target = (h[0].norm() + h[1].norm()) / 2
    k = [target / hi.norm() for hi in h]
    q = [ki * hi for ki, hi in zip(k, h)]
    inner = q[0] @ q[1]
    assert inner < 0, "the example must have conflicting gradients"
    projected = [q[0] - inner / (q[1] @ q[1]) * q[1], q[1] - inner / (q[0] @ q[0]) * q[0]]
    expected_shared = projected[0] + projected[1]
    coefficients = [
        u[0] * k[0] * (1 - inner / (q[0] @ q[0])),
        u[1] * k[1] * (1 - inner / (q[1] @ q[1])),
    ]
    expected_heads = {
        t: [
            c * grad
            for grad in torch.autograd.grad(reference[t], head.parameters(), retain_graph=True)
        ]
        for t, c, head in zip(("a", "b"), coefficients, (net.head_a, net.head_b))
    }
    values = [reference[t].item() for t in ("a", "b")]

    report = mtl.backward(net.losses())
    got_shared = torch.cat([p.grad.reshape(-1) for p in trunk])
    torch.testing.assert_close(got_shared, expected_shared, rtol=1e-10, atol=1e-12)
    for t, head in (("a", net.head_a), ("b", net.head_b)):
        for got, want in zip(head.parameters(), expected_heads[t]):
            torch.testing.assert_close(got.grad, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(report.weights, torch.stack(coefficients), rtol=1e-10, atol=0)
    (log_variance,) = mtl.parameters()
    torch.testing.assert_close(
        log_variance.grad,
        torch.tensor([0.5 - 0.5 * math.exp(-si) * li for si, li in zip(s.tolist(), values)]),
    )


# -- AvgNorm's loss-scale claim -----------------------------------------------------------------


@given(
    jacobian=jacobians(
        min_tasks=2, max_tasks=5, kinds=("dense", "nonnegative"), degenerate=False, max_exponent=4
    ),
    task=st.integers(0, 4),
    factor=st.sampled_from([1e-3, 0.5, 3.0, 1e3]),
)
def test_avgnorm_direction_not_norm_is_invariant_to_one_loss_scale(jacobian, task, factor):
    """Multiplying Lₖ by c multiplies gₖ by c. With S = mean norm, every weighted gradient gets
    norm S, so the update is S·Σᵢ gᵢ/‖gᵢ‖: its *direction* does not change, but S — and so
    the update's norm — changes by the ratio of the mean norms. (The claim "the update does not
    change" is false; this test checks what is true.)"""
    task = task % jacobian.shape[0]
    scales = torch.ones(jacobian.shape[0], dtype=torch.float64)
    scales[task] = factor
    norms = jacobian.norm(dim=1)

    def coefficients(gramian: torch.Tensor) -> torch.Tensor:
        step = balance(
            build("avgnorm", tasks=[f"t{i}" for i in range(len(gramian))]),
            [1.0] * len(gramian),
            gramian,
        )
        return step.weights

    base = coefficients(gramian_of(jacobian))
    scaled = coefficients(gramian_of(jacobian * scales[:, None])) * scales
    ratio = (norms * scales).mean() / norms.mean()
    torch.testing.assert_close(scaled, ratio * base, rtol=1e-9, atol=0)


def test_avgnorm_update_norm_does_change_with_one_loss_scale():
    """Orthogonal unit gradients; L_a × 3 raises the mean norm from 1 to 2, so the update
    (1/‖gᵢ‖-normalised sum times S) doubles in norm while keeping its direction."""
    plugin = build("avgnorm", tasks=("a", "b"))
    base = balance(plugin, [1.0, 1.0], diagonal([1.0, 1.0])).weights
    scaled = balance(plugin, [3.0, 1.0], diagonal([3.0, 1.0])).weights * torch.tensor([3.0, 1.0])
    torch.testing.assert_close(base, torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(scaled, torch.tensor([2.0, 2.0], dtype=torch.float64))


# -- properties ---------------------------------------------------------------------------------


positive_losses = st.builds(
    lambda mantissa, exponent: mantissa * 10.0**exponent,
    st.floats(1.0, 9.99),
    st.integers(-12, 12),
)


def run_history(plugin: Plugin, history: list[list[float]], gramian: torch.Tensor) -> torch.Tensor:
    """One call per loss vector, all with ``gramian``; learnable weights take an SGD step."""
    weights = torch.empty(0)
    for index, losses in enumerate(history):
        step = balance(plugin, losses, gramian, index=index)
        weights = step.weights
        for auxiliary in step.auxiliary_losses:
            assert torch.isfinite(auxiliary)
        if step.auxiliary_losses:
            (w,) = plugin.parameters()
            w.grad = None
            torch.stack(step.auxiliary_losses).sum().backward()
            with torch.no_grad():
                w -= 0.05 * w.grad / w.grad.abs().max().clamp_min(1e-30)
    return weights


@st.composite
def problems(draw: st.DrawFn, max_exponent: int = 12) -> tuple[torch.Tensor, list[list[float]]]:
    jacobian = draw(jacobians(max_tasks=5, max_exponent=max_exponent))
    size = jacobian.shape[0]
    history = draw(
        st.lists(st.lists(positive_losses, min_size=size, max_size=size), min_size=1, max_size=3)
    )
    return gramian_of(jacobian), history


@given(name=st.sampled_from(NORM_BALANCING), problem=problems())
def test_weights_are_finite_and_nonnegative(name, problem):
    gramian, history = problem
    plugin = build(name, tasks=[f"t{i}" for i in range(len(gramian))])
    weights = run_history(plugin, history, gramian)
    assert torch.isfinite(weights).all(), weights
    assert (weights >= 0).all(), weights


@given(
    name=st.sampled_from(NORM_BALANCING),
    problem=problems(max_exponent=4),
    data=st.data(),
)
def test_permuting_the_tasks_permutes_the_weights(name, problem, data):
    gramian, history = problem
    size = len(gramian)
    permutation = data.draw(st.permutations(range(size)))
    index = torch.tensor(permutation)
    tasks = [f"t{i}" for i in range(size)]
    base = run_history(build(name, tasks=tasks), history, gramian)
    permuted = run_history(
        build(name, tasks=[tasks[i] for i in permutation]),
        [[row[i] for i in permutation] for row in history],
        gramian[index][:, index],
    )
    scale = base.abs().max()
    assert (permuted - base[index]).abs().max() <= 1e-6 * scale, (permuted, base[index])


# -- resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plugins",
    [["gradnorm"], ["db_mtl"], ["uncertainty", {"name": "db_mtl", "sigma": 0.5}, "pcgrad"]],
    ids=["gradnorm", "db_mtl", "uncertainty+db_mtl+pcgrad"],
)
def test_resume_continues_bit_for_bit(make_problem, plugins):
    config = {"tasks": TASKS, "plugins": plugins, "seed": 11}

    def train(mtl, problem, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            _, losses = problem.losses()
            mtl.backward(losses)
            optimizer.step()

    def optimizer_for(problem, mtl):
        return torch.optim.Adam(
            [{"params": problem.model.parameters()}, {"params": mtl.parameters(), "lr": 0.025}],
            lr=0.01,
        )

    straight = make_problem()
    mtl = MTL(config, shared=straight.model.encoder)
    train(mtl, straight, optimizer_for(straight, mtl), 7)

    resumed = make_problem()
    first = MTL(config, shared=resumed.model.encoder)
    optimizer = optimizer_for(resumed, first)
    train(first, resumed, optimizer, 3)
    saved = copy.deepcopy({"mtl": first.state_dict(), "optimizer": optimizer.state_dict()})
    second = MTL(config, shared=resumed.model.encoder)
    optimizer = optimizer_for(resumed, second)
    second.load_state_dict(saved["mtl"])
    optimizer.load_state_dict(saved["optimizer"])
    train(second, resumed, optimizer, 4)

    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(mtl.parameters(), second.parameters()):
        assert torch.equal(a, b)
    assert_states_equal(mtl.state_dict(), second.state_dict())


@pytest.mark.parametrize("plugins", [["db_mtl"], ["famo", "db_mtl"]], ids=["db_mtl", "famo+db_mtl"])
def test_zero_loss_gives_finite_gradients(problem, plugins):
    """A loss exactly at its bound (0) is guarded by ε in db_mtl and famo: finite ``.grad``."""
    mtl = MTL({"tasks": problem.tasks, "plugins": plugins}, shared=problem.model.encoder)
    _, losses = problem.losses()
    losses["a"] = losses["a"] - losses["a"].detach()  # value 0, gradient of L_a
    mtl.backward(losses)
    for name, parameter in problem.model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
