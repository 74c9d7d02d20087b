"""Step-time ratios of the pipeline against a plain loop, measured side by side in one run.

Equivalent to ``mtlhooks bench`` (which this calls); run from the repository root:

    python benchmarks/bench_pipeline.py                 # cpu suite (about 10 minutes on 2 cores)
    python benchmarks/bench_pipeline.py --quick         # one model, a few rounds
    python benchmarks/bench_pipeline.py --device cuda   # gpu suite (ResNet-18, transformer)
    python benchmarks/bench_pipeline.py --json --out bench.json

Targets (issues 2, 7 and 17): space ``none`` ≤ 1.05× plain; ``features`` and ``last_shared``
≤ 1.2× plain; ``params`` ≤ 1.10× the floor and no slower than LibMTL's T backward passes.
See docs/gpu.md for the profiles that explain the targets still missed on the CPU.
"""

from __future__ import annotations

import sys

from mtlhooks.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
