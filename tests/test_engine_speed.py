"""The engine's faster write paths give the ``.grad`` of plain autograd (float64, tight)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from mtlhooks import MTL

TIGHT = {"rtol": 1e-12, "atol": 1e-12}


@pytest.mark.parametrize("plugins", [["mgda"], ["upgrad"], ["avgnorm", "pcgrad"], ["rlw", "mgda"]])
@pytest.mark.parametrize("loss_scale", [None, 256.0])
@pytest.mark.parametrize("existing", [False, True])
def test_direct_write_equals_plain_autograd(problem, plugins, loss_scale, existing):
    """Space params, J materialised: .grad (+)= Σ cᵢ∇Lᵢ, shared and task-specific, as plain
    autograd's gradient of Σ cᵢLᵢ (c from the report), onto existing gradients too."""
    config = {
        "tasks": problem.tasks,
        "space": "params",
        "plugins": plugins,
        "params_gramian": "materialize",
    }
    mtl = MTL(config, shared=problem.model.encoder)
    before = {n: torch.full_like(p, 0.25) for n, p in problem.model.named_parameters()}
    if existing:
        for name, p in problem.model.named_parameters():
            p.grad = before[name].clone()
    z, losses = problem.losses()
    report = mtl.backward(
        losses, features=z if mtl.space.value == "features" else None, loss_scale=loss_scale
    )
    assert mtl._engine.last_gramian_choice.mode == "materialize"
    expected = problem.reference_grads(report.weights)
    scale = 1.0 if loss_scale is None else loss_scale
    got = problem.grads()
    assert set(got) == set(expected)
    for name, grad in got.items():
        reference = expected[name] * scale + (before[name] if existing else 0.0)
        torch.testing.assert_close(grad, reference, **TIGHT, msg=name)


def test_written_gradients_own_their_storage(problem):
    """A .grad written from J is a tensor of its own: no view of J nor of another .grad, so
    the next call (or the optimizer, in place) cannot disturb it."""
    config = {"tasks": problem.tasks, "space": "params", "plugins": ["mgda"]}
    mtl = MTL({**config, "params_gramian": "materialize"}, shared=problem.model.encoder)
    z, losses = problem.losses()
    mtl.backward(losses, features=z if mtl.space.value == "features" else None)
    grads = {n: p.grad for n, p in problem.model.named_parameters()}
    storages = {n: g.untyped_storage().data_ptr() for n, g in grads.items()}
    assert len(set(storages.values())) == len(storages)
    for name, grad in grads.items():
        assert grad.is_contiguous() and grad.untyped_storage().nbytes() == grad.numel() * 8, name
    kept = {n: g.clone() for n, g in grads.items()}
    for p in problem.model.parameters():
        p.grad = None
    z, losses = problem.losses()
    mtl.backward(losses, features=z if mtl.space.value == "features" else None)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, kept[name], rtol=0, atol=0, msg=name)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)) + x).mean(dim=(2, 3))


def _graph(name):
    """Losses (roots) over one trunk and the trunk's parameters."""
    torch.manual_seed(0)
    if name != "diamond":
        trunk, x = {
            "residual": (_Residual(), torch.randn(2, 3, 5, 5)),
            "attention": (
                nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True),
                torch.randn(2, 4, 8),
            ),
            "mlp": (nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6)), torch.randn(3, 5)),
        }[name]
        z = trunk(x)
        heads = [nn.Linear(z.shape[-1], 1) for _ in range(3)]
        return [head(z).pow(2).mean() for head in heads], list(trunk.parameters())
    # A diamond, a leaf outside shared= inside the trunk, a head shared by two losses.
    shared = torch.randn(4, 4, requires_grad=True)
    gate = torch.randn(4, requires_grad=True)
    head = torch.randn(4, requires_grad=True)
    own = torch.randn(4, requires_grad=True)
    hidden = torch.tanh(torch.randn(3, 4) @ shared) * gate
    z = hidden + hidden.exp()
    return [(z @ head).sum(), ((z * own) @ head).sum(), (z * z).sum()], [shared]


@pytest.mark.parametrize("name", ["residual", "attention", "mlp", "diamond"])
def test_one_shared_walk_finds_each_losss_leaves(name):
    from mtlhooks.graph import graph_leaves, task_leaves

    roots, shared = _graph(name)
    exclude = {id(p) for p in shared}
    found = task_leaves(roots, exclude)
    for root, leaves in zip(roots, found):
        expected = graph_leaves(root, exclude)
        assert expected
        assert len({id(leaf) for leaf in leaves}) == len(leaves)
        assert {id(leaf) for leaf in leaves} == {id(leaf) for leaf in expected}


def _is_grad_tensor(obj: object) -> bool:
    try:
        return isinstance(obj, Tensor) and obj.requires_grad
    except ReferenceError:  # a weakref.proxy whose object is gone (left by an earlier test)
        return False


@pytest.mark.parametrize("name", ["residual", "attention", "mlp", "diamond"])
def test_graph_leaves_are_exactly_the_tensors_backward_writes(name):
    """Against autograd itself: every leaf found gets a gradient from ``root.backward()``, and
    every tensor that gets one was found, once; the order is the same on every walk."""
    import gc
    import warnings

    from mtlhooks.graph import graph_leaves

    roots, shared = _graph(name)
    root = torch.stack(roots).sum()
    found = graph_leaves(root, set())
    assert [id(leaf) for leaf in graph_leaves(root, set())] == [id(leaf) for leaf in found]
    assert len({id(leaf) for leaf in found}) == len(found)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch objects warns
        candidates = [obj for obj in gc.get_objects() if _is_grad_tensor(obj)]
    leaves = [t for t in candidates if t.is_leaf]
    for leaf in leaves:
        leaf.grad = None
    root.backward()
    written = {id(t) for t in leaves if t.grad is not None}
    assert written == {id(leaf) for leaf in found}
    excluded = graph_leaves(root, {id(p) for p in shared})
    assert {id(leaf) for leaf in excluded} == written - {id(p) for p in shared}


def test_a_leaf_outside_shared_reached_by_every_loss_is_written_once(problem):
    """A learnable gate between the trunk and the heads, outside shared=: task-specific to
    every loss, its .grad is Σ cᵢ∂Lᵢ/∂gate as in plain autograd."""
    gate = torch.full((6,), 0.7, dtype=torch.float64, requires_grad=True)
    config = {"tasks": problem.tasks, "space": "params", "plugins": ["upgrad"]}
    mtl = MTL({**config, "params_gramian": "materialize"}, shared=problem.model.encoder)
    z, _ = problem.model(problem.x)
    gated = {t: problem.model.heads[t](z * gate) for t in problem.tasks}
    losses = {t: (gated[t] - 0.5).pow(2).mean() * 10.0**i for i, t in enumerate(problem.tasks)}
    report = mtl.backward(losses, features=z if mtl.space.value == "features" else None)
    got = gate.grad.clone()
    gate.grad = None
    for p in problem.model.parameters():
        p.grad = None
    z, _ = problem.model(problem.x)
    total = sum(
        c * (problem.model.heads[t](z * gate) - 0.5).pow(2).mean() * 10.0**i
        for i, (c, t) in enumerate(zip(report.weights.tolist(), problem.tasks))
    )
    total.backward()
    torch.testing.assert_close(got, gate.grad, **TIGHT)
