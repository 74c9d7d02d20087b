"""Hypothesis strategies for task-gradient matrices J and their Gramians G = J Jᵀ (float64).

The generated matrices deliberately include the degenerate cases aggregators must survive: a
single task, zero gradients, duplicated (or exactly opposite) gradients, rank deficiency, and
per-task scales spread from 1e-12 to 1e12; :func:`family_gramians` draws the hard families of
``families.py`` (the inputs that broke solvers). Entries come from a seeded torch generator so that
examples are cheap to draw; the structure (sizes, kinds, edits, exponents) is drawn by
hypothesis so that it shrinks to readable cases.
"""

from __future__ import annotations

import torch
from families import FAMILIES, family_gramian
from hypothesis import strategies as st
from torch import Tensor

KINDS = ("dense", "low_rank", "integer", "nonnegative")


@st.composite
def jacobians(
    draw: st.DrawFn,
    *,
    min_tasks: int = 1,
    max_tasks: int = 8,
    min_params: int = 1,
    max_params: int = 20,
    kinds: tuple[str, ...] = KINDS,
    degenerate: bool = True,
    max_exponent: int = 12,
) -> Tensor:
    """A (T, P) float64 matrix of task gradients.

    :param min_params: with ``min_params ≥ max_tasks`` and dense kinds, J has full row rank
        (almost surely).
    :param kinds: ``dense`` Gaussian, ``low_rank`` (rank < min(T, P) when possible), ``integer``
        (entries in -2..2: exact orthogonality, ties and duplicates), ``nonnegative`` (no
        conflicts at all).
    :param degenerate: add duplicated / opposite / zero rows.
    :param max_exponent: rows are multiplied by 10**k, |k| ≤ max_exponent (0 disables).
    """
    num_tasks = draw(st.integers(min_tasks, max_tasks))
    num_params = draw(st.integers(min_params, max_params))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shape = (num_tasks, num_params)
    if kind == "dense":
        matrix = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif kind == "low_rank":
        rank = draw(st.integers(1, max(1, min(num_tasks, num_params) - 1)))
        left = torch.randn(num_tasks, rank, generator=gen, dtype=torch.float64)
        right = torch.randn(rank, num_params, generator=gen, dtype=torch.float64)
        matrix = left @ right
    elif kind == "integer":
        matrix = torch.randint(-2, 3, shape, generator=gen).to(torch.float64)
    else:
        matrix = torch.rand(shape, generator=gen, dtype=torch.float64)
    if degenerate and num_tasks > 1:
        for _ in range(draw(st.integers(0, num_tasks - 1))):
            target = draw(st.integers(0, num_tasks - 1))
            source = draw(st.integers(0, num_tasks - 1))
            factor = draw(st.sampled_from([1.0, 2.0, 0.5, -1.0]))
            if kind == "nonnegative":
                factor = abs(factor)
            matrix[target] = factor * matrix[source]
        zero_rows = draw(st.lists(st.integers(0, num_tasks - 1), max_size=num_tasks - 1))
        matrix[zero_rows] = 0.0
    if max_exponent:
        exponents = draw(
            st.lists(
                st.integers(-max_exponent, max_exponent), min_size=num_tasks, max_size=num_tasks
            )
        )
        matrix = matrix * torch.tensor([10.0**k for k in exponents], dtype=torch.float64)[:, None]
    return matrix


def gramian_of(jacobian: Tensor) -> Tensor:
    """``J Jᵀ``, symmetrised so that rounding cannot make it asymmetric."""
    gramian = jacobian @ jacobian.T
    return (gramian + gramian.T) / 2


@st.composite
def gramians(draw: st.DrawFn, **kwargs: object) -> Tensor:
    """A (T, T) float64 Gramian of :func:`jacobians` (same keyword arguments)."""
    return gramian_of(draw(jacobians(**kwargs)))  # type: ignore[arg-type]


scale_factors = st.sampled_from([1e-8, 0.3, 4.0, 7.0, 1e8])
"""Common factors c for ``G → cG`` (powers of 4 are exact in binary, the others are not)."""


@st.composite
def family_gramians(
    draw: st.DrawFn,
    *,
    families: tuple[str, ...] = FAMILIES,
    min_tasks: int = 2,
    max_tasks: int = 12,
) -> Tensor:
    """A Gramian of one of the hard families of ``families.py`` (rank-deficient,
    near-collinear, anti-parallel, extreme norm spreads, float32, slightly indefinite,
    Pareto-stationary), in the dtype the family hands to a method."""
    family = draw(st.sampled_from(families))
    num_tasks = draw(st.integers(min_tasks, max_tasks))
    seed = draw(st.integers(0, 2**31 - 1))
    return family_gramian(family, num_tasks, seed)
