"""Options that validate must run: values whose arithmetic would overflow are refused when the
config is validated, naming the field, and the largest accepted value runs a finite step."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mtlhooks import MTL, ConfigError

TASKS = ("a", "b", "c")

# (plugin, option, the largest accepted value, a refused value, why it would fail at run time)
BOUNDS = [
    ("uncertainty", "init", 80.0, 1e39, "a float32 log-variance of 1e39 is inf"),
    ("uncertainty", "init", -80.0, -100.0, "e^100 overflows float32: an infinite weight"),
    ("imtl_l", "init", 80.0, 100.0, "e^100 overflows float32: an infinite weight"),
    ("cagrad", "c", 1e6, 1e200, "c² overflows (OverflowError in Python floats)"),
    ("imgrad", "alpha", 1e6, 1e200, "α² overflows"),
    ("gradnorm", "alpha", 10.0, 50.0, "rᵢ^α overflows float32 targets"),
    ("fairgrad", "alpha", 1e3, 1e4, "w^(-1/α) loses every digit"),
    ("nash_mtl", "tol", 1e-2, 0.5, "a residual of 50% is no solution"),
]


def _config(plugin: str, option: str, value: float) -> dict[str, Any]:
    return {"tasks": TASKS, "plugins": [{"name": plugin, option: value}]}


@pytest.mark.parametrize(("plugin", "option", "largest", "refused", "why"), BOUNDS)
def test_values_that_would_fail_at_run_time_are_refused_by_validation(
    plugin: str, option: str, largest: float, refused: float, why: str
) -> None:
    with pytest.raises(ConfigError, match=option):
        MTL(_config(plugin, option, refused))


@pytest.mark.parametrize(("plugin", "option", "largest", "refused", "why"), BOUNDS)
def test_the_largest_accepted_value_runs_a_finite_step(
    problem: Any, plugin: str, option: str, largest: float, refused: float, why: str
) -> None:
    mtl = MTL(_config(plugin, option, largest), shared=problem.model.encoder)
    z, losses = problem.losses()
    report = mtl.backward(losses, features=z)
    assert bool(torch.isfinite(report.weights).all())
    assert all(bool(torch.isfinite(g).all()) for g in problem.grads().values())
