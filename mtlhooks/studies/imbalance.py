"""Study ``imbalance``: does scaling losses by gradient norms match a grid search of weights?

Guo et al., "Revisit the Imbalance Optimization in Multi-task Learning: An Experimental
Analysis" (2025) report (i) a strong correlation between a task's performance drop against its
single-task model and the norm of its gradient, and (ii) that scaling every task's loss by its
gradient norm (AvgNorm) performs comparably to an expensive grid search of loss weights.

Protocol (the margins are fixed in docs/reproducing.md before running):

- **Problems and regimes** (:class:`mtlhooks.studies.common.ProblemSpec`): the synthetic
  regression with three tasks whose imbalance is made either by *loss scale* (standardised
  targets, losses × 1/10/100) or by *target scale* (targets × 1/√10/10); MultiMNIST (left digit,
  right digit, their sum) with the raw sum 0–18 (``target``) or the standardised sum whose loss
  is multiplied by Var(sum) (``loss``). The data are fixed; a seed sets the initial weights and
  the batch order, the same for every method.
- **Baselines**: one single-task model per task and seed, on standardised targets (so the
  metric is in the same units in every regime), checked for convergence and against the
  trivial predictor.
- **Methods**: equal weights; AvgNorm; uncertainty weighting; the aggregators of the seed
  papers' comparisons (``--methods all``: every installed aggregator and norm-balancing plugin).
  FairGrad's default α = 1 solves Nash-MTL's equations, so ``all`` runs it with α = 2.
- **Grid search** of static weights wᵢ = 4^kᵢ for tasks 2..T with w₁ = 1 (under Adam a common
  factor on all weights changes nothing, so this spans every weighting up to scale; it can up- or
  down-weight any task against any other). Base 4 is not aligned with the designed factors
  (10, 100, √10, Var(sum)). It starts at kᵢ ∈ {−2…2}, is searched on the validation split of
  one seed (the *search seed*, 0), widened by one step on any axis where the winner sits on the
  edge (up to |kᵢ| = 7) until the winner is interior, and its winner is then trained with every
  seed. The test split is never used to choose.
- **Scores**: per-task change against the single-task model of the same seed and Δm in the seed
  paper's sign (higher is better; each term clipped to ±100 %, see
  :mod:`mtlhooks.studies.common`); mean ± sd over seeds; paired per-seed differences of each
  method against the grid and against equal weights.
- **Correlation**, within the grid runs (only the loss weights vary): Spearman's ρ between a
  task's share of the update on the last shared layer, log(|wᵢ|‖gᵢ‖ / meanⱼ |wⱼ|‖gⱼ‖) averaged
  over training, and its change, with a 95 % bootstrap interval resampling runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

from mtlhooks import registry
from mtlhooks.plugin import Family
from mtlhooks.studies.common import (
    Job,
    ProblemSpec,
    Runner,
    StudyError,
    TaskSpec,
    Timer,
    bootstrap_spearman,
    build_problem,
    changes,
    check_available,
    delta_m,
    delta_m_unclipped,
    fmt,
    format_table,
    pm,
    provenance,
    seeds_list,
    signed,
    summary,
    training,
)

PROBLEMS = ("regression:loss", "regression:target", "multimnist:target")
"""Default problems; ``multimnist:loss`` is also available (``--problems``)."""
ALL_PROBLEMS = ("regression:loss", "regression:target", "multimnist:loss", "multimnist:target")

GRID_BASE = 4.0
GRID_START = (-2, -1, 0, 1, 2)
GRID_LIMIT = 7
SEARCH_SEED = 0

MARGIN = 2.0
"""|mean paired Δm difference| within which two methods are called comparable (points)."""
STRONG = 0.5
"""Spearman's ρ from which a correlation is called strong (with its interval above 0)."""
CONVERGED = 0.10
"""A baseline has converged when its last quarter of training made at most this share of its
progress from the trivial predictor (validation metric)."""
R2_MIN = 0.5
"""A regression baseline must explain at least half the variance: RMSE ≤ √(1 − R2_MIN) times
the trivial predictor's."""
ACCURACY_MIN = 0.5
"""A classification baseline must reach this accuracy (5× chance for ten classes)."""

CORE_METHODS: dict[str, list[Any]] = {
    "equal weights": [],
    "avgnorm": ["avgnorm"],
    "uncertainty": ["uncertainty"],
    "mgda": ["mgda"],
    "pcgrad": ["pcgrad"],
    "cagrad": ["cagrad"],
    "imtl_g": ["imtl_g"],
    "aligned_mtl": ["aligned_mtl"],
    "nash_mtl": ["nash_mtl"],
    "upgrad": ["upgrad"],
}


def methods(which: str) -> dict[str, list[Any]]:
    """``core``: the methods above; ``all``: also every other installed aggregator and
    norm-balancing plugin (FairGrad with α = 2, its α = 1 being Nash-MTL), adapters to other
    libraries excepted."""
    if which == "core":
        return dict(CORE_METHODS)
    if which != "all":
        raise StudyError(f"--methods must be 'core' or 'all', got {which!r}")
    chosen = dict(CORE_METHODS)
    for info in registry.available_plugins():
        if info.cls.__module__.startswith("mtlhooks.integrations."):
            continue  # adapters to other libraries (torchjd) repeat built-in methods
        if info.family in (Family.AGGREGATOR, Family.NORM_BALANCING) and info.name not in chosen:
            if info.name == "fairgrad":
                chosen["fairgrad α=2"] = [{"name": "fairgrad", "alpha": 2.0}]
            else:
                chosen[info.name] = [info.name]
    return chosen


def _observe_every(spec: ProblemSpec) -> int:
    return 5 if spec.quick else 20


def parse_problems(text: str | None, quick: bool) -> list[ProblemSpec]:
    """``regression:loss,multimnist:target`` → specs; ``None`` → the defaults."""
    keys = PROBLEMS if text is None else tuple(k.strip() for k in text.split(",") if k.strip())
    if text is not None and keys == ("all",):
        keys = ALL_PROBLEMS
    unknown = [k for k in keys if k not in ALL_PROBLEMS]
    if unknown or not keys:
        raise StudyError(
            f"unknown problems {unknown or [text]}; choose from {', '.join(ALL_PROBLEMS)} or all"
        )
    specs = []
    for key in dict.fromkeys(keys):
        family, regime = key.split(":")
        specs.append(ProblemSpec(family, regime, quick))  # type: ignore[arg-type]
    return specs


def _grid_weights(tasks: Sequence[str], exponents: Sequence[int]) -> dict[str, float]:
    return {tasks[0]: 1.0, **{t: GRID_BASE**k for t, k in zip(tasks[1:], exponents)}}


def _grid_job(spec: ProblemSpec, tasks: Sequence[str], exponents: tuple[int, ...]) -> Job:
    weights = _grid_weights(tasks, exponents)
    return Job(
        spec,
        "grid",
        ({"name": "static", "weights": weights},),
        training(spec),
        SEARCH_SEED,
        observe_every=_observe_every(spec),
        tag=",".join(str(k) for k in exponents),
    )


def _exponents(outcome: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(k) for k in outcome["tag"].split(","))


class _Grid:
    """The growing grid of one problem and its validation scores."""

    def __init__(self, spec: ProblemSpec, tasks: tuple[TaskSpec, ...], quick: bool) -> None:
        self.spec = spec
        self.tasks = tasks
        self.names = [t.name for t in tasks]
        start = (-1, 1) if quick else GRID_START
        self.limit = 1 if quick else GRID_LIMIT
        self.axes = [list(start) for _ in tasks[1:]]
        self.runs: dict[tuple[int, ...], dict[str, Any]] = {}
        self.widenings = 0

    def pending(self) -> list[Job]:
        return [
            _grid_job(self.spec, self.names, point)
            for point in itertools.product(*self.axes)
            if point not in self.runs
        ]

    def add(self, outcome: dict[str, Any]) -> None:
        self.runs[_exponents(outcome)] = outcome

    def best(self, val_baseline: dict[str, float]) -> tuple[int, ...]:
        finite = {p: r for p, r in self.runs.items() if r["failure"] is None}
        if not finite:
            raise StudyError(f"every grid run failed on {self.spec.label}")
        return max(finite, key=lambda p: delta_m(finite[p]["val"], val_baseline, self.tasks))

    def widen(self, best: tuple[int, ...]) -> bool:
        """Add one exponent beyond the winner on every axis where it sits on the edge."""
        grew = False
        for axis, k in zip(self.axes, best):
            if k == min(axis) and k > -self.limit:
                axis.insert(0, k - 1)
                grew = True
            if k == max(axis) and k < self.limit:
                axis.append(k + 1)
                grew = True
        self.widenings += grew
        return grew

    def on_edge(self, best: tuple[int, ...]) -> bool:
        return any(k in (min(axis), max(axis)) for axis, k in zip(self.axes, best))


def _baseline_check(
    outcomes: list[dict[str, Any]], task: TaskSpec, trivial: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Whether the single-task runs of one task converged and beat the trivial predictor."""
    per_seed = []
    for outcome in outcomes:
        start = trivial["val"][task.name]
        curve = [c["val"][task.name] for c in outcome["checkpoints"]]
        final = outcome["val"][task.name]
        sign = 1.0 if task.higher_is_better else -1.0
        progress = sign * (final - start)
        last_quarter = sign * (final - curve[-2]) if len(curve) >= 2 else math.nan
        share = last_quarter / progress if progress > 0 else math.inf
        test = outcome["test"][task.name]
        if task.higher_is_better:
            beats = test >= ACCURACY_MIN
        else:
            beats = test <= math.sqrt(1 - R2_MIN) * trivial["test"][task.name]
        per_seed.append(
            {
                "seed": outcome["seed"],
                "last_quarter_share": share,
                "converged": outcome["failure"] is None and share <= CONVERGED,
                "beats_trivial": outcome["failure"] is None and beats,
            }
        )
    return {
        "task": task.name,
        "converged": all(s["converged"] for s in per_seed),
        "beats_trivial": all(s["beats_trivial"] for s in per_seed),
        "per_seed": per_seed,
    }


def _paired(rows: dict[str, dict[int, dict[str, Any]]], a: str, b: str) -> dict[str, Any] | None:
    """Per-seed Δm(a) − Δm(b) over the seeds where both runs succeeded."""
    if a not in rows or b not in rows:
        return None
    diffs = []
    for seed, run in rows[a].items():
        other = rows[b].get(seed)
        if run["failure"] is None and other is not None and other["failure"] is None:
            diffs.append(run["delta_m"] - other["delta_m"])
    return summary(diffs) if diffs else None


def _compare(diff: dict[str, Any] | None) -> str:
    if diff is None:
        return "not measured"
    if abs(diff["mean"]) <= MARGIN:
        return "comparable"
    return "better" if diff["mean"] > 0 else "worse"


def _assemble(
    spec: ProblemSpec,
    method_names: Sequence[str],
    seeds: list[int],
    stl: dict[tuple[str, str, int], dict[str, Any]],
    method_runs: dict[tuple[str, int], dict[str, Any]],
    grid: _Grid,
    winner: tuple[int, ...],
    winner_runs: dict[int, dict[str, Any]],
) -> dict[str, Any]:
    problem = build_problem(spec)
    tasks = problem.tasks
    names = problem.names
    base_key = spec.baseline.key
    baseline = {
        split: {s: {t: stl[base_key, t, s][split][t] for t in names} for s in seeds}
        for split in ("val", "test")
    }
    trivial = {split: build_problem(spec.baseline).trivial(split) for split in ("val", "test")}
    checks = [_baseline_check([stl[base_key, t.name, s] for s in seeds], t, trivial) for t in tasks]

    def scored(outcome: dict[str, Any]) -> dict[str, Any]:
        base = baseline["test"][outcome["seed"]]
        return {
            **outcome,
            "changes": changes(outcome["test"], base, tasks),
            "delta_m": delta_m(outcome["test"], base, tasks),
            "delta_m_unclipped": delta_m_unclipped(outcome["test"], base, tasks),
        }

    grid_label = "grid search"
    by_method: dict[str, dict[int, dict[str, Any]]] = {}
    order = [method_names[0], grid_label, *method_names[1:]]
    for name in method_names:
        by_method[name] = {s: scored(method_runs[name, s]) for s in seeds}
    by_method[grid_label] = {s: scored(winner_runs[s]) for s in seeds}

    rows = []
    for name in order:
        runs = by_method[name]
        ok = [r for r in runs.values() if r["failure"] is None]
        ratios = [
            r["norms"]["max_min_ratio"]
            for r in ok
            if r.get("norms") and r["norms"]["max_min_ratio"] is not None
        ]
        rows.append(
            {
                "method": name,
                "plugins": next(iter(runs.values()))["plugins"],
                "space": next(iter(runs.values()))["space"],
                "runs": [runs[s] for s in seeds],
                "failures": [
                    {"seed": r["seed"], "failure": r["failure"]}
                    for r in runs.values()
                    if r["failure"]
                ],
                "changes": {t: summary([r["changes"][t] for r in ok]) for t in names},
                "delta_m": summary([r["delta_m"] for r in ok]),
                "delta_m_unclipped": summary([r["delta_m_unclipped"] for r in ok]),
                "minus_grid": _paired(by_method, name, grid_label) if name != grid_label else None,
                "minus_equal": _paired(by_method, name, "equal weights")
                if name != "equal weights"
                else None,
                "max_min_ratio": math.exp(sum(math.log(v) for v in ratios) / len(ratios))
                if ratios
                else None,
            }
        )

    clusters = []
    search_base = baseline["test"][SEARCH_SEED]
    for run in grid.runs.values():
        share = (run.get("norms") or {}).get("log_share")
        if run["failure"] is None and share is not None:
            change = changes(run["test"], search_base, tasks)
            clusters.append([(share[t], change[t]) for t in names])
    correlation = bootstrap_spearman(clusters) if clusters else None
    avgnorm = next((r for r in rows if r["method"] == "avgnorm"), None)
    verdict = {
        "baselines_valid": all(c["converged"] and c["beats_trivial"] for c in checks),
        "avgnorm_vs_grid": _compare(avgnorm["minus_grid"]) if avgnorm else "not measured",
        "avgnorm_vs_equal": _compare(avgnorm["minus_equal"]) if avgnorm else "not measured",
        "correlation": _correlation_verdict(correlation),
        "grid_winner_interior": not grid.on_edge(winner),
    }
    return {
        "problem": spec.key,
        "label": spec.label,
        "tasks": [
            {
                "name": t.name,
                "metric": t.metric,
                "higher_is_better": t.higher_is_better,
                "loss_scale": t.loss_scale,
                "metric_scale": t.metric_scale,
            }
            for t in tasks
        ],
        "settings": training(spec).__dict__,
        "baseline": {
            split: {t: summary([baseline[split][s][t] for s in seeds]) for t in names}
            for split in ("val", "test")
        },
        "baseline_per_seed": baseline,
        "trivial": trivial,
        "baseline_checks": checks,
        "grid": {
            "base": GRID_BASE,
            "axes": {t: axis for t, axis in zip(names[1:], grid.axes)},
            "runs": len(grid.runs),
            "widenings": grid.widenings,
            "winner_exponents": dict(zip(names[1:], winner)),
            "winner_weights": _grid_weights(names, winner),
            "winner_interior": not grid.on_edge(winner),
            "search_seed": SEARCH_SEED,
            "points": [
                {
                    "exponents": list(point),
                    "val_delta_m": delta_m(run["val"], baseline["val"][SEARCH_SEED], tasks),
                    "test": run["test"],
                    "log_share": (run.get("norms") or {}).get("log_share"),
                    "failure": run["failure"],
                }
                for point, run in sorted(grid.runs.items())
            ],
        },
        "rows": rows,
        "correlation": correlation,
        "verdict": verdict,
    }


def _correlation_verdict(correlation: dict[str, Any] | None) -> str:
    if correlation is None or not math.isfinite(correlation["rho"]):
        return "not measured"
    low, high = correlation["ci95"]
    if correlation["rho"] >= STRONG and low > 0:
        return "strong"
    if low > 0:
        return "positive, not strong"
    if high < 0:
        return "negative"
    return "not significant"


def run(
    *,
    quick: bool = False,
    seeds: int = 3,
    jobs: int = 1,
    progress: bool = True,
    problems: str | None = None,
    which_methods: str = "core",
) -> dict[str, Any]:
    """Run the study; ``quick`` is a seconds-long smoke version (tiny problems, a 2×2 grid,
    three methods; its numbers mean nothing)."""
    specs = parse_problems(problems, quick)
    check_available(specs)
    seed_list = seeds_list(seeds)
    chosen = methods(which_methods)
    if quick:
        chosen = {k: chosen[k] for k in ("equal weights", "avgnorm", "mgda")}
    timer = Timer()
    origin = provenance()  # before training: the code that runs
    with Runner(jobs, progress=progress) as runner:
        first: list[Job] = []
        stl_keys: dict[tuple[str, str, int], int] = {}
        grids = {}
        for spec in specs:
            problem = build_problem(spec)
            for task in problem.names:
                for seed in seed_list:
                    key = (spec.baseline.key, task, seed)
                    if key not in stl_keys:
                        stl_keys[key] = len(first)
                        first.append(
                            Job(spec.baseline, f"STL {task}", (), training(spec), seed, (task,))
                        )
            for name, plugins in chosen.items():
                for seed in seed_list:
                    first.append(
                        Job(
                            spec,
                            name,
                            tuple(plugins),
                            training(spec),
                            seed,
                            observe_every=_observe_every(spec),
                        )
                    )
            grids[spec] = _Grid(spec, problem.tasks, quick)
            first += grids[spec].pending()
        outcomes = runner.run(first, "imbalance: baselines, methods, grid")
        stl = {key: outcomes[i] for key, i in stl_keys.items()}
        method_runs: dict[ProblemSpec, dict[tuple[str, int], dict[str, Any]]] = {
            s: {} for s in specs
        }
        by_key = {s.key: s for s in specs}
        for outcome in outcomes:
            if outcome["method"] == "grid":
                grids[by_key[outcome["problem"]]].add(outcome)
            elif not outcome["method"].startswith("STL "):
                spec = by_key[outcome["problem"]]
                method_runs[spec][outcome["method"], outcome["seed"]] = outcome

        def val_baseline(spec: ProblemSpec) -> dict[str, float]:
            names = build_problem(spec).names
            return {t: stl[spec.baseline.key, t, SEARCH_SEED]["val"][t] for t in names}

        while True:
            widening: list[Job] = []
            for spec, grid in grids.items():
                if grid.widen(grid.best(val_baseline(spec))):
                    widening += grid.pending()
            if not widening:
                break
            for outcome in runner.run(widening, "imbalance: widening the grid"):
                grids[by_key[outcome["problem"]]].add(outcome)

        winners = {spec: grid.best(val_baseline(spec)) for spec, grid in grids.items()}
        rerun = [
            Job(
                spec,
                "grid",
                ({"name": "static", "weights": _grid_weights(build_problem(spec).names, w)},),
                training(spec),
                seed,
                observe_every=_observe_every(spec),
                tag=",".join(str(k) for k in w),
            )
            for spec, w in winners.items()
            for seed in seed_list
            if seed != SEARCH_SEED
        ]
        reruns = runner.run(rerun, "imbalance: grid winner, other seeds") if rerun else []
        blocks = []
        for spec in specs:
            winner_runs = {SEARCH_SEED: grids[spec].runs[winners[spec]]}
            for outcome in reruns:
                if outcome["problem"] == spec.key:
                    winner_runs[outcome["seed"]] = outcome
            blocks.append(
                _assemble(
                    spec,
                    list(chosen),
                    seed_list,
                    stl,
                    method_runs[spec],
                    grids[spec],
                    winners[spec],
                    winner_runs,
                )
            )
        timing = timer.stamp(runner)
    result: dict[str, Any] = {
        "study": "imbalance",
        "quick": quick,
        "seeds": seed_list,
        "jobs": jobs,
        "methods": which_methods,
        "margins": {
            "comparable_points": MARGIN,
            "strong_rho": STRONG,
            "converged_last_quarter_share": CONVERGED,
            "regression_r2_min": R2_MIN,
            "accuracy_min": ACCURACY_MIN,
            "clip_percent": 100.0,
        },
        "problems": blocks,
        **timing,
        "provenance": origin,
    }
    result["table"] = format_result(result)
    return result


def _exponent_text(weights: dict[str, int]) -> str:
    return ", ".join(f"{t} = 4^{k}" for t, k in weights.items())


def format_result(result: dict[str, Any]) -> str:
    """The study's tables and verdicts (Markdown), from its JSON."""
    parts = []
    for block in result["problems"]:
        tasks = [t["name"] for t in block["tasks"]]
        metric = ", ".join(f"{t['name']}: {t['metric']}" for t in block["tasks"])
        header = [
            "method",
            "space",
            *(f"{t} %" for t in tasks),
            "Δm % ↑",
            "Δm − grid",
            "Δm − equal",
            "w‖g‖ max/min",
        ]
        rows = [
            [
                "single-task (test metric)",
                "-",
                *(pm(block["baseline"]["test"][t], 3, sign=False) for t in tasks),
                "0",
                "",
                "",
                "",
            ],
            [
                "trivial predictor (test metric)",
                "-",
                *(fmt(block["trivial"]["test"][t]) for t in tasks),
                "",
                "",
                "",
                "",
            ],
        ]
        for row in block["rows"]:
            name = row["method"]
            if row["failures"]:
                name += f" ({len(row['failures'])} failed)"
            rows.append(
                [
                    name,
                    row["space"],
                    *(signed(row["changes"][t]["mean"]) for t in tasks),
                    pm(row["delta_m"]),
                    pm(row["minus_grid"]),
                    pm(row["minus_equal"]),
                    fmt(row["max_min_ratio"], 1),
                ]
            )
        grid = block["grid"]
        corr = block["correlation"]
        verdict = block["verdict"]
        avgnorm = next((r for r in block["rows"] if r["method"] == "avgnorm"), None)
        lines = [
            f"#### {block['label']} ({block['settings']['steps']} steps, Adam lr "
            f"{block['settings']['lr']:g}, {len(result['seeds'])} seeds)",
            "",
            f"Per-task columns: mean change against the single-task model of the same seed "
            f"(%, positive = better; metrics {metric}). Δm: mean ± sd over seeds; "
            "Δm − grid, Δm − equal: mean ± sd of the paired per-seed differences (points).",
            "",
            format_table(header, rows),
            "",
            f"Grid: {grid['runs']} runs on seed {grid['search_seed']}'s validation split, "
            f"widened {grid['widenings']} time(s); winner "
            f"{_exponent_text(grid['winner_exponents'])} "
            f"({'interior' if grid['winner_interior'] else 'ON THE EDGE of the searched range'}).",
        ]
        if corr is not None:
            low, high = corr["ci95"]
            lines.append(
                f"Correlation within the grid runs between a task's share of the last-layer "
                f"update and its change: Spearman ρ = {fmt(corr['rho'], 2)} "
                f"[95 % CI {fmt(low, 2)}, {fmt(high, 2)}] over {corr['points']} (run, task) "
                f"points: {verdict['correlation']}."
            )
        bad = [
            f"{c['task']} ({'not converged' if not c['converged'] else ''}"
            f"{', ' if not c['converged'] and not c['beats_trivial'] else ''}"
            f"{'does not beat the trivial predictor' if not c['beats_trivial'] else ''})"
            for c in block["baseline_checks"]
            if not (c["converged"] and c["beats_trivial"])
        ]
        lines.append(
            "Single-task baselines: "
            + (
                "every one converged and beats the trivial predictor."
                if not bad
                else "NOT VALID for " + "; ".join(bad) + " — Δm against them is not meaningful."
            )
        )
        if avgnorm is not None and avgnorm["minus_grid"] is not None:
            per_seed = ", ".join(signed(v) for v in avgnorm["minus_grid"]["values"])
            lines.append(
                f"**AvgNorm vs grid: {pm(avgnorm['minus_grid'])} points (per seed {per_seed}) → "
                f"{verdict['avgnorm_vs_grid']}** "
                f"(margin ±{result['margins']['comparable_points']:g}); "
                f"vs equal weights: {pm(avgnorm['minus_equal'])} → "
                f"{verdict['avgnorm_vs_equal']}."
            )
        failures = [
            f"{r['method']} seed {f['seed']}: {f['failure']}"
            for r in block["rows"]
            for f in r["failures"]
        ]
        if failures:
            lines.append("Failed runs (left out of the means): " + "; ".join(failures) + ".")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
