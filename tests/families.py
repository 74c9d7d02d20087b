"""Families of hard Gramians: the inputs that break naive solvers (shared by the property tests,
through ``strategies.py``, and by ``benchmarks/bench_solvers.py``).

Every family is a Gramian ``G = J Jᵀ`` of task gradients J drawn from a seeded generator, so a
case is named by ``(family, num_tasks, seed)``:

- ``dense``: Gaussian J with P = 4T columns (full rank, mixed conflicts), the easy reference;
- ``rank_deficient``: J = A·B with A (T × T/2), B (T/2 × max(100, 4T)) Gaussian, e.g. T = 40 of
  rank 20;
- ``near_collinear``: every gᵢ = g + δ·noiseᵢ with δ = 1e-3, 1e-6 or 1e-9;
- ``anti_parallel``: Gaussian J whose second row is −c·g₁ + 1e-11·noise (c ∈ [0.5, 2]);
- ``norm_spread``: Gaussian rows scaled by 10^k, k uniform in [−12, 12] (float64);
- ``norm_spread_float32``: the same Gramian rounded to float32 (T ≤ 16 keeps it finite);
- ``float32``: J and G computed in float32;
- ``indefinite``: a rank-deficient J and its Gramian computed in float32, handed over as
  float64: the zero eigenvalues come out as ±1e-7 relative;
- ``pareto_stationary``: a positive combination of the gradients vanishes (gT = −Σλᵢgᵢ/λT with
  λ > 0), up to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

FAMILIES = (
    "dense",
    "rank_deficient",
    "near_collinear",
    "anti_parallel",
    "norm_spread",
    "norm_spread_float32",
    "float32",
    "indefinite",
    "pareto_stationary",
)
"""Every family, easiest first."""

FLOAT32_FAMILIES = frozenset({"norm_spread_float32", "float32"})
"""Families whose Gramians are float32 (all others are float64)."""


def _symmetric(gramian: Tensor) -> Tensor:
    return (gramian + gramian.T) / 2


def family_jacobian(family: str, num_tasks: int, seed: int) -> Tensor:
    """The float64 task gradients of a case (for ``float32`` and ``indefinite``: before the
    rounding to float32 that makes the case hard)."""
    gen = torch.Generator().manual_seed(seed)
    width = 4 * num_tasks

    def gaussian(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if family in ("dense", "float32"):
        return gaussian(num_tasks, width)
    if family in ("rank_deficient", "indefinite"):
        rank = max(1, num_tasks // 2)
        return gaussian(num_tasks, rank) @ gaussian(rank, max(100, width))
    if family == "near_collinear":
        spread = (1e-3, 1e-6, 1e-9)[seed % 3]
        return gaussian(1, width) + spread * gaussian(num_tasks, width)
    if family == "anti_parallel":
        jacobian = gaussian(num_tasks, width)
        if num_tasks >= 2:
            factor = 0.5 + 1.5 * float(torch.rand((), generator=gen, dtype=torch.float64))
            jacobian[1] = -factor * jacobian[0] + 1e-11 * gaussian(width)
        return jacobian
    if family in ("norm_spread", "norm_spread_float32"):
        exponents = torch.randint(-12, 13, (num_tasks, 1), generator=gen).to(torch.float64)
        return gaussian(num_tasks, width) * 10.0**exponents
    if family == "pareto_stationary":
        jacobian = gaussian(num_tasks, width)
        if num_tasks >= 2:
            combination = 0.1 + torch.rand(num_tasks, generator=gen, dtype=torch.float64)
            jacobian[-1] = -(combination[:-1] @ jacobian[:-1]) / combination[-1]
        return jacobian
    raise ValueError(f"unknown family {family!r}; families: {FAMILIES}")


def family_gramian(family: str, num_tasks: int, seed: int) -> Tensor:
    """The Gramian of a case, in the dtype the family hands to a method."""
    jacobian = family_jacobian(family, num_tasks, seed)
    if family == "float32":
        single = jacobian.float()
        return _symmetric(single @ single.T)
    if family == "indefinite":
        single = jacobian.float()
        return _symmetric(single @ single.T).double()
    gramian = _symmetric(jacobian @ jacobian.T)
    if family == "norm_spread_float32":
        return gramian.float()
    return gramian
