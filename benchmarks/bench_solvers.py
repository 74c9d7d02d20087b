"""Time every Gramian → weights method against TorchJD 0.18's weighting, on each hard family.

Usage: ``python benchmarks/bench_solvers.py [--tasks 40] [--repeats 15] [--threads 1]``
(TorchJD, with its solvers: ``pip install torch==2.13.0 "torchjd[full]==0.18.0"``; without
it only our times are printed). For every family of ``tests/families.py`` (``norm_spread_float32``
at T ≤ 16, where it stays finite), ``--seeds`` Gramians of T tasks are drawn; each round times
every (method, family, seed) for ours and then TorchJD's, interleaved, a block of ``--block``
consecutive calls each, so that a change in machine load hits both alike. A cell is the median
over rounds and seeds of the CPU time per call (``time.process_time``: time spent descheduled
does not count), in ms: ``ours / TorchJD (ratio)``; ``err`` marks a call that raised.

TorchJD counterparts: the ``*Weighting`` of the same name on the Gramian (CAGrad c = 0.4,
FairGrad α = 1, Krum f = 1, CR-MOGM around UPGrad); Nash-MTL and ConFIG take the matrix in
TorchJD, so they get ``L`` with ``LLᵀ = G`` (from ``eigh``), which has the same Gramian.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from families import FAMILIES, family_gramian

from mtlhooks.functional import METHODS

Call = Callable[[Tensor], object]


def ours(name: str) -> Call:
    spec = METHODS[name]

    def call(gramian: Tensor) -> object:
        args: list[object] = [gramian]
        if spec.stateful:
            initial = spec.initial_state or torch.zeros_like
            args.append(initial(gramian))
        kwargs = dict(spec.options)
        if spec.random:
            kwargs["generator"] = torch.Generator().manual_seed(0)
        return spec.function(*args, **kwargs)

    return call


def _factor(gramian: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(gramian.double())
    return (vectors * values.clamp_min(0).sqrt()).to(gramian.dtype)


def torchjd_calls() -> dict[str, Call]:
    """Our method name → a fresh-state TorchJD call on the Gramian (empty without TorchJD)."""
    try:
        from torchjd import aggregation as A
    except ImportError:
        return {}

    def fresh(factory: Callable[[], Callable[[Tensor], object]], matrix: bool = False) -> Call:
        def call(gramian: Tensor) -> object:
            weighting = factory()  # stateful ones start afresh, as ours do
            return weighting(_factor(gramian) if matrix else gramian)

        return call

    table: dict[str, Call] = {
        "mean": fresh(A.MeanWeighting),
        "sum": fresh(A.SumWeighting),
        "mgda": fresh(A.MGDAWeighting),
        "pcgrad": fresh(A.PCGradWeighting),
        "upgrad": fresh(A.UPGradWeighting),
        "dualproj": fresh(A.DualProjWeighting),
        "imtl_g": fresh(A.IMTLGWeighting),
        "aligned_mtl": fresh(A.AlignedMTLWeighting),
        "cagrad": fresh(lambda: A.CAGradWeighting(c=0.4)),
        "fairgrad": fresh(lambda: A.FairGradWeighting(alpha=1.0)),
        "gradvac": fresh(A.GradVacWeighting),
        "krum": fresh(lambda: A.KrumWeighting(n_byzantine=1)),
        "pcd": fresh(A.PCDWeighting),
        "cr_mogm": fresh(lambda: A.CRMOGMWeighting(A.UPGradWeighting())),
        "config": fresh(A.ConFIG, matrix=True),
    }
    nash = getattr(A, "NashMTL", None)
    if nash is not None:

        def nash_call(gramian: Tensor) -> object:
            aggregator = nash(n_tasks=gramian.shape[0], max_norm=0.0)
            return aggregator(_factor(gramian))

        table["nash_mtl"] = nash_call
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default="", help="comma-separated subset")
    parser.add_argument("--families", default="", help="comma-separated subset")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n, s in METHODS.items() if s.input == "gramian"]
    if args.methods:
        names = [n for n in names if n in args.methods.split(",")]
    families = list(FAMILIES) if not args.families else args.families.split(",")
    theirs = torchjd_calls()
    inputs = {
        family: [
            family_gramian(
                family, min(args.tasks, 16) if family == "norm_spread_float32" else args.tasks, s
            )
            for s in range(args.seeds)
        ]
        for family in families
    }
    callers: dict[tuple[str, str], Call] = {}
    for name in names:
        callers[name, "ours"] = ours(name)
        if name in theirs:
            callers[name, "torchjd"] = theirs[name]
    samples: dict[tuple[str, str, str], list[float]] = {}
    failed: set[tuple[str, str, str]] = set()
    for (name, side), call in callers.items():  # warm-up, and find what raises
        for family in families:
            for gramian in inputs[family]:
                try:
                    call(gramian)
                except Exception:
                    failed.add((name, side, family))
    for _ in range(args.repeats):
        for name in names:
            for family in families:
                for side in ("ours", "torchjd"):
                    key = (name, side, family)
                    if (name, side) not in callers or key in failed:
                        continue
                    for gramian in inputs[family]:
                        start = time.process_time()
                        for _ in range(args.block):
                            callers[name, side](gramian)
                        elapsed = (time.process_time() - start) / args.block
                        samples.setdefault(key, []).append(elapsed)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), T = {args.tasks}: ms "
        f"per call, ours / TorchJD (ratio), median of {args.repeats} interleaved rounds × "
        f"{args.seeds} seeds, CPU time"
    )
    print("| method | " + " | ".join(families) + " |")
    print("|" + " --- |" * (len(families) + 1))
    for name in names:
        cells = []
        for family in families:
            own_key, other_key = (name, "ours", family), (name, "torchjd", family)
            own = "err" if own_key in failed else f"{1e3 * statistics.median(samples[own_key]):.2f}"
            if (name, "torchjd") not in callers:
                cells.append(own)
                continue
            if other_key in failed:
                cells.append(f"{own} / err")
                continue
            other = 1e3 * statistics.median(samples[other_key])
            ratio = (
                ""
                if own_key in failed
                else f" ({1e3 * statistics.median(samples[own_key]) / other:.2f})"
            )
            cells.append(f"{own} / {other:.2f}{ratio}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
