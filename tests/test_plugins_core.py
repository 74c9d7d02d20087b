"""The first plugins of each family, checked against hand computations with plain autograd."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mtlhooks import MTL


def task_grads(problem, params, scales=None):
    """Per-task gradients (flattened) of the problem's losses w.r.t. ``params``, by autograd."""
    _, losses = problem.losses()
    rows = []
    for i, t in enumerate(problem.tasks):
        loss = losses[t] * (1.0 if scales is None else scales[i])
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def shared_grad(problem, params):
    return torch.cat([p.grad.reshape(-1) for p in params])


# -- static -------------------------------------------------------------------------------------


def test_static_default_reproduces_plain_backward_exactly(make_problem):
    ours, plain = make_problem(), make_problem()
    mtl = MTL({"tasks": ours.tasks, "plugins": ["static"]}, shared=ours.model.encoder)
    _, losses = ours.losses()
    mtl.backward(losses)
    _, reference = plain.losses()
    sum(reference.values()).backward()
    for a, b in zip(ours.model.parameters(), plain.model.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_static_weights_and_normalize(problem):
    mtl = MTL(
        {
            "tasks": problem.tasks,
            "plugins": [
                {"name": "static", "weights": {"a": 4.0}, "default": 2.0, "normalize": True}
            ],
        }
    )
    _, losses = problem.losses()
    report = mtl.backward(losses)
    torch.testing.assert_close(
        report.weights, torch.tensor([4.0, 2.0, 2.0], dtype=torch.float64) / 3
    )
    expected = problem.reference_grads(report.weights)
    for name, grad in problem.grads().items():
        torch.testing.assert_close(grad, expected[name])


def test_static_weights_keep_float64_after_float32_calls():
    """The plugin keeps its weights converted to the losses' dtype between calls: a float32
    call must not round what a later float64 call gets (kept from the float64 original)."""
    config = {"tasks": ["a", "b", "c"], "plugins": [{"name": "static", "normalize": True}]}
    mtl = MTL(config)
    weights = {}
    for dtype in (torch.float32, torch.float64, torch.float32):
        x = torch.ones(2, dtype=dtype, requires_grad=True)
        report = mtl.backward({t: (x * (i + 1)).sum() for i, t in enumerate("abc")})
        assert report.weights is not None
        weights[dtype] = report.weights
    assert weights[torch.float64].dtype == torch.float64
    assert torch.equal(weights[torch.float64], torch.full((3,), 1.0, dtype=torch.float64) / 3)
    assert torch.equal(weights[torch.float32], torch.full((3,), 1.0 / 3, dtype=torch.float32))


# -- avgnorm ------------------------------------------------------------------------------------


def test_avgnorm_equalises_last_shared_layer_norms(problem):
    mtl = MTL({"tasks": problem.tasks, "plugins": ["avgnorm"]}, shared=problem.model.encoder)
    layer = list(problem.model.encoder[2].parameters())
    jacobian = task_grads(problem, layer)
    norms = jacobian.norm(dim=1)
    _, losses = problem.losses()
    report = mtl.backward(losses)
    expected = norms.mean() / norms
    torch.testing.assert_close(report.weights, expected)
    weighted = jacobian * report.weights[:, None]
    torch.testing.assert_close(
        weighted.norm(dim=1), torch.full((3,), float(norms.mean()), dtype=torch.float64)
    )
    torch.testing.assert_close(shared_grad(problem, layer), weighted.sum(0))


def test_avgnorm_sum_norm_target(problem):
    mtl = MTL(
        {"tasks": problem.tasks, "plugins": [{"name": "avgnorm", "target": "sum_norm"}]},
        shared=problem.model.encoder,
    )
    jacobian = task_grads(problem, list(problem.model.encoder[2].parameters()))
    _, losses = problem.losses()
    report = mtl.backward(losses)
    torch.testing.assert_close(report.weights, jacobian.sum(0).norm() / jacobian.norm(dim=1))


def test_avgnorm_ema_of_norms(make_problem):
    problem = make_problem()
    mtl = MTL(
        {"tasks": problem.tasks, "plugins": [{"name": "avgnorm", "ema": 0.75}]},
        shared=problem.model.encoder,
    )
    layer = list(problem.model.encoder[2].parameters())
    first = task_grads(problem, layer).norm(dim=1)
    _, losses = problem.losses()
    mtl.backward(losses)
    with torch.no_grad():
        for p in problem.model.parameters():
            p.add_(0.05 * p.grad)
            p.grad = None
    second = task_grads(problem, layer).norm(dim=1)
    _, losses = problem.losses()
    report = mtl.backward(losses)
    smoothed = 0.75 * first + 0.25 * second
    target = 0.75 * first.mean() + 0.25 * second.mean()
    torch.testing.assert_close(report.weights, target / smoothed)


def test_avgnorm_leaves_a_zero_gradient_task_alone(problem):
    mtl = MTL({"tasks": problem.tasks, "plugins": ["avgnorm"]}, shared=problem.model.encoder)
    _, losses = problem.losses()
    losses["b"] = losses["b"] * 0.0
    report = mtl.backward(losses)
    assert report.weights[1] == 1.0
    assert torch.isfinite(report.weights).all()
    assert all(torch.isfinite(p.grad).all() for p in problem.model.parameters())


@given(scale=st.floats(1e-6, 1e6), task=st.integers(0, 2))
def test_avgnorm_update_direction_ignores_one_loss_scale(make_problem, scale, task):
    """Seed paper 2: multiplying one task's loss by c > 0 leaves the direction of the update
    unchanged (each task contributes a gradient of the common norm S; only S moves)."""

    def update(c: float) -> torch.Tensor:
        problem = make_problem()
        mtl = MTL({"tasks": problem.tasks, "plugins": ["avgnorm"]}, shared=problem.model.encoder)
        _, losses = problem.losses()
        losses[problem.tasks[task]] = losses[problem.tasks[task]] * c
        mtl.backward(losses)
        return torch.cat([p.grad.reshape(-1) for p in problem.model.encoder.parameters()])

    base, scaled = update(1.0), update(scale)
    torch.testing.assert_close(base / base.norm(), scaled / scaled.norm(), rtol=1e-9, atol=1e-12)


# -- pcgrad and mgda end to end --------------------------------------------------------------------


def test_pcgrad_two_tasks_matches_textbook_projection(make_problem):
    problem = make_problem(("a", "b"))
    params = list(problem.model.encoder.parameters())
    g = task_grads(problem, params)
    projected = []
    for i, j in ((0, 1), (1, 0)):
        dot = g[i] @ g[j]
        projected.append(g[i] - min(float(dot), 0.0) / (g[j] @ g[j]) * g[j])
    expected = projected[0] + projected[1]
    mtl = MTL({"tasks": problem.tasks, "plugins": ["pcgrad"]}, shared=problem.model.encoder)
    _, losses = problem.losses()
    report = mtl.backward(losses)
    torch.testing.assert_close(shared_grad(problem, params), expected)
    assert report.gramian[0, 1] < 0, "the fixture's tasks should conflict"


@pytest.mark.parametrize("normalization", ["none", "l2"])
def test_mgda_two_tasks_matches_closed_form(make_problem, normalization):
    problem = make_problem(("a", "b"))
    params = list(problem.model.encoder.parameters())
    g = task_grads(problem, params)
    scales = g.norm(dim=1) if normalization == "l2" else torch.ones(2, dtype=g.dtype)
    u = g / scales[:, None]
    gamma = float(((u[1] - u[0]) @ u[1]) / ((u[0] - u[1]) @ (u[0] - u[1])))
    gamma = min(max(gamma, 0.0), 1.0)
    expected = gamma * u[0] + (1 - gamma) * u[1]
    mtl = MTL(
        {"tasks": problem.tasks, "plugins": [{"name": "mgda", "normalization": normalization}]},
        shared=problem.model.encoder,
    )
    _, losses = problem.losses()
    mtl.backward(losses)
    torch.testing.assert_close(shared_grad(problem, params), expected)


def test_mgda_loss_normalization_uses_loss_values(make_problem):
    problem = make_problem(("a", "b"))
    params = list(problem.model.encoder.parameters())
    g = task_grads(problem, params)
    _, losses = problem.losses()
    values = torch.stack([losses[t].detach() for t in problem.tasks])
    u = g / values[:, None]
    gamma = float(((u[1] - u[0]) @ u[1]) / ((u[0] - u[1]) @ (u[0] - u[1])))
    gamma = min(max(gamma, 0.0), 1.0)
    mtl = MTL(
        {"tasks": problem.tasks, "plugins": [{"name": "mgda", "normalization": "loss"}]},
        shared=problem.model.encoder,
    )
    mtl.backward(losses)
    torch.testing.assert_close(shared_grad(problem, params), gamma * u[0] + (1 - gamma) * u[1])


# -- gradstats -----------------------------------------------------------------------------------


def test_gradstats_jsonl_records_match_autograd(problem, tmp_path, capsys):
    path = tmp_path / "run" / "stats.jsonl"
    config = {
        "tasks": problem.tasks,
        "plugins": [{"name": "gradstats", "every": 2, "console": True, "jsonl": str(path)}],
    }
    g = task_grads(problem, list(problem.model.encoder.parameters()))
    with MTL(config, shared=problem.model.encoder) as mtl:
        for _ in range(3):
            _, losses = problem.losses()
            mtl.backward(losses)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    first = records[0]
    norms = g.norm(dim=1)
    torch.testing.assert_close(
        torch.tensor(list(first["grad_norms"].values()), dtype=torch.float64), norms
    )
    cosine = (g @ g.T) / (norms[:, None] * norms[None, :])
    pairs = [(0, 1), (0, 2), (1, 2)]
    tasks = problem.tasks
    for i, j in pairs:
        assert first["cosine"][tasks[i]][tasks[j]] == pytest.approx(float(cosine[i, j]))
    assert first["conflict_rate"] == sum(float(cosine[i, j] < 0) for i, j in pairs) / 3
    gms = 2 * norms[0] * norms[1] / (norms[0] ** 2 + norms[1] ** 2)
    assert first["magnitude_similarity"]["a"]["b"] == pytest.approx(float(gms))
    assert first["norm_imbalance"]["max_min_ratio"] == pytest.approx(
        float(norms.max() / norms.min())
    )
    err = capsys.readouterr().err
    assert err.count("step 0") == 1 and "step 2" in err and "conflicts" in err
