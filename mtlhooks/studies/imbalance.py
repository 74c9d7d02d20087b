"""Study ``imbalance``: does scaling losses by gradient norms match a grid search of weights?

Guo et al., "Revisit the Imbalance Optimization in Multi-task Learning: An Experimental
Analysis" (2025) report (i) that a task's performance drop against its single-task model
correlates strongly with the norm of its gradient, and (ii) that scaling every task's loss by
its gradient norm (AvgNorm) performs as well as an expensive grid search of loss weights.

On each problem (the synthetic regression with task scales σ = 1, 10, 100, and the two-digit
image task with a sum-regression task next to two classifications, when scikit-learn is
installed) this study trains, from the same initial weights and batches:

- one single-task model per task (the baselines Bᵢ of Δm);
- equal weights; every static weighting of a log-spaced grid, the best chosen by Δm on a
  held-out validation split (never on the test split); ``avgnorm``; and every installed
  aggregator (gradient surgery) with its default options;

then reports each method's per-task test metric, Δm, and the imbalance of the task-gradient
norms it produced: ``w‖g‖ max/min``, the geometric mean over recorded steps of the max/min
ratio of the *weighted* last-shared-layer gradient norms |wᵢ|·‖gᵢ‖ (the share of the trunk's
update each task actually gets). Finally the correlation, over every (method, task), between
log(|wᵢ|‖gᵢ‖ / mean over tasks) and the task's performance drop: the paper's claim predicts it
clearly negative (a task with a small share of the update drops most).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from mtlhooks.errors import ConfigError
from mtlhooks.progress import ProgressBar
from mtlhooks.studies.common import (
    Problem,
    Run,
    Settings,
    aggregators,
    delta_m,
    digits_available,
    digits_problem,
    drops,
    fmt,
    format_table,
    own_space,
    pearson,
    regression_problem,
    spearman,
    threads,
    train,
)

GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
"""Weights tried for every task but the first (whose weight is 1) in the grid search."""


def _last_layer_prefix(problem: Problem) -> str:
    model = problem.make_model({t.name: t.out_dim for t in problem.tasks}, 0)
    encoder, last = model.encoder, model.last_shared_layer
    names = {id(module): name for name, module in encoder.named_modules()}
    return names[id(last)] + "."


def _weighted_norms(record: dict[str, Any], tasks: tuple[str, ...]) -> list[float] | None:
    """|wᵢ|·‖gᵢ‖ on the last shared layer (the ``last`` group in space params, the whole space
    otherwise)."""
    block = record.get("groups", {}).get("last", record)
    if "grad_norms" not in block or "weights" not in record:
        return None
    return [abs(record["weights"][t]) * block["grad_norms"][t] for t in tasks]


def _norm_summary(run: Run, tasks: tuple[str, ...]) -> dict[str, Any]:
    """Mean weighted norm per task and the geometric-mean max/min ratio over the records."""
    rows = [n for r in run.records if (n := _weighted_norms(r, tasks)) is not None]
    rows = [n for n in rows if min(n) > 0]
    if not rows:
        return {"mean_weighted_norms": None, "max_min_ratio": math.nan}
    means = [sum(column) / len(rows) for column in zip(*rows)]
    log_ratio = sum(math.log(max(n) / min(n)) for n in rows) / len(rows)
    return {"mean_weighted_norms": dict(zip(tasks, means)), "max_min_ratio": math.exp(log_ratio)}


def _methods() -> dict[str, list[Any]]:
    return {"avgnorm": ["avgnorm"], **{name: [name] for name in aggregators()}}


def study_problem(
    problem: Problem, settings: Settings, grid: tuple[float, ...], every: int, bar: ProgressBar
) -> dict[str, Any]:
    """Every method on one problem; a JSON-ready dict with rows and correlations."""
    tasks = problem.names
    prefix = _last_layer_prefix(problem)

    def observed(method: str, plugins: list[Any]) -> Run:
        try:
            params = own_space(problem, plugins).value == "params"
        except ConfigError:
            params = False  # train() reports the method as not applicable to this problem
        options = {"groups": {"last": [prefix]}} if params else None
        return train(
            problem,
            plugins,
            settings,
            method=method,
            observe_every=every,
            observer_options=options,
            bar=bar,
        )

    baseline_runs = [
        train(problem.subset([t]), [], settings, method=f"STL {t}", bar=bar) for t in tasks
    ]
    baseline = {
        split: {t: getattr(r, split)[t] for t, r in zip(tasks, baseline_runs)}
        for split in ("val", "test")
    }

    runs: list[Run] = [observed("equal weights", [])]
    grid_runs = []
    for values in itertools.product(grid, repeat=len(tasks) - 1):
        weights = dict(zip(tasks, (1.0, *values)))
        plugins = [{"name": "static", "weights": weights}]
        grid_runs.append(observed("grid", plugins))
    finite = [r for r in grid_runs if r.failure is None]
    best = min(finite, key=lambda r: delta_m(r.val, baseline["val"], problem.tasks))
    best.method = f"grid search (best of {len(grid_runs)})"
    runs.append(best)
    for name, plugins in _methods().items():
        runs.append(observed(name, plugins))

    rows = []
    points: list[tuple[float, float]] = []
    method_points: list[tuple[float, float]] = []
    for run in runs:
        norms = _norm_summary(run, tasks)
        task_drops = drops(run.test, baseline["test"], problem.tasks)
        score = delta_m(run.test, baseline["test"], problem.tasks)
        rows.append(
            {
                **run.as_dict(),
                "drops": task_drops,
                "delta_m": score,
                "val_delta_m": delta_m(run.val, baseline["val"], problem.tasks),
                **norms,
            }
        )
        shares = norms["mean_weighted_norms"]
        if shares is not None and run.failure is None and math.isfinite(score):
            mean_share = sum(shares.values()) / len(shares)
            points += [(math.log(shares[t] / mean_share), task_drops[t]) for t in tasks]
            spread = max(task_drops.values()) - min(task_drops.values())
            method_points.append((math.log(norms["max_min_ratio"]), spread))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = [p[0] for p in method_points], [p[1] for p in method_points]
    return {
        "problem": problem.name,
        "tasks": [
            {"name": t.name, "metric": t.metric, "higher_is_better": t.higher_is_better}
            for t in problem.tasks
        ],
        "settings": settings.__dict__,
        "baseline": baseline,
        "grid": list(grid),
        "grid_weights": best.plugins[0]["weights"],
        "rows": rows,
        "correlation": {
            "points": len(points),
            "spearman_share_vs_drop": spearman(xs, ys),
            "pearson_share_vs_drop": pearson(xs, ys),
            "spearman_ratio_vs_drop_spread": spearman(mx, my),
        },
    }


def format_result(result: dict[str, Any]) -> str:
    """The tables of :func:`run`, one per problem."""
    parts = []
    for block in result["problems"]:
        tasks = [t["name"] for t in block["tasks"]]
        arrows = {t["name"]: "↑" if t["higher_is_better"] else "↓" for t in block["tasks"]}
        header = [
            "method",
            "space",
            *(f"{t} {arrows[t]}" for t in tasks),
            "Δm % ↓",
            "w‖g‖ max/min",
        ]
        rows = [
            ["single-task", "-", *(fmt(block["baseline"]["test"][t]) for t in tasks), "0.0", "-"]
        ]
        for row in block["rows"]:
            name = row["method"] + (" (failed)" if row["failure"] else "")
            rows.append(
                [
                    name,
                    row["space"],
                    *(fmt(row["test"][t]) for t in tasks),
                    fmt(row["delta_m"], 1),
                    fmt(row["max_min_ratio"], 1),
                ]
            )
        weights = ", ".join(f"{t}={w:g}" for t, w in block["grid_weights"].items())
        corr = block["correlation"]
        metric = ", ".join(f"{t['name']}: {t['metric']}" for t in block["tasks"])
        parts.append(
            f"### {block['problem']} ({block['settings']['steps']} steps, "
            f"{block['settings']['optimizer']})\n\nTest metrics ({metric}).\n\n"
            + format_table(header, rows)
            + f"\n\nGrid search chose {weights} (by validation Δm).\n"
            f"Correlation over {corr['points']} (method, task) points between "
            f"log(task's weighted gradient norm / mean) and its performance drop: "
            f"Spearman {fmt(corr['spearman_share_vs_drop'], 2)}, "
            f"Pearson {fmt(corr['pearson_share_vs_drop'], 2)}. Across methods, "
            f"log(w‖g‖ max/min) vs the spread of the drops: Spearman "
            f"{fmt(corr['spearman_ratio_vs_drop_spread'], 2)}."
        )
    return "\n\n".join(parts)


def run(*, quick: bool = False, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run the study; ``quick`` is a few-second smoke version (two regression tasks, a 2-point
    grid, a few dozen steps; its numbers mean nothing)."""
    setups: list[tuple[Problem, int, tuple[float, ...], int]]
    with threads(1):
        if quick:
            setups = [
                (regression_problem((1.0, 100.0), n_train=640, seed=seed), 30, (1.0, 1e-2), 5)
            ]
            if digits_available():
                setups.append((digits_problem(n_train=400, seed=seed), 15, (1.0, 1e-2), 5))
        else:
            setups = [(regression_problem((1.0, 10.0, 100.0), seed=seed), 800, GRID, 10)]
            if digits_available():
                setups.append((digits_problem(seed=seed), 400, (1.0, 1e-1, 1e-2, 1e-3), 10))
        results = []
        for problem, steps, grid, every in setups:
            settings = Settings(steps=steps, seed=seed)
            count = len(problem.tasks) + 1 + len(grid) ** (len(problem.tasks) - 1)
            count += len(_methods())
            with ProgressBar(count * steps, f"imbalance: {problem.name}", enabled=progress) as bar:
                results.append(study_problem(problem, settings, grid, every, bar))
    result: dict[str, Any] = {"study": "imbalance", "quick": quick, "problems": results}
    result["table"] = format_result(result)
    return result
