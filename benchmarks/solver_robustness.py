"""Failure rates of every Gramian → weights method on the hard input families.

Usage: ``python benchmarks/solver_robustness.py [--seeds N] [--sizes 2,3,5,8,16,40]``. For each
family of ``tests/families.py`` and each method of :data:`mtlhooks.functional.METHODS` (default
options), every (size, seed) case is run once and classified:

- ``raise``: a :class:`~mtlhooks.errors.SolverError` (documented where the method declares
  ``may_raise``; an undocumented one is a failure);
- ``crash``: any other exception (``ZeroDivisionError``, a LAPACK error, ...);
- ``nan``: non-finite weights for a finite Gramian;
- ``wrong``: finite weights that break a property the method claims (non-conflicting:
  ``(Gα)ᵢ ≥ −rtol·‖gᵢ‖Σⱼ|αⱼ|‖gⱼ‖``; nonnegative) or, for Nash-MTL and FairGrad (α = 1), that do
  not solve ``αᵢ(Gα)ᵢ = 1`` (relative 1e-6, float32: 1e-3), checked in float64.

Prints one Markdown table per outcome kind: the percentage of cases per method and family.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from families import FAMILIES, FLOAT32_FAMILIES, family_gramian

from mtlhooks.errors import SolverError
from mtlhooks.functional import METHODS, Property

KINDS = ("raise", "crash", "nan", "wrong")
EQUATIONS = ("nash_mtl", "fairgrad")


def call(name: str, gramian: Tensor) -> Tensor:
    spec = METHODS[name]
    args: list[object] = [gramian]
    if spec.stateful:
        initial = getattr(spec, "initial_state", None)
        args.append(initial(gramian) if initial is not None else torch.zeros_like(gramian))
    kwargs = dict(getattr(spec, "options", {}))
    if spec.random:
        kwargs["generator"] = torch.Generator().manual_seed(0)
    result = spec.function(*args, **kwargs)
    return result[0] if spec.stateful else result  # type: ignore[index,return-value]


def classify(name: str, gramian: Tensor, float32: bool) -> str | None:
    spec = METHODS[name]
    try:
        weights = call(name, gramian)
    except SolverError:
        return "raise"
    except Exception:
        return "crash"
    if not bool(torch.isfinite(weights).all()):
        return "nan"
    exact = gramian.double()
    alpha = weights.double()
    rtol = 1e-3 if float32 else 1e-6
    norms = exact.diagonal().clamp_min(0).sqrt()
    scale = norms * (norms * alpha.abs()).sum()
    products = exact @ alpha
    if Property.NON_CONFLICTING in spec.properties and bool((products < -rtol * scale).any()):
        return "wrong"
    if Property.NONNEGATIVE in spec.properties and bool((alpha < 0).any()):
        return "wrong"
    if name in EQUATIONS and bool(((alpha * products) - 1).abs().max() > max(rtol, 1e-4)):
        return "wrong"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--sizes", default="2,3,5,8,16,40")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    names = [name for name, spec in METHODS.items() if spec.input == "gramian"]
    counts: dict[tuple[str, str], Counter[str]] = {}
    for family in FAMILIES:
        float32 = family in FLOAT32_FAMILIES
        for size in sizes:
            if family == "norm_spread_float32" and size > 16:
                continue
            for seed in range(args.seeds):
                gramian = family_gramian(family, size, seed)
                for name in names:
                    if size < getattr(METHODS[name], "min_tasks", 1):
                        continue
                    outcome = classify(name, gramian, float32)
                    cell = counts.setdefault((name, family), Counter())
                    cell["cases"] += 1
                    if outcome is not None:
                        cell[outcome] += 1
    print(f"sizes {sizes}, {args.seeds} seeds per size and family; % of cases")
    for kind in KINDS:
        print(f"\n### {kind}\n")
        print("| method | " + " | ".join(FAMILIES) + " |")
        print("|" + " --- |" * (len(FAMILIES) + 1))
        for name in names:
            cells = []
            for family in FAMILIES:
                cell = counts.get((name, family), Counter())
                share = 100 * cell[kind] / cell["cases"] if cell["cases"] else 0.0
                cells.append("." if share == 0 else f"{share:.0f}")
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
