"""The pipeline end to end: gradients written, ordering, policies, generator, resume."""

from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import torch
from pydantic import Field

import mtlhooks
from mtlhooks import MTL, Family, Need, Plugin, PluginConfig, Space, Step, hookimpl
from mtlhooks.errors import InputError, NonFiniteError, PluginError

ALL_SPACES = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)


class FixedConfig(PluginConfig):
    alphas: list[float] = Field(default_factory=lambda: [1.0, 2.0, 0.5])


class Fixed(Plugin):
    """Test aggregator: fixed α, any space."""

    name = "test_fixed"
    family = Family.AGGREGATOR
    Config = FixedConfig
    spaces = ALL_SPACES
    needs = Need.GRAMIAN

    @hookimpl
    def mtl_aggregate(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, FixedConfig)
        return torch.tensor(self.config.alphas, dtype=step.gramian().dtype)


def assert_grads_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("space", [*ALL_SPACES, Space.NONE])
def test_written_gradients_equal_autograd_reference(problem, registered, space):
    """Every parameter, shared or task-specific, receives Σ αᵢ wᵢ ∇Lᵢ."""
    registered(Fixed)
    plugins = [{"name": "static", "weights": {"a": 3.0, "c": 0.25}}]
    if space is not Space.NONE:
        plugins.append("test_fixed")
    mtl = MTL(
        {"tasks": problem.tasks, "space": space.value, "plugins": plugins},
        shared=problem.model.encoder,
    )
    z, losses = problem.losses()
    report = mtl.backward(losses, features=z)
    alphas = torch.tensor([1.0, 2.0, 0.5]) if space is not Space.NONE else torch.ones(3)
    expected = alphas.double() * torch.tensor([3.0, 1.0, 0.25], dtype=torch.float64)
    torch.testing.assert_close(report.weights, expected)
    assert report.space is space
    assert_grads_equal(problem.grads(), problem.reference_grads(expected))


@pytest.mark.parametrize("space", ALL_SPACES)
def test_gradients_accumulate_like_backward(problem, registered, space):
    registered(Fixed)
    mtl = MTL(
        {"tasks": problem.tasks, "space": space.value, "plugins": ["test_fixed"]},
        shared=problem.model.encoder,
    )
    before = {n: torch.full_like(p, 0.125) for n, p in problem.model.named_parameters()}
    for n, p in problem.model.named_parameters():
        p.grad = before[n].clone()
    z, losses = problem.losses()
    report = mtl.backward(losses, features=z)
    reference = problem.reference_grads(report.weights)
    for name, grad in problem.grads().items():
        torch.testing.assert_close(grad, before[name] + reference[name], rtol=1e-10, atol=1e-12)


def test_gramian_is_that_of_the_space(problem):
    """The report's Gramian is J Jᵀ of the unweighted task gradients in the chosen space."""
    mtl = MTL({"tasks": problem.tasks, "plugins": ["gradstats"]}, shared=problem.model.encoder)
    assert mtl.space is Space.PARAMS
    z, losses = problem.losses()
    report = mtl.backward(losses)
    params = list(problem.model.encoder.parameters())
    rows = []
    clone_losses = problem.losses()[1]
    for t in problem.tasks:
        grads = torch.autograd.grad(clone_losses[t], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jacobian = torch.stack(rows)
    torch.testing.assert_close(report.gramian, jacobian @ jacobian.T)
    del z


def test_task_with_unused_shared_parameter_counts_zero(make_problem, registered):
    """A shared parameter that one task does not reach contributes a zero gradient row."""
    registered(Fixed)
    problem = make_problem()
    extra = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    mtl = MTL(
        {"tasks": problem.tasks, "space": "params", "plugins": ["test_fixed"]},
        shared=[*problem.model.encoder.parameters(), extra],
    )
    z, losses = problem.losses()
    losses = dict(losses, a=losses["a"] * extra)
    report = mtl.backward(losses)
    assert report.gramian[0, 0] > 0
    assert extra.grad is not None and extra.grad != 0
    del z


def test_shared_parameter_without_gradient_is_an_error(problem):
    unused = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    mtl = MTL(
        {"tasks": problem.tasks, "plugins": ["gradstats"]},
        shared=[*problem.model.encoder.parameters(), unused],
    )
    _, losses = problem.losses()
    with pytest.raises(InputError, match=r"shared parameter 'shared\[4\]' receives no gradient"):
        mtl.backward(losses)
    assert all(p.grad is None for p in problem.model.parameters())


class Recorder(Plugin):
    name = "test_recorder"
    family = Family.LOSS_SCALING
    log: ClassVar[list[str]] = []

    @hookimpl
    def mtl_scale_losses(self, step: Step) -> None:
        Recorder.log.append(f"scale:{self.setup.tasks[0]}:{id(self)}")
        step.weights = step.weights * 2.0

    @hookimpl
    def mtl_observe(self, report: mtlhooks.StepReport) -> None:
        Recorder.log.append(f"observe:{id(self)}")


class Watcher(Plugin):
    name = "test_watcher"
    family = Family.OBSERVER

    @hookimpl
    def mtl_observe(self, report: mtlhooks.StepReport) -> None:
        Recorder.log.append(f"watch:{id(self)}")


def test_config_order_is_call_order_and_observers_run_last(problem, registered):
    registered(Recorder)
    registered(Watcher)
    config = {
        "tasks": problem.tasks,
        "plugins": ["test_watcher", "test_recorder", "static", "test_recorder"],
    }
    mtl = MTL(config)
    Recorder.log.clear()
    _, losses = problem.losses()
    mtl.backward(losses)
    keys = list(mtl.plugins)
    assert keys == ["test_watcher", "test_recorder", "static", "test_recorder#3"]
    first, second = id(mtl.plugins["test_recorder"]), id(mtl.plugins["test_recorder#3"])
    watcher = id(mtl.plugins["test_watcher"])
    assert Recorder.log == [
        f"scale:a:{first}",
        f"scale:a:{second}",
        f"observe:{first}",
        f"observe:{second}",
        f"watch:{watcher}",
    ]
    # Each loss-scaling plugin saw the previous one's output: 2 · 1 · 2.
    torch.testing.assert_close(mtl.last_report.weights, torch.full((3,), 4.0, dtype=torch.float64))


def test_tryfirst_is_refused(registered):
    class Pushy(Plugin):
        name = "test_pushy"
        family = Family.LOSS_SCALING

        @hookimpl(tryfirst=True)
        def mtl_scale_losses(self, step: Step) -> None:
            pass

    with pytest.raises(PluginError, match="tryfirst/trylast"):
        registered(Pushy)


def test_wrapper_hook_surrounds_the_call(problem, registered):
    calls: list[str] = []

    class Timer(Plugin):
        name = "test_timer"
        family = Family.OBSERVER

        @hookimpl(wrapper=True)
        def mtl_backward(self, step: Step):
            calls.append(f"before {step.index}")
            report = yield
            calls.append(f"after {report.index}")
            return report

    registered(Timer)
    mtl = MTL({"tasks": problem.tasks, "plugins": ["test_timer"]})
    _, losses = problem.losses()
    mtl.backward(losses)
    assert calls == ["before 0", "after 0"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda ls: {**ls, "d": ls["a"]}, r"unknown: \['d'\]"),
        (lambda ls: {"a": ls["a"], "b": ls["b"]}, r"missing: \['c'\]"),
        (lambda ls: {**ls, "b": ls["b"].expand(2)}, r"task 'b' must be a scalar"),
        (lambda ls: {**ls, "c": ls["c"].detach()}, r"task 'c' has no graph"),
        (lambda ls: {**ls, "a": 1.0}, r"task 'a' is a float"),
        (lambda ls: list(ls.values()), "mapping task name"),
    ],
)
def test_bad_losses_are_named(problem, mutate, message):
    mtl = MTL({"tasks": problem.tasks}, shared=problem.model.encoder)
    _, losses = problem.losses()
    with pytest.raises(InputError, match=message):
        mtl.backward(mutate(losses))
    assert all(p.grad is None for p in problem.model.parameters())


def test_features_space_needs_features(problem):
    mtl = MTL({"tasks": problem.tasks, "space": "features", "plugins": ["mgda"]})
    _, losses = problem.losses()
    with pytest.raises(InputError, match="features=z"):
        mtl.backward(losses)


@pytest.mark.parametrize("space", ["none", "params", "features"])
def test_nonfinite_raise_writes_nothing(problem, space):
    plugins = [] if space == "none" else ["mgda"]
    mtl = MTL(
        {"tasks": problem.tasks, "space": space, "plugins": plugins},
        shared=problem.model.encoder,
    )
    z, losses = problem.losses()
    losses["b"] = losses["b"] * float("nan")
    with pytest.raises(NonFiniteError, match=r"task\(s\) \['b'\]"):
        mtl.backward(losses, features=z)
    assert all(p.grad is None for p in problem.model.parameters())


def test_nonfinite_gradient_is_caught_before_writing(problem):
    mtl = MTL(
        {"tasks": problem.tasks, "plugins": ["mgda"], "on_nonfinite": "skip"},
        shared=problem.model.encoder,
    )
    z, losses = problem.losses()
    z.register_hook(lambda g: g * float("inf"))
    report = mtl.backward(losses)
    assert report.skipped and "Gramian" in report.reason
    assert all(p.grad is None for p in problem.model.parameters())


def test_nonfinite_skip_reports_and_keeps_state(problem, registered):
    seen: list[bool] = []

    class Spy(Plugin):
        name = "test_spy"
        family = Family.OBSERVER

        @hookimpl
        def mtl_observe(self, report: mtlhooks.StepReport) -> None:
            seen.append(report.skipped)

    registered(Spy)
    mtl = MTL(
        {"tasks": problem.tasks, "plugins": ["avgnorm", "test_spy"], "on_nonfinite": "skip"},
        shared=problem.model.encoder,
    )
    state = copy.deepcopy(mtl.state_dict())
    _, losses = problem.losses()
    losses["a"] = losses["a"] + float("inf")
    report = mtl.backward(losses)
    assert report.skipped and "['a']" in report.reason
    assert seen == [True]
    assert all(p.grad is None for p in problem.model.parameters())
    assert mtl.state_dict()["plugins"] == state["plugins"]


def test_aggregator_returning_nan_is_refused(problem, registered):
    class Broken(Fixed):
        name = "test_broken"

        @hookimpl
        def mtl_aggregate(self, step: Step) -> torch.Tensor:
            return torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64)

    registered(Broken)
    mtl = MTL({"tasks": problem.tasks, "plugins": ["test_broken"]}, shared=problem.model.encoder)
    _, losses = problem.losses()
    with pytest.raises(PluginError, match="non-finite weights"):
        mtl.backward(losses)
    assert all(p.grad is None for p in problem.model.parameters())


def test_weights_that_require_grad_are_refused(problem, registered):
    class Leaky(Plugin):
        name = "test_leaky"
        family = Family.LOSS_SCALING

        def __init__(self, config, setup):
            super().__init__(config, setup)
            self.s = torch.nn.Parameter(torch.zeros(3))

        @hookimpl
        def mtl_scale_losses(self, step: Step) -> None:
            step.weights = step.weights * self.s.exp()

    registered(Leaky)
    mtl = MTL({"tasks": problem.tasks, "plugins": ["test_leaky"]})
    _, losses = problem.losses()
    with pytest.raises(PluginError, match="add_auxiliary_loss"):
        mtl.backward(losses)


def test_auxiliary_loss_reaches_plugin_parameters(problem, registered):
    """A learnable plugin (here a minimal uncertainty weighting) trains through the auxiliary
    loss while the model gets the detached weights."""

    class Learnable(Plugin):
        name = "test_learnable"
        family = Family.LOSS_SCALING

        def __init__(self, config, setup):
            super().__init__(config, setup)
            self.s = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))

        def parameters(self):
            yield self.s

        @hookimpl
        def mtl_scale_losses(self, step: Step) -> None:
            precision = torch.exp(-self.s)
            step.add_auxiliary_loss((precision * step.losses + self.s).sum() / 2)
            step.weights = step.weights * precision.detach() / 2

    registered(Learnable)
    mtl = MTL({"tasks": problem.tasks, "plugins": ["test_learnable"]})
    assert list(mtl.parameters()) == [mtl.plugins["test_learnable"].s]
    _, losses = problem.losses()
    values = torch.stack([losses[t].detach() for t in problem.tasks])
    mtl.backward(losses)
    torch.testing.assert_close(mtl.plugins["test_learnable"].s.grad, (1 - values) / 2)
    assert_grads_equal(problem.grads(), problem.reference_grads(torch.full((3,), 0.5)))


def test_random_choices_come_from_the_seeded_generator(make_problem):
    def run(seed: int) -> list[torch.Tensor]:
        problem = make_problem()
        mtl = MTL(
            {"tasks": problem.tasks, "plugins": ["pcgrad"], "seed": seed},
            shared=problem.model.encoder,
        )
        torch.manual_seed(1234 + seed)  # global RNG must not matter
        weights = []
        for _ in range(4):
            _, losses = problem.losses()
            weights.append(mtl.backward(losses).weights)
        return weights

    first, again = run(0), run(0)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_observer_every_n_takes_fast_path_in_between(problem):
    mtl = MTL(
        {"tasks": problem.tasks, "plugins": [{"name": "gradstats", "every": 3}]},
        shared=problem.model.encoder,
    )
    spaces = []
    for _ in range(4):
        _, losses = problem.losses()
        spaces.append(mtl.backward(losses).space)
    assert spaces == [Space.PARAMS, Space.NONE, Space.NONE, Space.PARAMS]


def _train(mtl: MTL, problem, steps: int) -> None:
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        z, losses = problem.losses()
        mtl.backward(losses, features=z)
        optimizer.step()


@pytest.mark.parametrize(
    "plugins", [["avgnorm", "pcgrad"], [{"name": "avgnorm", "ema": 0.9}, "mgda"]]
)
def test_resume_continues_bit_for_bit(make_problem, plugins):
    config = {"tasks": ("a", "b", "c"), "plugins": plugins, "seed": 7}
    straight = make_problem()
    mtl = MTL(config, shared=straight.model.encoder)
    _train(mtl, straight, 6)

    resumed = make_problem()
    first = MTL(config, shared=resumed.model.encoder)
    _train(first, resumed, 3)
    saved = copy.deepcopy(first.state_dict())
    second = MTL(config, shared=resumed.model.encoder)
    second.load_state_dict(saved)
    _train(second, resumed, 3)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_other_pipelines(problem):
    mtl = MTL({"tasks": problem.tasks, "plugins": ["avgnorm"]}, shared=problem.model.encoder)
    other = MTL({"tasks": problem.tasks, "plugins": ["pcgrad"]}, shared=problem.model.encoder)
    with pytest.raises(InputError, match="plugins"):
        other.load_state_dict(mtl.state_dict())


def test_report_is_read_only(problem):
    mtl = MTL({"tasks": problem.tasks, "plugins": ["avgnorm"]}, shared=problem.model.encoder)
    _, losses = problem.losses()
    report = mtl.backward(losses)
    with pytest.raises(AttributeError):
        report.weights = None  # type: ignore[misc]
    assert set(report.timings) >= {"task_gradients", "aggregate", "write", "total"}
    assert report.as_dict()["space"] == "last_shared"


def test_skipped_gradient_step_leaves_loss_scaling_state_unchanged(problem, registered):
    """Loss scaling runs on the device before the Gramian is checked (one host copy carries
    both); a step found non-finite afterwards puts the plugin's state back."""

    class Counting(Plugin):
        name = "test_counting"
        family = Family.LOSS_SCALING

        def __init__(self, config, setup):
            super().__init__(config, setup)
            self.calls: list[int] = []

        @hookimpl
        def mtl_scale_losses(self, step: Step) -> None:
            self.calls.append(step.index)

        def state_dict(self):
            return {"calls": list(self.calls)}

        def load_state_dict(self, state):
            self.calls = list(state["calls"])

    registered(Counting)
    mtl = MTL(
        {"tasks": problem.tasks, "plugins": ["test_counting", "mgda"], "on_nonfinite": "skip"},
        shared=problem.model.encoder,
    )
    z, losses = problem.losses()
    z.register_hook(lambda g: g * float("inf"))
    assert mtl.backward(losses).skipped
    assert mtl.plugins["test_counting"].calls == []
    _, losses = problem.losses()
    assert not mtl.backward(losses).skipped
    assert mtl.plugins["test_counting"].calls == [1]


def test_observers_do_not_change_the_space(problem):
    shared = problem.model.encoder
    alone = MTL({"tasks": problem.tasks, "plugins": ["avgnorm"]}, shared=shared)
    watched = MTL({"tasks": problem.tasks, "plugins": ["avgnorm", "gradstats"]}, shared=shared)
    assert alone.space is watched.space is Space.LAST_SHARED
    only_observer = MTL({"tasks": problem.tasks, "plugins": ["gradstats"]}, shared=shared)
    assert only_observer.space is Space.PARAMS


def test_to_moves_plugin_parameters_in_place(problem, registered):
    class Holder(Plugin):
        name = "test_holder"
        family = Family.LOSS_SCALING

        def __init__(self, config, setup):
            super().__init__(config, setup)
            self.s = torch.nn.Parameter(torch.zeros(3))

        def parameters(self):
            yield self.s

    registered(Holder)
    mtl = MTL({"tasks": problem.tasks, "plugins": ["test_holder"]})
    parameter = next(mtl.parameters())
    assert mtl.to(dtype=torch.float64) is mtl
    assert next(mtl.parameters()) is parameter and parameter.dtype == torch.float64
