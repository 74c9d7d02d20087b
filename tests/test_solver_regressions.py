"""Regression tests for solver inputs found by the property suite on some machines only (the
summation order of a matrix product differs with the CPU's SIMD kernels, and a hypothesis
example that is harmless on one machine breaks a solver on another): each input is stored here
as it was found, so the case runs everywhere."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from families import family_gramian

from mtlhooks import functional
from mtlhooks.solvers import mean_gradient, simplex_qp, worst_case_weights

# Found by test_scale_invariant_update[imgrad]: rows 1 and 3 anti-parallel (a Pareto-stationary
# pair), norms spread over 1e16. IMGrad's ρ is rounding noise there, so its radius is ~1e-7.
SPREAD_PARETO = torch.tensor(
    [
        [27.200720689706543, -27027487817.012383, 6.074139105406728e-08, 2702748781.7012386],
        [-27027487817.012383, 4.342305035395654e19, -1388.2723487775809, -4.3423050353956547e18],
        [6.074139105406728e-08, -1388.2723487775809, 1.4434750345465016e-13, 138.8272348777581],
        [2702748781.7012386, -4.3423050353956547e18, 138.8272348777581, 4.3423050353956544e17],
    ],
    dtype=torch.float64,
)


def _objective(gramian, linear, radius, weights):
    return float(linear @ weights + radius * (weights @ gramian @ weights).clamp_min(0).sqrt())


@pytest.mark.parametrize("radius", [1e-12, 1e-9, 3.08e-7, 1e-3, 1.0])
def test_the_penalised_problem_is_never_beaten_by_a_vertex(radius):
    """Every vertex of the simplex is feasible: the solution's objective is at most the best
    vertex's (it was −312 against −9.8e17 for small radii: a face candidate whose weights
    cancel to 1 within rounding won on an objective computed from those weights)."""
    matrix, uniform, _ = mean_gradient(SPREAD_PARETO)
    linear = matrix @ uniform
    weights = worst_case_weights(matrix, linear, radius)
    assert bool((weights >= 0).all()) and abs(float(weights.sum()) - 1) < 1e-12
    best_vertex = min(
        _objective(matrix, linear, radius, torch.eye(4, dtype=torch.float64)[i]) for i in range(4)
    )
    value = _objective(matrix, linear, radius, weights)
    assert value <= best_vertex + 1e-9 * abs(best_vertex)


@pytest.mark.parametrize("factor", [1e-8, 1.0, 1e8])
def test_imgrad_is_scale_invariant_on_the_spread_pareto_input(factor):
    """The update Σ wᵢgᵢ is the same for G and c·G (IMGrad's declared scale invariance)."""
    first = functional.imgrad(SPREAD_PARETO)
    second = functional.imgrad(SPREAD_PARETO * factor)
    difference = first - second
    scale = float((first @ SPREAD_PARETO @ first).sqrt())
    assert float((difference @ SPREAD_PARETO @ difference).clamp_min(0).sqrt()) <= 1e-6 * scale


# simplex_qp with a linear term of order 1 on Gramians whose gradient norms span 1e-12…1e12:
# the face points β = z + μ·z_a cancelled (the weight of the smallest gradient came out as −1e4
# instead of 1), and the active-set method cycled ("did not terminate": the first four) or
# returned non-finite weights (the others). (family, T, family seed, seed of the linear term)
SPREAD_LINEAR_CASES = [
    ("norm_spread", 8, 0, 5),
    ("norm_spread", 16, 0, 4),
    ("norm_spread", 24, 1, 7),
    ("norm_spread", 40, 0, 4),
    ("norm_spread", 8, 0, 1),
    ("norm_spread", 24, 0, 8),
    ("norm_spread", 40, 1, 6),
    ("norm_spread_float32", 8, 0, 1),
]


def _simplex_by_enumeration(gramian: np.ndarray, linear: np.ndarray) -> float:
    """The optimal value of ``min_{w∈Δ} ½wᵀGw + cᵀw`` by solving every face's KKT system in
    long double (an exact reference for small T)."""
    num = gramian.shape[0]
    g, c = gramian.astype(np.longdouble), linear.astype(np.longdouble)
    best = None
    for mask in range(1, 2**num):
        face = [i for i in range(num) if mask >> i & 1]
        size = len(face)
        system = np.zeros((size + 1, size + 1), dtype=np.longdouble)
        system[:size, :size] = g[np.ix_(face, face)]
        system[:size, size] = -1.0
        system[size, :size] = 1.0
        rhs = np.concatenate([-c[face], np.ones(1, dtype=np.longdouble)])
        try:
            solution = _long_double_solve(system, rhs)
        except ZeroDivisionError:
            continue
        weights = np.zeros(num, dtype=np.longdouble)
        weights[face] = solution[:size]
        if (weights < 0).any():
            continue
        value = 0.5 * weights @ g @ weights + c @ weights
        best = value if best is None or value < best else best
    assert best is not None
    return float(best)


def _long_double_solve(system: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Gaussian elimination with partial pivoting in long double."""
    size = system.shape[0]
    augmented = np.concatenate([system, rhs[:, None]], axis=1)
    for column in range(size):
        pivot = column + int(np.argmax(np.abs(augmented[column:, column])))
        if augmented[pivot, column] == 0:
            raise ZeroDivisionError
        augmented[[column, pivot]] = augmented[[pivot, column]]
        below = augmented[column + 1 :, column : column + 1] / augmented[column, column]
        augmented[column + 1 :] -= below * augmented[column]
    solution = np.zeros(size, dtype=np.longdouble)
    for row in range(size - 1, -1, -1):
        tail = augmented[row, row + 1 : size] @ solution[row + 1 :]
        solution[row] = (augmented[row, size] - tail) / augmented[row, row]
    return solution


@pytest.mark.parametrize(("family", "num_tasks", "seed", "linear_seed"), SPREAD_LINEAR_CASES)
def test_simplex_qp_with_a_linear_term_on_spread_norms(family, num_tasks, seed, linear_seed):
    gramian = family_gramian(family, num_tasks, seed)
    gen = torch.Generator().manual_seed(linear_seed)
    linear = torch.randn(num_tasks, generator=gen, dtype=torch.float64).to(gramian.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the normalisation divided 0 by 0
        weights = simplex_qp(gramian, linear).double()
    assert bool(torch.isfinite(weights).all()) and bool((weights >= 0).all())
    assert abs(float(weights.sum()) - 1) < 1e-12
    g, c, w = gramian.double().numpy(), linear.double().numpy(), weights.numpy()
    value = float(0.5 * w @ g @ w + c @ w)
    if num_tasks <= 8:
        exact = _simplex_by_enumeration(g, c)
        assert value <= exact + 1e-12 * (abs(exact) + 1)
    # KKT in long double: the gradient Gw + c is smallest, and equal, on the support
    gradient = g.astype(np.longdouble) @ w.astype(np.longdouble) + c.astype(np.longdouble)
    support = w > 1e-9
    level = gradient[support].min()
    spread = np.abs(g).astype(np.longdouble) @ np.abs(w).astype(np.longdouble) + np.abs(c)
    assert (gradient >= level - 1e-9 * spread).all()
    assert (np.abs(gradient[support] - level) <= 1e-9 * spread[support]).all()
