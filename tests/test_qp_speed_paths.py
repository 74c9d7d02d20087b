"""Cross-checks of the dual-cone and simplex QP solvers at T = 40 on every hard family.

The batched path (block principal pivoting, then the monotone active-set method for the
problems it leaves open, then the polishing solve) is compared with the monotone method alone,
started from the bounds: two routes through the same QPs must give the same updates ``Jᵀv``.
These pin the results that a faster core (fewer pivots, factor updates) has to reproduce.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from families import FAMILIES, FLOAT32_FAMILIES, family_gramian
from properties import assert_non_conflicting, assert_updates_close

from mtlhooks import solvers
from mtlhooks.errors import SolverError


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


def _count_face_solves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the face solves of the batched and the single-problem routes."""
    calls = [0]
    for name in ("_face_points", "_single_face_point", "_enumerate_faces"):
        original = getattr(solvers, name)

        def counted(*args: object, _original: Any = original, **kwargs: object) -> Any:
            calls[0] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(solvers, name, counted)
    return calls


def _projection_bounds(kind: str, num_tasks: int) -> torch.Tensor:
    """UPGrad's bounds (one problem per task) or DualProj's (the mean), float64."""
    if kind == "upgrad":
        return torch.eye(num_tasks, dtype=torch.float64) / num_tasks
    return torch.full((1, num_tasks), 1.0 / num_tasks, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["upgrad", "dualproj"])
def test_pareto_stationary_projections_hold_a_single_bound_and_take_two_solves(
    kind: str, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Near Pareto stationarity each projection holds one bound and frees the rest: after
    the first pivot those faces come in closed form from one inverse (``_single_bound_faces``),
    so the call takes two face solves (that pivot and the polish), not the 6–9 of block pivoting,
    and gives the monotone method's updates."""
    gramian = family_gramian("pareto_stationary", 40, seed)
    num_tasks = gramian.shape[0]
    lower = _projection_bounds(kind, num_tasks)
    calls = _count_face_solves(monkeypatch)
    batched = solvers.dual_cone_qp(gramian, lower)
    assert calls[0] == 2
    monkeypatch.undo()
    reference = _monotone_dual_cone(gramian, lower)
    for row in range(lower.shape[0]):
        assert_updates_close(gramian, batched[row], reference[row], 1e-9)
        assert int((batched[row] > lower[row] * (1 + 1e-9)).sum()) == num_tasks - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_single_bound_solutions_satisfy_the_kkt_conditions(family: str) -> None:
    """Every solution ``_single_bound_faces`` accepts is the ridge problem's KKT point, on
    every family and for random nonnegative and mixed-sign bounds (where it finds none, block
    pivoting goes on as before)."""
    gen = torch.Generator().manual_seed(7)
    accepted = 0
    for seed in range(3):
        gramian = family_gramian(family, _size(family), seed).double()
        num_tasks = gramian.shape[0]
        problem = solvers._scaled_problem(gramian, None)
        problem = problem._replace(pivot=0.0)  # bypass the gate: test every input
        lowers = [
            np.eye(num_tasks) / num_tasks,
            torch.rand(4, num_tasks, generator=gen, dtype=torch.float64).numpy(),
            torch.randn(4, num_tasks, generator=gen, dtype=torch.float64).numpy(),
        ]
        for lower in lowers:
            bound = lower * problem.scales
            with np.errstate(all="ignore"):
                found, free, beta = solvers._single_bound_faces(problem, bound)
            accepted += int(found.sum())
            for row in np.flatnonzero(found):
                held = np.flatnonzero(~free[row])
                assert held.size == 1
                assert beta[row, held[0]] == bound[row, held[0]]
                multipliers = beta[row] @ problem.regularized
                scale = np.abs(beta[row]) @ np.abs(problem.regularized)
                tol = problem.tol
                size = np.maximum(np.abs(beta[row]), np.abs(bound[row])).max()
                assert (beta[row] >= bound[row] - tol * size).all()
                assert (np.abs(multipliers[free[row]]) <= tol * scale[free[row]]).all()
                assert multipliers[held[0]] > 0
    if family == "pareto_stationary":
        assert accepted >= 3 * num_tasks  # at least UPGrad's projections, on every seed


@pytest.mark.parametrize("num_tasks", [5, 40])
@pytest.mark.parametrize("kind", ["upgrad", "dualproj"])
def test_bounds_that_satisfy_the_kkt_conditions_are_returned_without_a_solve(
    kind: str, num_tasks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nearly collinear gradients conflict with none of the others: every projection is its
    bound (UPGrad and DualProj give the mean), found by the first KKT test, with no face
    solve, no enumeration of the faces (T = 5) and no polish."""
    gramian = family_gramian("near_collinear", num_tasks, 0)
    num_tasks = gramian.shape[0]
    lower = _projection_bounds(kind, num_tasks)
    calls = _count_face_solves(monkeypatch)
    solution = solvers.dual_cone_qp(gramian, lower)
    assert calls[0] == 0
    torch.testing.assert_close(solution, lower, rtol=1e-15, atol=0)  # (u·s)/s, to an ulp


def _generic_route(
    problem: solvers._Scaled,
    lower: np.ndarray | None,
    linear: np.ndarray | None,
    unit: np.ndarray | None = None,
) -> np.ndarray:
    """``_solve_lcp``'s batched route, for one problem."""
    num = problem.regularized.shape[-1]
    if unit is None:
        bound = lower if lower is not None else np.zeros((1, num))
        free = solvers._bounds_start(problem, bound, linear)
        if not free.any():
            return bound.copy()
    else:
        free = np.ones((1, num), dtype=bool)
    free, beta, solved = solvers._pivot_until_optimal(
        problem, free, lower, linear, unit, solvers._BPP_ATTEMPTS
    )
    if not solved.all():
        free, beta = solvers._descend_faces(problem, beta, lower, linear, unit, "test")
    return solvers._polish(problem, free, beta, lower, linear, unit)


def _single_route(
    problem: solvers._Scaled,
    lower: np.ndarray | None,
    linear: np.ndarray | None,
    unit: np.ndarray | None,
) -> np.ndarray:
    return solvers._solve_lcp(problem, lower, linear, unit, 1, "test")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_single_problem_takes_the_batched_routes_pivots_bit_for_bit(family: str) -> None:
    """Single QPs (DualProj, MGDA, PCD, CAGrad's cold starts) take ``_pivot_single`` and
    ``_polish_single``, which must be the batched route's arithmetic exactly: the same
    solutions, bit for bit, on every family, for bounds (DualProj), linear terms (PCD's
    nonnegative QP) and the simplex with and without a linear term (MGDA, CAGrad)."""
    gen = torch.Generator().manual_seed(3)
    for num_tasks in (9, 16, 40):
        if family == "norm_spread_float32" and num_tasks > 16:
            continue
        for seed in range(2):
            gramian = family_gramian(family, num_tasks, seed).double()
            problem = solvers._scaled_problem(gramian, None)
            mean = np.full((1, num_tasks), 1.0 / num_tasks) * problem.scales
            spread = torch.rand(1, num_tasks, generator=gen, dtype=torch.float64).numpy()
            linear = torch.randn(1, num_tasks, generator=gen, dtype=torch.float64).numpy()
            unit = 1 / problem.scales
            cases = [
                (mean, None, None),
                (spread * problem.scales, None, None),
                (None, linear, None),
                (None, None, unit),
                (None, linear * unit, unit),
            ]
            for lower, term, equality in cases:
                outcomes = []
                for route in (_generic_route, _single_route):
                    try:
                        with np.errstate(all="ignore"):
                            outcomes.append(route(problem, lower, term, equality))
                    except SolverError as error:  # the same failure on both routes
                        outcomes.append(str(error))
                if isinstance(outcomes[0], str) or isinstance(outcomes[1], str):
                    assert outcomes[0] == outcomes[1]
                else:
                    np.testing.assert_array_equal(outcomes[1], outcomes[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_single_problem_descent_is_the_batched_one_bit_for_bit(family: str) -> None:
    """``_descend_single`` (one problem's monotone active-set method: the fallback after block
    pivoting and CAGrad's warm starts) takes the same iterates as ``_descend_faces``, from
    random starts, for bounds, linear terms and the simplex."""
    gen = torch.Generator().manual_seed(11)
    num_tasks = 16 if family == "norm_spread_float32" else 24
    for seed in range(2):
        gramian = family_gramian(family, num_tasks, seed).double()
        problem = solvers._scaled_problem(gramian, None)
        unit = 1 / problem.scales

        def draw() -> np.ndarray:
            return torch.rand(1, num_tasks, generator=gen, dtype=torch.float64).numpy()

        linear = torch.randn(1, num_tasks, generator=gen, dtype=torch.float64).numpy()
        bound = draw() * problem.scales / num_tasks
        cases = [
            (bound, None, None, bound + draw() * problem.scales),
            (None, linear, None, draw()),
            (None, None, unit, draw() * problem.scales),
            (None, linear * unit, unit, draw() * problem.scales),
        ]
        for lower, term, equality, start in cases:
            outcomes = []
            for descend in (solvers._descend_faces, solvers._descend_single):
                try:
                    with np.errstate(all="ignore"):
                        outcomes.append(descend(problem, start, lower, term, equality, "test"))
                except SolverError as error:
                    outcomes.append(str(error))
            if isinstance(outcomes[0], str) or isinstance(outcomes[1], str):
                assert outcomes[0] == outcomes[1]
            else:
                np.testing.assert_array_equal(outcomes[1][0], outcomes[0][0])
                np.testing.assert_array_equal(outcomes[1][1], outcomes[0][1])
