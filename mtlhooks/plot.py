"""``mtlhooks plot``: pictures of a logged run, and of methods on the two-objective toy.

- ``mtlhooks plot RUN.jsonl -o run.png`` reads the JSONL file of the ``gradstats`` observer and
  draws losses, effective weights, task-gradient norms, cosines, magnitude similarity and the
  conflict rate over the steps (with the half-batch single-task baseline where recorded).
- ``mtlhooks plot toy -o toy.png`` trains several methods from the start points of the CAGrad
  paper (Liu et al., NeurIPS 2021, Fig. 1) on :func:`mtlhooks.problems.toy_losses`, through the
  mtlhooks pipeline itself, and draws the trajectories over the contours of the mean loss, with
  each objective's minimiser and the Pareto set, as in CAGrad's and Nash-MTL's (Navon et al.,
  ICML 2022) figures.

matplotlib is an optional dependency: ``pip install "mtlhooks[plot]"``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mtlhooks import registry
from mtlhooks.core import MTL
from mtlhooks.errors import InputError
from mtlhooks.plugin import Family
from mtlhooks.problems import toy_losses, toy_start_points
from mtlhooks.progress import ProgressBar

TOY_PREFERRED = ("mgda", "pcgrad", "cagrad", "nash_mtl", "upgrad", "imtl_g", "aligned_mtl")
"""Aggregators drawn by default on the toy, when installed (the methods of the papers' figures)."""

TOY_PARETO_X2 = -8.355
"""x₂ of the Pareto set of the toy, drawn as the segment x₁ ∈ [−7, 7] (CAGrad, Fig. 1)."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError('mtlhooks plot needs matplotlib: pip install "mtlhooks[plot]"') from error
    return plt


# -- a logged run ---------------------------------------------------------------------------------


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file written by an observer (one JSON object per line)."""
    records = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{number}: not a JSON object ({error.msg})") from error
    if not records:
        raise InputError(f"{path} holds no record")
    return records


def _series(records: Sequence[dict[str, Any]], *keys: str) -> tuple[list[int], list[float]]:
    """Steps and finite values of ``record[k1][k2]…``, skipping records that lack it."""
    steps, values = [], []
    for record in records:
        value: Any = record
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, float | int) and math.isfinite(value):
            steps.append(record["step"])
            values.append(value)
    return steps, values


def _pairs(records: Sequence[dict[str, Any]], key: str) -> list[tuple[str, str]]:
    for record in records:
        if key in record:
            return [(a, b) for a, row in record[key].items() for b in row]
    return []


def plot_run(records: Sequence[dict[str, Any]], out: str | Path, *, title: str = "") -> Path:
    """Draw one logged run (records of the ``gradstats`` observer) into ``out`` (PNG, SVG, …).

    Six panels over the steps: losses, effective weights, task-gradient norms (solid) and
    weighted norms (dashed), pairwise cosine, pairwise magnitude similarity (with the
    halves of one task's batch, dotted, where ``split_batch`` recorded them), and the
    conflict rate with the norms' max/min ratio.
    """
    plt = _pyplot()
    tasks = list(records[0]["losses"])
    colours = {t: f"C{i}" for i, t in enumerate(tasks)}
    figure, axes = plt.subplots(3, 2, figsize=(12, 10), sharex=True)
    (loss_ax, weight_ax), (norm_ax, conflict_ax), (cos_ax, gms_ax) = axes

    def log_if_positive(ax: Any, drawn: list[float]) -> None:
        if drawn and min(drawn) > 0 and max(drawn) / min(drawn) > 20:
            ax.set_yscale("log")

    for ax, key, label in (
        (loss_ax, "losses", "loss"),
        (weight_ax, "weights", "effective weight (multiplier of ∇Lᵢ)"),
    ):
        drawn: list[float] = []
        for task in tasks:
            steps, values = _series(records, key, task)
            ax.plot(steps, values, color=colours[task], label=task)
            drawn += values
        log_if_positive(ax, drawn)
        ax.set_title(label)
    loss_ax.legend(loc="best", fontsize="small")

    drawn = []
    for task in tasks:
        steps, values = _series(records, "grad_norms", task)
        norm_ax.plot(steps, values, color=colours[task], label=f"‖∇L_{task}‖")
        drawn += values
        steps, values = _series(records, "weighted_grad_norms", task)
        norm_ax.plot(steps, values, color=colours[task], linestyle="--", label=f"w·‖∇L_{task}‖")
        drawn += values
    log_if_positive(norm_ax, drawn)
    norm_ax.set_title("task-gradient norms (dashed: weighted)")
    norm_ax.legend(loc="best", fontsize="x-small", ncol=2)

    steps, values = _series(records, "conflict_rate")
    conflict_ax.plot(steps, values, color="black", label="conflict rate")
    conflict_ax.set_ylim(-0.05, 1.05)
    conflict_ax.set_title("conflict rate (left) and ‖g‖ max/min (right, red)")
    ratio_ax = conflict_ax.twinx()
    steps, values = _series(records, "norm_imbalance", "max_min_ratio")
    ratio_ax.plot(steps, values, color="tab:red")
    log_if_positive(ratio_ax, values)

    for ax, key, panel in (
        (cos_ax, "cosine", "cosine between tasks"),
        (gms_ax, "magnitude_similarity", "gradient magnitude similarity"),
    ):
        for index, (a, b) in enumerate(_pairs(records, key)):
            steps, values = _series(records, key, a, b)
            ax.plot(steps, values, color=f"C{index}", label=f"{a}–{b}")
        for task in tasks:
            steps, values = _series(records, "split", "stl", task, key)
            if steps:
                ax.plot(
                    steps,
                    values,
                    color=colours[task],
                    linestyle=":",
                    marker=".",
                    label=f"halves of {task}'s batch",
                )
        if key == "cosine":
            ax.axhline(0.0, color="grey", linewidth=0.8)
            ax.set_ylim(-1.05, 1.05)
        else:
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.legend(loc="best", fontsize="x-small")
    space = records[0].get("space", "")
    figure.suptitle(title or f"gradient statistics ({space} space)")
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


# -- the two-objective toy --------------------------------------------------------------------


def toy_methods() -> dict[str, list[Any]]:
    """Equal weights and the installed aggregators of :data:`TOY_PREFERRED` (all installed
    aggregators when fewer than two of those are), as name → plugin list."""
    aggregators = [i.name for i in registry.available_plugins() if i.family is Family.AGGREGATOR]
    chosen = [name for name in TOY_PREFERRED if name in aggregators]
    if len(chosen) < 2:
        chosen = aggregators
    return {"equal weights": [], **{name: [name] for name in chosen}}


def toy_trajectories(
    methods: dict[str, list[Any]],
    *,
    starts: torch.Tensor | None = None,
    steps: int = 3500,
    lr: float = 0.01,
    first_scale: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, list[torch.Tensor]]:
    """Train each method from each start point with Adam; return name → one ``(steps+1, 2)``
    trajectory per start point.

    The point x ∈ ℝ² is the shared parameter and the two toy losses the tasks, so each step is
    one ``mtl.backward`` with the method's plugins in space ``params``. The papers use Adam at
    lr 1e-3 for 35k–100k steps; lr 1e-2 for 3,500 steps covers the distance of Nash-MTL's
    budget (Adam moves about lr per coordinate and step) at a tenth of the cost.
    """
    start_points = toy_start_points("cagrad", dtype=torch.float64) if starts is None else starts
    result: dict[str, list[torch.Tensor]] = {}
    with ProgressBar(len(methods) * len(start_points) * steps, "toy", enabled=progress) as bar:
        for name, plugins in methods.items():
            result[name] = []
            for start in start_points:
                x = torch.nn.Parameter(start.clone().double())
                mtl = MTL({"tasks": ["L1", "L2"], "plugins": plugins, "seed": seed}, shared=[x])
                optimizer = torch.optim.Adam([x], lr=lr)
                path = [x.detach().clone()]
                for _ in range(steps):
                    optimizer.zero_grad(set_to_none=True)
                    first, second = toy_losses(x, first_scale=first_scale)
                    mtl.backward({"L1": first, "L2": second})
                    optimizer.step()
                    path.append(x.detach().clone())
                    bar.advance()
                result[name].append(torch.stack(path))
    return result


def plot_toy(
    trajectories: dict[str, list[torch.Tensor]],
    out: str | Path,
    *,
    first_scale: float = 1.0,
) -> Path:
    """One panel per method: contours of (L₁ + L₂)/2 over [−10, 10]², trajectories from their
    start (circle) to their end (cross), the minimisers of L₁ and L₂ and the Pareto set."""
    plt = _pyplot()
    grid = torch.linspace(-10, 10, 301, dtype=torch.float64)
    x1, x2 = torch.meshgrid(grid, grid, indexing="xy")
    with torch.no_grad():
        first, second = toy_losses(torch.stack([x1, x2], dim=-1), first_scale=first_scale)
    mean = ((first + second) / 2).numpy()
    count = len(trajectories)
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 4.0 * rows), squeeze=False, sharex=True, sharey=True
    )
    levels = 24
    for ax, (name, paths) in zip(axes.flat, trajectories.items()):
        ax.contourf(x1.numpy(), x2.numpy(), mean, levels=levels, cmap="Greys", alpha=0.55)
        ax.contour(x1.numpy(), x2.numpy(), mean, levels=levels, colors="grey", linewidths=0.4)
        ax.plot(
            [-7, 7],
            [TOY_PARETO_X2, TOY_PARETO_X2],
            color="tab:green",
            linewidth=3,
            alpha=0.8,
            label="Pareto set",
        )
        ax.plot(
            [7, -7],
            [-8.4345, -8.4345],
            linestyle="none",
            marker="*",
            markersize=11,
            color="gold",
            markeredgecolor="black",
            label="minimisers of L₁, L₂",
        )
        for index, path in enumerate(paths):
            colour = f"C{index + 1}"
            ax.plot(path[:, 0], path[:, 1], color=colour, linewidth=1.6)
            ax.plot(*path[0].tolist(), marker="o", color=colour, markersize=6)
            ax.plot(
                *path[-1].tolist(), marker="X", color=colour, markersize=8, markeredgecolor="black"
            )
        ax.set_title(name)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_aspect("equal")
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize="small")
    scale = "" if first_scale == 1.0 else f", L₁ × {first_scale:g}"
    figure.suptitle(
        f"Two-objective toy (CAGrad, Liu et al. 2021){scale}: Adam trajectories, "
        "start ● end ✕, contours of (L₁ + L₂)/2"
    )
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


# -- command line --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mtlhooks plot``."""
    parser.add_argument("source", help="a JSONL file written by the gradstats observer, or 'toy'")
    parser.add_argument("-o", "--output", required=True, help="image to write (.png, .svg, …)")
    parser.add_argument("--title", default="", help="figure title (JSONL runs)")
    toy = parser.add_argument_group("toy")
    toy.add_argument(
        "--methods",
        default=None,
        help="comma-separated aggregators to draw besides equal weights "
        f"(default: the installed ones of {', '.join(TOY_PREFERRED)})",
    )
    toy.add_argument("--steps", type=int, default=3500, help="Adam steps per start point")
    toy.add_argument("--lr", type=float, default=0.01)
    toy.add_argument(
        "--first-scale",
        type=float,
        default=1.0,
        help="multiply L₁ (Nash-MTL's imbalanced variant uses 0.1)",
    )
    toy.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Carry out ``mtlhooks plot``; print the path written."""
    if args.source == "toy":
        if args.methods is None:
            methods = toy_methods()
        else:
            names = [n.strip() for n in args.methods.split(",") if n.strip()]
            for name in names:
                registry.get_plugin(name)  # unknown names: a ConfigError with suggestions
            methods = {"equal weights": [], **{name: [name] for name in names}}
        trajectories = toy_trajectories(
            methods,
            steps=args.steps,
            lr=args.lr,
            first_scale=args.first_scale,
            progress=not args.no_progress,
        )
        written = plot_toy(trajectories, args.output, first_scale=args.first_scale)
    else:
        if not Path(args.source).is_file():
            raise InputError(f"{args.source!r} is neither 'toy' nor a file")
        written = plot_run(load_records(args.source), args.output, title=args.title)
    print(written)
    return 0
