"""Gradient accumulation and mixed-precision loss scaling in a single process."""

from __future__ import annotations

import copy

import pytest
import torch

from mtlhooks import MTL, Family
from mtlhooks.errors import NonFiniteError


def losses_on(problem, model, x):
    z, outputs = model(x)
    return z, {
        t: (outputs[t] - 0.5 * (i + 1)).pow(2).mean() * 10.0**i for i, t in enumerate(problem.tasks)
    }


@pytest.mark.parametrize(
    "plugins",
    [["pcgrad"], ["avgnorm", "mgda"], [{"name": "static", "weights": {"a": 2.0}}, "gradstats"]],
)
def test_accumulated_micro_steps_equal_one_big_batch(make_problem, plugins):
    """K micro-steps with losses / K and sync=False, then sync=True: same weights and .grad as
    one call on the concatenated batch (space params, sync: exact)."""
    problem = make_problem()
    config = {"tasks": problem.tasks, "plugins": plugins, "space": "params", "seed": 3}
    big_model = copy.deepcopy(problem.model)
    big = MTL(config, shared=big_model.encoder)
    _, losses = losses_on(problem, big_model, problem.x)
    big_report = big.backward(losses)

    model = copy.deepcopy(problem.model)
    mtl = MTL(config, shared=model.encoder)
    chunks = problem.x.split(3)
    for k, chunk in enumerate(chunks):
        _, losses = losses_on(problem, model, chunk)
        last = k == len(chunks) - 1
        report = mtl.backward({t: loss / len(chunks) for t, loss in losses.items()}, sync=last)
        assert report.accumulating is not last
        if not last:
            assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(report.losses, big_report.losses)
    torch.testing.assert_close(report.weights, big_report.weights)
    for (name, a), b in zip(model.named_parameters(), big_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize(
    "plugins",
    [
        [{"name": "uw_so"}, {"name": "gradstats", "every": 2}],
        [{"name": "static", "weights": {"a": 2.0}}, {"name": "gradstats", "every": 3}],
        [{"name": "dwa", "temperature": 0.5}],
        [{"name": "gradstats", "every": 2}],
        [{"name": "uw_so"}, {"name": "gradstats", "every": 4}, "pcgrad"],
    ],
)
def test_every_window_is_one_big_batch_whatever_the_calls_want(make_problem, plugins):
    """Space params (exact), several optimizer steps of K=3 micro-steps, with plugins that
    want per-task gradients at some calls only (an observer every N calls) or never (loss
    scaling alone): every window's .grad and weights equal one call on the window's batch, and
    stateful plugins advance once per window."""
    problem = make_problem()
    config = {"tasks": problem.tasks, "plugins": plugins, "space": "params", "seed": 3}
    big_model, model = copy.deepcopy(problem.model), copy.deepcopy(problem.model)
    big, mtl = MTL(config, shared=big_model.encoder), MTL(config, shared=model.encoder)
    generator = torch.Generator().manual_seed(5)
    for window in range(4):
        x = torch.randn(9, 5, dtype=torch.float64, generator=generator)
        for net in (big_model, model):
            for p in net.parameters():
                p.grad = None
        expected = big.backward(losses_on(problem, big_model, x)[1])
        chunks = x.split(3)
        for k, chunk in enumerate(chunks):
            _, losses = losses_on(problem, model, chunk)
            last = k == len(chunks) - 1
            report = mtl.backward({t: v / len(chunks) for t, v in losses.items()}, sync=last)
        torch.testing.assert_close(report.weights, expected.weights, msg=f"window {window}")
        for (name, a), b in zip(model.named_parameters(), big_model.parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=f"{name}, window {window}")
    for key, plugin in big.plugins.items():
        if plugin.family is not Family.OBSERVER:  # observers count calls, not windows
            assert repr(plugin.state_dict()) == repr(mtl.plugins[key].state_dict()), key


@pytest.mark.parametrize("space", ["params", "last_shared", "features"])
def test_loss_scale_unscales_the_gramian_and_scales_the_gradients(make_problem, space):
    scale = 1024.0
    problem = make_problem()
    config = {"tasks": problem.tasks, "plugins": ["mgda"], "space": space}
    plain_model = copy.deepcopy(problem.model)
    plain = MTL(config, shared=plain_model.encoder)
    z, losses = losses_on(problem, plain_model, problem.x)
    expected = plain.backward(losses, features=z)

    model = copy.deepcopy(problem.model)
    mtl = MTL(config, shared=model.encoder)
    z, losses = losses_on(problem, model, problem.x)
    report = mtl.backward(losses, features=z, loss_scale=scale)
    torch.testing.assert_close(report.gramian, expected.gramian)
    torch.testing.assert_close(report.weights, expected.weights)
    for a, b in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad * scale)


@pytest.mark.parametrize("space", ["params", "features"])
def test_overflow_under_loss_scale_is_left_for_the_scaler(make_problem, space):
    problem = make_problem()
    model = copy.deepcopy(problem.model)
    mtl = MTL({"tasks": problem.tasks, "plugins": ["mgda"], "space": space}, shared=model.encoder)
    z, losses = losses_on(problem, model, problem.x)
    z.register_hook(lambda g: g * float("inf"))
    report = mtl.backward(losses, features=z, loss_scale=65536.0)
    assert report.skipped and "GradScaler" in report.reason
    encoder_grads = [p.grad for p in model.encoder.parameters()]
    assert any(not torch.isfinite(g).all() for g in encoder_grads)

    # Without a loss scale the same overflow follows on_nonfinite and writes nothing.
    model = copy.deepcopy(problem.model)
    mtl = MTL({"tasks": problem.tasks, "plugins": ["mgda"], "space": space}, shared=model.encoder)
    z, losses = losses_on(problem, model, problem.x)
    z.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteError):
        mtl.backward(losses, features=z)
    assert all(p.grad is None for p in model.parameters())


def test_grad_scaler_cpu_fp16_skips_overflowing_step(make_problem):
    """CPU autocast float16 with torch.amp.GradScaler("cpu"): a step whose gradients overflow
    leaves the parameters untouched and halves the scale."""
    problem = make_problem()
    model = copy.deepcopy(problem.model).float()
    x = problem.x.float()
    mtl = MTL({"tasks": problem.tasks, "plugins": ["pcgrad"]}, shared=model.encoder)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    for inject in (False, True):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            z, losses = losses_on(problem, model, x)
        if inject:
            z.register_hook(lambda g: g * float("inf"))
        before = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        report = mtl.backward({t: loss.float() for t, loss in losses.items()}, loss_scale=scaler)
        assert report.skipped is inject, report.reason
        scaler.step(optimizer)
        scaler.update()
        changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert changed is not inject
        if inject:
            assert scaler.get_scale() == scale / 2
