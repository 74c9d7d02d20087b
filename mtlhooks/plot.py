"""``mtlhooks plot``: pictures of a logged run, and of methods on the two-objective toy.

- ``mtlhooks plot RUN.jsonl -o run.png`` reads the JSONL file of the ``gradstats`` observer and
  draws losses, effective weights, task-gradient norms, cosines, magnitude similarity and the
  conflict rate over the steps (with the half-batch single-task baseline where recorded). A last
  line cut by a crash is skipped with a warning.
- ``mtlhooks plot toy -o toy.png`` trains several methods from the start points of the CAGrad
  paper (Liu et al., NeurIPS 2021, Fig. 1) on :func:`mtlhooks.problems.toy_losses`, through the
  mtlhooks pipeline itself, and draws the trajectories over the contours of the mean loss, with
  each objective's minimiser and the Pareto set, as in CAGrad's and Nash-MTL's (Navon et al.,
  ICML 2022) figures. A trajectory ends where it becomes Pareto-stationary (no update improves
  both objectives, so the methods have converged; some, such as Nash-MTL, have no defined update
  there) or after ``--steps`` steps; the figure marks which.

The output format is the extension of ``-o`` (``.png``, ``.svg``, ``.pdf``, …), checked before
any work is done. matplotlib is an optional dependency: ``pip install "mtlhooks[plot]"``.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtlhooks import registry
from mtlhooks.core import MTL
from mtlhooks.errors import ConfigError, InputError, OutputError, SolverError
from mtlhooks.plugin import Family
from mtlhooks.problems import toy_losses, toy_start_points
from mtlhooks.progress import ProgressBar

TOY_PREFERRED = ("mgda", "pcgrad", "cagrad", "nash_mtl", "upgrad", "imtl_g", "aligned_mtl")
"""Aggregators drawn by default on the toy, when installed (the methods of the papers' figures)."""

TOY_PARETO_X2 = -8.355
"""x₂ of the Pareto set of the toy, drawn as the segment x₁ ∈ [−7, 7] (CAGrad, Fig. 1)."""

TOY_STEPS = 1000
TOY_LR = 0.035
"""Default Adam budget on the toy. The papers run lr 1e-3 for 35k–100k steps; Adam moves
about ``lr`` per coordinate and step, so 1,000 steps of 0.035 cover the distance of Nash-MTL's
budget (35 units) at a thirty-fifth of the cost."""

TOY_STATIONARY_TOLERANCE = 1e-2
"""A point of the toy is taken as Pareto-stationary when the smallest convex combination of
the two *unit* task gradients has a norm below this: cos(θ/2) < 0.01, i.e. the gradients are
within 1.15° of opposite (or one of them vanishes). No direction then improves both losses to
first order; the trajectory ends there."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError('mtlhooks plot needs matplotlib: pip install "mtlhooks[plot]"') from None
    return plt


def image_formats() -> dict[str, str]:
    """Extension → description of the image formats matplotlib can write here."""
    plt = _pyplot()
    figure = plt.figure()
    try:
        formats: dict[str, str] = figure.canvas.get_supported_filetypes()
    finally:
        plt.close(figure)
    return formats


def check_output(path: str | Path) -> Path:
    """The image path ``-o`` names, checked before any work: a known extension, not a
    directory, in a directory that can be created. :class:`InputError` otherwise."""
    out = Path(path)
    if out.is_dir():
        raise InputError(f"-o {path} is a directory; give a file name such as {out / 'plot.png'}")
    formats = image_formats()
    extension = out.suffix.lower().removeprefix(".")
    if extension not in formats:
        listed = ", ".join(f".{e}" for e in sorted(formats))
        if not out.suffix:
            raise InputError(f"-o {path} has no extension to tell the image format; use {listed}")
        raise InputError(
            f"-o {path}: {out.suffix!r} is not an image format matplotlib writes; use {listed}"
        )
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"-o {path}: {parent} is a file, not a directory")
            break
    return out


def _save(figure: Any, out: str | Path) -> Path:
    plt = _pyplot()
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=110)
    except OSError as error:
        raise OutputError(f"cannot write {out}: {error.strerror or error}") from None
    except (ValueError, RuntimeError) as error:  # matplotlib: unknown format, missing writer
        raise InputError(f"cannot draw {out}: {error}") from None
    finally:
        plt.close(figure)
    return out


# -- a logged run ---------------------------------------------------------------------------------


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file written by an observer (one JSON object per line). A last
    line that does not parse (cut by a crash) is skipped with a warning; any other bad line is
    an :class:`InputError`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {path}: {error}") from None
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    records: list[dict[str, Any]] = []
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record (a JSON object with a 'step')")
        except ValueError as error:
            message = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
            if position == len(numbered) - 1 and records:
                warnings.warn(
                    f"{path}:{number}: skipped the last line, which does not parse ({message}): "
                    "cut by a crash?",
                    stacklevel=2,
                )
                break
            raise InputError(f"{path}:{number}: not a JSON record ({message})") from None
        records.append(record)
    if not records:
        raise InputError(f"{path} holds no record")
    if "losses" not in records[0] or not isinstance(records[0]["losses"], dict):
        raise InputError(f"{path}: these are not gradstats records (no 'losses' mapping)")
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
        if isinstance(record.get(key), dict):
            return [(a, b) for a, row in record[key].items() for b in row]
    return []


PAIR_COLOURS = (
    "#393b79",
    "#7b4173",
    "#637939",
    "#843c39",
    "#6b6ecf",
    "#e7ba52",
    "#d6616b",
    "#b5cf6b",
    "#8c6d31",
    "#ce6dbd",
)
"""Colours of task pairs: darker tones apart from the tasks' own (matplotlib's C0–C9), so that
a pair's line is never mistaken for a task's."""

MAX_PAIR_LINES = len(PAIR_COLOURS)
"""Beyond this many pairs, the pairwise panels draw the mean and the min–max band."""

MAX_LEGEND_TASKS = 12


def _task_colour(index: int) -> str:
    return f"C{index % 10}"


def _draw_tasks(ax: Any, records: Sequence[dict[str, Any]], key: str, tasks: list[str]) -> bool:
    """One line per task of ``record[key][task]``; tasks with identical series share one line
    labelled with all their names (so that no drawn line hides another). Whether any was
    drawn."""
    groups: dict[tuple[tuple[int, ...], tuple[float, ...]], list[str]] = {}
    for task in tasks:
        steps, values = _series(records, key, task)
        if steps:
            groups.setdefault((tuple(steps), tuple(values)), []).append(task)
    for (drawn_steps, drawn_values), members in groups.items():
        label = " = ".join(members) if len(members) <= 4 else f"{len(members)} tasks (equal)"
        ax.plot(drawn_steps, drawn_values, color=_task_colour(tasks.index(members[0])), label=label)
    return bool(groups)


def _log_scale_if_positive(ax: Any, records: Sequence[dict[str, Any]], key: str) -> None:
    """Log scale when every value of ``record[key]`` is positive: decided by sign alone, so
    that one kind of run always gets the same scale."""
    values = [
        v
        for r in records
        for v in (r.get(key) or {}).values()
        if isinstance(v, float | int) and math.isfinite(v)
    ]
    if values and min(values) > 0:
        ax.set_yscale("log", nonpositive="mask")


def _legend(ax: Any, count: int, **options: Any) -> None:
    if count <= MAX_LEGEND_TASKS and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="x-small", **options)


def _note(ax: Any, text: str) -> None:
    ax.text(
        0.5,
        0.25,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize="small",
        color="dimgrey",
        bbox={"facecolor": "white", "edgecolor": "lightgrey", "boxstyle": "round"},
    )


def _pairwise_panel(
    ax: Any, records: Sequence[dict[str, Any]], key: str, tasks: list[str], stat: str
) -> None:
    """Pairs of tasks (solid, in pair colours; mean and min–max band beyond
    :data:`MAX_PAIR_LINES` pairs) and the halves of each task's batch (dotted, task colours)."""
    pairs = _pairs(records, key)
    if len(pairs) <= MAX_PAIR_LINES:
        for index, (a, b) in enumerate(pairs):
            steps, values = _series(records, key, a, b)
            ax.plot(steps, values, color=PAIR_COLOURS[index], label=f"{a} – {b}")
    elif pairs:
        steps, lows, means, highs = [], [], [], []
        for record in records:
            values = [record[key][a][b] for a, b in pairs if key in record]
            finite = [v for v in values if isinstance(v, float | int) and math.isfinite(v)]
            if finite:
                steps.append(record["step"])
                lows.append(min(finite))
                means.append(sum(finite) / len(finite))
                highs.append(max(finite))
        ax.fill_between(steps, lows, highs, color=PAIR_COLOURS[0], alpha=0.2, label="min–max")
        ax.plot(steps, means, color=PAIR_COLOURS[0], label=f"mean over {len(pairs)} pairs")
    for index, task in enumerate(tasks):
        steps, values = _series(records, "split", "stl", task, stat)
        if steps:
            ax.plot(
                steps,
                values,
                color=_task_colour(index),
                linestyle=":",
                marker=".",
                label=f"halves of {task}'s batch",
            )
    if not pairs:
        _note(ax, "no pairwise statistics recorded (one task, or only skipped steps)")


def plot_run(records: Sequence[dict[str, Any]], out: str | Path, *, title: str = "") -> Path:
    """Draw one logged run (records of the ``gradstats`` observer) into ``out`` (PNG, SVG, …).

    Six panels over the steps: losses; effective weights (the loss weights, with a note, when
    a coordinate-wise aggregator leaves no per-task multiplier); task-gradient norms (solid)
    and weighted norms (dashed), always on a log scale; the conflict rate with the norms'
    max/min ratio; pairwise cosine; pairwise magnitude similarity. Pairs are drawn in their own
    colours, the halves of one task's batch (``split_batch``) dotted in the task's colour.
    """
    plt = _pyplot()
    tasks = list(records[0]["losses"])
    figure, axes = plt.subplots(3, 2, figsize=(12, 10), sharex=True)
    (loss_ax, weight_ax), (norm_ax, conflict_ax), (cos_ax, gms_ax) = axes

    _draw_tasks(loss_ax, records, "losses", tasks)
    _log_scale_if_positive(loss_ax, records, "losses")
    loss_ax.set_title("task losses")
    loss_ax.set_ylabel("loss Lᵢ")
    _legend(loss_ax, len(tasks))

    if _draw_tasks(weight_ax, records, "weights", tasks):
        weight_ax.set_title("effective weights (multiplier of ∇Lᵢ in the update)")
        _log_scale_if_positive(weight_ax, records, "weights")
    elif _draw_tasks(weight_ax, records, "loss_weights", tasks):
        weight_ax.set_title("loss weights (no effective weights recorded)")
        _log_scale_if_positive(weight_ax, records, "loss_weights")
        _note(
            weight_ax,
            "The aggregator combined the task gradients coordinate-wise\n"
            "(e.g. GradDrop): no per-task multiplier of ∇Lᵢ exists.\n"
            "Shown: the weights after loss scaling.",
        )
    else:
        weight_ax.set_title("effective weights")
        _note(weight_ax, "no weights recorded")
    weight_ax.set_ylabel("weight")
    _legend(weight_ax, len(tasks))

    same = True
    for index, task in enumerate(tasks):
        steps, values = _series(records, "grad_norms", task)
        norm_ax.plot(steps, values, color=_task_colour(index), label=task)
        weighted_steps, weighted = _series(records, "weighted_grad_norms", task)
        if (weighted_steps, weighted) != (steps, values) and weighted_steps:
            same = False
            norm_ax.plot(weighted_steps, weighted, color=_task_colour(index), linestyle="--")
    # Zero norms (a weight of 0, say) leave gaps rather than lines plunging off the axis.
    norm_ax.set_yscale("log", nonpositive="mask")
    norm_ax.set_ylabel("‖∇Lᵢ‖ (log scale)")
    if any("weighted_grad_norms" in r for r in records):
        norm_ax.set_title(
            "task-gradient norms (weighted equal to unweighted)"
            if same
            else "task-gradient norms (solid) and weighted norms wᵢ‖∇Lᵢ‖ (dashed)"
        )
    else:
        norm_ax.set_title("task-gradient norms")
    _legend(norm_ax, len(tasks), ncol=2)

    steps, values = _series(records, "conflict_rate")
    (conflicts,) = conflict_ax.plot(steps, values, color="black", label="conflict rate")
    conflict_ax.set_ylim(-0.05, 1.05)
    conflict_ax.set_ylabel("share of pairs with ⟨∇Lᵢ, ∇Lⱼ⟩ < 0")
    conflict_ax.set_title("conflict rate and norm imbalance")
    ratio_ax = conflict_ax.twinx()
    steps, values = _series(records, "norm_imbalance", "max_min_ratio")
    (ratio,) = ratio_ax.plot(steps, values, color="tab:red", label="max/min ‖∇Lᵢ‖ (right)")
    ratio_ax.set_yscale("log", nonpositive="mask")
    ratio_ax.set_ylabel("max ‖∇Lᵢ‖ / min ‖∇Lᵢ‖ (log scale)", color="tab:red")
    conflict_ax.legend(handles=[conflicts, ratio], loc="best", fontsize="x-small")

    _pairwise_panel(cos_ax, records, "cosine", tasks, "cosine")
    cos_ax.axhline(0.0, color="grey", linewidth=0.8)
    cos_ax.set_ylim(-1.05, 1.05)
    cos_ax.set_title("cosine between task gradients")
    cos_ax.set_ylabel("cos(∇Lᵢ, ∇Lⱼ)")
    _pairwise_panel(gms_ax, records, "magnitude_similarity", tasks, "magnitude_similarity")
    gms_ax.set_ylim(-0.05, 1.05)
    gms_ax.set_title("gradient magnitude similarity (1: equal norms)")
    gms_ax.set_ylabel("2‖∇Lᵢ‖‖∇Lⱼ‖ / (‖∇Lᵢ‖² + ‖∇Lⱼ‖²)")
    for ax in (cos_ax, gms_ax):
        ax.set_xlabel("step (backward() call)")
        _legend(ax, len(tasks))
    space = records[0].get("space", "")
    suffix = "" if len(tasks) <= MAX_LEGEND_TASKS else f", {len(tasks)} tasks (colours repeat)"
    figure.suptitle(title or f"gradient statistics ({space} space{suffix})")
    figure.tight_layout()
    return _save(figure, out)


# -- the two-objective toy --------------------------------------------------------------------


def toy_methods() -> dict[str, list[Any]]:
    """Equal weights and the installed aggregators of :data:`TOY_PREFERRED` (all installed
    aggregators when fewer than two of those are), as name → plugin list."""
    aggregators = [
        i.name
        for i in registry.available_plugins()
        if i.family is Family.AGGREGATOR
        and not i.cls.__module__.startswith("mtlhooks.integrations.")
    ]
    chosen = [name for name in TOY_PREFERRED if name in aggregators]
    if len(chosen) < 2:
        chosen = aggregators
    return {"equal weights": [], **{name: [name] for name in chosen}}


def pareto_stationarity(first: Tensor, second: Tensor) -> float:
    """Distance from Pareto stationarity of a point with task gradients ``first`` and
    ``second``: the norm of the smallest convex combination of the two *unit* gradients,
    cos(θ/2) for an angle θ between them (0 when they are opposite or one vanishes, 1 when
    they agree). Unit gradients make it independent of the losses' scales."""
    units = []
    for gradient in (first, second):
        norm = gradient.norm()
        if norm == 0:
            return 0.0
        units.append(gradient / norm)
    return float((units[0] + units[1]).norm() / 2)


def toy_stationarity(point: Tensor, *, first_scale: float = 1.0) -> float:
    """:func:`pareto_stationarity` of the toy at ``point`` (shape ``(2,)``)."""
    x = point.detach().clone().double().requires_grad_(True)
    return pareto_stationarity(*_toy_gradients(x, *toy_losses(x, first_scale=first_scale)))


def _toy_gradients(x: Tensor, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of the two toy losses at ``x``, keeping the graph for the step."""
    return (
        torch.autograd.grad(first, x, retain_graph=True)[0],
        torch.autograd.grad(second, x, retain_graph=True)[0],
    )


def toy_trajectories(
    methods: dict[str, list[Any]],
    *,
    starts: Tensor | None = None,
    steps: int = TOY_STEPS,
    lr: float = TOY_LR,
    first_scale: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    tolerance: float = TOY_STATIONARY_TOLERANCE,
) -> dict[str, list[Tensor]]:
    """Train each method from each start point with Adam; return name → one trajectory per
    start point, of shape ``(k + 1, 2)`` after ``k ≤ steps`` steps.

    The point x ∈ ℝ² is the shared parameter and the two toy losses the tasks, so each step is
    one ``mtl.backward`` with the method's plugins in space ``params``. Before each step the
    point is tested for Pareto stationarity (:func:`pareto_stationarity` below ``tolerance``):
    there the methods have converged (and some, Nash-MTL among them, have no defined update),
    so the trajectory ends at that point, before the method is asked for an update.
    :func:`toy_stationarity` of a trajectory's last point tells which way it ended.
    """
    start_points = toy_start_points("cagrad", dtype=torch.float64) if starts is None else starts
    result: dict[str, list[Tensor]] = {}
    with ProgressBar(len(methods) * len(start_points) * steps, "toy", enabled=progress) as bar:
        for name, plugins in methods.items():
            result[name] = []
            for start in start_points:
                x = torch.nn.Parameter(start.clone().double())
                mtl = MTL({"tasks": ["L1", "L2"], "plugins": plugins, "seed": seed}, shared=[x])
                optimizer = torch.optim.Adam([x], lr=lr)
                path = [x.detach().clone()]
                for done in range(steps):
                    optimizer.zero_grad(set_to_none=True)
                    first, second = toy_losses(x, first_scale=first_scale)
                    stationarity = pareto_stationarity(*_toy_gradients(x, first, second))
                    if stationarity < tolerance:
                        bar.advance(steps - done)
                        break
                    try:
                        mtl.backward({"L1": first, "L2": second})
                    except SolverError as error:
                        raise SolverError(
                            f"toy: {name} from {start.tolist()} at step {done}, x = "
                            f"{x.detach().tolist()} (Pareto stationarity {stationarity:.2g}): "
                            f"{error}"
                        ) from error
                    optimizer.step()
                    path.append(x.detach().clone())
                    bar.advance()
                result[name].append(torch.stack(path))
    return result


def plot_toy(
    trajectories: dict[str, list[Tensor]],
    out: str | Path,
    *,
    first_scale: float = 1.0,
    tolerance: float = TOY_STATIONARY_TOLERANCE,
) -> Path:
    """One panel per method: contours of (L₁ + L₂)/2 over [−10, 10]², trajectories from their
    start (circle) to their end: a square where the end is Pareto-stationary (the trajectory
    converged), a cross where the step budget ran out; the minimisers of L₁ and L₂ and the
    Pareto set."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    grid = torch.linspace(-10, 10, 301, dtype=torch.float64)
    x1, x2 = torch.meshgrid(grid, grid, indexing="xy")
    with torch.no_grad():
        first, second = toy_losses(torch.stack([x1, x2], dim=-1), first_scale=first_scale)
    mean = ((first + second) / 2).numpy()
    count = len(trajectories)
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 4.2 * rows), squeeze=False, sharex=True, sharey=True
    )
    levels = 24
    for ax, (name, paths) in zip(axes.flat, trajectories.items()):
        ax.contourf(x1.numpy(), x2.numpy(), mean, levels=levels, cmap="Greys", alpha=0.55)
        ax.contour(x1.numpy(), x2.numpy(), mean, levels=levels, colors="grey", linewidths=0.4)
        ax.plot([-7, 7], [TOY_PARETO_X2, TOY_PARETO_X2], color="tab:green", linewidth=3, alpha=0.8)
        ax.plot(
            [7, -7],
            [-8.4345, -8.4345],
            linestyle="none",
            marker="*",
            markersize=11,
            color="gold",
            markeredgecolor="black",
        )
        converged = 0
        for index, path in enumerate(paths):
            colour = f"C{index + 1}"
            stationary = toy_stationarity(path[-1], first_scale=first_scale) < tolerance
            converged += stationary
            ax.plot(path[:, 0], path[:, 1], color=colour, linewidth=1.6)
            ax.plot(*path[0].tolist(), marker="o", color=colour, markersize=6)
            ax.plot(
                *path[-1].tolist(),
                marker="s" if stationary else "X",
                color=colour,
                markersize=7 if stationary else 8,
                markeredgecolor="black",
            )
        ax.set_title(f"{name}: {converged} of {len(paths)} converged", fontsize=10)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_aspect("equal")
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    for column in range(columns):
        # The lowest panel drawn in each column carries the x axis (the last row may be short).
        lowest = max(row for row in range(rows) if row * columns + column < count)
        axes[lowest, column].xaxis.set_tick_params(labelbottom=True)
        axes[lowest, column].set_xlabel("x₁")
    for ax in axes[:, 0]:
        ax.set_ylabel("x₂")
    key = [
        Line2D([], [], color="tab:green", linewidth=3, alpha=0.8, label="Pareto set"),
        Line2D(
            [],
            [],
            linestyle="none",
            marker="*",
            markersize=11,
            color="gold",
            markeredgecolor="black",
            label="minimisers of L₁ and L₂",
        ),
        Line2D([], [], linestyle="none", marker="o", color="grey", label="start"),
        Line2D(
            [],
            [],
            linestyle="none",
            marker="s",
            color="grey",
            markeredgecolor="black",
            label="end: Pareto-stationary (converged)",
        ),
        Line2D(
            [],
            [],
            linestyle="none",
            marker="X",
            color="grey",
            markersize=8,
            markeredgecolor="black",
            label="end: step budget spent",
        ),
    ]
    figure.legend(handles=key, loc="lower center", ncol=3, fontsize="small")
    scale = "" if first_scale == 1.0 else f", L₁ × {first_scale:g}"
    longest = max((len(path) - 1 for paths in trajectories.values() for path in paths), default=0)
    figure.suptitle(
        f"Two-objective toy (CAGrad, Liu et al. 2021){scale}: Adam trajectories over the "
        "contours of (L₁ + L₂)/2\nA trajectory ends when it converges to a Pareto-stationary "
        f"point (unit task gradients within {math.degrees(2 * math.asin(tolerance)):.2g}° of "
        f"opposite) or when its steps are spent (longest: {longest})",
        fontsize=11,
    )
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(figure, out)


# -- command line --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mtlhooks plot``."""
    from mtlhooks.cli import positive_float, positive_int

    parser.add_argument("source", help="a JSONL file written by the gradstats observer, or 'toy'")
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="image to write; its extension (.png, .svg, .pdf, …) sets the format",
    )
    parser.add_argument("--title", default="", help="figure title (JSONL runs)")
    toy = parser.add_argument_group("toy")
    toy.add_argument(
        "--methods",
        default=None,
        help="comma-separated aggregators to draw besides equal weights "
        f"(default: the installed ones of {', '.join(TOY_PREFERRED)})",
    )
    toy.add_argument(
        "--steps",
        type=positive_int,
        default=TOY_STEPS,
        help="most Adam steps per start point (a trajectory ends earlier where it is "
        "Pareto-stationary)",
    )
    toy.add_argument("--lr", type=positive_float, default=TOY_LR, help="Adam learning rate")
    toy.add_argument(
        "--first-scale",
        type=positive_float,
        default=1.0,
        help="multiply L₁ (Nash-MTL's imbalanced variant uses 0.1)",
    )
    toy.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Carry out ``mtlhooks plot``; print the path written."""
    out = check_output(args.output)
    if args.source == "toy":
        if args.methods is None:
            methods = toy_methods()
        else:
            names = [n.strip() for n in args.methods.split(",") if n.strip()]
            for name in names:
                info = registry.get_plugin(name)  # unknown names: a ConfigError with suggestions
                if info.family is not Family.AGGREGATOR:
                    raise InputError(
                        f"--methods: {name!r} is a {info.family.value} plugin, not an aggregator"
                    )
            methods = {"equal weights": [], **{name: [name] for name in names}}
        trajectories = toy_trajectories(
            methods,
            steps=args.steps,
            lr=args.lr,
            first_scale=args.first_scale,
            progress=not args.no_progress,
        )
        written = plot_toy(trajectories, out, first_scale=args.first_scale)
    else:
        source = Path(args.source)
        if not source.is_file():
            raise InputError(f"{args.source!r} is neither 'toy' nor a file")
        written = plot_run(load_records(source), out, title=args.title)
    print(written)
    return 0
