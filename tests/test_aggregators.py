"""The gradient-surgery plugins end to end: what ``mtl.backward`` writes, against autograd.

Every aggregator runs through the pipeline in each gradient space it supports; the ``.grad`` of
every parameter (shared and task-specific) is compared with plain autograd on a copy of the
model, using weights computed independently from per-task gradients taken by hand. Several
methods are also checked against re-implementations on explicit gradient vectors (two-task
closed forms, the defining equations), and the random and stateful ones for reproducibility.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable

import pytest
import torch
from test_functional import graddrop_by_hand

from mtlhooks import MTL, Space, functional
from mtlhooks.cli import main
from mtlhooks.errors import ConfigError, SolverError

SPACES = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def fresh_generator(seed: int = 0) -> torch.Generator:
    """The pipeline's generator as it is before the first ``backward()``."""
    return torch.Generator().manual_seed(seed)


# Independent weights: the functional core applied to a Gramian built here from autograd.
REFERENCE_WEIGHTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "cagrad": lambda g: functional.cagrad(g, c=0.4),
    "imgrad": lambda g: functional.imgrad(g, alpha=0.8),
    "imtl_g": functional.imtl_g,
    "aligned_mtl": functional.aligned_mtl,
    "nash_mtl": functional.nash_mtl,
    "fairgrad": lambda g: functional.fairgrad(g, alpha=1.0),
    "config": functional.config,
    "upgrad": functional.upgrad,
    "dualproj": functional.dualproj,
    "gradvac": lambda g: functional.gradvac(
        g, torch.zeros_like(g), beta=0.5, generator=fresh_generator()
    )[0],
}
ALL_AGGREGATORS = (*REFERENCE_WEIGHTS, "graddrop")


def space_inputs(model, z: torch.Tensor, space: Space) -> list[torch.Tensor]:
    if space is Space.PARAMS:
        return list(model.encoder.parameters())
    if space is Space.LAST_SHARED:
        return list(model.encoder[2].parameters())  # the encoder's last layer with parameters
    return [z]


def jacobian(problem, space: Space, losses_fn: LossFn | None = None) -> torch.Tensor:
    """T×P per-task gradients in ``space``, by autograd on a copy of the model."""
    clone = copy.deepcopy(problem.model)
    z, losses = (losses_fn or problem.losses)(clone)
    inputs = space_inputs(clone, z, space)
    rows = []
    for task in problem.tasks:
        grads = torch.autograd.grad(losses[task], inputs, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def reference_grads(
    problem, coefficients: torch.Tensor, losses_fn: LossFn | None = None
) -> dict[str, torch.Tensor]:
    """``.grad`` of every parameter for ``Σ cᵢ Lᵢ``, by autograd on a copy of the model."""
    clone = copy.deepcopy(problem.model)
    _, losses = (losses_fn or problem.losses)(clone)
    total = torch.stack([c * losses[t] for c, t in zip(coefficients, problem.tasks)]).sum()
    total.backward()
    return {n: p.grad.clone() for n, p in clone.named_parameters() if p.grad is not None}


def assert_grads_close(actual: dict, expected: dict, rtol: float = 1e-7) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=1e-10, msg=name)


def build(problem, plugin: str | dict, space: Space | None = None, seed: int = 0) -> MTL:
    config = {"tasks": problem.tasks, "seed": seed, "plugins": [plugin]}
    if space is not None:
        config["space"] = space.value
    return MTL(config, shared=problem.model.encoder)


# -- every aggregator, every space ----------------------------------------------------------


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.value)
@pytest.mark.parametrize("name", list(REFERENCE_WEIGHTS))
def test_written_gradients_match_autograd_with_independent_weights(problem, name, space):
    """Shared and task-specific parameters receive Σ αᵢ∇Lᵢ, α from the hand-built Gramian."""
    jac = jacobian(problem, space)
    alphas = REFERENCE_WEIGHTS[name](jac @ jac.T)
    mtl = build(problem, name, space)
    z, losses = problem.losses()
    report = mtl.backward(losses, features=z)
    assert report.space is space
    torch.testing.assert_close(report.weights, alphas, rtol=1e-7, atol=1e-12)
    assert_grads_close(problem.grads(), reference_grads(problem, alphas))


@pytest.mark.parametrize("name", ALL_AGGREGATORS)
def test_declared_spaces_and_auto_choice(problem, name):
    mtl = build(problem, name)
    expected = Space.FEATURES if name == "graddrop" else Space.PARAMS
    assert mtl.space is expected


def test_cli_lists_every_aggregator(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    for name in ALL_AGGREGATORS:
        assert rows[name]["family"] == "aggregator", name
    assert rows["graddrop"]["spaces"] == ["features"]
    defaults = {
        (name, field["name"]): field["default"] for name in rows for field in rows[name]["fields"]
    }
    assert defaults[("cagrad", "c")] == 0.4
    assert defaults[("imgrad", "alpha")] == 0.8
    assert defaults[("gradvac", "beta")] == 0.5
    assert defaults[("graddrop", "leak")] == 0.0


# -- re-implementations on explicit gradient vectors ----------------------------------------


def cagrad_two_tasks(jac: torch.Tensor, c: float) -> torch.Tensor:
    """CAGrad for two tasks on the vectors: w = (x, 1 − x) minimises the convex
    ``F(x) = g_wᵀg₀ + c‖g₀‖‖g_w‖``; F' is increasing, so bisect it to machine precision."""
    g1, g2 = jac
    g0 = (g1 + g2) / 2
    radius = c * g0.norm()
    direction = g1 - g2

    def slope(x: float) -> float:
        gw = x * g1 + (1 - x) * g2
        return float(direction @ g0 + radius * (direction @ gw) / gw.norm())

    if slope(0.0) >= 0:
        x = 0.0
    elif slope(1.0) <= 0:
        x = 1.0
    else:
        low, high = 0.0, 1.0
        for _ in range(100):
            mid = (low + high) / 2
            low, high = (mid, high) if slope(mid) < 0 else (low, mid)
        x = (low + high) / 2
    w = torch.tensor([x, 1 - x], dtype=jac.dtype)
    gw = w @ jac
    return (0.5 + radius / gw.norm() * w) / (1 + c**2)


@pytest.mark.parametrize("c", [0.0, 0.4, 2.0])
@pytest.mark.parametrize("space", [Space.PARAMS, Space.FEATURES], ids=lambda s: s.value)
def test_cagrad_two_tasks_closed_form(make_problem, space, c):
    problem = make_problem(tasks=("a", "b"))
    alphas = cagrad_two_tasks(jacobian(problem, space), c)
    if c == 0:
        torch.testing.assert_close(alphas, torch.full((2,), 0.5, dtype=torch.float64))
    mtl = build(problem, {"name": "cagrad", "c": c}, space)
    z, losses = problem.losses()
    report = mtl.backward(losses, features=z)
    torch.testing.assert_close(report.weights, alphas, rtol=1e-7, atol=0)
    assert_grads_close(problem.grads(), reference_grads(problem, alphas))


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.value)
def test_imtl_g_two_tasks_closed_form(make_problem, space):
    """The paper's α₂ = g₁Uᵀ(DUᵀ)⁻¹ with D = g₁ − g₂, U = u₁ − u₂, and α₁ = 1 − α₂."""
    problem = make_problem(tasks=("a", "b"))
    jac = jacobian(problem, space)
    g1, g2 = jac
    u = g1 / g1.norm() - g2 / g2.norm()
    second = (g1 @ u) / ((g1 - g2) @ u)
    alphas = torch.stack([1 - second, second])
    mtl = build(problem, "imtl_g", space)
    z, losses = problem.losses()
    report = mtl.backward(losses, features=z)
    torch.testing.assert_close(report.weights, alphas, rtol=1e-6, atol=0)
    update = report.weights @ jac
    torch.testing.assert_close(update @ g1 / g1.norm(), update @ g2 / g2.norm(), rtol=1e-6, atol=0)
    assert_grads_close(problem.grads(), reference_grads(problem, report.weights), rtol=1e-6)


def aligned_losses(problem, model=None):
    """Losses whose shared gradients never conflict: b and c are mostly a multiple of a."""
    z, raw = problem.losses(model)
    a = raw["a"]
    return z, {"a": a, "b": 0.5 * a + 1e-3 * raw["b"], "c": 2.0 * a + 1e-3 * raw["c"]}


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.value)
def test_dual_cone_methods_on_non_conflicting_gradients_give_the_preferences(problem, name, space):
    """No conflict: UPGrad and DualProj reduce to the mean (default) or the preference sum."""
    jac = jacobian(problem, space, lambda m: aligned_losses(problem, m))
    assert bool(((jac @ jac.T) >= 0).all())
    preferences = {"a": 1.0, "b": 2.0, "c": 0.5}
    for options, expected in [
        ({}, torch.full((3,), 1 / 3, dtype=torch.float64)),
        ({"pref": preferences}, torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)),
    ]:
        problem.zero_grad()
        mtl = build(problem, {"name": name, **options}, space)
        z, losses = aligned_losses(problem)
        report = mtl.backward(losses, features=z)
        torch.testing.assert_close(report.weights, expected, rtol=1e-9, atol=1e-12)
        assert_grads_close(
            problem.grads(),
            reference_grads(problem, expected, lambda m: aligned_losses(problem, m)),
        )


def test_upgrad_update_conflicts_with_no_task(problem):
    jac = jacobian(problem, Space.PARAMS)
    assert bool(((jac @ jac.T) < 0).any())  # the problem does have conflicts
    mtl = build(problem, "upgrad", Space.PARAMS)
    report = mtl.backward(problem.losses()[1])
    update = report.weights @ jac
    assert bool((jac @ update >= -1e-9 * jac.norm(dim=1) * update.norm()).all())


def test_upgrad_preferences_must_name_every_task(problem):
    with pytest.raises(ConfigError, match=r"upgrad.*missing: \['c'\]"):
        build(problem, {"name": "upgrad", "pref": {"a": 1.0, "b": 1.0}})
    with pytest.raises(ConfigError, match=r"dualproj.*>= 0"):
        build(problem, {"name": "dualproj", "pref": {"a": -1.0, "b": 1.0, "c": 1.0}})


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.value)
def test_nash_mtl_solves_the_bargaining_equations(problem, space):
    """αᵢ(Gα)ᵢ = 1 on the hand-built Gramian, hence an update of norm √T."""
    jac = jacobian(problem, space)
    mtl = build(problem, "nash_mtl", space)
    z, losses = problem.losses()
    alphas = mtl.backward(losses, features=z).weights
    assert bool((alphas > 0).all())
    products = alphas * (jac @ (jac.T @ alphas))
    torch.testing.assert_close(products, torch.ones(3, dtype=torch.float64), rtol=1e-7, atol=0)
    torch.testing.assert_close((alphas @ jac).norm().item(), 3**0.5, rtol=1e-7, atol=0)


def test_fairgrad_alpha_one_is_nash_mtl(make_problem):
    written = []
    for plugin in ["nash_mtl", {"name": "fairgrad", "alpha": 1.0}]:
        problem = make_problem()
        build(problem, plugin).backward(problem.losses()[1])
        written.append(problem.grads())
    assert_grads_close(written[0], written[1], rtol=1e-9)


def test_fairgrad_solves_its_fairness_equations(problem):
    """(Gw)ᵢ = wᵢ^(−1/α) for α = 2, on the hand-built Gramian."""
    jac = jacobian(problem, Space.FEATURES)
    mtl = build(problem, {"name": "fairgrad", "alpha": 2.0}, Space.FEATURES)
    z, losses = problem.losses()
    weights = mtl.backward(losses, features=z).weights
    torch.testing.assert_close(jac @ (jac.T @ weights), weights**-0.5, rtol=1e-6, atol=0)
    assert_grads_close(problem.grads(), reference_grads(problem, weights))


@pytest.mark.parametrize("name", ["nash_mtl", "fairgrad"])
def test_bargaining_failure_raises_on_request_and_nothing_is_written(problem, name):
    """if_undefined: raise — a task without gradient has no solution: an error, no weights."""
    mtl = build(problem, {"name": name, "if_undefined": "raise"})
    _, losses = problem.losses()
    losses["b"] = losses["b"] * 0.0
    with pytest.raises(SolverError, match=name):
        mtl.backward(losses)
    assert all(p.grad is None for p in problem.model.parameters())


@pytest.mark.parametrize("name", ["nash_mtl", "fairgrad"])
def test_a_zero_gradient_task_gets_weight_zero_and_the_others_bargain(problem, name):
    jac = jacobian(problem, Space.PARAMS)
    mtl = build(problem, name, Space.PARAMS)
    _, losses = problem.losses()
    losses["b"] = losses["b"] * 0.0
    report = mtl.backward(losses)
    kept = torch.tensor([0, 2])
    expected = functional.nash_mtl((jac @ jac.T)[kept][:, kept])
    torch.testing.assert_close(report.weights[kept], expected, rtol=1e-7, atol=0)
    assert report.weights[1] == 0
    assert report.notes == (f"{name}: zero gradient for task(s) ['b']: weight 0",)
    assert_grads_close(problem.grads(), reference_grads(problem, report.weights))


@pytest.mark.parametrize("name", ["nash_mtl", "fairgrad"])
def test_pareto_stationary_gradients_get_mgda_weights_and_a_note(problem, name):
    """Training that converged does not crash: opposite losses have opposite gradients (a
    vanishing positive combination), so no bargaining solution exists; MGDA's weights make the
    shared update zero, and the report says so."""

    def opposite(model):
        z, losses = problem.losses(model)
        return z, {"a": losses["a"], "b": -losses["a"], "c": losses["c"] * 0.0 - losses["a"]}

    mtl = build(problem, name, Space.PARAMS)
    _, losses = opposite(problem.model)
    report = mtl.backward(losses)
    jac = jacobian(problem, Space.PARAMS, opposite)
    # MGDA's weights of the call's own Gramian, bit for bit; that Gramian is J Jᵀ up to the
    # summation order (which differs with the machine's SIMD kernels), the weights with it.
    torch.testing.assert_close(report.gramian, jac @ jac.T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(report.weights, functional.mgda(report.gramian), rtol=0, atol=0)
    torch.testing.assert_close(report.weights, functional.mgda(jac @ jac.T), rtol=1e-9, atol=0)
    assert (report.weights @ jac).norm() <= 1e-9 * jac.norm()
    (note,) = report.notes
    assert note.startswith(f"{name}: no weights verified") and "MGDA's min-norm weights" in note
    assert_grads_close(problem.grads(), reference_grads(problem, report.weights, opposite))


def test_imtl_g_without_positive_equal_projections_uses_mgda_and_says_so():
    """Full-rank gradients whose equal-projection weights sum to < 0: Σα = 1 would flip the
    update against every task. The functional API raises unless asked to fall back; the
    plugin falls back to MGDA's weights with a note (or raises on request)."""
    from mtlhooks.plugin import Setup
    from mtlhooks.plugins.imtl_g import IMTLG, IMTLGConfig
    from mtlhooks.step import Step, TaskGradients

    jac = torch.tensor([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0], [3.0, -3.0, 2.0]], dtype=torch.float64)
    gramian = jac @ jac.T
    with pytest.raises(SolverError, match="summing to ≤ 0"):
        functional.imtl_g(gramian)
    torch.testing.assert_close(
        functional.imtl_g(gramian, if_undefined="mgda"), functional.mgda(gramian)
    )
    for option in ("mgda", "raise"):
        plugin = IMTLG(IMTLGConfig(if_undefined=option), Setup(("a", "b", "c"), Space.PARAMS, 0))
        step = Step(
            index=0,
            tasks=("a", "b", "c"),
            losses=torch.ones(3, dtype=torch.float64),
            weights=torch.ones(3, dtype=torch.float64),
            space=Space.PARAMS,
            generator=fresh_generator(),
            gradients=TaskGradients.from_blocks(Space.PARAMS, ["w"], [jac]),
        )
        if option == "raise":
            with pytest.raises(SolverError):
                plugin.mtl_aggregate(step)
            continue
        torch.testing.assert_close(plugin.mtl_aggregate(step), functional.mgda(gramian))
        (note,) = step.notes
        assert note.startswith("imtl_g: the equal-projection direction") and "MGDA" in note


def test_functional_bargaining_raises_by_default_and_falls_back_on_request():
    opposite = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    for function in (functional.nash_mtl, functional.fairgrad):
        with pytest.raises(SolverError, match="Pareto-stationary"):
            function(opposite)
        weights = function(opposite, if_undefined="mgda")
        torch.testing.assert_close(weights, torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("every", [1, 3])
def test_nash_mtl_update_weights_every_reuses_the_last_solution(make_problem, every):
    problem = make_problem()
    mtl = build(problem, {"name": "nash_mtl", "update_weights_every": every}, Space.PARAMS)
    solved = None
    for index in range(4):
        problem.zero_grad()
        with torch.no_grad():
            for parameter in problem.model.parameters():
                parameter.mul_(0.9)  # a new Gramian at every step
        jac = jacobian(problem, Space.PARAMS)
        report = mtl.backward(problem.losses()[1])
        if index % every == 0:
            solved = functional.nash_mtl(jac @ jac.T)
        assert solved is not None
        torch.testing.assert_close(report.weights, solved, rtol=1e-9, atol=0)
    state = mtl.state_dict()["plugins"]
    (saved,) = state.values()
    assert saved["count"] == 4


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.value)
def test_config_update_has_equal_cosines_and_the_projected_length(problem, space):
    jac = jacobian(problem, space)
    mtl = build(problem, "config", space)
    z, losses = problem.losses()
    update = mtl.backward(losses, features=z).weights @ jac
    unit = update / update.norm()
    cosines = (jac @ unit) / jac.norm(dim=1)
    torch.testing.assert_close(cosines, cosines.mean().expand(3), rtol=1e-7, atol=0)
    assert cosines.min() > 0
    torch.testing.assert_close(update.norm(), (jac @ unit).sum(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.value)
def test_aligned_mtl_from_the_singular_value_decomposition(problem, space):
    """With J = U S Wᵀ the update Jᵀ(√λ_min VΛ^{-½}Vᵀ1) is σ_min·W Uᵀ1: every principal
    direction of the gradients contributes with the same norm."""
    jac = jacobian(problem, space)
    left, singular, right_t = torch.linalg.svd(jac, full_matrices=False)
    expected = singular.min() * (right_t.T @ (left.T @ torch.ones(3, dtype=torch.float64)))
    mtl = build(problem, "aligned_mtl", space)
    z, losses = problem.losses()
    update = mtl.backward(losses, features=z).weights @ jac
    torch.testing.assert_close(update, expected, rtol=1e-6, atol=1e-9 * expected.norm().item())


# -- GradDrop ----------------------------------------------------------------------------------


@pytest.mark.parametrize("leak", [0.0, 0.25])
def test_graddrop_matches_masked_combination_by_hand(problem, leak):
    """Features space: the trunk receives the masked combination of the weighted feature
    gradients (mask from the pipeline's first draw), the heads receive Σ wᵢ∇Lᵢ."""
    weights = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    mtl = MTL(
        {
            "tasks": problem.tasks,
            "plugins": [
                {"name": "static", "weights": {"a": 3.0, "c": 0.5}},
                {"name": "graddrop", "leak": leak},
            ],
        },
        shared=problem.model.encoder,
    )
    assert mtl.space is Space.FEATURES
    clone = copy.deepcopy(problem.model)
    z_ref, losses_ref = problem.losses(clone)
    grads = torch.stack(
        [torch.autograd.grad(losses_ref[t], z_ref, retain_graph=True)[0] for t in problem.tasks]
    )  # (T, batch, features)
    # The pipeline draws float32 uniforms on its (CPU) generator, whatever the gradients' dtype:
    # one per feature (non-batch coordinate of z).
    draw = torch.rand(grads.shape[2], generator=fresh_generator()).double()
    weighted = grads * weights[:, None, None]
    combined = graddrop_by_hand(weighted, z_ref.detach(), draw, leak)
    dropped = (combined - weighted.sum(0)).abs() > 1e-12
    assert bool(dropped.any())  # the draw really dropped something
    trunk = list(clone.encoder.parameters())
    expected_trunk = torch.autograd.grad(
        z_ref, trunk, grad_outputs=combined.reshape(z_ref.shape), retain_graph=True
    )
    heads = list(clone.heads.parameters())
    total = torch.stack([w * losses_ref[t] for w, t in zip(weights, problem.tasks)]).sum()
    expected_heads = torch.autograd.grad(total, heads)

    z, losses = problem.losses()
    mtl.backward(losses, features=z)
    for p, expected in zip(problem.model.encoder.parameters(), expected_trunk):
        torch.testing.assert_close(p.grad, expected, rtol=1e-10, atol=1e-12)
    for p, expected in zip(problem.model.heads.parameters(), expected_heads):
        torch.testing.assert_close(p.grad, expected, rtol=1e-10, atol=1e-12)


def test_graddrop_under_loss_scale_writes_scaled_gradients(make_problem):
    """Per-task gradients are of the scaled losses; the result is the unscaled one × scale."""
    written = []
    for scale in [None, 1024.0]:
        problem = make_problem()
        mtl = build(problem, "graddrop")
        z, losses = problem.losses()
        mtl.backward(losses, features=z, loss_scale=scale)
        written.append(problem.grads())
    for name, grad in written[0].items():
        torch.testing.assert_close(written[1][name], grad * 1024.0, rtol=1e-12, atol=0)


@pytest.mark.parametrize("space", ["params", "last_shared"])
def test_graddrop_outside_features_space_is_a_config_error(problem, space):
    with pytest.raises(ConfigError, match=rf"'graddrop' cannot work in space '{space}'"):
        build(problem, "graddrop", Space(space))


# -- reproducibility: seeds, state ----------------------------------------------------------


def run_steps(make_problem, plugin, seed: int, steps: int = 3) -> list[dict[str, torch.Tensor]]:
    """Gradients written at each of ``steps`` SGD steps of a fresh run."""
    problem = make_problem()
    mtl = build(problem, plugin, seed=seed)
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=0.01)
    written = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        z, losses = problem.losses()
        mtl.backward(losses, features=z)
        written.append(problem.grads())
        optimizer.step()
    return written


def same(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(x[n], y[n]) for x, y in zip(a, b) for n in x)


@pytest.mark.parametrize("name", ["gradvac", "graddrop"])
def test_random_methods_same_seed_same_gradients(make_problem, name):
    assert same(run_steps(make_problem, name, seed=3), run_steps(make_problem, name, seed=3))


def test_graddrop_different_seed_different_gradients(make_problem):
    assert not same(run_steps(make_problem, "graddrop", 3), run_steps(make_problem, "graddrop", 4))


@pytest.mark.parametrize("granularity", ["whole_model", "all_layer"])
def test_gradvac_resume_is_bit_for_bit(make_problem, granularity):
    steps, split = 4, 2
    plugin = {"name": "gradvac", "granularity": granularity}
    through = run_steps(make_problem, plugin, seed=5, steps=steps)

    problem = make_problem()
    mtl = build(problem, plugin, seed=5)
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=0.01)
    for _ in range(split):
        optimizer.zero_grad(set_to_none=True)
        mtl.backward(problem.losses()[1])
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"mtl": mtl.state_dict(), "model": problem.model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert saved["mtl"]["plugins"]["gradvac"]["targets"].abs().sum() > 0

    def resumed(load_targets: bool) -> list[dict[str, torch.Tensor]]:
        fresh = make_problem()
        fresh.model.load_state_dict(saved["model"])
        mtl2 = build(fresh, plugin, seed=5)
        state = copy.deepcopy(saved["mtl"])
        if not load_targets:
            state["plugins"]["gradvac"] = mtl2.plugins["gradvac"].state_dict()
        mtl2.load_state_dict(state)
        opt2 = torch.optim.SGD(fresh.model.parameters(), lr=0.01)
        written = []
        for _ in range(steps - split):
            opt2.zero_grad(set_to_none=True)
            mtl2.backward(fresh.losses()[1])
            written.append(fresh.grads())
            opt2.step()
        return written

    assert same(resumed(load_targets=True), through[split:])
    assert not same(resumed(load_targets=False), through[split:])  # the targets matter


@pytest.mark.parametrize("granularity", ["all_layer", "all_matrix"])
def test_gradvac_groups_correct_each_layer_or_matrix_on_its_own(problem, granularity):
    """Each group of shared parameters gets GradVac's weights from its own block Gramian (its own
    targets, the same orders): the shared parameters receive J_gᵀα_g block by block, the
    task-specific parameters the plain sum."""
    from mtlhooks.plugins.gradvac import gradvac_from_orders, parameter_groups

    mtl = build(problem, {"name": "gradvac", "granularity": granularity}, Space.PARAMS)
    clone = copy.deepcopy(problem.model)
    _, losses_ref = problem.losses(clone)
    names = [name for name, _ in clone.encoder.named_parameters()]
    params = list(clone.encoder.parameters())
    rows = [torch.autograd.grad(losses_ref[t], params, retain_graph=True) for t in problem.tasks]
    blocks = [torch.stack([row[k].reshape(-1) for row in rows]) for k in range(len(params))]
    orders = torch.rand(3, 3, generator=fresh_generator()).argsort(1)
    groups = parameter_groups(names, granularity)
    assert len(groups) == (2 if granularity == "all_layer" else 4)
    expected = {}
    for group in groups:
        gramian = sum(blocks[k] @ blocks[k].T for k in group)
        weights, _ = gradvac_from_orders(gramian, torch.zeros(3, 3, dtype=torch.float64), orders)
        for k in group:
            expected[names[k]] = (weights @ blocks[k]).reshape(params[k].shape)
    z, losses = problem.losses()
    mtl.backward(losses, features=z)
    for name, p in problem.model.encoder.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12)
    plain = reference_grads(problem, torch.ones(3, dtype=torch.float64))
    for name, p in problem.model.heads.named_parameters():
        torch.testing.assert_close(p.grad, plain[f"heads.{name}"], rtol=1e-10, atol=1e-12)
    (state,) = mtl.state_dict()["plugins"].values()
    assert state["targets"].shape == (len(groups), 3, 3) and state["targets"].abs().sum() > 0


@pytest.mark.parametrize("space", ["features", "last_shared"])
def test_gradvac_groups_outside_params_space_are_refused_at_construction(problem, space):
    with pytest.raises(ConfigError, match="granularity 'all_layer' needs space 'params'"):
        build(problem, {"name": "gradvac", "granularity": "all_layer"}, Space(space))


def test_gradvac_refuses_foreign_state(problem):
    plugin = build(problem, "gradvac").plugins["gradvac"]
    with pytest.raises(ValueError, match="shape"):
        plugin.load_state_dict({"targets": torch.zeros(2, 2)})
