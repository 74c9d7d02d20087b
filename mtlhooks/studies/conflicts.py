"""Study ``conflicts``: are task gradients more in conflict than two batches of one task?

Elich et al., "Challenging Common Assumptions in Multi-task Learning" (2023), §5: the angle
between task gradients in multi-task learning is no worse than the angle between gradients of
different batches of a single task; what sets MTL apart is the *magnitude* of the gradients
(gradient magnitude similarity well below 1 between tasks, close to 1 between batches).

On each problem (the synthetic regression with task scales σ = 1, 10, 100, and the two-digit
task with two classifications and a sum regression when scikit-learn is installed) the study
trains an equal-weights multi-task model with Adam and, every few steps, splits the batch in two
halves (:meth:`mtlhooks.plugins.gradstats.GradStats.split_batch`) and measures, on all shared
parameters and at equal sample size (half a batch on both sides):

- **tasks**: cosine, conflict rate and magnitude similarity between different tasks on the same
  half;
- **halves, MTL model**: the same between the two halves of one task's batch, in the
  multi-task model;
- **halves, STL model**: the same in a model trained on that task alone (the paper's baseline).

The table gives the means over the first, middle and last third of training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtlhooks.plugin import Space
from mtlhooks.progress import ProgressBar
from mtlhooks.studies.common import (
    Problem,
    Settings,
    digits_available,
    digits_problem,
    fmt,
    format_table,
    regression_problem,
    threads,
    train,
)

PHASES = ("early", "middle", "late")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _upper_values(matrix: dict[str, dict[str, float]]) -> list[float]:
    return [v for row in matrix.values() for v in row.values()]


def _phase_means(series: list[tuple[int, dict[str, float]]]) -> list[dict[str, float]]:
    """Split a series of (step, values) into thirds by position; mean of each value per third."""
    count = len(series)
    result = []
    for k in range(len(PHASES)):
        part = series[k * count // 3 : (k + 1) * count // 3]
        keys = part[0][1] if part else {}
        result.append({key: _mean([values[key] for _, values in part]) for key in keys})
    return result


def study_problem(
    problem: Problem, settings: Settings, every: int, bar: ProgressBar, log_dir: Path | None
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if log_dir is not None:
        slug = problem.name.split()[0]
        options["jsonl"] = str(log_dir / f"conflicts-{slug}.jsonl")
    mtl_run = train(
        problem,
        [],
        settings,
        method="equal weights",
        observe_every=every,
        observer_options=options,
        observe_space=Space.PARAMS,
        split_batch=True,
        bar=bar,
    )
    mtl_series = []
    for record in mtl_run.records:
        split = record.get("split")
        if not split:
            continue
        stl = split["stl"].values()
        mtl_series.append(
            (
                record["step"],
                {
                    "tasks_cosine": _mean(_upper_values(split["mtl"]["cosine"])),
                    "tasks_conflict": split["mtl_conflict_rate"],
                    "tasks_gms": _mean(_upper_values(split["mtl"]["magnitude_similarity"])),
                    "halves_mtl_cosine": _mean([v["cosine"] for v in stl]),
                    "halves_mtl_conflict": split["stl_conflict_rate"],
                    "halves_mtl_gms": _mean([v["magnitude_similarity"] for v in stl]),
                },
            )
        )
    stl_series: dict[int, dict[str, list[float]]] = {}
    for task in problem.names:
        single = train(
            problem.subset([task]),
            [],
            settings,
            method=f"STL {task}",
            observe_every=every,
            observe_space=Space.PARAMS,
            split_batch=True,
            bar=bar,
        )
        for record in single.records:
            if record.get("split"):
                values = record["split"]["stl"][task]
                slot = stl_series.setdefault(record["step"], {"cos": [], "conf": [], "gms": []})
                slot["cos"].append(values["cosine"])
                slot["conf"].append(float(values["cosine"] < 0))
                slot["gms"].append(values["magnitude_similarity"])
    stl_list = [
        (
            step,
            {
                "halves_stl_cosine": _mean(v["cos"]),
                "halves_stl_conflict": _mean(v["conf"]),
                "halves_stl_gms": _mean(v["gms"]),
            },
        )
        for step, v in sorted(stl_series.items())
    ]
    phases = [
        {**a, **b} for a, b in zip(_phase_means(mtl_series), _phase_means(stl_list), strict=True)
    ]
    return {
        "problem": problem.name,
        "steps": settings.steps,
        "every": every,
        "samples_per_half": settings.batch_size // 2,
        "phases": dict(zip(PHASES, phases)),
        "series": {"mtl": mtl_series, "stl": stl_list},
        "mtl_test": mtl_run.test,
    }


def format_result(result: dict[str, Any]) -> str:
    header = [
        "problem",
        "phase",
        "cos tasks",
        "cos halves MTL",
        "cos halves STL",
        "conflict tasks",
        "conflict halves MTL",
        "conflict halves STL",
        "GMS tasks",
        "GMS halves MTL",
        "GMS halves STL",
    ]
    rows = []
    for block in result["problems"]:
        for phase, v in block["phases"].items():
            rows.append(
                [
                    block["problem"],
                    phase,
                    *(
                        fmt(v[f"{who}_{what}"], 2)
                        for what in ("cosine", "conflict", "gms")
                        for who in ("tasks", "halves_mtl", "halves_stl")
                    ),
                ]
            )
    steps = ", ".join(f"{b['problem']}: {b['steps']} steps" for b in result["problems"])
    return (
        f"Equal-weights MTL with Adam ({steps}); gradients of all shared parameters on half "
        "batches; cos = mean cosine, conflict = share of negative inner products, GMS = "
        "gradient magnitude similarity (1: equal norms).\n\n" + format_table(header, rows)
    )


def run(
    *, quick: bool = False, seed: int = 0, progress: bool = True, log_dir: str | None = None
) -> dict[str, Any]:
    """Run the study; ``quick`` trains a few dozen steps (its numbers mean nothing). With
    ``log_dir``, the multi-task runs' gradstats records are written there as JSONL (draw them
    with ``mtlhooks plot``)."""
    directory = None if log_dir is None else Path(log_dir)
    with threads(1):
        if quick:
            setups = [(regression_problem((1.0, 10.0, 100.0), n_train=640, seed=seed), 24, 4)]
            if digits_available():
                setups.append((digits_problem(n_train=400, seed=seed), 12, 4))
        else:
            setups = [(regression_problem((1.0, 10.0, 100.0), seed=seed), 1000, 20)]
            if digits_available():
                setups.append((digits_problem(seed=seed), 600, 20))
        blocks = []
        for problem, steps, every in setups:
            settings = Settings(steps=steps, seed=seed)
            total = (1 + len(problem.tasks)) * steps
            with ProgressBar(total, f"conflicts: {problem.name}", enabled=progress) as bar:
                blocks.append(study_problem(problem, settings, every, bar, directory))
    result: dict[str, Any] = {"study": "conflicts", "quick": quick, "problems": blocks}
    result["table"] = format_result(result)
    return result
