"""CUDA readiness (``pytest -m gpu``; skipped without a CUDA device).

Every test is parametrised over devices: the ``cpu`` variant runs in the ordinary suite and
proves the test itself works (the same comparison against an independent float64 CPU
reference), the ``cuda`` variant carries the ``gpu`` mark and runs where CUDA is available
(``benchmarks/gpu_check.sh`` runs them all).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from plugin_entries import entry
from torch import nn

from mtlhooks import MTL, registry, solvers

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]
TASKS = ("a", "b", "c")


class Net(nn.Module):
    """Two linear layers in the trunk (so the layerwise Gramian applies), one head per task."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, width))
        self.heads = nn.ModuleDict({t: nn.Linear(width, i + 1) for i, t in enumerate(TASKS)})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.encoder(x)
        return z, {t: head(z) for t, head in self.heads.items()}


def _losses(model: Net, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    z, outputs = model(x)
    return z, {t: (outputs[t] - 0.5 * (i + 1)).pow(2).mean() * 3.0**i for i, t in enumerate(TASKS)}


def _problem(seed: int = 0) -> tuple[Net, torch.Tensor]:
    torch.manual_seed(seed)
    return Net().double(), torch.randn(9, 5, dtype=torch.float64)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _train(plugin: str, model: Net, x: torch.Tensor, steps: int) -> tuple[MTL, list[Any]]:
    """``steps`` calls of one plugin (space auto), with ``after_step``; the reports."""
    mtl = MTL({"tasks": TASKS, "plugins": [entry(plugin)], "seed": 5}, shared=model.encoder)
    mtl.to(device=x.device)
    reports = []
    for _ in range(steps):
        for p in model.parameters():
            p.grad = None
        z, losses = _losses(model, x)
        reports.append(mtl.backward(losses, features=z if mtl.space.value == "features" else None))
        mtl.after_step({t: loss.detach() for t, loss in losses.items()})
    return mtl, reports


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plugin", list(registry.BUILTINS))
def test_every_plugin_runs_on_the_models_device_as_in_float64_on_the_cpu(device, plugin):
    """Float32 on ``device`` against float64 on the CPU: the same .grad (random methods draw
    from the pipeline's CPU generator, so both runs draw the same numbers); every tensor the
    plugin keeps, learnable parameters included, lives on the model's device."""
    model, x = _problem()
    reference_model = copy.deepcopy(model)
    _, expected = _train(plugin, reference_model, x, steps=2)

    model = model.float().to(device)
    mtl, reports = _train(plugin, model, x.float().to(device), steps=2)
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        assert p.grad is not None and p.grad.device.type == device, name
        torch.testing.assert_close(p.grad.double().cpu(), q.grad, rtol=2e-3, atol=1e-4, msg=name)
    for report, reference in zip(reports, expected):
        for field in ("weights", "gramian"):
            value = getattr(report, field)
            if value is not None:
                assert value.device.type == device, field
                torch.testing.assert_close(
                    value.double().cpu(), getattr(reference, field), rtol=2e-3, atol=1e-4
                )
    for tensor in _tensors(mtl.state_dict()["plugins"]):
        assert tensor.device.type == device
    for parameter in mtl.parameters():
        assert parameter.device.type == device


SPACES = ["none", "features", "last_shared", "params"]
# Each space's plugins: one that reads gradients there (none: a loss-scaling method).
PLUGIN_OF_SPACE = {"none": "dwa", "features": "mgda", "last_shared": "mgda", "params": "upgrad"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("space", SPACES)
def test_fp16_with_grad_scaler_skips_an_overflowing_step(device, space):
    """An inf injected into the trunk's gradient under fp16 autocast: mtlhooks writes it as it
    is, the GradScaler skips the optimizer step and lowers its scale; the next step trains."""
    model, x = _problem()
    model, x = model.float().to(device), x.float().to(device)
    config = {"tasks": TASKS, "plugins": [PLUGIN_OF_SPACE[space]], "space": space}
    mtl = MTL(config, shared=model.encoder).to(device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]

    with torch.autocast(device, dtype=torch.float16):
        z, losses = _losses(model, x)
    z.register_hook(lambda grad: grad * float("inf"))
    mtl.backward(losses, features=z if mtl.space.value == "features" else None, loss_scale=scaler)
    scaler.step(optimizer)
    scaler.update()
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p.detach(), old)
    assert scaler.get_scale() < 2.0**10

    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.float16):
        z, losses = _losses(model, x)
    report = mtl.backward(
        losses, features=z if mtl.space.value == "features" else None, loss_scale=scaler
    )
    scaler.step(optimizer)
    scaler.update()
    assert not report.skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p.detach(), old) for p, old in zip(model.parameters(), before))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("space", SPACES)
def test_bf16_autocast_trains_and_an_inf_loss_skips_the_step(device, space):
    """bf16 autocast in every space gives the float32 gradients within bf16's precision; a
    loss made inf skips the call (on_nonfinite: skip) and leaves .grad and the parameters
    untouched."""
    model, x = _problem()
    model, x = model.float().to(device), x.float().to(device)
    reference = copy.deepcopy(model)
    config = {
        "tasks": TASKS,
        "plugins": [PLUGIN_OF_SPACE[space]],
        "space": space,
        "on_nonfinite": "skip",
    }
    mtl = MTL(config, shared=model.encoder).to(device=device)
    reference_mtl = MTL(config, shared=reference.encoder).to(device=device)
    z, losses = _losses(reference, x)
    reference_mtl.backward(losses, features=z if reference_mtl.space.value == "features" else None)
    with torch.autocast(device, dtype=torch.bfloat16):
        z, losses = _losses(model, x)
    report = mtl.backward(losses, features=z if mtl.space.value == "features" else None)
    assert not report.skipped
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0.1, atol=0.05)

    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    with torch.autocast(device, dtype=torch.bfloat16):
        z, losses = _losses(model, x)
    losses["b"] = losses["b"] * float("inf")
    report = mtl.backward(losses, features=z if mtl.space.value == "features" else None)
    assert report.skipped
    for p, grad, old in zip(model.parameters(), grads, params):
        assert torch.equal(p.grad, grad) and torch.equal(p.detach(), old)


def _gramians(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(count, 3 * count, generator=generator, dtype=torch.float64)
    jacobian *= torch.logspace(0, 1, count, dtype=torch.float64)[:, None]
    return jacobian @ jacobian.T


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count", [2, 5, 10])
def test_solvers_in_float32_on_the_device_equal_float64_on_the_cpu(device, count):
    gramian = _gramians(count, seed=count)
    fast = gramian.float().to(device)
    lower = torch.full((count,), 1.0 / count, dtype=torch.float64)
    linear = -torch.linspace(0.0, 1.0, count, dtype=torch.float64)
    cases = [
        (solvers.min_norm_weights(gramian), solvers.min_norm_weights(fast)),
        (
            solvers.dual_cone_qp(gramian, lower),
            solvers.dual_cone_qp(fast, lower.float().to(device)),
        ),
        (
            solvers.simplex_qp(gramian, linear),
            solvers.simplex_qp(fast, linear.float().to(device)),
        ),
    ]
    for exact, found in cases:
        assert found.device.type == device
        # Compare the quantity the methods use, G w, relative to the Gramian's scale.
        difference = gramian @ (found.double().cpu() - exact)
        assert difference.abs().max() <= 1e-3 * gramian.diagonal().max() * exact.abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [(4,), (3, 7)])
def test_layerwise_gramian_on_the_device_equals_the_materialised_one(device, rows):
    """Layerwise (never forming J) against materialised J on ``device``; inputs with an extra
    token dimension take the other branch of the layer Gramian (kernel vs direct)."""
    torch.manual_seed(1)
    model = Net().to(device)
    x = torch.randn(*rows, 5, device=device)
    results = []
    for mode in ("materialize", "layerwise"):
        twin = copy.deepcopy(model)
        mtl = MTL(
            {"tasks": TASKS, "plugins": ["upgrad"], "space": "params", "params_gramian": mode},
            shared=twin.encoder,
        )
        z, outputs = twin(x)
        losses = {t: (outputs[t] - 0.5).pow(2).mean() for t in TASKS}
        report = mtl.backward(losses, features=z if mtl.space.value == "features" else None)
        assert mtl._engine.last_gramian_choice.mode == mode
        results.append((report, [p.grad for p in twin.parameters()]))
        mtl.close()
    (dense, dense_grads), (layered, layered_grads) = results
    torch.testing.assert_close(layered.gramian, dense.gramian, rtol=1e-4, atol=1e-6)
    for a, b in zip(layered_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


STATEFUL = ["famo", "dwa", "uncertainty", "gradvac", "avgnorm", "slaw", "gradnorm", "db_mtl"]


@pytest.mark.parametrize("device", DEVICES)
def test_state_saved_on_the_device_loads_on_the_cpu_and_back(device):
    """Save after two steps on ``device``, load on the CPU, save there, load on ``device``:
    each copy continues exactly as the original does."""
    for plugin in STATEFUL:
        model, x = _problem()
        model, x = model.float().to(device), x.float().to(device)
        mtl, _ = _train(plugin, model, x, steps=2)
        buffer = io.BytesIO()
        torch.save(mtl.state_dict(), buffer)

        cpu_model = copy.deepcopy(model).cpu()
        cpu_mtl = MTL({"tasks": TASKS, "plugins": [plugin]}, shared=cpu_model.encoder)
        cpu_mtl.to(dtype=torch.float32)  # the model's dtype, which the saved state has
        buffer.seek(0)
        cpu_mtl.load_state_dict(torch.load(buffer, map_location="cpu", weights_only=False))
        back = io.BytesIO()
        torch.save(cpu_mtl.state_dict(), back)

        device_model = copy.deepcopy(model)
        device_mtl = MTL({"tasks": TASKS, "plugins": [plugin]}, shared=device_model.encoder)
        device_mtl.to(device=device, dtype=torch.float32)
        back.seek(0)
        device_mtl.load_state_dict(torch.load(back, map_location=device, weights_only=False))

        weights = []
        for twin, twin_mtl, where in (
            (model, mtl, x),
            (cpu_model, cpu_mtl, x.cpu()),
            (device_model, device_mtl, x),
        ):
            z, losses = _losses(twin, where)
            weights.append(
                twin_mtl.backward(
                    losses, features=z if twin_mtl.space.value == "features" else None
                ).weights.cpu()
            )
        torch.testing.assert_close(weights[1], weights[0], msg=plugin)
        torch.testing.assert_close(weights[2], weights[0], msg=plugin, rtol=0, atol=0)
