"""``mtlhooks study NAME``: one command per claim of the seed papers.

- ``imbalance`` (Guo et al. 2025): AvgNorm vs a grid search of loss weights vs equal weights vs
  gradient surgery, Δm against single-task models, and the correlation between a task's share
  of the gradient norm and its performance drop — :mod:`mtlhooks.studies.imbalance`;
- ``adam`` (Elich et al. 2023): one loss multiplied by 1…1000 under SGD and Adam —
  :mod:`mtlhooks.studies.adam`;
- ``conflicts`` (Elich et al. 2023): cosine and magnitude similarity between tasks vs between
  two halves of one task's batch — :mod:`mtlhooks.studies.conflicts`.

Each takes ``--quick`` (seconds, for CI: the numbers mean nothing), ``--json`` and shows a
progress bar on stderr. Δm is defined in :mod:`mtlhooks.studies.common`.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

STUDIES = ("imbalance", "adam", "conflicts")


def run_study(
    name: str,
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    log_dir: str | None = None,
) -> dict[str, Any]:
    """Run one study by name; a JSON-ready dict whose ``"table"`` is the Markdown result."""
    if name == "imbalance":
        from mtlhooks.studies import imbalance

        return imbalance.run(quick=quick, seed=seed, progress=progress)
    if name == "adam":
        from mtlhooks.studies import adam

        return adam.run(quick=quick, seed=seed, progress=progress)
    if name == "conflicts":
        from mtlhooks.studies import conflicts

        return conflicts.run(quick=quick, seed=seed, progress=progress, log_dir=log_dir)
    raise ValueError(f"unknown study {name!r}; studies are {', '.join(STUDIES)}")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mtlhooks study``."""
    parser.add_argument("name", choices=STUDIES, help="which study")
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--log-dir",
        default=None,
        help="conflicts: write the multi-task runs' gradstats JSONL here (for mtlhooks plot)",
    )


def run(args: argparse.Namespace) -> int:
    """Carry out ``mtlhooks study``."""
    result = run_study(
        args.name,
        quick=args.quick,
        seed=args.seed,
        progress=not args.no_progress,
        log_dir=args.log_dir,
    )
    if args.json:
        print(json.dumps(_json_safe(result), indent=1, allow_nan=False))
    else:
        print(result["table"])
    return 0
