"""The LibMTL weighting of :mod:`mtlhooks.integrations.libmtl`, run as LibMTL runs it.

LibMTL 1.1.5 does not import beside torch 2.13's CPU build here (its torchvision fails to load
its operators), so most tests mix the weighting into a stand-in for LibMTL's hard-parameter-
sharing architecture written from LibMTL's documented ``AbsArchitecture`` interface, and
drive it with the body of LibMTL's training loop (``zero_grad(set_to_none=False)``, ``w =
model.backward(losses, **weight_args)``, ``optimizer.step()``). Where LibMTL imports, the same
checks run on its own ``HPS`` architecture.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from mtlhooks import MTL, ConfigError, InputError
from mtlhooks.integrations import libmtl
from mtlhooks.problems import MultiTaskMLP, make_regression

TASKS = ["t0", "t1", "t2"]


def problem() -> tuple[Any, MultiTaskMLP]:
    data = make_regression(
        sigmas=(1.0, 3.0, 10.0),
        n_train=96,
        n_test=8,
        in_dim=6,
        out_dim=2,
        seed=0,
        dtype=torch.float64,
    )
    return data, MultiTaskMLP(6, 10, data.task_out_dims, depth=2, seed=1).double()


class HardSharing(nn.Module):
    """LibMTL's ``AbsArchitecture`` + ``HPS`` interface: ``__init__(task_name, encoder_class,
    decoders, rep_grad, multi_input, device, **kwargs)``, ``forward(inputs) -> {task: pred}``,
    ``get_share_params``, ``zero_grad_share_params``."""

    def __init__(
        self,
        task_name: list[str],
        encoder_class: Any,
        decoders: nn.ModuleDict,
        rep_grad: bool,
        multi_input: bool,
        device: torch.device,
        **kwargs: Any,
    ) -> None:
        super().__init__()  # the weighting class is next in the MRO, as in LibMTL
        self.task_name, self.task_num = task_name, len(task_name)
        self.decoders, self.rep_grad, self.multi_input = decoders, rep_grad, multi_input
        self.device = device
        self.encoder = encoder_class()

    def forward(self, inputs: torch.Tensor, task_name: str | None = None) -> dict[str, Any]:
        rep = self.encoder(inputs)
        return {task: self.decoders[task](rep) for task in self.task_name}

    def get_share_params(self) -> Any:
        return self.encoder.parameters()

    def zero_grad_share_params(self) -> None:
        self.encoder.zero_grad(set_to_none=False)


def libmtl_model(architecture: type, weighting: type, mlp: MultiTaskMLP, **options: Any) -> Any:
    """What LibMTL's ``Trainer._prepare_model`` builds."""

    class MTLmodel(architecture, weighting):  # type: ignore[misc, valid-type]
        def __init__(self, task_name: list[str], encoder_class: Any, decoders: Any, **kw: Any):
            super().__init__(task_name, encoder_class, decoders, **kw)
            self.init_param()

    settings = {"rep_grad": False, "multi_input": False, "device": torch.device("cpu")}
    settings.update(options)
    return MTLmodel(TASKS, lambda: mlp.encoder, mlp.heads, **settings)


def libmtl_steps(model: Any, data: Any, steps: int, batch: int = 16) -> np.ndarray:
    """The body of LibMTL's ``Trainer.train`` for ``steps`` batches; returns ``batch_weight``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batch_weight = np.zeros([len(TASKS), 1, steps])
    for index in range(steps):
        rows = slice(index * batch, (index + 1) * batch)
        preds = model(data.x_train[rows])
        train_losses = torch.zeros(len(TASKS), dtype=torch.float64)
        for tn, task in enumerate(TASKS):
            train_losses[tn] = nn.functional.mse_loss(preds[task], data.y_train[task][rows])
        optimizer.zero_grad(set_to_none=False)
        w = model.backward(train_losses)
        if w is not None:
            batch_weight[:, 0, index] = w
        optimizer.step()
    return batch_weight


def plain(config: dict[str, Any], steps: int) -> tuple[dict[str, torch.Tensor], list[Any]]:
    data, mlp = problem()
    mtl = MTL(config, shared=mlp.encoder)
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.05)
    weights = []
    for index in range(steps):
        rows = slice(index * 16, (index + 1) * 16)
        z, outputs = mlp(data.x_train[rows])
        losses = data.losses(outputs, {t: data.y_train[t][rows] for t in TASKS})
        weights.append(mtl.backward(losses, features=z).weights)
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in mlp.named_parameters()}, weights


def params(mlp: MultiTaskMLP) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in mlp.named_parameters()}


CONFIGS = {
    "pcgrad_params": {"tasks": TASKS, "seed": 1, "space": "params", "plugins": ["pcgrad"]},
    "mgda_features": {"tasks": TASKS, "space": "features", "plugins": ["mgda"]},
    "uncertainty": {"tasks": TASKS, "plugins": ["uncertainty"]},
}


def architectures() -> list[Any]:
    found: list[Any] = [pytest.param(HardSharing, id="stand-in")]
    try:
        hps = importlib.import_module("LibMTL.architecture").HPS
    except Exception as error:
        reason = f"LibMTL does not import here ({type(error).__name__}: {error})"
        found.append(pytest.param(None, id="LibMTL-HPS", marks=pytest.mark.skip(reason=reason)))
    else:
        found.append(pytest.param(hps, id="LibMTL-HPS"))
    return found


@pytest.mark.parametrize("architecture", architectures())
@pytest.mark.parametrize("name", ["pcgrad_params", "mgda_features"])
def test_libmtl_loop_equals_the_plain_loop(architecture: type, name: str) -> None:
    """Three LibMTL steps with the mtlhooks weighting equal three steps of the plain loop with
    the same config (parameters to 1e-12, and LibMTL's recorded weights are the report's)."""
    config = CONFIGS[name]
    data, mlp = problem()
    model = libmtl_model(architecture, libmtl.weighting(config), mlp)
    batch_weight = libmtl_steps(model, data, 3)
    want, weights = plain(config, 3)
    for key, value in params(mlp).items():
        torch.testing.assert_close(value, want[key], rtol=1e-10, atol=1e-12, msg=key)
    np.testing.assert_allclose(batch_weight[:, 0, :], torch.stack(weights).T.numpy(), rtol=1e-12)


def test_learnable_plugin_parameters_are_trained_by_libmtls_optimizer() -> None:
    """Uncertainty weighting's log-variances are model parameters for LibMTL's optimizer, and
    training moves them as the plain loop (whose optimizer holds them too) does."""
    config = CONFIGS["uncertainty"]
    data, mlp = problem()
    model = libmtl_model(HardSharing, libmtl.weighting(config), mlp)
    learnable = list(model.mtl.parameters())
    assert learnable and all(any(p is q for q in model.parameters()) for p in learnable)
    libmtl_steps(model, data, 3)

    data, ref = problem()
    mtl = MTL(config)
    optimizer = torch.optim.SGD([*ref.parameters(), *mtl.parameters()], lr=0.05)
    for index in range(3):
        rows = slice(index * 16, (index + 1) * 16)
        _, outputs = ref(data.x_train[rows])
        mtl.backward(data.losses(outputs, {t: data.y_train[t][rows] for t in TASKS}))
        optimizer.step()
        optimizer.zero_grad()
    for got, want in zip(model.mtl.parameters(), mtl.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(params(mlp), params(ref), rtol=1e-10, atol=1e-12)


def test_state_travels_in_the_models_state_dict() -> None:
    """LibMTL saves ``model.state_dict()`` (``best.pt``) and reloads it with ``strict=False``:
    the pipeline's state (PCGrad's generator, the step counter) goes with it, so a reloaded
    model continues as the original does."""
    config = CONFIGS["pcgrad_params"]
    data, mlp = problem()
    model = libmtl_model(HardSharing, libmtl.weighting(config), mlp)
    libmtl_steps(model, data, 2)
    saved = copy.deepcopy(model.state_dict())
    assert saved["_extra_state"]["mtlhooks"]["index"] == 2
    _, mlp2 = problem()
    reloaded = libmtl_model(HardSharing, libmtl.weighting(config), mlp2)
    reloaded.load_state_dict(saved, strict=False)
    assert reloaded.mtl.state_dict()["index"] == 2
    assert torch.equal(reloaded.mtl.generator.get_state(), model.mtl.generator.get_state())


def test_what_cannot_work_is_refused() -> None:
    _, mlp = problem()
    features = libmtl.weighting(CONFIGS["mgda_features"])
    with pytest.raises(ConfigError, match="rep_grad=True"):
        libmtl_model(HardSharing, features, mlp, rep_grad=True)
    with pytest.raises(ConfigError, match="multi_input=True"):
        libmtl_model(HardSharing, features, copy.deepcopy(mlp), multi_input=True)
    other = {**CONFIGS["pcgrad_params"], "tasks": ["a", "b", "c"]}
    with pytest.raises(ConfigError, match="task_dict has"):
        libmtl_model(HardSharing, libmtl.weighting(other), copy.deepcopy(mlp))
    model = libmtl_model(HardSharing, libmtl.weighting(CONFIGS["pcgrad_params"]), mlp)
    with pytest.raises(InputError, match="weight_args"):
        model.backward(torch.zeros(3, requires_grad=True), alpha=1.5)
    with pytest.raises(ConfigError, match="unknown plugin"):
        libmtl.weighting({"tasks": TASKS, "plugins": ["pcgard"]})


def test_register_names_the_class_for_trainers_that_take_a_name() -> None:
    try:
        weighting_module = importlib.import_module("LibMTL.weighting")
    except Exception:
        with pytest.raises(InputError, match=r"cannot import LibMTL\.weighting"):
            libmtl.register(CONFIGS["pcgrad_params"])
        return
    name = libmtl.register(CONFIGS["pcgrad_params"], name="MTLHooksTest")
    assert issubclass(getattr(weighting_module, name), libmtl.MTLHooksWeighting)
