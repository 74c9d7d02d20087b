"""A step completes or changes nothing: non-finite gradients never reach ``.grad``, a failing
call leaves every plugin's state, the generator and ``.grad`` as they were, and errors are ours.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from plugin_entries import entry

from mtlhooks import (
    MTL,
    Family,
    GradientError,
    InputError,
    MTLError,
    MTLWarning,
    NonFiniteError,
    Plugin,
    PluginError,
    Space,
    Step,
    hookimpl,
    hostsync,
    registry,
)
from mtlhooks.report import StepReport

# (space, params_gramian) of every way the pipeline can write gradients.
WRITE_PATHS = [
    ("none", "auto"),
    ("features", "auto"),
    ("last_shared", "materialize"),
    ("last_shared", "layerwise"),
    ("params", "materialize"),
    ("params", "layerwise"),
]


def _mtl(problem, space: str, gramian: str = "auto", policy: str = "raise", **extra) -> MTL:
    plugins = [] if space == "none" else ["mgda"]
    config = {
        "tasks": problem.tasks,
        "space": space,
        "plugins": extra.pop("plugins", plugins),
        "params_gramian": gramian,
        "on_nonfinite": policy,
        **extra,
    }
    return MTL(config, shared=problem.model.encoder)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_grads(model, before: dict[str, torch.Tensor | None]) -> None:
    for name, p in model.named_parameters():
        if before[name] is None:
            assert p.grad is None, f"{name} received a gradient"
        else:
            assert p.grad is not None and torch.equal(p.grad, before[name]), name


def _poison(parameter: torch.Tensor, value: float = float("nan")) -> Any:
    """Make the gradient of ``parameter`` non-finite while every loss stays finite."""
    return parameter.register_hook(lambda g: g * value)


def _backward(mtl: MTL, problem, **kwargs) -> StepReport:
    z, losses = problem.losses()
    features = z if mtl.space is Space.FEATURES else None
    return mtl.backward(losses, features=features, **kwargs)


# -- 1. non-finite gradients ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["shared", "task_specific"])
@pytest.mark.parametrize("accumulating", [False, True], ids=["fresh", "accumulating"])
@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize(("space", "gramian"), WRITE_PATHS)
def test_nonfinite_gradient_never_reaches_grad(
    problem, space, gramian, policy, accumulating, where
):
    """A finite loss whose gradient is NaN (here: in the first shared layer, or in one head)
    is refused or skipped in every space, and ``.grad`` keeps exactly what it held, including
    earlier micro-steps of gradient accumulation."""
    model = problem.model
    mtl = _mtl(problem, space, gramian, policy)
    if accumulating:
        _backward(mtl, problem)
    before = _grads(model)
    state = copy.deepcopy(mtl.state_dict())
    target = model.encoder[0].weight if where == "shared" else model.heads["b"].weight
    handle = _poison(target)
    try:
        if policy == "raise":
            with pytest.raises(NonFiniteError, match="nothing was written"):
                _backward(mtl, problem)
        else:
            report = _backward(mtl, problem)
            assert report.skipped, report
            assert "non-finite" in (report.reason or "")
    finally:
        handle.remove()
    _assert_same_grads(model, before)
    assert torch.equal(mtl.state_dict()["generator"], state["generator"])
    # The pipeline goes on normally afterwards.
    assert not _backward(mtl, problem).skipped


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_gradient_inside_an_accumulation_window(problem, policy):
    """Space params (exact): the micro-steps wait for the synchronising call; a non-finite
    gradient among them is found there and nothing of the window is written."""
    mtl = _mtl(problem, "params", "materialize", policy)
    model = problem.model
    _backward(mtl, problem, sync=False)
    handle = _poison(model.heads["c"].weight, float("inf"))
    _backward(mtl, problem, sync=False)
    handle.remove()
    if policy == "raise":
        with pytest.raises(NonFiniteError):
            _backward(mtl, problem, sync=True)
    else:
        assert _backward(mtl, problem, sync=True).skipped
    assert all(p.grad is None for p in model.parameters())


def test_nonfinite_from_the_graph_itself(problem):
    """No hook: sqrt at 0 inside the graph gives an infinite gradient of a finite loss."""
    mtl = _mtl(problem, "none", policy="skip")
    z, losses = problem.losses()
    losses["a"] = losses["a"] + torch.sqrt(z[:, 0] * 0.0).sum()
    assert torch.isfinite(losses["a"])
    report = mtl.backward(losses)
    assert report.skipped and "non-finite gradient" in (report.reason or "")
    assert all(p.grad is None for p in problem.model.parameters())


def test_nonfinite_reason_names_the_parameter(problem):
    mtl = _mtl(problem, "none", policy="skip")
    handle = _poison(problem.model.encoder[2].bias)
    report = _backward(mtl, problem)
    handle.remove()
    assert "'2.bias'" in (report.reason or "")


def test_grad_scaler_still_gets_the_overflow(problem):
    """Under a loss scale, non-finite gradients are written for the GradScaler to skip, as
    before (it checks them itself)."""
    mtl = _mtl(problem, "none")
    handle = _poison(problem.model.heads["a"].weight, float("inf"))
    report = _backward(mtl, problem, loss_scale=1024.0)
    handle.remove()
    assert not report.skipped
    assert not torch.isfinite(problem.model.heads["a"].weight.grad).all()


# -- 2. transactional steps -------------------------------------------------------------------


class _Boom(Exception):
    pass


class _Failing(Plugin):
    """Breaks the call at its stage once armed, after every plugin before it ran."""

    armed = False


class FailInObserver(_Failing):
    name = "test_fail_observe"
    family = Family.OBSERVER

    @hookimpl
    def mtl_observe(self, report: StepReport) -> None:
        if self.armed:
            raise InputError("observer failed on purpose")


class FailWithNaNWeights(_Failing):
    name = "test_fail_nan_weights"
    family = Family.LOSS_SCALING

    @hookimpl
    def mtl_scale_losses(self, step: Step) -> None:
        if self.armed:
            step.weights = step.weights * float("nan")


class FailInLossScaling(_Failing):
    name = "test_fail_raise"
    family = Family.LOSS_SCALING

    @hookimpl
    def mtl_scale_losses(self, step: Step) -> None:
        if self.armed:
            raise _Boom("loss scaling failed on purpose")


FAILURES = {
    "observe": (FailInObserver, InputError),
    "nan_weights": (FailWithNaNWeights, PluginError),
    "raise": (FailInLossScaling, PluginError),
}


@pytest.fixture(scope="module")
def failing_plugins():
    for cls, _ in FAILURES.values():
        registry.register(cls)
    yield
    for cls, _ in FAILURES.values():
        registry.unregister(cls.name)


def _builtin_config(name: str) -> dict[str, Any]:
    if name == "static":
        return {"name": name, "weights": {"a": 2.0}}
    config = entry(name)
    return config if isinstance(config, dict) else {"name": config}


def _states_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a.cpu(), b.cpu()))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


BUILTINS = [
    info.name
    for info in registry.builtin_plugins()
    if not info.cls.__module__.startswith("mtlhooks.integrations.")  # adapters: test_torchjd
]


def _train_step(mtl: MTL, model: torch.nn.Module, x: torch.Tensor, tasks) -> StepReport:
    z, outputs = model(x)
    losses = {t: (outputs[t] - 0.5 * (i + 1)).pow(2).mean() * 10.0**i for i, t in enumerate(tasks)}
    report = mtl.backward(losses, features=z if mtl.space is Space.FEATURES else None)
    mtl.after_step({t: v.detach() for t, v in losses.items()})
    return report


@pytest.mark.parametrize("name", BUILTINS)
@settings(max_examples=3, deadline=None)
@given(stage=st.sampled_from(sorted(FAILURES)), before_steps=st.integers(0, 2))
def test_a_failing_call_changes_nothing(failing_plugins, make_problem, name, stage, before_steps):
    """Every built-in plugin through a failing call (an observer that raises after .grad was
    written, non-finite weights from a later loss-scaling plugin, a later plugin that raises):
    its state, the generator, the step counter and every ``.grad`` (holding earlier calls'
    gradients) are as before, and the next call equals that of a twin run that never saw the
    failure, bit for bit."""
    cls, error = FAILURES[stage]
    problem = make_problem()
    model, twin_model = problem.model, copy.deepcopy(problem.model)
    plugins = [_builtin_config(name)]
    mtl = MTL({"tasks": problem.tasks, "plugins": [*plugins, cls.name]}, shared=model.encoder)
    twin = MTL({"tasks": problem.tasks, "plugins": plugins}, shared=twin_model.encoder)
    for _ in range(before_steps):
        _train_step(mtl, model, problem.x, problem.tasks)
        _train_step(twin, twin_model, problem.x, problem.tasks)
    state, grads = copy.deepcopy(mtl.state_dict()), _grads(model)

    mtl.plugins[cls.name].armed = True  # type: ignore[attr-defined]
    with pytest.raises(error):
        _train_step(mtl, model, problem.x, problem.tasks)
    mtl.plugins[cls.name].armed = False  # type: ignore[attr-defined]
    assert _states_equal(mtl.state_dict(), state)
    _assert_same_grads(model, grads)

    report = _train_step(mtl, model, problem.x, problem.tasks)
    expected = _train_step(twin, twin_model, problem.x, problem.tasks)
    assert _states_equal(report.weights, expected.weights)
    assert _states_equal(mtl.state_dict()["plugins"][name], twin.state_dict()["plugins"][name])
    assert _states_equal(mtl.state_dict()["generator"], twin.state_dict()["generator"])
    _assert_same_grads(model, _grads(twin_model))


def _state_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _state_tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _state_tensors(item)]
    return []


def _writes_state_in_place(mtl: MTL, key: str, step: Any) -> bool:
    """Whether one call changed a tensor of the plugin's state in place."""
    held = _state_tensors(mtl.plugins[key].state_dict())
    copies = [t.clone() for t in held]
    step()
    return not all(torch.equal(t, c) for t, c in zip(held, copies))


REPLACERS = [info.name for info in registry.builtin_plugins() if info.cls.replaces_state]


@pytest.mark.parametrize("name", REPLACERS)
def test_plugins_that_replace_their_state_never_write_it_in_place(make_problem, name):
    """``replaces_state`` lets the transaction keep references to the state's tensors instead
    of copies: the claim is checked over several calls (a wrong claim would make a failed
    call's rollback restore tensors the call had already changed)."""
    problem = make_problem()
    mtl = MTL({"tasks": problem.tasks, "plugins": [entry(name)]}, shared=problem.model.encoder)
    for _ in range(3):
        assert not _writes_state_in_place(
            mtl, name, lambda: _train_step(mtl, problem.model, problem.x, problem.tasks)
        )


def test_the_in_place_check_sees_an_in_place_write(make_problem, registered):
    class Counter(Plugin):
        name = "counter_in_place"
        family = Family.OBSERVER

        def __init__(self, config: Any, setup: Any) -> None:
            super().__init__(config, setup)
            self.seen = torch.zeros(1)

        @hookimpl
        def mtl_observe(self, report: Any) -> None:
            self.seen.add_(1)

        def state_dict(self) -> dict[str, Any]:
            return {"seen": self.seen}

        def load_state_dict(self, state: Any) -> None:
            self.seen = state["seen"].clone()

    registered(Counter)
    problem = make_problem()
    mtl = MTL(
        {"tasks": problem.tasks, "plugins": ["counter_in_place"]}, shared=problem.model.encoder
    )
    assert _writes_state_in_place(
        mtl, "counter_in_place", lambda: _train_step(mtl, problem.model, problem.x, problem.tasks)
    )


# -- load_state_dict, after_step --------------------------------------------------------------


def test_load_state_dict_refuses_mismatches_and_loads_nothing(problem):
    mtl = MTL({"tasks": problem.tasks, "plugins": ["gradvac", "dwa"]}, shared=problem.model.encoder)
    _backward(mtl, problem)
    good = mtl.state_dict()
    current = copy.deepcopy(mtl.state_dict())

    wrong_shape = copy.deepcopy(good)
    wrong_shape["plugins"]["gradvac"]["targets"] = torch.zeros(2, 2, dtype=torch.float64)
    wrong_dtype = copy.deepcopy(good)
    wrong_dtype["plugins"]["gradvac"]["targets"] = good["plugins"]["gradvac"]["targets"].long()
    missing_key = copy.deepcopy(good)
    del missing_key["plugins"]["dwa"]["count"]
    bad_generator = copy.deepcopy(good)
    bad_generator["generator"] = torch.zeros(3, dtype=torch.uint8)
    for bad, match in [
        (wrong_shape, r"gradvac.*targets.*shape \(1, 3, 3\)"),
        (wrong_dtype, r"gradvac.*dtype"),
        (missing_key, r"dwa.*missing \['count'\]"),
        (bad_generator, r"generator"),
    ]:
        with pytest.raises(InputError, match=match):
            mtl.load_state_dict(bad)
        assert _states_equal(mtl.state_dict(), current)


def test_after_step_refuses_nonfinite_losses_and_changes_nothing(problem):
    mtl = MTL({"tasks": problem.tasks, "plugins": ["famo"]})
    _, losses = problem.losses()
    mtl.backward(losses)
    state = copy.deepcopy(mtl.state_dict())
    with pytest.raises(NonFiniteError, match=r"\['c'\]"):
        mtl.after_step({"a": 1.0, "b": 2.0, "c": float("nan")})
    assert _states_equal(mtl.state_dict(), state)
    mtl.after_step({t: v.detach() for t, v in losses.items()})


# -- 3. errors are early and ours -------------------------------------------------------------


def test_backward_twice_on_one_graph_is_an_input_error(problem):
    mtl = _mtl(problem, "none")
    _, losses = problem.losses()
    mtl.backward(losses)
    with pytest.raises(InputError, match="twice on the same forward"):
        mtl.backward(losses)


def test_a_leaf_loss_is_refused(problem):
    mtl = _mtl(problem, "none")
    _, losses = problem.losses()
    losses["b"] = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    with pytest.raises(InputError, match="'b' is a leaf tensor"):
        mtl.backward(losses)


def test_an_integer_loss_is_refused_for_its_dtype(problem):
    mtl = _mtl(problem, "none")
    _, losses = problem.losses()
    losses["c"] = torch.tensor(3)
    with pytest.raises(InputError, match=r"dtype torch\.int64"):
        mtl.backward(losses)


def test_features_in_another_space_warns_once(problem):
    mtl = _mtl(problem, "params")
    z, losses = problem.losses()
    with pytest.warns(MTLWarning, match="features= is ignored"):
        mtl.backward(losses, features=z)


def test_features_space_without_shared_says_what_shared_would_give(problem):
    mtl = MTL({"tasks": problem.tasks, "plugins": ["pcgrad"]})
    assert mtl.space is Space.FEATURES
    _, losses = problem.losses()
    with pytest.raises(InputError, match=r"shared=model\.encoder"):
        mtl.backward(losses)


def test_a_plugin_bug_is_wrapped_and_changes_nothing(problem, registered):
    class Buggy(Plugin):
        name = "test_buggy"
        family = Family.LOSS_SCALING

        @hookimpl
        def mtl_scale_losses(self, step: Step) -> None:
            raise TypeError("a bug")

    registered(Buggy)
    mtl = MTL({"tasks": problem.tasks, "plugins": ["dwa", "test_buggy"]})
    state = copy.deepcopy(mtl.state_dict())
    with pytest.raises(PluginError, match="TypeError: a bug") as caught:
        _backward(mtl, problem)
    assert isinstance(caught.value, MTLError)
    assert _states_equal(mtl.state_dict(), state)
    assert all(p.grad is None for p in problem.model.parameters())


def test_torch_errors_are_wrapped(problem):
    mtl = MTL(
        {"tasks": problem.tasks},
        backward_fn=lambda total: (_ for _ in ()).throw(RuntimeError("device exploded")),
    )
    with pytest.raises(GradientError, match="device exploded"):
        _backward(mtl, problem)


# -- host syncs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plugins", "space", "expected"),
    [
        ([], "none", 1),
        (["static"], "none", 1),
        (["mgda"], "features", 2),
        (["avgnorm", "pcgrad"], "last_shared", 2),
        (["upgrad"], "params", 2),
    ],
)
def test_host_sync_budget(problem, plugins, space, expected):
    """The pipeline reads the device once per call on the fast path and twice when it takes
    per-task gradients (mtlhooks.hostsync); the same points are synchronisations on CUDA."""
    mtl = MTL(
        {"tasks": problem.tasks, "plugins": plugins, "space": space}, shared=problem.model.encoder
    )
    with hostsync.counting() as syncs:
        _backward(mtl, problem)
    assert syncs[0] == expected
    mtl_exact = _mtl(problem, "params", "materialize", plugins=["pcgrad"])
    with hostsync.counting() as syncs:
        _backward(mtl_exact, problem, sync=False)
    assert syncs[0] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("plugins", "space", "budget"),
    [
        ([], "none", 1),
        (["static"], "none", 1),
        (["mgda"], "features", 2),
        (["avgnorm", "pcgrad"], "last_shared", 2),
        (["upgrad"], "params", 2),
        (["nash_mtl"], "params", 2),
    ],
)
def test_host_sync_budget_on_cuda(make_problem, plugins, space, budget):
    """On CUDA, torch's own sync detector counts the waits of one backward() call: at most
    the pipeline's budget (mtlhooks.hostsync), whatever the solver."""
    import warnings

    problem = make_problem()
    model = problem.model.cuda()
    problem.x = problem.x.cuda()
    mtl = MTL({"tasks": problem.tasks, "plugins": plugins, "space": space}, shared=model.encoder)
    mtl.to("cuda")
    _backward(mtl, problem)  # warm-up: lazy initialisations sync once
    for p in model.parameters():
        p.grad = None
    z, losses = problem.losses()
    features = z if mtl.space is Space.FEATURES else None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            mtl.backward(losses, features=features)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= budget, [str(w.message) for w in syncs]


def test_check_gradients_false_trusts_the_gradients_of_finite_losses(problem):
    """The documented trade: without the gradient check a NaN gradient of a finite loss is
    written (the losses, weights and Gramian are still checked)."""
    mtl = MTL({"tasks": problem.tasks, "check_gradients": False, "on_nonfinite": "skip"})
    handle = _poison(problem.model.heads["a"].weight)
    report = _backward(mtl, problem)
    handle.remove()
    assert not report.skipped
    assert not torch.isfinite(problem.model.heads["a"].weight.grad).all()
    problem.zero_grad()
    _, losses = problem.losses()
    losses["b"] = losses["b"] * float("nan")
    assert mtl.backward(losses).skipped
    assert all(p.grad is None for p in problem.model.parameters())


# -- held gradients (unchecked fast path while accumulating) -----------------------------------


class _RaiseInBackward(torch.autograd.Function):
    """Identity forward; its backward raises once armed (after the heads above it already
    received their gradients)."""

    armed = False

    @staticmethod
    def forward(ctx, z):  # type: ignore[no-untyped-def]
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        if _RaiseInBackward.armed:
            raise _Boom("backward failed on purpose")
        return grad


@pytest.mark.parametrize("config", [{"check_gradients": False}, {"check_gradients": True}])
def test_accumulating_fast_path_matches_plain_accumulation_bitwise(make_problem, config):
    """Space none over three micro-steps and a sync step, on gradients held from before: the
    same .grad bits and the same .grad objects as plain ``loss.backward()`` accumulation (held
    gradients are added at commit with autograd's own ``old += new``)."""
    ours, plain = make_problem(), make_problem()
    mtl = MTL({"tasks": ours.tasks, "plugins": [{"name": "static", "default": 0.3}], **config})
    objects = None
    for micro in range(4):
        _, losses = ours.losses()
        mtl.backward(losses, sync=micro == 3)
        _, reference = plain.losses()
        sum(0.3 * loss for loss in reference.values()).backward()  # type: ignore[union-attr]
        if objects is None:
            objects = [id(p.grad) for p in ours.model.parameters()]
        assert [id(p.grad) for p in ours.model.parameters()] == objects
        for a, b in zip(ours.model.parameters(), plain.model.parameters()):
            assert torch.equal(a.grad, b.grad)


def test_a_failing_backward_puts_held_gradients_back(problem):
    """Unchecked, accumulating: a backward that raises after some leaves were written leaves
    every .grad as it was, the same tensor objects with the same values."""
    mtl = MTL({"tasks": problem.tasks, "check_gradients": False})
    _backward(mtl, problem, sync=False)
    before = _grads(problem.model)
    objects = [id(p.grad) for p in problem.model.parameters()]
    z, outputs = problem.model(problem.x)
    gated = _RaiseInBackward.apply(z)
    heads = {t: (problem.model.heads[t](gated) - 0.5).pow(2).mean() for t in problem.tasks}
    # The heads' weights are reached without crossing the failing node: written first.
    losses = {t: heads[t] + (outputs[t] * 0).sum() for t in problem.tasks}
    _RaiseInBackward.armed = True
    try:
        with pytest.raises(MTLError, match="on purpose"):
            mtl.backward(losses)
    finally:
        _RaiseInBackward.armed = False
    _assert_same_grads(problem.model, before)
    assert [id(p.grad) for p in problem.model.parameters()] == objects


def test_a_failing_observer_puts_held_gradients_back(problem, failing_plugins):
    mtl = MTL({"tasks": problem.tasks, "check_gradients": False, "plugins": ["test_fail_observe"]})
    mtl.plugins["test_fail_observe"].armed = False
    _backward(mtl, problem, sync=False)
    before = _grads(problem.model)
    mtl.plugins["test_fail_observe"].armed = True
    with pytest.raises(MTLError, match="on purpose"):
        _backward(mtl, problem, sync=False)
    _assert_same_grads(problem.model, before)


def test_a_post_accumulate_hook_sees_the_accumulated_gradient(make_problem):
    """A tensor with a post-accumulate-grad hook is not held: its hook sees ``old + new`` in
    .grad during the backward, as with plain autograd."""
    seen: dict[str, list[torch.Tensor]] = {"ours": [], "plain": []}
    problems = {"ours": make_problem(), "plain": make_problem()}
    for key, prob in problems.items():
        weight = prob.model.heads[prob.tasks[0]].weight
        weight.register_post_accumulate_grad_hook(
            lambda p, key=key: seen[key].append(p.grad.clone())
        )
    mtl = MTL({"tasks": problems["ours"].tasks, "check_gradients": False})
    for _ in range(2):
        _, losses = problems["ours"].losses()
        mtl.backward(losses, sync=False)
        _, reference = problems["plain"].losses()
        sum(reference.values()).backward()  # type: ignore[union-attr]
    assert len(seen["ours"]) == len(seen["plain"]) == 2
    for a, b in zip(seen["ours"], seen["plain"]):
        assert torch.equal(a, b)


class _CountBackward(torch.autograd.Function):
    """Identity; counts how often autograd runs its backward."""

    calls = 0

    @staticmethod
    def forward(ctx, z):  # type: ignore[no-untyped-def]
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        _CountBackward.calls += 1
        return grad


@pytest.mark.parametrize("check_gradients", [True, False])
def test_nonfinite_host_losses_skip_the_backward(problem, check_gradients):
    """One process, losses on the host: a non-finite loss is found before the backward, which
    then never runs (nothing to write, nothing to undo); a finite call runs it once."""
    mtl = MTL({"tasks": problem.tasks, "on_nonfinite": "skip", "check_gradients": check_gradients})
    _CountBackward.calls = 0
    z, _ = problem.model(problem.x)
    counted = _CountBackward.apply(z)
    losses = {t: problem.model.heads[t](counted).pow(2).mean() for t in problem.tasks}
    losses[problem.tasks[1]] = losses[problem.tasks[1]] * float("inf")
    assert mtl.backward(losses).skipped
    assert _CountBackward.calls == 0
    assert all(p.grad is None for p in problem.model.parameters())
    z, _ = problem.model(problem.x)
    counted = _CountBackward.apply(z)
    losses = {t: problem.model.heads[t](counted).pow(2).mean() for t in problem.tasks}
    assert not mtl.backward(losses).skipped
    assert _CountBackward.calls == 1


_DIRECT_PLUGINS = [
    [],
    ["static"],
    [{"name": "static", "weights": {"a": 0.3, "b": 2.5}}],
    [{"name": "static", "normalize": True, "default": 0.7}],
]


@pytest.mark.parametrize("check_gradients", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plugins", _DIRECT_PLUGINS, ids=["none", "static", "weights", "norm"])
def test_the_direct_path_is_the_hook_path_bitwise(make_problem, plugins, dtype, check_gradients):
    """Space none without hooks to dispatch takes the direct path: the same .grad bits and
    objects, reports and skips as the general path (forced by dropping the direct path) over
    accumulation micro-steps, a sync step and a skipped non-finite step."""
    problems = [make_problem(), make_problem()]
    mtls = []
    for prob in problems:
        prob.model.to(dtype)
        prob.x = prob.x.to(dtype)
        config = {
            "tasks": prob.tasks,
            "plugins": plugins,
            "check_gradients": check_gradients,
            "on_nonfinite": "skip",
        }
        mtls.append(MTL(config))
    direct, general = mtls
    general._direct = None

    def no_hooks(step: Any) -> Any:
        raise AssertionError("the direct path ran the general path")

    direct._run = no_hooks  # type: ignore[method-assign]
    for call, (sync, poisoned) in enumerate(
        [(False, False), (False, True), (False, False), (True, False), (True, False)]
    ):
        reports = []
        for prob, mtl in zip(problems, mtls):
            _, losses = prob.losses()
            if poisoned:
                losses["b"] = losses["b"] * float("nan")
            reports.append(mtl.backward(losses, sync=sync))
        ours, reference = reports
        assert ours.skipped == reference.skipped == poisoned
        assert ours.index == reference.index == call
        for field in ("losses", "loss_weights", "weights"):
            a, b = getattr(ours, field), getattr(reference, field)
            assert (a is None) == (b is None), field
            if a is None:
                continue
            assert a.dtype == b.dtype, field
            assert torch.equal(a, b) or (poisoned and field == "losses"), field
        for a, b in zip(problems[0].model.parameters(), problems[1].model.parameters()):
            assert (a.grad is None) == (b.grad is None)
            if a.grad is not None:
                assert a.grad.dtype == b.grad.dtype and torch.equal(a.grad, b.grad)


def test_the_direct_path_is_taken_only_without_hooks(problem, registered):
    """An observer, a second plugin, a loss-scaling plugin whose weights change or another
    space keep the general path (its hooks must run)."""
    tasks = problem.tasks
    assert MTL({"tasks": tasks})._direct is not None
    assert MTL({"tasks": tasks, "plugins": ["static"]})._direct is not None
    for plugins in (["static", "static"], ["dwa"], ["static", "gradstats"]):
        assert MTL({"tasks": tasks, "plugins": plugins})._direct is None, plugins
    assert MTL({"tasks": tasks, "space": "features"})._direct is None


@pytest.mark.parametrize("plugins", _DIRECT_PLUGINS[:3], ids=["none", "static", "weights"])
def test_the_direct_path_under_autocast_is_the_hook_path_bitwise(make_problem, plugins):
    """A forward under CPU autocast (bfloat16): the direct path's total runs in the ambient
    autocast, the hook path's outside it; the gradients that reach .grad are the same bits."""
    problems = [make_problem(), make_problem()]
    mtls = [MTL({"tasks": prob.tasks, "plugins": plugins}) for prob in problems]
    mtls[1]._direct = None
    for prob in problems:
        prob.model.float()
        prob.x = prob.x.float()
    for _ in range(2):
        for prob, mtl in zip(problems, mtls):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, losses = prob.losses()
                mtl.backward(losses, sync=False)
    for a, b in zip(problems[0].model.parameters(), problems[1].model.parameters()):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("poisoned", [False, True], ids=["finite", "nan_loss"])
def test_a_weight_the_working_dtype_cannot_hold_on_the_direct_path(make_problem, poisoned):
    """A static weight beyond float32's range with float32 losses: a PluginError and nothing
    written on both paths; with a NaN loss as well, the loss comes first (skipped) on both."""
    results = []
    for direct in (True, False):
        prob = make_problem()
        prob.model.float()
        prob.x = prob.x.float()
        plugins = [{"name": "static", "weights": {"a": 1e39}}]
        mtl = MTL({"tasks": prob.tasks, "plugins": plugins, "on_nonfinite": "skip"})
        if not direct:
            mtl._direct = None
        _, losses = prob.losses()
        if poisoned:
            losses["b"] = losses["b"] * float("nan")
        try:
            results.append(mtl.backward(losses).skipped)
        except PluginError as error:
            results.append(str(error).split(";")[0])
        assert all(p.grad is None for p in prob.model.parameters())
    assert results[0] == results[1]
    assert results[0] is True if poisoned else "non-finite weights" in results[0]
