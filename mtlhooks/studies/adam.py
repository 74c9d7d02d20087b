"""Study ``adam``: how much do the tasks' results move when one loss is multiplied by a constant?

Elich et al., "Challenging Common Assumptions in Multi-task Learning" (2023), §4: Adam is
*partially* invariant to the scale of a task's loss. Each task-specific parameter receives the
gradient of one loss only, and Adam divides it by its own running RMS, so multiplying that loss
by c changes nothing there (up to ε); the shared parameters receive a sum, where c changes the
task's share. SGD has no such normalisation: c multiplies the step size of everything the task
touches.

The study trains the synthetic regression with three tasks of equal scale (σ = 1) with task
``t0``'s loss multiplied by 1, 10, 100 and 1000 (outside mtlhooks' weights: the plugins see the
scaled loss, as they would a loss of a different unit), under SGD with momentum and under Adam,
from the same initial weights and batches, and reports each task's test RMSE/σ and how far it
moved from the ×1 run. A run whose loss becomes non-finite is reported as diverged.
"""

from __future__ import annotations

from typing import Any

from mtlhooks.progress import ProgressBar
from mtlhooks.studies.common import (
    Settings,
    fmt,
    format_table,
    regression_problem,
    threads,
    train,
)

SCALES = (1.0, 10.0, 100.0, 1000.0)
OPTIMIZERS = {
    "sgd": ("SGD + momentum 0.9", 0.05),
    "adam": ("Adam", 3e-3),
}
"""name → (label, learning rate); each rate was chosen for the ×1 runs and then kept."""


def run(*, quick: bool = False, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run the study; ``quick`` trains a few dozen steps (its numbers mean nothing)."""
    steps = 30 if quick else 1000
    scaled = "t0"
    with threads(1):
        problem = regression_problem((1.0, 1.0, 1.0), n_train=640 if quick else 2048, seed=seed)
        rows: list[dict[str, Any]] = []
        total = len(OPTIMIZERS) * len(SCALES) * steps
        with ProgressBar(total, "adam: loss scale", enabled=progress) as bar:
            for name, (label, lr) in OPTIMIZERS.items():
                settings = Settings(steps=steps, optimizer=name, lr=lr, seed=seed)  # type: ignore[arg-type]
                reference: dict[str, float] | None = None
                for scale in SCALES:
                    outcome = train(
                        problem,
                        [],
                        settings,
                        method=f"{label} ×{scale:g}",
                        multipliers={scaled: scale},
                        bar=bar,
                    )
                    if reference is None:
                        reference = outcome.test
                    change = {
                        t: 100.0 * (outcome.test[t] - reference[t]) / reference[t]
                        for t in problem.names
                    }
                    rows.append(
                        {
                            "optimizer": name,
                            "lr": lr,
                            "scale": scale,
                            "test": outcome.test,
                            "change_percent": None if outcome.failure else change,
                            "failure": outcome.failure,
                            "seconds": round(outcome.seconds, 3),
                        }
                    )
    summary: dict[str, Any] = {}
    for name in OPTIMIZERS:
        mine = [r for r in rows if r["optimizer"] == name]
        summary[name] = {
            "diverged_scales": [r["scale"] for r in mine if r["failure"]],
            "max_abs_change_percent": {
                t: max(
                    (abs(r["change_percent"][t]) for r in mine if r["change_percent"]),
                    default=None,
                )
                for t in problem.names
            },
        }
    result: dict[str, Any] = {
        "study": "adam",
        "quick": quick,
        "problem": problem.name,
        "scaled_task": scaled,
        "steps": steps,
        "rows": rows,
        "summary": summary,
    }
    result["table"] = format_result(result)
    return result


def format_result(result: dict[str, Any]) -> str:
    tasks = list(result["rows"][0]["test"])
    scaled = result["scaled_task"]
    header = [
        "optimizer",
        f"{scaled} loss ×",
        *(f"{t}{' (scaled)' if t == scaled else ''} RMSE/σ" for t in tasks),
        *(f"Δ{t} %" for t in tasks),
    ]
    rows = []
    for row in result["rows"]:
        label = OPTIMIZERS[row["optimizer"]][0]
        if row["failure"]:
            metrics = ["diverged"] * len(tasks)
            changes = ["—"] * len(tasks)
        else:
            metrics = [fmt(row["test"][t]) for t in tasks]
            changes = [f"{row['change_percent'][t]:+.1f}" for t in tasks]
        rows.append([label, f"{row['scale']:g}", *metrics, *changes])
    lines = [
        f"### {result['problem']}, {result['steps']} steps",
        "",
        f"Task {scaled}'s loss multiplied by each factor; Δ: change of the test RMSE/σ against "
        "the ×1 run of the same optimizer (lower RMSE is better).",
        "",
        format_table(header, rows),
        "",
    ]
    for name, info in result["summary"].items():
        moved = ", ".join(f"{t} {fmt(v, 1)}%" for t, v in info["max_abs_change_percent"].items())
        diverged = ", ".join(f"×{s:g}" for s in info["diverged_scales"]) or "none"
        lines.append(
            f"{OPTIMIZERS[name][0]}: largest |change| over the finite runs: {moved}; "
            f"diverged: {diverged}."
        )
    return "\n".join(lines)
