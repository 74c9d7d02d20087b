"""Study ``adam``: how far do the results move when losses are multiplied by constants?

Elich et al., "Challenging Common Assumptions in Multi-task Learning" (2023), §4: Adam is
*partially* invariant to the scale of a task's loss. Each task-specific parameter receives the
gradient of one loss only and Adam divides it by its own running RMS, so multiplying that loss
by c changes nothing there (up to ε); the shared parameters receive a sum, in which c changes
the task's share. SGD has no such normalisation. Uncertainty weighting, at its optimum
(weight 1/(2ℓᵢ)), removes any constant factor on ℓᵢ whatever the optimiser.

On the synthetic regression with three standardised tasks (equal weights unless stated), from
the same initial weights and batches per seed, the study trains:

- **one task**: task ``t0``'s loss × 1, 10, 100, 1000 — full model, and **heads only** (trunk
  frozen at its initial weights: every trained parameter then sees one loss, the mechanism in
  its pure form);
- **all tasks**: every loss × 10, 100, 1000 (a common scale);
- **uncertainty weighting**, learned (the ``uncertainty`` plugin) and at its optimum (each
  loss replaced by ℓᵢ / (2·sg(ℓᵢ)), whose gradient ½∇ℓᵢ/ℓᵢ is that of the optimum);
- a **rounding perturbation**: the same losses × (1 + 2⁻²⁰), a change of a few float32 ulps
  that is invisible in exact arithmetic. How far it moves the results is the run-to-run noise
  floor against which every other change is read.

Under Adam (lr 3e-3) and SGD with momentum 0.9, whose learning rate is chosen on the validation
split of seed 0 from a half-decade grid — once at ×1 ("fixed": then kept for every scale) and
once per scale ("tuned"). A run whose loss becomes non-finite is reported as *diverged*, one
whose test RMSE on some task is within 5 % of the trivial predictor's as *collapsed*; neither
enters the means as a finite result.
"""

from __future__ import annotations

from typing import Any

from mtlhooks.studies.common import (
    Job,
    ProblemSpec,
    Runner,
    Settings,
    Timer,
    build_problem,
    fmt,
    format_table,
    mean,
    pm,
    provenance,
    seeds_list,
    signed,
    summary,
    training,
)

SCALES = (1.0, 10.0, 100.0, 1000.0)
PERTURBATIONS = (1.0 + 2.0**-20, 1.0 - 2.0**-20, 1.0 + 2.0**-19)
"""Factors invisible in exact arithmetic: as many rounding perturbations as scaled conditions,
so that the noise floor (their largest effect) is a maximum over as many runs."""
ADAM_LR = 3e-3
SGD_LRS = tuple(round(0.1 * 10 ** (-k / 2), 12) for k in range(9))
"""0.1 down to 1e-5 in half decades."""
SCALED_TASK = "t0"

INVARIANT = 1.0
"""Largest |change| (%) of every task's test RMSE for which a run counts as unchanged."""
NOISE_FACTOR = 2.0
"""Changes within this multiple of the rounding noise floor count as noise."""
COLLAPSE = 0.95
"""A task whose test RMSE is at least this share of the trivial predictor's has collapsed."""

TINY_EPS = 1e-20
"""Adam's ε in the diagnostic run of the common scale: a common factor on every loss leaves
Adam's update m̂/(√v̂ + ε) unchanged exactly when ε is negligible against √v̂."""

EXPERIMENTS: dict[str, str] = {
    "one": f"one task ({SCALED_TASK}) × c, full model",
    "heads": f"one task ({SCALED_TASK}) × c, heads only",
    "all": "all tasks × c, full model",
    "all_eps": f"all tasks × c, full model, Adam with ε = {TINY_EPS:g} (diagnostic)",
    "uw": f"{SCALED_TASK} × c, uncertainty weighting (learned)",
    "uw_opt": f"{SCALED_TASK} × c, uncertainty weighting at its optimum",
}


CONDITIONS = (*SCALES, *PERTURBATIONS)
ROUNDING = "rounding ×(1±2⁻²⁰), ×(1+2⁻¹⁹)"
"""The label of the pooled perturbation runs: the noise floor."""


class _Plan:
    """Jobs keyed by what they train, so that identical runs are trained once."""

    def __init__(self, spec: ProblemSpec, steps: int) -> None:
        self.spec = spec
        self.steps = steps
        self.names = build_problem(spec).names
        self.jobs: dict[tuple[Any, ...], Job] = {}

    def job(
        self,
        experiment: str,
        optimizer: str,
        lr: float,
        factor: float,
        seed: int,
    ) -> tuple[Any, ...]:
        """The key of the run of one experiment's condition (added to the plan if new)."""
        if experiment in ("all", "all_eps"):
            multipliers = tuple((t, factor) for t in self.names) if factor != 1.0 else ()
        else:
            multipliers = ((SCALED_TASK, factor),) if factor != 1.0 else ()
        plugins: tuple[Any, ...] = ("uncertainty",) if experiment == "uw" else ()
        heads = experiment == "heads"
        optimum = experiment == "uw_opt"
        # ×1 is the same run for "one" and "all".
        kind = "one" if experiment == "all" and factor == 1.0 else experiment
        key = (kind, optimizer, lr, factor, seed)
        if key not in self.jobs:
            self.jobs[key] = Job(
                self.spec,
                f"{experiment} {optimizer}",
                plugins,
                Settings(
                    steps=self.steps,
                    optimizer=optimizer,  # type: ignore[arg-type]
                    lr=lr,
                    adam_eps=TINY_EPS if experiment == "all_eps" else 1e-8,
                ),
                seed,
                multipliers=multipliers,
                uw_optimum=optimum,
                heads_only=heads,
                tag=f"{experiment}|{optimizer}|{lr:g}|{factor!r}",
            )
        return key


def _status(outcome: dict[str, Any], trivial: dict[str, float]) -> str:
    if outcome["failure"]:
        if outcome["failure"].startswith("not applicable"):
            return "not applicable"
        return "diverged" if outcome["failure"].startswith("diverged") else "failed"
    if any(outcome["test"][t] >= COLLAPSE * trivial[t] for t in outcome["test"]):
        return "collapsed"
    return "ok"


def _choose_lr(outcomes: dict[float, dict[str, Any]], trivial: dict[str, float]) -> float | None:
    """The learning rate with the best mean validation RMSE among runs that trained."""
    trained = {
        lr: mean(list(o["val"].values()))
        for lr, o in outcomes.items()
        if _status(o, trivial) == "ok"
    }
    return min(trained, key=trained.__getitem__) if trained else None


def run(
    *, quick: bool = False, seeds: int = 3, jobs: int = 1, progress: bool = True
) -> dict[str, Any]:
    """Run the study; ``quick`` trains a few dozen steps on a tiny problem (its numbers mean
    nothing)."""
    spec = ProblemSpec("regression", "equal", quick)
    steps = training(spec).steps
    lrs = SGD_LRS[::4] if quick else SGD_LRS
    seed_list = seeds_list(seeds)
    problem = build_problem(spec)
    trivial = problem.trivial("test")
    timer = Timer()
    origin = provenance()  # before training: the code that runs
    plan = _Plan(spec, steps)
    with Runner(jobs, progress=progress) as runner:
        # Phase 1: every Adam run, and the SGD learning-rate sweeps on seed 0.
        for experiment in EXPERIMENTS:
            for factor in CONDITIONS:
                for seed in seed_list:
                    plan.job(experiment, "adam", ADAM_LR, factor, seed)
        sweeps = {
            ("one", factor): {lr: plan.job("one", "sgd", lr, factor, 0) for lr in lrs}
            for factor in SCALES
        }
        for experiment in ("heads", "uw_opt"):
            sweeps[experiment, 1.0] = {lr: plan.job(experiment, "sgd", lr, 1.0, 0) for lr in lrs}
        keys = list(plan.jobs)
        done = dict(zip(keys, runner.run([plan.jobs[k] for k in keys], "adam: Adam, SGD sweep")))
        chosen = {
            key: _choose_lr({lr: done[k] for lr, k in sweep.items()}, trivial)
            for key, sweep in sweeps.items()
        }
        # Phase 2: SGD at the chosen rates, every condition and seed. "fixed": the rate chosen
        # at ×1 (for the full model, heads only, and UW at its optimum each); "tuned": the rate
        # chosen at each scale (the perturbations keep the ×1 rate).
        fixed = {
            "one": chosen["one", 1.0],
            "all": chosen["one", 1.0],
            "heads": chosen["heads", 1.0],
            "uw_opt": chosen["uw_opt", 1.0],
        }
        sgd_lr: dict[tuple[str, str, float], float | None] = {}
        for experiment, lr in fixed.items():
            for factor in CONDITIONS:
                sgd_lr["sgd fixed", experiment, factor] = lr
        for factor in CONDITIONS:
            tuned = chosen["one", factor] if factor in SCALES else fixed["one"]
            sgd_lr["sgd tuned", "one", factor] = tuned
        wanted = {}
        for (label, experiment, factor), lr in sgd_lr.items():
            if lr is None:
                continue
            for seed in seed_list:
                wanted[label, experiment, factor, seed] = plan.job(
                    experiment, "sgd", lr, factor, seed
                )
        missing = [k for k in dict.fromkeys(wanted.values()) if k not in done]
        if missing:
            outcomes = runner.run([plan.jobs[k] for k in missing], "adam: SGD runs")
            done.update(zip(missing, outcomes))
        timing = timer.stamp(runner)

    blocks = []
    settings_of: list[tuple[str, str, str, float | None]] = []
    for experiment in EXPERIMENTS:
        settings_of.append((experiment, "adam", "Adam", ADAM_LR))
        if experiment in fixed:
            settings_of.append((experiment, "sgd fixed", "SGD, lr fixed", fixed[experiment]))
        if experiment == "one":
            settings_of.append((experiment, "sgd tuned", "SGD, lr tuned per scale", None))
    for experiment, label, shown, lr in settings_of:
        conditions = []
        for factor in CONDITIONS:
            runs = []
            for seed in seed_list:
                key: tuple[Any, ...] | None
                if label == "adam":
                    key = plan.job(experiment, "adam", ADAM_LR, factor, seed)
                else:
                    key = wanted.get((label, experiment, factor, seed))
                runs.append(None if key is None else done[key])
            conditions.append((factor, runs))
        blocks.append(_summarise(experiment, label, shown, lr, conditions, sgd_lr, trivial))
    result: dict[str, Any] = {
        "study": "adam",
        "quick": quick,
        "seeds": seed_list,
        "jobs": jobs,
        "problem": spec.label,
        "scaled_task": SCALED_TASK,
        "steps": steps,
        "adam_lr": ADAM_LR,
        "sgd_lrs": list(lrs),
        "sgd_lr_chosen": {
            f"{experiment} ×{factor:g}": lr for (experiment, factor), lr in chosen.items()
        },
        "trivial": trivial,
        "margins": {
            "invariant_percent": INVARIANT,
            "noise_factor": NOISE_FACTOR,
            "collapse_share_of_trivial": COLLAPSE,
        },
        "blocks": blocks,
        **timing,
        "provenance": origin,
    }
    result["verdicts"] = _verdicts(result)
    result["table"] = format_result(result)
    return result


def _summarise(
    experiment: str,
    label: str,
    shown: str,
    lr: float | None,
    conditions: list[tuple[float, list[dict[str, Any] | None]]],
    sgd_lr: dict[tuple[str, str, float], float | None],
    trivial: dict[str, float],
) -> dict[str, Any]:
    """Per scale, and pooled over the rounding perturbations: how many runs trained, each
    task's test RMSE and its change against the ×1 run of the same seed."""
    reference = dict(conditions)[1.0]
    tasks = list(trivial)
    groups: list[tuple[float | None, list[tuple[float, list[dict[str, Any] | None]]]]] = [
        (factor, [(factor, runs)]) for factor, runs in conditions if factor in SCALES
    ]
    groups.append((None, [(f, runs) for f, runs in conditions if f in PERTURBATIONS]))
    rows: list[dict[str, Any]] = []
    for factor, members in groups:
        statuses: list[str | None] = []
        per_task: dict[str, list[float]] = {t: [] for t in tasks}
        rmse: dict[str, list[float]] = {t: [] for t in tasks}
        uw_gap = []
        for _, runs in members:
            for run, ref in zip(runs, reference):
                status = None if run is None else _status(run, trivial)
                statuses.append(status)
                if run is not None and "uw_log_gap" in run:
                    uw_gap.append(run["uw_log_gap"])
                if run is None or ref is None or status != "ok" or _status(ref, trivial) != "ok":
                    continue
                for t in tasks:
                    rmse[t].append(run["test"][t])
                    change = 100.0 * (run["test"][t] - ref["test"][t]) / ref["test"][t]
                    per_task[t].append(change)
        first = members[0][0]
        rows.append(
            {
                "factor": factor,
                "condition": ROUNDING if factor is None else f"×{factor:g}",
                "lr": sgd_lr.get((label, experiment, first), lr) if label != "adam" else lr,
                "status": statuses,
                "rmse": {t: summary(v) for t, v in rmse.items()},
                "change_percent": {t: summary(v) for t, v in per_task.items()},
                "uw_log_gap": {t: mean([g[t] for g in uw_gap]) for t in tasks} if uw_gap else None,
            }
        )
    rounding = rows[-1]
    floor_values = [abs(v) for s in rounding["change_percent"].values() for v in s["values"]]
    return {
        "experiment": experiment,
        "description": EXPERIMENTS[experiment],
        "optimizer": label,
        "label": shown,
        "lr": lr,
        "rows": rows,
        "noise_floor_percent": max(floor_values) if floor_values else None,
        "rounding_runs_not_trained": sum(x != "ok" for x in rounding["status"]),
    }


def _max_change(block: dict[str, Any], tasks: list[str] | None = None) -> float | None:
    """Largest |change| over the scaled conditions (not the perturbation), tasks and seeds."""
    values = [
        abs(v)
        for row in block["rows"]
        if row["factor"] in SCALES[1:]
        for t, s in row["change_percent"].items()
        if tasks is None or t in tasks
        for v in s["values"]
    ]
    return max(values) if values else None


def _untrained(block: dict[str, Any]) -> int:
    return sum(
        1
        for row in block["rows"]
        if row["factor"] in SCALES[1:]
        for status in row["status"]
        if status != "ok"
    )


def _verdicts(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The pre-stated checks (docs/reproducing.md), each with the numbers it rests on."""
    blocks = {(b["experiment"], b["optimizer"]): b for b in result["blocks"]}
    others = [t for t in result["trivial"] if t != SCALED_TASK]
    verdicts = []

    def invariance(key: tuple[str, str], claim: str, expect: bool | None) -> None:
        block = blocks.get(key)
        if block is None:
            return
        largest = _max_change(block)
        floor = block["noise_floor_percent"]
        untrained = _untrained(block)
        bound = INVARIANT if floor is None else max(INVARIANT, NOISE_FACTOR * floor)
        invariant = untrained == 0 and largest is not None and largest <= bound
        verdicts.append(
            {
                "claim": claim,
                "experiment": block["description"],
                "optimizer": block["label"],
                "max_abs_change_percent": largest,
                "noise_floor_percent": floor,
                "bound_percent": bound,
                "runs_not_trained": untrained,
                "invariant": invariant,
                "as_claimed": None if expect is None else invariant == expect,
            }
        )

    invariance(("heads", "adam"), "heads only: Adam invariant to one task's loss scale", True)
    invariance(("heads", "sgd fixed"), "heads only: SGD not invariant", False)
    invariance(("one", "adam"), "full model: Adam not fully invariant (shared trunk)", False)
    invariance(("one", "sgd fixed"), "full model: SGD (lr fixed) not invariant", False)
    invariance(("one", "sgd tuned"), "full model: SGD (lr tuned per scale) not invariant", False)
    invariance(("all", "adam"), "common scale: Adam invariant", True)
    invariance(("all", "sgd fixed"), "common scale: SGD not invariant", False)
    invariance(("all_eps", "adam"), f"common scale, Adam with ε = {TINY_EPS:g} (diagnostic)", None)
    invariance(("uw_opt", "adam"), "UW at its optimum: invariant under Adam", True)
    invariance(("uw_opt", "sgd fixed"), "UW at its optimum: invariant under SGD", True)
    invariance(("uw", "adam"), "UW learned in this budget (no claim): invariant under Adam", None)
    one_adam = blocks.get(("one", "adam"))
    if one_adam is not None:
        verdicts.append(
            {
                "claim": "full model, Adam: largest change of the unscaled tasks",
                "experiment": one_adam["description"],
                "optimizer": one_adam["label"],
                "max_abs_change_percent": _max_change(one_adam, others),
                "noise_floor_percent": one_adam["noise_floor_percent"],
            }
        )
    return verdicts


def format_result(result: dict[str, Any]) -> str:
    """The study's tables and verdicts (Markdown), from its JSON."""
    tasks = list(result["trivial"])
    header = [
        "experiment",
        "optimizer (lr)",
        "condition",
        "trained",
        *(f"{t} RMSE/σ" for t in tasks),
        *(f"Δ{t} %" for t in tasks),
    ]
    rows = []
    for block in result["blocks"]:
        for row in block["rows"]:
            counts: dict[str, int] = {}
            for status in row["status"]:
                name = "not run" if status is None else status
                counts[name] = counts.get(name, 0) + 1
            trained = ", ".join(
                f"{n} {k}" if k != "ok" else f"{n}/{len(row['status'])}" for k, n in counts.items()
            )
            lr = row["lr"]
            rows.append(
                [
                    block["description"],
                    f"{block['label']} ({'—' if lr is None else f'{lr:g}'})",
                    row["condition"],
                    trained,
                    *(pm(row["rmse"][t], 3, sign=False) for t in tasks),
                    *(pm(row["change_percent"][t], 2) for t in tasks),
                ]
            )
    lines = [
        f"#### {result['problem']}, {result['steps']} steps, {len(result['seeds'])} seeds",
        "",
        "Test RMSE/σ (mean ± sd over the seeds that trained) and its change against the ×1 run "
        "of the same setting and seed (%, positive = worse). Rounding: the three perturbations "
        "that exact arithmetic would not see, pooled; their largest |change| is the noise floor. "
        "trained: runs that neither diverged nor "
        "collapsed to the trivial predictor (test RMSE ≥ "
        f"{result['margins']['collapse_share_of_trivial']:g} × trivial: "
        + ", ".join(f"{t} {fmt(v)}" for t, v in result["trivial"].items())
        + ").",
        "",
        format_table(header, rows),
        "",
        "| claim (pre-stated) | largest abs. change % | noise floor % | bound % | "
        "runs not trained | "
        "invariant | as claimed |",
        "|---|---|---|---|---|---|---|",
    ]
    for verdict in result["verdicts"]:
        if "invariant" not in verdict:
            continue
        lines.append(
            f"| {verdict['claim']} | {fmt(verdict['max_abs_change_percent'], 2)} | "
            f"{fmt(verdict['noise_floor_percent'], 2)} | {fmt(verdict['bound_percent'], 2)} | "
            f"{verdict['runs_not_trained']} | {'yes' if verdict['invariant'] else 'no'} | "
            f"{ {True: 'yes', False: '**no**', None: '—'}[verdict['as_claimed']] } |"
        )
    uw = next(
        (b for b in result["blocks"] if b["experiment"] == "uw" and b["optimizer"] == "adam"),
        None,
    )
    if uw is not None:
        gaps = [
            f"{row['condition']}: "
            + ", ".join(f"{t} {signed(v, 2)}" for t, v in row["uw_log_gap"].items())
            for row in uw["rows"]
            if row["uw_log_gap"] is not None and row["factor"] in SCALES
        ]
        lines += [
            "",
            "Learned uncertainty weighting, distance from its optimum over the last 50 steps, "
            "mean log(2·wᵢ·ℓᵢ) (0 at the optimum): " + "; ".join(gaps) + ".",
        ]
    chosen = ", ".join(
        f"{k}: {'none trains' if v is None else f'{v:g}'}"
        for k, v in result["sgd_lr_chosen"].items()
    )
    lines += ["", f"SGD learning rates chosen on seed 0's validation split: {chosen}."]
    return "\n".join(lines)
