"""Set-ups that used to give a misleading error or silently wrong gradients: activation
checkpointing and torch.compile. Each supported one is checked against plain autograd."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtlhooks import MTL, InputError

TASKS = ("a", "b")


class Trunk(nn.Module):
    def __init__(self, reentrant: bool | None = None) -> None:
        super().__init__()
        self.first = nn.Linear(5, 8)
        self.block = nn.Sequential(nn.Tanh(), nn.Linear(8, 6))
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.first(x)
        if self.reentrant is None:
            return self.block(hidden)
        return checkpoint(self.block, hidden, use_reentrant=self.reentrant)


class Net(nn.Module):
    def __init__(self, reentrant: bool | None = None) -> None:
        super().__init__()
        self.encoder = Trunk(reentrant)
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in TASKS])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.encoder(x)
        return z, [head(z) for head in self.heads]


def _losses(outputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {t: (out - i).pow(2).mean() * 3.0**i for i, (t, out) in enumerate(zip(TASKS, outputs))}


def _check_against_autograd(model: nn.Module, eager: nn.Module, x, coefficients) -> None:
    """``.grad`` of ``model`` equals Σ cᵢ∇Lᵢ computed by plain autograd on ``eager``."""
    _, outputs = eager(x)
    total = sum(c * loss for c, loss in zip(coefficients.tolist(), _losses(outputs).values()))
    total.backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("space", ["last_shared", "params"])
def test_reentrant_checkpoint_is_named_as_the_cause(space):
    torch.manual_seed(0)
    model = Net(reentrant=True).double()
    mtl = MTL({"tasks": TASKS, "plugins": ["mgda"], "space": space}, shared=model.encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, outputs = model(torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(InputError, match="use_reentrant=False") as caught:
        mtl.backward(_losses(outputs))
    if space == "last_shared":
        assert "'block.1.weight'" in str(caught.value)  # its path in the trunk
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("space", ["features", "last_shared", "params"])
def test_non_reentrant_checkpoint_is_exact(space):
    torch.manual_seed(0)
    model = Net(reentrant=False).double()
    eager = copy.deepcopy(model)
    eager.encoder.reentrant = None
    mtl = MTL({"tasks": TASKS, "plugins": ["mgda"], "space": space}, shared=model.encoder)
    x = torch.randn(4, 5, dtype=torch.float64)
    z, outputs = model(x)
    report = mtl.backward(_losses(outputs), features=z if space == "features" else None)
    _check_against_autograd(model, eager, x, report.weights)


def _compiled(model: nn.Module, what: str) -> nn.Module:
    torch._dynamo.reset()
    if what == "whole":
        return torch.compile(model, backend="aot_eager")
    model.encoder = torch.compile(model.encoder, backend="aot_eager")
    return model


@pytest.mark.parametrize(
    ("what", "space"),
    [
        ("trunk", "features"),
        ("trunk", "last_shared"),
        ("trunk", "params"),
        ("whole", "last_shared"),
        ("whole", "params"),
        ("whole", "none"),
    ],
)
def test_torch_compile_is_exact(what, space):
    """A compiled trunk or a compiled whole model, two calls (the first one traces): the
    written gradients equal plain autograd with the same weights."""
    torch.manual_seed(0)
    net = Net().double()
    eager = copy.deepcopy(net)
    model = _compiled(net, what)
    plugins = [] if space == "none" else ["mgda"]
    mtl = MTL({"tasks": TASKS, "plugins": plugins, "space": space}, shared=net.encoder)
    assert all(not name.startswith("_orig_mod") for name, _ in mtl._shared)
    for seed in (1, 2):
        x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        for p, q in zip(net.parameters(), eager.parameters()):
            p.grad = q.grad = None
        z, outputs = model(x)
        report = mtl.backward(_losses(outputs), features=z if space == "features" else None)
        coefficients = report.weights if report.weights is not None else torch.ones(2)
        _check_against_autograd(net, eager, x, coefficients)


def test_compiled_whole_model_in_features_space_names_the_cause():
    torch.manual_seed(0)
    net = Net().double()
    model = _compiled(net, "whole")
    mtl = MTL({"tasks": TASKS, "plugins": ["mgda"], "space": "features"})
    z, outputs = model(torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(InputError, match=r"Compile the trunk alone"):
        mtl.backward(_losses(outputs), features=z)


def test_donated_buffer_error_says_what_to_set():
    """torch's error for a compiled backward that freed its buffers (seen with inductor) is
    turned into the setting that avoids it."""

    def backward(total: torch.Tensor) -> None:
        raise RuntimeError("This backward function was compiled with non-empty donated buffers")

    torch.manual_seed(0)
    model = Net().double()
    mtl = MTL({"tasks": TASKS}, backward_fn=backward)
    _, outputs = model(torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(InputError, match=r"donated_buffer = False"):
        mtl.backward(_losses(outputs))
