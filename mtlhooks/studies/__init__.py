"""``mtlhooks study NAME``: one command per claim of the seed papers, over several seeds.

- ``imbalance`` (Guo et al. 2025): AvgNorm vs a grid search of loss weights vs equal weights vs
  gradient surgery under labelled imbalance regimes, Δm against converged single-task models,
  and the correlation between a task's share of the gradient norm and its change —
  :mod:`mtlhooks.studies.imbalance`;
- ``adam`` (Elich et al. 2023): one loss, or all, multiplied by 1…1000 under SGD and Adam; the
  mechanism (heads-only training) and uncertainty weighting at its optimum, against the
  run-to-run noise floor — :mod:`mtlhooks.studies.adam`;
- ``conflicts`` (Elich et al. 2023): cosine, conflict rate and magnitude similarity between
  tasks vs between two halves of one task's batch, over several batch sizes —
  :mod:`mtlhooks.studies.conflicts`.

Each takes ``--seeds N`` (default 3), ``--jobs N`` (worker processes; results do not depend on
it), ``--json``, ``--quick`` (seconds, for CI: the numbers mean nothing) and shows a progress bar
on stderr. ``python -m mtlhooks.studies.report`` regenerates the documentation's tables and
plots from the studies' JSON. Δm is defined in :mod:`mtlhooks.studies.common`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

STUDIES = ("imbalance", "adam", "conflicts")


def default_jobs() -> int:
    """Two worker processes where there are two cores (the studies' budget), else one."""
    return max(1, min(2, os.cpu_count() or 1))


def run_study(
    name: str,
    *,
    quick: bool = False,
    seeds: int = 3,
    jobs: int = 1,
    progress: bool = True,
    problems: str | None = None,
    methods: str = "core",
    log_dir: str | None = None,
) -> dict[str, Any]:
    """Run one study by name; a JSON-ready dict whose ``"table"`` is the Markdown result."""
    if name == "imbalance":
        from mtlhooks.studies import imbalance

        return imbalance.run(
            quick=quick,
            seeds=seeds,
            jobs=jobs,
            progress=progress,
            problems=problems,
            which_methods=methods,
        )
    if name == "adam":
        from mtlhooks.studies import adam

        return adam.run(quick=quick, seeds=seeds, jobs=jobs, progress=progress)
    if name == "conflicts":
        from mtlhooks.studies import conflicts

        return conflicts.run(
            quick=quick,
            seeds=seeds,
            jobs=jobs,
            progress=progress,
            problems=problems,
            log_dir=log_dir,
        )
    raise ValueError(f"unknown study {name!r}; studies are {', '.join(STUDIES)}")


def json_safe(value: Any) -> Any:
    """Non-finite floats become ``null`` (strict JSON); tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def dumps(result: dict[str, Any]) -> str:
    """The JSON text of a study's result, as ``--json`` prints and the docs store it."""
    return json.dumps(json_safe(result), indent=1, allow_nan=False, ensure_ascii=False) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mtlhooks study`` (kept here, next to the studies)."""
    parser.add_argument("name", choices=STUDIES, help="which study")
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 (default 3)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=default_jobs(),
        help="worker processes (default: 2 on two or more cores); results do not depend on it",
    )
    parser.add_argument(
        "--problems",
        default=None,
        help="imbalance: comma-separated from regression:loss, regression:target, "
        "multimnist:loss, multimnist:target, or all; conflicts: regression, multimnist",
    )
    parser.add_argument(
        "--methods",
        choices=("core", "all"),
        default="core",
        help="imbalance: the seed papers' methods (core) or every installed one (all)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--log-dir",
        default=None,
        help="conflicts: also write every run's measurements here (one JSON file per problem)",
    )


def run(args: argparse.Namespace) -> int:
    """Carry out ``mtlhooks study``."""
    result = run_study(
        args.name,
        quick=args.quick,
        seeds=args.seeds,
        jobs=args.jobs,
        progress=not args.no_progress,
        problems=args.problems,
        methods=args.methods,
        log_dir=args.log_dir,
    )
    if args.json:
        sys.stdout.write(dumps(result))
    else:
        print(result["table"])
    minutes = result["wall_seconds"] / 60
    print(
        f"study {args.name}: {result['wall_seconds']:.0f} s ({minutes:.1f} min) wall, "
        f"{result['cpu_seconds_in_runs']:.0f} s CPU in training runs, {args.jobs} worker(s)",
        file=sys.stderr,
    )
    return 0
