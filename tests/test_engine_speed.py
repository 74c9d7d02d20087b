"""The engine's faster write paths give the ``.grad`` of plain autograd (float64, tight)."""

from __future__ import annotations

import pytest
import torch

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
    report = mtl.backward(losses, features=z, loss_scale=loss_scale)
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
    mtl.backward(losses, features=z)
    grads = {n: p.grad for n, p in problem.model.named_parameters()}
    storages = {n: g.untyped_storage().data_ptr() for n, g in grads.items()}
    assert len(set(storages.values())) == len(storages)
    for name, grad in grads.items():
        assert grad.is_contiguous() and grad.untyped_storage().nbytes() == grad.numel() * 8, name
    kept = {n: g.clone() for n, g in grads.items()}
    for p in problem.model.parameters():
        p.grad = None
    z, losses = problem.losses()
    mtl.backward(losses, features=z)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, kept[name], rtol=0, atol=0, msg=name)
