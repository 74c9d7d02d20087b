"""The fast paths of CAGrad's inner problem and of the equal-projection solve give the answers of
the exact references they stand in for, on every hard family (issue 13 §5: faster, never less
exact)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import FAMILIES, family_gramian
from properties import assert_updates_close

from mtlhooks import solvers
from mtlhooks.functional import mean


def _sizes(family: str) -> tuple[int, ...]:
    return (9, 16) if family == "norm_spread_float32" else (9, 16, 24, 40)


def _cagrad_problem(
    gramian: torch.Tensor, c: float
) -> tuple[solvers._Scaled, np.ndarray, np.ndarray, float]:
    matrix = gramian.double()
    uniform = mean(matrix)
    problem = solvers._scaled_problem(matrix, None)
    unit = 1 / problem.scales
    linear = (matrix @ uniform).numpy() * unit
    radius = c * float((uniform @ matrix @ uniform).clamp_min(0).sqrt())
    return problem, unit, linear, radius


@pytest.mark.parametrize("family", FAMILIES)
def test_the_active_set_method_finds_the_homotopys_optimum(family: str) -> None:
    # the primal active-set method on the penalised problem itself must reach the optimum that
    # the homotopy over QP(t) (one exact QP per step) certifies, without needing it as fallback
    for num_tasks in _sizes(family):
        for seed in range(2):
            gramian = family_gramian(family, num_tasks, seed)
            for c in (0.1, 0.4, 2.0):
                problem, unit, linear, radius = _cagrad_problem(gramian, c)
                with np.errstate(all="ignore"):
                    fast = solvers._penalized_by_active_set(problem, unit, linear, radius)
                    reference = solvers._penalized_by_homotopy(problem, unit, linear, radius)
                assert fast is not None, (family, num_tasks, seed, c)
                cosine = torch.from_numpy(problem.cosine)
                first, second = torch.from_numpy(fast), torch.from_numpy(reference)
                # anti_parallel's near-null pair (1e-11) leaves the optimum that well defined
                assert_updates_close(cosine, first, second, 1e-9)


def test_an_active_set_failure_falls_back_to_the_homotopy(monkeypatch: pytest.MonkeyPatch) -> None:
    gramian = family_gramian("dense", 12, 0)
    uniform = mean(gramian)
    linear, radius = gramian @ uniform, 0.4 * float((uniform @ gramian @ uniform).sqrt())
    expected = solvers.penalized_simplex_weights(gramian, linear, radius)
    monkeypatch.setattr(solvers, "_penalized_by_active_set", lambda *args: None)
    fallback = solvers.penalized_simplex_weights(gramian, linear, radius)
    assert_updates_close(gramian, expected, fallback, 1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_host_scaled_problem_is_psd_cosine(family: str) -> None:
    for num_tasks in (5, 16):
        gramian = family_gramian(family, num_tasks, 0).double()
        cosine, scales, _ = solvers.psd_cosine(gramian)
        host_side = solvers._scaled_problem(gramian, None)
        ridge = solvers.default_ridge(torch.float64)
        # equal to a few ulps (torch's vectorised sqrt is not always correctly rounded)
        np.testing.assert_allclose(host_side.cosine, cosine.numpy(), rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(
            host_side.regularized,
            cosine.numpy() + ridge * np.eye(num_tasks),
            rtol=1e-14,
            atol=1e-15,
        )
        np.testing.assert_allclose(host_side.scales, scales.numpy(), rtol=1e-15)
        assert host_side.tol == 64 * num_tasks * float(torch.finfo(torch.float64).eps)
        assert host_side.ridge == ridge
        if family in ("dense", "norm_spread"):
            assert host_side.pivot > 1e-3  # well conditioned: no single-bound search
        if family in ("pareto_stationary", "indefinite"):
            assert host_side.pivot < 1e-3


def _eigen_path(matrix: np.ndarray, rhs: np.ndarray, relative: float, eps: float) -> np.ndarray:
    # psd_pinv_solve's rules through the batched eigen branch (a batch of one skips the Cholesky)
    return solvers._host_pinv_solve(matrix[None], rhs[None], relative, eps)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cholesky_shortcut_is_the_pseudo_inverse(family: str) -> None:
    for num_tasks in (3, 16, 40):
        if family == "norm_spread_float32" and num_tasks > 16:
            continue
        gramian = family_gramian(family, num_tasks, 1)
        matrix = gramian.double()
        scales = matrix.diagonal().sqrt()
        cosine = (matrix / scales[:, None] / scales[None, :]).numpy()
        rhs = np.ones(num_tasks)
        eps = solvers.input_eps(gramian)
        relative = solvers.rank_rtol(num_tasks, eps)
        shortcut = solvers._well_conditioned_solve(cosine, rhs, relative, eps)
        exact = _eigen_path(cosine, rhs, relative, eps)
        if family in ("dense", "norm_spread"):
            assert shortcut is not None  # the families it exists for
        if shortcut is not None:
            # the update Σ zᵢuᵢ, relative to its size
            delta = shortcut - exact
            assert (
                float(delta @ cosine @ delta) ** 0.5 <= 1e-11 * float(exact @ cosine @ exact) ** 0.5
            )
        if family in ("rank_deficient", "indefinite", "pareto_stationary", "anti_parallel"):
            assert shortcut is None  # singular to the rank rule: the eigen path decides
        if family in ("float32", "norm_spread_float32"):
            assert shortcut is None  # float32's noise rule is not rounding


def test_a_single_pinv_solve_is_the_batched_one() -> None:
    gen = torch.Generator().manual_seed(0)
    jacobians = torch.randn(4, 7, 5, generator=gen, dtype=torch.float64)
    gramians = jacobians @ jacobians.transpose(-1, -2)  # rank 5 of 7
    rhs = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    batched = solvers.psd_pinv_solve(gramians, rhs)
    single = torch.stack([solvers.psd_pinv_solve(g, b) for g, b in zip(gramians, rhs)])
    torch.testing.assert_close(single, batched, rtol=1e-10, atol=1e-12)
    reference = (torch.linalg.pinv(gramians, hermitian=True) @ rhs[..., None])[..., 0]
    torch.testing.assert_close(batched, reference, rtol=1e-8, atol=1e-10)


def test_a_vertex_of_the_penalised_problem_keeps_its_exact_weight() -> None:
    # hypothesis' case of test_scale_invariant_update[imgrad]: norms 4e-7 … 7e9, g₄ = −0.1·g₂, and
    # IMGrad's radius is rounding (ρ ≈ 4e-16). On a vertex the face direction e is 0 exactly;
    # computed, its rounding over the tiny √D made vertex 4's weight −0.19 (judged infeasible)
    # and vertex 1's 2.19: the worse vertex won, and the update depended on the Gramian's scale
    values = [
        "0x1.b33626e5deb90p+4", "-0x1.92bdaf1240caep+34", "0x1.04e1dda1df7d7p-24",
        "0x1.423158db6708cp+31", "-0x1.92bdaf1240caep+34", "0x1.2d4ed51da9bd6p+65",
        "-0x1.5b116e2991343p+10", "-0x1.e217bb62a92f2p+61", "0x1.04e1dda1df7d7p-24",
        "-0x1.5b116e2991343p+10", "0x1.450aaba199e86p-43", "0x1.15a78b547429cp+7",
        "0x1.423158db6708cp+31", "-0x1.e217bb62a92f2p+61", "0x1.15a78b547429cp+7",
        "0x1.81ac95e88758ep+58",
    ]  # fmt: skip
    gramian = torch.tensor([float.fromhex(v) for v in values], dtype=torch.float64).view(4, 4)
    uniform = mean(gramian)
    linear = gramian @ uniform
    radius = 3.119538e-07
    weights = solvers.penalized_simplex_weights(gramian, linear, radius)

    def objective(w: torch.Tensor) -> float:
        return float(w @ linear) + radius * float((w @ gramian @ w).clamp_min(0).sqrt())

    vertices = torch.eye(4, dtype=torch.float64)
    best = min(objective(v) for v in vertices)
    assert objective(weights) <= best + 1e-12 * abs(best)
    torch.testing.assert_close(weights, vertices[3])
    from mtlhooks.functional import imgrad

    torch.testing.assert_close(imgrad(gramian), imgrad(1e-8 * gramian))
