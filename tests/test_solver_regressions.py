"""Regression tests for solver inputs found by the property suite on some machines only (the
summation order of a matrix product differs with the CPU's SIMD kernels, and a hypothesis
example that is harmless on one machine breaks a solver on another): each input is stored here
as it was found, so the case runs everywhere."""

from __future__ import annotations

import pytest
import torch

from mtlhooks import functional
from mtlhooks.solvers import mean_gradient, worst_case_weights

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
