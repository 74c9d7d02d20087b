"""``task_specific``: what the heads receive, against hand-written autograd, in every space."""

from __future__ import annotations

import copy

import pytest
import torch

from mtlhooks import MTL, Family, InputError, Need, Plugin, Space, Step, hookimpl

ALPHAS = (1.0, 2.0, 0.5)
WEIGHTS = {"a": 3.0, "b": 1.0, "c": 0.25}


class FixedAlphas(Plugin):
    name = "test_task_specific_fixed"
    family = Family.AGGREGATOR
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        return torch.tensor(ALPHAS, dtype=step.gramian().dtype)


def _reference(problem, trunk: torch.Tensor, heads: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ trunkᵢ∇Lᵢ on the encoder, Σ headsᵢ∇Lᵢ on the heads, by plain autograd."""
    model = copy.deepcopy(problem.model)
    _, losses = problem.losses(model)
    ordered = [losses[t] for t in problem.tasks]
    encoder = list(model.encoder.parameters())
    head_params = list(model.heads.parameters())
    trunk_total = sum(c * loss for c, loss in zip(trunk.tolist(), ordered))
    heads_total = sum(c * loss for c, loss in zip(heads.tolist(), ordered))
    grads = torch.autograd.grad(trunk_total, encoder, retain_graph=True)
    head_grads = torch.autograd.grad(heads_total, head_params, allow_unused=True)
    names = [n for n, _ in model.encoder.named_parameters()]
    out = {f"encoder.{n}": g for n, g in zip(names, grads)}
    for (name, p), g in zip(model.heads.named_parameters(), head_grads):
        out[f"heads.{name}"] = torch.zeros_like(p) if g is None else g
    return out


@pytest.mark.parametrize("mode", ["aggregated", "weighted", "unweighted"])
@pytest.mark.parametrize(
    ("space", "sync"),
    [("features", "exact"), ("last_shared", "exact"), ("params", "exact"), ("params", "gramian")],
)
def test_heads_receive_what_task_specific_says(problem, registered, mode, space, sync):
    registered(FixedAlphas)
    mtl = MTL(
        {
            "tasks": problem.tasks,
            "space": space,
            "sync": sync,
            "task_specific": mode,
            "plugins": [{"name": "static", "weights": WEIGHTS}, FixedAlphas.name],
        },
        shared=problem.model.encoder,
    )
    z, losses = problem.losses()
    mtl.backward(losses, features=z)
    w = torch.tensor([WEIGHTS[t] for t in problem.tasks], dtype=torch.float64)
    trunk = torch.tensor(ALPHAS, dtype=torch.float64) * w
    heads = {"aggregated": trunk, "weighted": w, "unweighted": torch.ones(3, dtype=torch.float64)}
    expected = _reference(problem, trunk, heads[mode])
    written = {n: p.grad for n, p in problem.model.named_parameters()}
    assert written.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(written[name], grad, rtol=1e-12, atol=1e-14, msg=name)


def test_unweighted_heads_on_the_fast_path(problem):
    mtl = MTL(
        {
            "tasks": problem.tasks,
            "task_specific": "unweighted",
            "plugins": [{"name": "static", "weights": WEIGHTS}],
        }
    )
    z, losses = problem.losses()
    mtl.backward(losses, features=z)
    w = torch.tensor([WEIGHTS[t] for t in problem.tasks], dtype=torch.float64)
    expected = _reference(problem, w, torch.ones(3, dtype=torch.float64))
    for name, p in problem.model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-12, atol=1e-14, msg=name)


def test_unweighted_heads_need_z_outside_exact_params(problem):
    mtl = MTL(
        {
            "tasks": problem.tasks,
            "task_specific": "unweighted",
            "plugins": [{"name": "static", "weights": WEIGHTS}],
        }
    )
    _, losses = problem.losses()
    with pytest.raises(InputError, match="features=z"):
        mtl.backward(losses)
    assert all(p.grad is None for p in problem.model.parameters())


# -- autocast -----------------------------------------------------------------------------------


def test_pipeline_arithmetic_ignores_ambient_autocast(make_problem):
    """Inside torch.autocast(bf16) the per-task gradients stay as autocast made them, but the
    Gramian and the weights are computed in float32, as outside autocast."""
    from mtlhooks import functional

    problem = make_problem()
    model = copy.deepcopy(problem.model).float()
    x = problem.x.float()
    mtl = MTL({"tasks": problem.tasks, "plugins": ["mgda"], "space": "features"})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, outputs = model(x)
        losses = {
            t: (outputs[t].float() - 0.5 * (i + 1)).pow(2).mean() * 10.0**i
            for i, t in enumerate(problem.tasks)
        }
        rows = [
            torch.autograd.grad(losses[t], z, retain_graph=True)[0].float().reshape(-1)
            for t in problem.tasks
        ]
        report = mtl.backward(losses, features=z)
    assert z.dtype == torch.bfloat16
    jacobian = torch.stack(rows)
    gramian = jacobian @ jacobian.T  # float32, outside autocast
    assert report.gramian is not None and report.gramian.dtype == torch.float32
    torch.testing.assert_close(report.gramian, gramian, rtol=1e-6, atol=0)
    torch.testing.assert_close(report.weights, functional.mgda(gramian), rtol=1e-6, atol=1e-7)
