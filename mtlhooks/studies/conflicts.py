"""Study ``conflicts``: are task gradients more in conflict than two batches of one task?

Elich et al., "Challenging Common Assumptions in Multi-task Learning" (2023), §5: the angle
between task gradients in multi-task learning is no worse than the angle between gradients of
different batches of a single task; what sets MTL apart is the *magnitude* of the gradients
(gradient magnitude similarity, GMS, well below 1 between tasks, close to 1 between batches).

Both sides depend on the batch size: two halves of one task's batch agree more the larger the
batch (less sampling noise), while the angle between two tasks' expected gradients does not
shrink with it. So the study reports the curve over batch sizes. On each problem — the
synthetic regression with three standardised tasks, and MultiMNIST (left digit, right digit:
two tasks with naturally equal loss scales; their standardised sum) — trained with equal
weights, which these standardised losses make a sensible weighting, and with Adam, it measures
after 10 % of training and at the end, on fresh training batches of 8 to 512 samples
(:func:`mtlhooks.stats.split_batch_statistics`, all shared parameters, equal sample size on
both sides of every comparison):

- **tasks**: cosine, conflict rate (share of negative inner products) and GMS between the
  gradients of different tasks on the same half-batch, in the multi-task model;
- **halves, STL**: the same between the two halves of one task's batch, in a model trained on
  that task alone (the paper's baseline); **halves, MTL**: likewise in the multi-task model.

Means over repeated batches, then mean ± sd over seeds. The margins of the verdicts are fixed in
docs/reproducing.md before running.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtlhooks.studies import dumps
from mtlhooks.studies.common import (
    Job,
    Measure,
    ProblemSpec,
    Runner,
    StudyError,
    Timer,
    build_problem,
    check_available,
    format_table,
    mean,
    pm,
    provenance,
    seeds_list,
    summary,
    training,
)

PROBLEMS = ("regression", "multimnist")
BATCH_SIZES = (8, 32, 128, 512)
REPEATS = 8
AT = (0.1, 1.0)
PHASES = {0.1: "after 10 %", 1.0: "trained"}

ANGLE_MARGIN = 0.10
"""Tasks conflict "no more" than halves when their mean cosine is at most this much lower and
their conflict rate at most this much higher than between the halves of one task's batch."""
GMS_MARGIN = 0.10
"""Magnitudes "differ" between tasks when their GMS is at least this much below the halves'."""


def parse_problems(text: str | None, quick: bool) -> list[ProblemSpec]:
    keys = PROBLEMS if text is None else tuple(k.strip() for k in text.split(",") if k.strip())
    if text is not None and keys == ("all",):
        keys = PROBLEMS
    unknown = [k for k in keys if k not in PROBLEMS]
    if unknown or not keys:
        raise StudyError(
            f"unknown problems {unknown or [text]} for the conflicts study; choose from "
            f"{', '.join(PROBLEMS)} (both are trained on standardised targets)"
        )
    return [ProblemSpec(k, "equal", quick) for k in dict.fromkeys(keys)]  # type: ignore[arg-type]


def _measure(quick: bool) -> Measure:
    if quick:
        return Measure(at=(1.0,), batch_sizes=(8, 32), repeats=2)
    return Measure(at=AT, batch_sizes=BATCH_SIZES, repeats=REPEATS)


def _phase_stats(
    mtl_runs: list[dict[str, Any]],
    stl_runs: dict[str, list[dict[str, Any]]],
    measure: Measure,
    tasks: tuple[str, ...],
) -> dict[str, Any]:
    """Per phase and batch size: mean ± sd over seeds of the statistics."""

    def at(run: dict[str, Any], phase: float) -> dict[str, Any]:
        return next(m for m in run["measurements"] if m["at"] == phase)["stats"]

    phases = {}
    for phase in measure.at:
        sizes = {}
        for size in measure.batch_sizes:
            key = str(size)
            per_seed: dict[str, list[float]] = {}

            def add(name: str, value: float, into: dict[str, list[float]] = per_seed) -> None:
                into.setdefault(name, []).append(value)

            pairs: dict[str, dict[str, list[float]]] = {}
            for run in mtl_runs:
                stats = at(run, phase)[key]
                add("tasks_cosine", mean([p["cosine"] for p in stats["pairs"].values()]))
                add("tasks_gms", mean([p["gms"] for p in stats["pairs"].values()]))
                add("tasks_conflict", stats["tasks_conflict"])
                add("halves_mtl_cosine", mean([h["cosine"] for h in stats["halves"].values()]))
                add("halves_mtl_gms", mean([h["gms"] for h in stats["halves"].values()]))
                add(
                    "halves_mtl_conflict",
                    mean([h["conflict"] for h in stats["halves"].values()]),
                )
                for pair, values in stats["pairs"].items():
                    slot = pairs.setdefault(pair, {"cosine": [], "gms": []})
                    slot["cosine"].append(values["cosine"])
                    slot["gms"].append(values["gms"])
            for seed_index in range(len(mtl_runs)):
                halves = [at(stl_runs[t][seed_index], phase)[key]["halves"][t] for t in tasks]
                add("halves_stl_cosine", mean([h["cosine"] for h in halves]))
                add("halves_stl_gms", mean([h["gms"] for h in halves]))
                add("halves_stl_conflict", mean([h["conflict"] for h in halves]))
            values = {name: summary(v) for name, v in per_seed.items()}
            values["pairs"] = {
                pair: {k: summary(v) for k, v in slot.items()} for pair, slot in pairs.items()
            }
            values["verdict"] = _verdict(values)
            sizes[key] = values
        phases[PHASES.get(phase, f"after {phase:.0%}")] = sizes
    return phases


def _verdict(values: dict[str, Any]) -> dict[str, bool]:
    cos_tasks = values["tasks_cosine"]["mean"]
    cos_halves = values["halves_stl_cosine"]["mean"]
    conflict_tasks = values["tasks_conflict"]["mean"]
    conflict_halves = values["halves_stl_conflict"]["mean"]
    gms_tasks = values["tasks_gms"]["mean"]
    gms_halves = values["halves_stl_gms"]["mean"]
    return {
        "angles_no_worse": cos_tasks >= cos_halves - ANGLE_MARGIN
        and conflict_tasks <= conflict_halves + ANGLE_MARGIN,
        "magnitudes_differ": gms_tasks <= gms_halves - GMS_MARGIN,
    }


def run(
    *,
    quick: bool = False,
    seeds: int = 3,
    jobs: int = 1,
    progress: bool = True,
    problems: str | None = None,
    log_dir: str | None = None,
) -> dict[str, Any]:
    """Run the study; ``quick`` trains a few dozen steps (its numbers mean nothing). With
    ``log_dir``, every run's measurements are also written there as JSON (one file per
    problem)."""
    specs = parse_problems(problems, quick)
    check_available(specs)
    seed_list = seeds_list(seeds)
    measure = _measure(quick)
    timer = Timer()
    origin = provenance()  # before training: the code that runs
    planned: list[Job] = []
    for spec in specs:
        names = build_problem(spec).names
        for seed in seed_list:
            planned.append(Job(spec, "equal weights", (), training(spec), seed, measure=measure))
            for task in names:
                planned.append(
                    Job(spec, f"STL {task}", (), training(spec), seed, (task,), measure=measure)
                )
    with Runner(jobs, progress=progress) as runner:
        outcomes = runner.run(planned, "conflicts: train and measure")
        timing = timer.stamp(runner)
    blocks = []
    for spec in specs:
        names = build_problem(spec).names
        mine = [o for o in outcomes if o["problem"] == spec.key]
        mtl_runs = [o for o in mine if o["method"] == "equal weights"]
        stl_runs = {t: [o for o in mine if o["method"] == f"STL {t}"] for t in names}
        failed = [o for o in mine if o["failure"]]
        if failed:
            raise StudyError(
                f"conflicts: {len(failed)} run(s) failed on {spec.label}: {failed[0]['failure']}"
            )
        blocks.append(
            {
                "problem": spec.family,
                "label": spec.label,
                "tasks": list(names),
                "settings": training(spec).__dict__,
                "mtl_test": {t: summary([r["test"][t] for r in mtl_runs]) for t in names},
                "stl_test": {t: summary([r["test"][t] for r in stl_runs[t]]) for t in names},
                "phases": _phase_stats(mtl_runs, stl_runs, measure, names),
            }
        )
        if log_dir is not None:
            directory = Path(log_dir)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"conflicts-{spec.family}.json").write_text(
                dumps({"problem": spec.label, "runs": mine}), encoding="utf-8"
            )
    result: dict[str, Any] = {
        "study": "conflicts",
        "quick": quick,
        "seeds": seed_list,
        "jobs": jobs,
        "batch_sizes": list(measure.batch_sizes),
        "repeats": measure.repeats,
        "margins": {"angle": ANGLE_MARGIN, "gms": GMS_MARGIN},
        "problems": blocks,
        **timing,
        "provenance": origin,
    }
    result["table"] = format_result(result)
    return result


def format_result(result: dict[str, Any]) -> str:
    """The study's tables (Markdown), from its JSON."""
    header = [
        "problem",
        "batch (half)",
        "cos tasks",
        "cos halves STL",
        "cos halves MTL",
        "conflict tasks",
        "conflict halves STL",
        "GMS tasks",
        "GMS halves STL",
        "angles no worse",
        "magnitudes differ",
    ]
    parts = []
    phase_names = list(result["problems"][0]["phases"]) if result["problems"] else []
    for phase in reversed(phase_names):
        rows = []
        for block in result["problems"]:
            for size, v in block["phases"][phase].items():
                rows.append(
                    [
                        block["label"],
                        f"{size} ({int(size) // 2})",
                        pm(v["tasks_cosine"], 2),
                        pm(v["halves_stl_cosine"], 2),
                        pm(v["halves_mtl_cosine"], 2),
                        pm(v["tasks_conflict"], 2, sign=False),
                        pm(v["halves_stl_conflict"], 2, sign=False),
                        pm(v["tasks_gms"], 2, sign=False),
                        pm(v["halves_stl_gms"], 2, sign=False),
                        "yes" if v["verdict"]["angles_no_worse"] else "no",
                        "yes" if v["verdict"]["magnitudes_differ"] else "no",
                    ]
                )
        parts.append(
            f"#### Models {phase}: mean ± sd over {len(result['seeds'])} seeds of means over "
            f"{result['repeats']} batches\n\n" + format_table(header, rows)
        )
    pair_rows = []
    if phase_names:
        last = phase_names[-1]
        for block in result["problems"]:
            for size, v in block["phases"][last].items():
                pair_rows.append(
                    [
                        block["label"],
                        size,
                        *(
                            f"{p}: cos {pm(s['cosine'], 2)}, GMS {pm(s['gms'], 2, sign=False)}"
                            for p, s in v["pairs"].items()
                        ),
                    ]
                )
    if pair_rows:
        width = max(len(r) for r in pair_rows)
        pair_rows = [r + [""] * (width - len(r)) for r in pair_rows]
        parts.append(
            "#### Task pairs, trained models\n\n"
            + format_table(
                ["problem", "batch", *(f"pair {k + 1}" for k in range(width - 2))], pair_rows
            )
        )
    return "\n\n".join(parts)
