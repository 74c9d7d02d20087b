"""Cross-checks of the dual-cone and simplex QP solvers at T = 40 on every hard family.

The batched path (block principal pivoting, then the monotone active-set method for the
problems it leaves open, then the polishing solve) is compared with the monotone method alone,
started from the bounds: two routes through the same QPs must give the same updates ``Jᵀv``.
These pin the results that a faster core (fewer pivots, factor updates) has to reproduce.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import FAMILIES, FLOAT32_FAMILIES, family_gramian
from properties import assert_non_conflicting, assert_updates_close

from mtlhooks import solvers


def _size(family: str) -> int:
    return 16 if family == "norm_spread_float32" else 40


def _monotone_dual_cone(gramian: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """``min vᵀGv s.t. v ≥ u`` by the monotone active-set method alone, from ``v = u``."""
    problem = solvers._scaled_problem(gramian.double(), None)
    bound = lower.double().numpy() * problem.scales
    with np.errstate(all="ignore"):
        free, beta = solvers._descend_faces(problem, bound, bound, None, None, "test")
        beta = solvers._polish(problem, free, beta, bound, None, None)
    return torch.from_numpy(np.maximum(beta, bound) / problem.scales)


@pytest.mark.parametrize("family", FAMILIES)
def test_upgrad_projections_agree_with_the_monotone_method_alone(family: str) -> None:
    gramian = family_gramian(family, _size(family), 0)
    num_tasks = gramian.shape[0]
    exact = gramian.double()
    lower = torch.eye(num_tasks, dtype=torch.float64) / num_tasks
    batched = solvers.dual_cone_qp(gramian, lower.to(gramian.dtype)).double()
    reference = _monotone_dual_cone(gramian, lower)
    rtol = 1e-5 if family in FLOAT32_FAMILIES else 1e-9
    for row in range(num_tasks):
        assert_updates_close(exact, batched[row], reference[row], rtol)
        assert bool((batched[row] >= lower[row] * (1 - rtol)).all())
    # the rtol of benchmarks/solver_robustness.py: indefinite Gramians are solved shifted
    assert_non_conflicting(exact, batched.sum(0), 1e-3 if family in FLOAT32_FAMILIES else 1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_dualproj_projection_agrees_with_the_monotone_method_alone(family: str) -> None:
    gramian = family_gramian(family, _size(family), 1)
    num_tasks = gramian.shape[0]
    mean = torch.full((1, num_tasks), 1.0 / num_tasks, dtype=torch.float64)
    batched = solvers.dual_cone_qp(gramian, mean[0].to(gramian.dtype)).double()
    reference = _monotone_dual_cone(gramian, mean)[0]
    rtol = 1e-5 if family in FLOAT32_FAMILIES else 1e-9
    assert_updates_close(gramian.double(), batched, reference, rtol)
