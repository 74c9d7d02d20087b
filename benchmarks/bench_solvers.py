"""Time every Gramian → weights method of :mod:`mtlhooks.functional` on CPU.

Usage: ``python benchmarks/bench_solvers.py [--repeats N]``. Prints one table, milliseconds per
call (median over N calls after warm-up), for T = 4, 10, 40 in float64 and float32. Gramians are
those of random Gaussian gradients with P = 4T parameters (full rank, mixed conflicts).
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


def time_call(call: Callable[[Tensor], object], gramian: Tensor, repeats: int) -> float:
    for _ in range(3):
        call(gramian)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(gramian)
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    gramians = {}
    for size in SIZES:
        jacobian = torch.randn(size, 4 * size, generator=gen, dtype=torch.float64)
        gramians[size] = jacobian @ jacobian.T
    columns = [(size, dtype) for dtype in DTYPES for size in SIZES]
    header = "| method | " + " | ".join(
        f"T={size} {str(dtype).removeprefix('torch.')}" for size, dtype in columns
    )
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, ms per call (median)")
    print(header + " |")
    print("|" + " --- |" * (len(columns) + 1))
    for name, spec in METHODS.items():
        if spec.input != "gramian":
            continue
        cells = []
        for size, dtype in columns:
            try:
                cells.append(
                    f"{time_call(_caller(name), gramians[size].to(dtype), args.repeats):.3f}"
                )
            except SolverError:
                cells.append("SolverError")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
