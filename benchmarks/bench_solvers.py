"""Time every Gramian → weights method of :mod:`mtlhooks.functional` on CPU.

Usage: ``python benchmarks/bench_solvers.py [--repeats N] [--threads K]``. Prints one table,
milliseconds per call for T = 4, 10, 40 in float64 and float32, and the ratio of the T = 40
float64 time to the target of issue 4 (1 ms for closed-form and projection methods, 5 ms for
the iterative Nash-MTL and FairGrad; ≤ 1 means met). Gramians are those of random Gaussian
gradients with P = 4T parameters (full rank, mixed conflicts).

Measurement: the calls are interleaved (every round times each method and size in turn, a block
of ``--block`` consecutive calls each), so that a change in machine load hits all of them alike;
each cell is the median over rounds of the CPU time per call (``time.process_time``, which does
not count time spent descheduled). ``--block 1`` measures cold-cache calls, as in a training
step where the model's work evicts the solver's data between calls.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from mtlhooks.errors import SolverError
from mtlhooks.functional import METHODS

SIZES = (4, 10, 40)
DTYPES = (torch.float64, torch.float32)
ITERATIVE = ("nash_mtl", "fairgrad")


def _caller(name: str) -> Callable[[Tensor], object]:
    spec = METHODS[name]

    def call(gramian: Tensor) -> object:
        args: list[object] = [gramian]
        if spec.stateful:
            args.append(torch.zeros_like(gramian))
        if spec.random:
            return spec.function(*args, generator=torch.Generator().manual_seed(0))
        return spec.function(*args)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--block", type=int, default=5, help="consecutive calls per case and round (warm caches)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    gramians = {}
    for size in SIZES:
        jacobian = torch.randn(size, 4 * size, generator=gen, dtype=torch.float64)
        gramians[size] = jacobian @ jacobian.T
    columns = [(size, dtype) for dtype in DTYPES for size in SIZES]
    names = [name for name, spec in METHODS.items() if spec.input == "gramian"]
    cases = [(name, size, dtype) for name in names for size, dtype in columns]
    inputs = {(size, dtype): gramians[size].to(dtype) for size, dtype in columns}
    callers = {name: _caller(name) for name in names}
    failed: set[tuple[str, int, torch.dtype]] = set()
    samples: dict[tuple[str, int, torch.dtype], list[float]] = {case: [] for case in cases}
    for case in cases:  # warm-up (and find the cases that raise)
        name, size, dtype = case
        try:
            for _ in range(3):
                callers[name](inputs[size, dtype])
        except SolverError:
            failed.add(case)
    for _ in range(args.repeats):
        for case in cases:
            if case in failed:
                continue
            name, size, dtype = case
            start = time.process_time()
            for _ in range(args.block):
                callers[name](inputs[size, dtype])
            samples[case].append((time.process_time() - start) / args.block)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), ms per call "
        f"(median of {args.repeats} interleaved rounds of {args.block} calls, CPU time)"
    )
    header = " | ".join(f"T={size} {str(dtype).removeprefix('torch.')}" for size, dtype in columns)
    print(f"| method | {header} | T=40 f64 / target |")
    print("|" + " --- |" * (len(columns) + 2))
    for name in names:
        cells = []
        for size, dtype in columns:
            case = (name, size, dtype)
            cells.append(
                "SolverError" if case in failed else f"{1e3 * statistics.median(samples[case]):.3f}"
            )
        target = 5.0 if name in ITERATIVE else 1.0
        key = (name, 40, torch.float64)
        ratio = "—" if key in failed else f"{1e3 * statistics.median(samples[key]) / target:.2f}"
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
