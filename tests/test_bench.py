"""The benchmark's machinery (never its timings: this machine is shared and noisy) and the
engine's account of which Gramian ``params_gramian: auto`` takes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtlhooks import MTL, MTLError, bench


def _losses(problem, model, batch):
    z, outputs = model(problem.x[:batch])
    return z, {t: (outputs[t] - 0.5).pow(2).mean() for t in problem.tasks}


def _run(problem, config, batch=None, shared=None):
    model = copy.deepcopy(problem.model)
    source = model.encoder if shared is None else shared(model)
    mtl = MTL({"tasks": problem.tasks, "plugins": ["mgda"], **config}, shared=source)
    z, losses = _losses(problem, model, batch or len(problem.x))
    mtl.backward(losses, features=z if mtl.space.value == "features" else None)
    choice = mtl._engine.last_gramian_choice
    mtl.close()
    return choice


def test_auto_names_why_it_takes_the_layerwise_gramian(problem):
    # Batch 2: 2 rows × (8 + 6) outputs = 28 < 102 parameters, all in nn.Linear layers.
    choice = _run(problem, {"space": "params"}, batch=2)
    assert choice.mode == "layerwise"
    assert "100.0%" in choice.reason and "(28)" in choice.reason and "(102)" in choice.reason


def test_auto_names_why_it_materialises(problem):
    # Batch 9: 9 × 14 = 126 rows × outputs ≥ 102 parameters: J is the smaller.
    choice = _run(problem, {"space": "params"})
    assert choice.mode == "materialize" and "(126)" in choice.reason

    forced = _run(problem, {"space": "params", "params_gramian": "materialize"}, batch=2)
    assert forced.mode == "materialize" and "params_gramian is 'materialize'" in forced.reason

    tensors = _run(problem, {"space": "params"}, batch=2, shared=lambda m: m.encoder.parameters())
    assert tensors.mode == "materialize" and "tensors, not a module" in tensors.reason

    features = _run(problem, {"space": "features"}, batch=2)
    assert features.mode == "materialize" and "one block" in features.reason


def test_auto_names_the_share_of_untapped_parameters():
    torch.manual_seed(0)
    model = bench._CNN(2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, outputs = model(x)
    choices = bench.auto_choices(model, x, [torch.randn_like(o) for o in outputs])
    # The two convolutions hold 19 k of the 543 k shared parameters (3.6 %).
    assert choices["params"]["mode"] == "materialize"
    assert "96.4%" in choices["params"]["reason"]
    # The last shared layer is the linear one: layerwise when its rows are few.
    assert choices["last_shared"]["mode"] == "layerwise"


class _Attention(nn.Module):
    """nn.MultiheadAttention applies its out_proj (an nn.Linear) with F.linear, never through
    the module's forward: its forward hook never fires."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.MultiheadAttention(4, 1, batch_first=True)
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(2))

    def forward(self, x):
        z = self.encoder(x, x, x, need_weights=False)[0].mean(dim=1)
        return z, [head(z) for head in self.heads]


def test_a_linear_layer_applied_without_its_forward_makes_layerwise_materialise():
    torch.manual_seed(0)
    model = _Attention()
    x = torch.randn(3, 5, 4)
    mtl = MTL(
        {
            "tasks": ["a", "b"],
            "plugins": ["mgda"],
            "space": "params",
            "params_gramian": "layerwise",
        },
        shared=model.encoder,
    )
    z, outputs = model(x)
    mtl.backward(
        {t: out.pow(2).mean() for t, out in zip("ab", outputs)},
        features=z if mtl.space.value == "features" else None,
    )
    choice = mtl._engine.last_gramian_choice
    assert choice.mode == "materialize" and "recorded no forward call" in choice.reason
    mtl.close()


@pytest.mark.parametrize("suite", sorted(bench.SUITES))
def test_every_suite_names_known_models(suite):
    for model_name, tasks in bench.SUITES[suite]:
        assert model_name in bench.MODELS and model_name in bench.TINY and tasks >= 2


def test_bad_bench_arguments_are_refused_with_what_to_do():
    with pytest.raises(MTLError, match="unknown suite 'tpu'"):
        bench.run(suite="tpu")
    with pytest.raises(MTLError, match=r"has no model \['resnet18'\]; it has \['cnn', 'mlp'"):
        bench.run(suite="cpu", only=["resnet18"])
    with pytest.raises(MTLError, match="on CUDA the bench uses CUDA events"):
        bench.run(suite="gpu", device="cuda", cpu_time=True)
    if not torch.cuda.is_available():
        with pytest.raises(MTLError, match="--dry-run tests the gpu suite"):
            bench.run(suite="gpu", device="cuda")


def test_every_case_has_its_own_key():
    """Each (space, method, mode) of the bench is built and timed apart (a shared key would
    time one pipeline twice and print it under two names)."""
    keys = [bench._key(*case) for case in bench.CASES]
    assert len(set(keys)) == len(keys)


def _reference_on_its_own_copy(key: str, copy_of: str) -> tuple[bench._Setup, list[nn.Parameter]]:
    """Run the reference step ``key`` after ``plain``: it must leave the model's ``.grad``
    alone and give plain's gradients, bit for bit, into the parameters of its own copy
    (``setup.<copy_of>``). Returns the setup and that copy's parameters."""
    model, x, targets = bench._build("mlp", 2, torch.device("cpu"), tiny=True, seed=0)
    setup = bench._steps(model, x, targets)
    setup.steps["plain"]()
    expected = [p.grad.clone() for p in model.parameters()]
    setup.zero()
    setup.steps[key]()
    assert all(p.grad is None for p in model.parameters())
    own = list(getattr(setup, copy_of).parameters())
    assert all(a is not b for a, b in zip(own, model.parameters()))
    for parameter, grad in zip(own, expected, strict=True):
        assert torch.equal(parameter.grad, grad)
    return setup, own


def _bench_row(space: str, method: str) -> None:
    cases, _ = bench.measure("mlp", 2, repeats=1, warmup=0, tiny=True)
    rows = [c for c in cases if (c.space, c.method) == (space, method)]
    assert len(rows) == 1 and rows[0].ratio_to_plain > 0


def test_the_a_a_control_is_the_plain_step_on_a_copy_of_the_model():
    """The ``plain``/``twin`` row times ``sum(losses).backward()`` on a deep copy, as every
    mtlhooks case runs on a copy of its own: the same gradients into other tensors, so its
    ratio to ``plain`` measures what two copies of one model differ by, nothing else."""
    setup, _ = _reference_on_its_own_copy("plain_twin", "twin")
    for mtl in setup.mtls.values():
        mtl.close()
    _bench_row("plain", "twin")


def test_the_checked_reference_is_the_plain_step_followed_by_a_check_of_every_gradient():
    """``plain``/``checked``: the least a step that guarantees finite gradients costs. It
    steps its own copy (the same gradients as plain), reads every gradient (a NaN in any one
    of them, however placed, is found) and appears as a row of the bench."""
    setup, own = _reference_on_its_own_copy("plain_checked", "checked")
    assert all(a is not b for a, b in zip(own, setup.twin.parameters()))
    # a non-finite value in one gradient entry, of the first or of the last parameter
    for parameter in (own[0], own[-1]):
        handle = parameter.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("nan")))
        with pytest.raises(FloatingPointError, match="non-finite gradient"):
            setup.steps["plain_checked"]()
        handle.remove()
    setup.steps["plain_checked"]()  # finite again
    for mtl in setup.mtls.values():
        mtl.close()
    _bench_row("plain", "checked")
