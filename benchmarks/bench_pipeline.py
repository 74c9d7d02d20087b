"""Step-time ratios of the pipeline against a plain loop, measured side by side in one run.

Equivalent to ``mtlhooks bench`` (which this calls); run from the repository root:

    python benchmarks/bench_pipeline.py            # full table (a few minutes on 2 cores)
    python benchmarks/bench_pipeline.py --quick    # one model, a few rounds

Targets (issues 2 and 7): space ``none`` ≤ 1.05× plain; ``features`` and ``last_shared``
≤ 1.3× plain; ``params`` ≤ 1.10× the floor and no slower than LibMTL's T backward passes.
"""

from __future__ import annotations

import sys

from mtlhooks.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
