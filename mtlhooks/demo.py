"""``mtlhooks demo``: several configurations trained side by side on an embedded problem.

The default problem is the GradNorm-style synthetic regression (:func:`mtlhooks.problems.
make_regression`) whose tasks differ in scale by orders of magnitude, so the loss of one task
dominates a plain sum. Every configuration starts from the same initial model and sees the same
batches; the table reports each task's test error relative to its scale σᵢ (lower is better).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mtlhooks.core import MTL
from mtlhooks.problems import MultiTaskMLP, make_regression, regression_errors
from mtlhooks.progress import ProgressBar

SIGMAS = (1.0, 10.0, 100.0, 1000.0)
"""Scales of the demo's four tasks: the plain sum of their losses is dominated by the last."""

DEMO_CONFIGS: dict[str, list[Any]] = {
    "equal weights": [],
    "static 1/σ² (oracle)": [
        {"name": "static", "weights": {f"t{i}": 1.0 / s**2 for i, s in enumerate(SIGMAS)}}
    ],
    "uncertainty": ["uncertainty"],
    "avgnorm": ["avgnorm"],
    "pcgrad": ["pcgrad"],
    "mgda": ["mgda"],
    "upgrad": ["upgrad"],
    "avgnorm + pcgrad": ["avgnorm", "pcgrad"],
}
"""Name → plugin list of the configurations the demo compares. The oracle knows the task
scales σᵢ, which a real problem does not reveal: it shows what balancing could achieve."""


@dataclass(frozen=True)
class DemoResult:
    name: str
    plugins: list[Any]
    space: str
    errors: dict[str, float]
    seconds: float

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / len(self.errors)


def run_demo(
    *,
    configs: Mapping[str, list[Any]] | None = None,
    steps: int = 1500,
    batch_size: int = 64,
    optimizer: Literal["sgd", "adam"] = "adam",
    lr: float | None = None,
    seed: int = 0,
    n_train: int = 2048,
    progress: bool = True,
) -> list[DemoResult]:
    """Train one model per configuration for ``steps`` optimizer steps; return the results.

    The problem is a small instance of the synthetic regression (inputs 32, outputs 8 per task,
    σ = 1, 10, 100, 1000) and the model an MLP with a 4-layer trunk of width 64, so that each
    configuration trains in seconds on a CPU.
    """
    data = make_regression(
        n_train=n_train, n_test=512, in_dim=32, out_dim=8, sigmas=SIGMAS, seed=seed
    )
    learning_rate = lr if lr is not None else (3e-3 if optimizer == "adam" else 1e-6)
    results = []
    for name, plugins in (configs or DEMO_CONFIGS).items():
        model = MultiTaskMLP(data.x_train.shape[1], 64, data.task_out_dims, seed=seed)
        mtl = MTL(
            {"tasks": data.task_names, "plugins": plugins, "seed": seed},
            shared=model.encoder,
        )
        params = [*model.parameters(), *mtl.parameters()]
        opt: torch.optim.Optimizer = (
            torch.optim.Adam(params, lr=learning_rate)
            if optimizer == "adam"
            else torch.optim.SGD(params, lr=learning_rate, momentum=0.9)
        )
        batches = torch.Generator().manual_seed(seed)
        done = 0
        start = time.perf_counter()
        with ProgressBar(steps, name, enabled=progress) as bar:
            while done < steps:
                for x, targets in data.batches(batch_size, batches, drop_last=True):
                    opt.zero_grad(set_to_none=True)
                    z, outputs = model(x)
                    mtl.backward(
                        data.losses(outputs, targets),
                        features=z if mtl.takes_features else None,
                    )
                    opt.step()
                    done += 1
                    bar.advance()
                    if done == steps:
                        break
        seconds = time.perf_counter() - start
        results.append(
            DemoResult(
                name, list(plugins), mtl.space.value, regression_errors(model, data), seconds
            )
        )
    return results


def format_table(results: Sequence[DemoResult]) -> str:
    """A plain-text table: one row per configuration, one column per task."""
    tasks = list(results[0].errors)
    header = ["config", "space", *tasks, "mean", "time [s]"]
    rows = [
        [
            r.name,
            r.space,
            *(f"{r.errors[t]:.3f}" for t in tasks),
            f"{r.mean_error:.3f}",
            f"{r.seconds:.1f}",
        ]
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i < 2 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        )

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(row) for row in rows)])
