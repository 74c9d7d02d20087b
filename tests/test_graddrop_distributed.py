"""GradDrop under data parallelism: 2 gloo processes × half batch against 1 process × full batch.

GradDrop's purity is a sum over the batch (per feature of z), so the ranks sum their batch sums
(``step.all_reduce``) and draw the same uniforms from the shared seed: the result must equal
the single-process run on the global batch to rounding. Reuses the harness of
``test_distributed.py`` (its problem, its DDP training loop, its launcher on a free port); this
file run as a script is the worker.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_distributed import WORLD, _spec, assert_matches, launch, train_plain

SCENARIOS: dict[str, dict[str, Any]] = {
    "graddrop_features": _spec({"plugins": ["graddrop"], "space": "features"}, steps=4),
    "graddrop_leak_static": _spec(
        {
            "plugins": [
                {"name": "static", "weights": {"t0": 1.0, "t1": 0.5, "t2": 2.0}},
                {"name": "graddrop", "leak": 0.2},
            ],
            "space": "features",
        },
        steps=3,
    ),
}


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group("gloo")
    for name, spec in SCENARIOS.items():
        torch.save(train_plain(spec, rank, world), out / f"{name}.rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("graddrop")
    launch([sys.executable, str(Path(__file__).resolve()), str(out)])
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_graddrop_on_two_ranks_equals_one_process_on_the_global_batch(
    results: Path, name: str
) -> None:
    """Final parameters of both ranks, and every step's weights, equal the single-process run
    (float64); the ranks agree bit for bit."""
    ranks = [torch.load(results / f"{name}.rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert_matches(name, ranks, train_plain(SCENARIOS[name]), rtol=1e-12, atol=1e-14)


if __name__ == "__main__":
    from worker_exit import run_worker

    run_worker(_worker, Path(sys.argv[1]))
