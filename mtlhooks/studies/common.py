"""What the studies share: problems with per-task metrics, one training loop, Δm, tables.

Δm (Maninis et al., "Attentive Single-Tasking of Multiple Tasks", CVPR 2019; the form used by
Liu et al., "End-to-End Multi-Task Learning with Attention", CVPR 2019, and most later work) is
the mean relative change of each task's metric against its single-task baseline, signed so that
a positive value is a *drop* in performance::

    Δm = (100 / T) · Σᵢ (−1)^{hᵢ} · (Mᵢ − Bᵢ) / Bᵢ        [%]

with Mᵢ the multi-task model's metric on task i, Bᵢ the single-task model's, hᵢ = 1 when
higher is better (accuracy) and 0 when lower is better (error). Lower Δm is better; Δm < 0
means the multi-task model beats the single-task models on average. The per-task term
``(−1)^{hᵢ}·(Mᵢ − Bᵢ)/Bᵢ`` is that task's performance drop.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlhooks import registry
from mtlhooks.backends import MemoryBackend
from mtlhooks.core import MTL
from mtlhooks.errors import ConfigError, MTLError
from mtlhooks.plugin import Family, Space
from mtlhooks.plugins.gradstats import GradStats
from mtlhooks.problems import (
    MultiTaskCNN,
    MultiTaskMLP,
    make_multidigits,
    make_regression,
)
from mtlhooks.progress import ProgressBar

Kind = Literal["regression", "classification"]


@dataclass(frozen=True)
class TaskSpec:
    """One task: its loss (MSE or cross-entropy), output size and metric."""

    name: str
    kind: Kind
    out_dim: int
    scale: float = 1.0
    """Regression: the metric is RMSE / scale, so tasks of any scale read alike."""

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "classification"

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "classification" else "RMSE/σ"


class StudyModel(Protocol):
    """What the studies need of a model: ``model(x) -> (z, {task: output})``, a shared trunk
    ``encoder`` and its ``last_shared_layer`` (as :class:`mtlhooks.problems.MultiTaskMLP`)."""

    training: bool

    @property
    def encoder(self) -> nn.Module: ...

    @property
    def last_shared_layer(self) -> nn.Module: ...

    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def train(self, mode: bool = True) -> nn.Module: ...


@dataclass(frozen=True, eq=False)
class Problem:
    """Train / validation / test tensors, the tasks, and a model factory."""

    name: str
    tasks: tuple[TaskSpec, ...]
    x: Mapping[str, Tensor]
    """split name ("train", "val", "test") → inputs."""
    y: Mapping[str, Mapping[str, Tensor]]
    """split name → task name → targets."""
    make_model: Callable[[Mapping[str, int], int], StudyModel]
    """(task name → output size, seed) → a model returning ``(z, {task: output})`` with
    ``.encoder`` and ``.last_shared_layer``."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def subset(self, names: Sequence[str]) -> Problem:
        """The same problem restricted to some tasks (single-task baselines)."""
        tasks = tuple(t for t in self.tasks if t.name in names)
        y = {split: {t.name: ys[t.name] for t in tasks} for split, ys in self.y.items()}
        return replace(self, tasks=tasks, y=y)

    def batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """Endless shuffled training batches of exactly ``batch_size`` samples."""
        count = self.x["train"].shape[0]
        while True:
            order = torch.randperm(count, generator=generator)
            for start in range(0, count - batch_size + 1, batch_size):
                index = order[start : start + batch_size]
                yield self.x["train"][index], {t: self.y["train"][t][index] for t in self.names}

    def per_sample_losses(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Task → per-sample losses, shape ``(n,)``: squared error averaged over the output
        dimensions (regression) or cross-entropy (classification)."""
        losses = {}
        for task in self.tasks:
            out, target = outputs[task.name], targets[task.name]
            if task.kind == "classification":
                losses[task.name] = F.cross_entropy(out, target, reduction="none")
            else:
                losses[task.name] = (out - target).pow(2).reshape(out.shape[0], -1).mean(1)
        return losses

    def metrics(self, model: StudyModel, split: str) -> dict[str, float]:
        """Per-task metric on a split: accuracy, or RMSE divided by the task's scale."""
        was_training = model.training
        model.train(False)
        try:
            with torch.no_grad():
                _, outputs = model(self.x[split])
        finally:
            model.train(was_training)
        result = {}
        for task in self.tasks:
            out, target = outputs[task.name], self.y[split][task.name]
            if task.kind == "classification":
                result[task.name] = float((out.argmax(-1) == target).double().mean())
            else:
                rmse = float((out - target).double().pow(2).mean().sqrt())
                result[task.name] = rmse / task.scale
        return result


def _split_train(
    x: Tensor, ys: Mapping[str, Tensor], fraction: float
) -> tuple[tuple[Tensor, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]:
    cut = x.shape[0] - max(1, int(fraction * x.shape[0]))
    train = (x[:cut], {t: y[:cut] for t, y in ys.items()})
    val = (x[cut:], {t: y[cut:] for t, y in ys.items()})
    return train, val


def regression_problem(
    sigmas: Sequence[float], *, n_train: int = 2048, seed: int = 0, width: int = 64
) -> Problem:
    """The GradNorm-style synthetic regression (:func:`mtlhooks.problems.make_regression`),
    inputs 32, outputs 8 per task, task scales ``sigmas``; a fifth of the training samples is
    held out for validation; an MLP with a 4-layer trunk of ``width``."""
    data = make_regression(
        sigmas=sigmas, n_train=n_train, n_test=512, in_dim=32, out_dim=8, seed=seed
    )
    (x_train, y_train), (x_val, y_val) = _split_train(data.x_train, data.y_train, 0.2)
    tasks = tuple(
        TaskSpec(name, "regression", data.task_out_dims[name], data.scales[name])
        for name in data.task_names
    )

    def make_model(out_dims: Mapping[str, int], model_seed: int) -> StudyModel:
        return MultiTaskMLP(32, width, out_dims, seed=model_seed)

    return Problem(
        name=f"regression σ={'/'.join(f'{s:g}' for s in sigmas)}",
        tasks=tasks,
        x={"train": x_train, "val": x_val, "test": data.x_test},
        y={"train": y_train, "val": y_val, "test": data.y_test},
        make_model=make_model,
    )


def digits_available() -> bool:
    """Whether scikit-learn (for the bundled ``digits``) is installed."""
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


def digits_problem(*, n_train: int = 3000, seed: int = 0) -> Problem:
    """Two-digit images (:func:`mtlhooks.problems.make_multidigits`, scikit-learn's digits)
    with three tasks of different kinds: classify the left digit, classify the right digit, and
    regress their sum (0–18, squared error on the raw value: its loss starts two orders of
    magnitude above the cross-entropies, the natural imbalance of mixed task types such as
    segmentation + depth). A small CNN with a shared trunk."""
    data = make_multidigits(n_train=n_train, n_test=1000, seed=seed)

    def with_sum(ys: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {**ys, "sum": (ys["left"] + ys["right"]).double().float().unsqueeze(1)}

    y_train_all = with_sum(data.y_train)
    (x_train, y_train), (x_val, y_val) = _split_train(data.x_train, y_train_all, 0.2)
    sum_scale = float(y_train["sum"].std())
    tasks = (
        TaskSpec("left", "classification", 10),
        TaskSpec("right", "classification", 10),
        TaskSpec("sum", "regression", 1, sum_scale),
    )

    def make_model(out_dims: Mapping[str, int], model_seed: int) -> StudyModel:
        return MultiTaskCNN(out_dims, channels=(8, 16), hidden=48, seed=model_seed)

    return Problem(
        name="digits left/right/sum",
        tasks=tasks,
        x={"train": x_train, "val": x_val, "test": data.x_test},
        y={"train": y_train, "val": y_val, "test": with_sum(data.y_test)},
        make_model=make_model,
    )


# -- training ------------------------------------------------------------------------------


@contextlib.contextmanager
def threads(count: int = 1) -> Iterator[None]:
    """Run with ``count`` intra-op threads, then restore. The studies' models are tiny: one
    thread is as fast as two on an idle machine, and many times faster on a busy one (two
    threads contending with other processes for two cores cost ~30× per step, measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Settings:
    """How every run of a study is trained."""

    steps: int
    batch_size: int = 64
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 3e-3
    momentum: float = 0.9
    seed: int = 0


@dataclass
class Run:
    """The outcome of one training run."""

    method: str
    plugins: list[Any]
    space: str
    val: dict[str, float]
    test: dict[str, float]
    seconds: float
    records: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None
    """Why training stopped early (a non-finite loss under SGD, a solver error); the metrics
    are then those of the model where it stopped, or NaN."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "plugins": self.plugins,
            "space": self.space,
            "val": self.val,
            "test": self.test,
            "seconds": round(self.seconds, 3),
            "failure": self.failure,
        }


def own_space(problem: Problem, plugins: list[Any]) -> Space:
    """The gradient space a config resolves to by itself (observers change the choice when
    added, so studies resolve the method's space first and then force it)."""
    model = problem.make_model({t.name: t.out_dim for t in problem.tasks}, 0)
    mtl = MTL(
        {"tasks": problem.names, "plugins": plugins},
        shared=model.encoder,
        last_shared=model.last_shared_layer,
    )
    return mtl.space


def train(
    problem: Problem,
    plugins: list[Any],
    settings: Settings,
    *,
    method: str = "",
    multipliers: Mapping[str, float] | None = None,
    observe_every: int | None = None,
    observer_options: Mapping[str, Any] | None = None,
    split_batch: bool = False,
    observe_space: Space | None = None,
    bar: ProgressBar | None = None,
) -> Run:
    """Train a fresh model (seeded: every method starts from the same weights and sees the same
    batches) with ``plugins`` for ``settings.steps`` steps.

    :param multipliers: multiply task losses by these constants before ``mtl.backward`` (the
        Adam study's loss scaling, invisible to the plugins).
    :param observe_every: add the ``gradstats`` observer, recording every N steps; its records
        land in :attr:`Run.records`. The method's own gradient space is kept (space ``none``
        methods are observed in ``last_shared``) unless ``observe_space`` forces one.
    :param split_batch: also record the half-batch single-task baseline at recorded steps.
    """
    names = problem.names
    out_dims = {t.name: t.out_dim for t in problem.tasks}
    model = problem.make_model(out_dims, settings.seed)
    config: dict[str, Any] = {"tasks": names, "plugins": list(plugins), "seed": settings.seed}
    memory = MemoryBackend()
    space = None
    try:
        if observe_every is not None:
            space = own_space(problem, list(plugins))
            if observe_space is None:
                observe_space = space if space is not Space.NONE else Space.LAST_SHARED
            config["space"] = observe_space.value
            config["plugins"].append(
                {"name": "gradstats", "every": observe_every, **(observer_options or {})}
            )
        mtl = MTL(config, shared=model.encoder, last_shared=model.last_shared_layer)
    except ConfigError as error:
        # a method the problem cannot have (Krum needs ≥ 4 tasks): an untrained row
        val, test = problem.metrics(model, "val"), problem.metrics(model, "test")
        reason = f"not applicable: {str(error).splitlines()[0][:160]}"
        return Run(method, list(plugins), "—", val, test, 0.0, [], reason)
    observer = mtl.plugins.get("gradstats")
    if isinstance(observer, GradStats):
        observer.attach(memory)
    parameters = [*model.parameters(), *mtl.parameters()]
    optimizer: torch.optim.Optimizer
    if settings.optimizer == "adam":
        optimizer = torch.optim.Adam(parameters, lr=settings.lr)
    else:
        optimizer = torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum)
    scale = dict(multipliers or {})
    failure = None
    start = time.perf_counter()
    batches = problem.batches(settings.batch_size, torch.Generator().manual_seed(settings.seed))
    done = 0
    try:
        for x, targets in batches:
            if done == settings.steps:
                break
            optimizer.zero_grad(set_to_none=True)
            z, outputs = model(x)
            per_sample = problem.per_sample_losses(outputs, targets)
            if split_batch and isinstance(observer, GradStats):
                observer.split_batch(per_sample, model.encoder.parameters())
            losses = {t: per_sample[t].mean() * scale.get(t, 1.0) for t in names}
            mtl.backward(losses, features=z)
            optimizer.step()
            done += 1
            if bar is not None:
                bar.advance()
    except MTLError as error:
        failure = f"step {done}: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    finally:
        mtl.close()
        if bar is not None:
            bar.advance(settings.steps - done)
    seconds = time.perf_counter() - start
    val, test = problem.metrics(model, "val"), problem.metrics(model, "test")
    if failure is None and not all(math.isfinite(v) for v in [*val.values(), *test.values()]):
        failure = "non-finite predictions"
    # Report the space the method chose on its own, not the one forced for observing it.
    shown = (space or mtl.space).value
    return Run(method, list(plugins), shown, val, test, seconds, memory.records, failure)


# -- scores ----------------------------------------------------------------------------------


def drops(
    metrics: Mapping[str, float], baseline: Mapping[str, float], tasks: Sequence[TaskSpec]
) -> dict[str, float]:
    """Per-task performance drop against the single-task baseline, in percent (positive: worse
    than single-task); see the module docstring."""
    result = {}
    for task in tasks:
        sign = -1.0 if task.higher_is_better else 1.0
        base = baseline[task.name]
        result[task.name] = 100.0 * sign * (metrics[task.name] - base) / base
    return result


def delta_m(
    metrics: Mapping[str, float], baseline: Mapping[str, float], tasks: Sequence[TaskSpec]
) -> float:
    """Δm in percent (lower is better); NaN when a metric is not finite."""
    values = list(drops(metrics, baseline, tasks).values())
    return sum(values) / len(values)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation coefficient (NaN for fewer than 3 points or a constant input)."""
    if len(x) != len(y) or len(x) < 3:
        return math.nan
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on ranks, ties averaged)."""
    return pearson(_ranks(x), _ranks(y))


def aggregators() -> list[str]:
    """Names of every installed aggregator plugin (the catalog may grow)."""
    return [i.name for i in registry.available_plugins() if i.family is Family.AGGREGATOR]


# -- output -------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (aligned, readable as plain text too)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
