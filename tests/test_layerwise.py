"""The layerwise Gramian of space params equals the materialised one, and holds less."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtlhooks import MTL
from mtlhooks.errors import PluginError


class Mixed(nn.Module):
    """A trunk with a linear layer applied twice, a 3-d input and a LayerNorm (untapped)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict(
            {"a": nn.Linear(5, 6), "b": nn.Linear(6, 6, bias=False), "norm": nn.LayerNorm(6)}
        )
        self.heads = nn.ModuleList(nn.Linear(6, 2) for _ in range(3))

    def forward(self, x: torch.Tensor):
        e = self.encoder
        h = torch.tanh(e["a"](x))
        h = e["norm"](torch.tanh(e["b"](h)) + e["b"](h))
        z = h.mean(dim=1)
        return z, [head(z) for head in self.heads]


def run(model, mode, plugins, x):
    mtl = MTL(
        {"tasks": ["a", "b", "c"], "plugins": plugins, "space": "params", "params_gramian": mode},
        shared=model.encoder,
    )
    z, outs = model(x)
    losses = {t: (o - i).pow(2).mean() * 10.0**i for i, (t, o) in enumerate(zip("abc", outs))}
    return mtl.backward(losses, features=z)


@pytest.mark.parametrize("plugins", [["pcgrad"], ["avgnorm", "mgda"], ["gradstats"]])
def test_layerwise_equals_materialized(plugins):
    torch.manual_seed(0)
    model = Mixed().double()
    x = torch.randn(4, 7, 5, dtype=torch.float64)
    twin = copy.deepcopy(model)
    ours = run(model, "layerwise", plugins, x)
    reference = run(twin, "materialize", plugins, x)
    torch.testing.assert_close(ours.gramian, reference.gramian)
    assert ours.block_gramians.keys() == reference.block_gramians.keys()
    for name, gramian in reference.block_gramians.items():
        torch.testing.assert_close(ours.block_gramians[name], gramian, msg=name)
    torch.testing.assert_close(ours.weights, reference.weights)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_auto_takes_layerwise_when_it_holds_less(problem):
    """Wide layers, few rows: layerwise holds T·N·out, materialise T·P."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256)).double()
    heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(2)).double()
    mtl = MTL({"tasks": ["a", "b"], "plugins": ["mgda"]}, shared=model)
    z = model(torch.randn(8, 64, dtype=torch.float64))
    losses = {t: head(z).pow(2).mean() for t, head in zip("ab", heads)}
    assert mtl._engine.use_layerwise(accumulating=False)
    mtl.backward(losses)
    mtl.close()
    assert not model[0]._forward_hooks


def test_plugins_reading_the_matrix_get_a_clear_error_in_layerwise(problem):
    mtl = MTL(
        {"tasks": problem.tasks, "plugins": ["gradstats"], "params_gramian": "layerwise"},
        shared=problem.model.encoder,
    )
    _, losses = problem.losses()
    mtl.backward(losses)
    from mtlhooks.step import TaskGradients

    gradients = TaskGradients(mtl.space, ["w"], [], [torch.eye(3)], torch.eye(3))
    with pytest.raises(PluginError, match=r"Need\.JACOBIAN"):
        gradients.matrix()


def test_records_of_other_forwards_are_ignored():
    """A forward whose loss is never back-propagated (or one in eval mode) leaves no trace."""
    torch.manual_seed(0)
    model = Mixed().double()
    x = torch.randn(4, 7, 5, dtype=torch.float64)
    twin = copy.deepcopy(model)
    mtl = MTL(
        {"tasks": ["a", "b", "c"], "plugins": ["mgda"], "params_gramian": "layerwise"},
        shared=model.encoder,
    )
    model(torch.randn(4, 7, 5, dtype=torch.float64))  # a stray training forward
    model.eval()
    model(x)
    model.train()
    _, outs = model(x)
    losses = {t: (o - i).pow(2).mean() * 10.0**i for i, (t, o) in enumerate(zip("abc", outs))}
    ours = mtl.backward(losses)
    reference = run(twin, "materialize", ["mgda"], x)
    torch.testing.assert_close(ours.gramian, reference.gramian)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("plugins", [["avgnorm"], ["avgnorm", "upgrad"]])
def test_last_shared_layerwise_equals_materialized(make_problem, plugins):
    """Space last_shared with a linear last layer takes its Gramian from the layer's input and
    output gradients: same weights and gradients as materialising its per-task gradients."""
    reports, grads = [], []
    for mode in ("layerwise", "materialize"):
        problem = make_problem()
        config = {
            "tasks": problem.tasks,
            "plugins": plugins,
            "space": "last_shared",
            "params_gramian": mode,
        }
        mtl = MTL(config, shared=problem.model.encoder)
        assert (mtl._engine.taps is not None) is (mode == "layerwise")
        _, losses = problem.losses()
        reports.append(mtl.backward(losses))
        grads.append(problem.grads())
    torch.testing.assert_close(reports[0].gramian, reports[1].gramian)
    torch.testing.assert_close(reports[0].weights, reports[1].weights)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_auto_materialises_when_convolutions_hold_the_weights():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(2))
    mtl = MTL({"tasks": ["a", "b"], "plugins": ["mgda"]}, shared=trunk)
    z = trunk(torch.randn(3, 1, 6, 6))
    losses = {t: head(z).pow(2).mean() for t, head in zip("ab", heads)}
    assert not mtl._engine.use_layerwise(accumulating=False)
    mtl.backward(losses)


def test_a_dropped_mtl_removes_its_forward_hooks():
    import gc

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
    mtl = MTL(
        {"tasks": ["a", "b"], "plugins": ["mgda"], "params_gramian": "layerwise"}, shared=model
    )
    assert model[0]._forward_hooks
    del mtl
    gc.collect()
    assert not model[0]._forward_hooks and not model[2]._forward_hooks
