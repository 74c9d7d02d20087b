"""Named assertion helpers shared by the aggregator tests.

Tolerances are relative to the natural scale of each quantity, so that the same helper works for
gradients of norm 1e-12 and 1e12. For the update ``d = Jᵀα`` the scale of ``⟨d, gᵢ⟩`` is
``‖gᵢ‖ · Σⱼ |αⱼ| ‖gⱼ‖``: rounding in ``(Gα)ᵢ`` alone is of that order times eps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Weighting = Callable[[Tensor], Tensor]


def norms(gramian: Tensor) -> Tensor:
    return gramian.diagonal().clamp_min(0).sqrt()


def inner_product_scale(gramian: Tensor, weights: Tensor) -> Tensor:
    """Per-task scale ``‖gᵢ‖ Σⱼ |αⱼ| ‖gⱼ‖`` of ``⟨d, gᵢ⟩``."""
    scales = norms(gramian)
    return scales * (scales * weights.abs()).sum()


def assert_finite(weights: Tensor) -> None:
    assert torch.isfinite(weights).all(), f"non-finite output: {weights}"


def assert_nonnegative(weights: Tensor) -> None:
    assert (weights >= 0).all(), f"negative weight: {weights}"


def assert_non_conflicting(gramian: Tensor, weights: Tensor, rtol: float = 1e-8) -> None:
    """``⟨d, gᵢ⟩ = (Gα)ᵢ ≥ 0`` for every task, up to ``rtol`` of its natural scale."""
    products = gramian @ weights
    slack = rtol * inner_product_scale(gramian, weights)
    bad = products < -slack
    assert not bad.any(), f"conflicts with tasks {bad.nonzero().flatten().tolist()}: {products}"


def assert_updates_close(gramian: Tensor, first: Tensor, second: Tensor, rtol: float) -> None:
    """``‖Jᵀ(α − β)‖ ≤ rtol · Σⱼ (|αⱼ| + |βⱼ|) ‖gⱼ‖``: the two weightings give the same update."""
    delta = first - second
    distance = (delta @ gramian @ delta).clamp_min(0).sqrt()
    scale = (norms(gramian) * (first.abs() + second.abs())).sum()
    assert distance <= rtol * scale, f"updates differ: {distance} > {rtol} * {scale}"


def assert_weights_close(first: Tensor, second: Tensor, rtol: float) -> None:
    """Weights equal up to ``rtol`` of the largest weight."""
    scale = torch.maximum(first.abs().max(), second.abs().max())
    assert (first - second).abs().max() <= rtol * scale, f"{first} != {second}"


def assert_scale_law(
    weighting: Weighting,
    gramian: Tensor,
    factor: float,
    exponent: float = 0.0,
    rtol: float = 1e-6,
    *,
    check_weights: bool = True,
) -> None:
    """``weights(c·G) = c**exponent · weights(G)`` (exponent 0: scale invariance).

    ``check_weights=False`` compares only the updates ``Jᵀα``: use it where the optimal weights
    are not unique (e.g. a QP whose optimal face is not a point).
    """
    base = weighting(gramian)
    scaled = weighting(factor * gramian) / factor**exponent
    assert_updates_close(gramian, base, scaled, rtol)
    if check_weights:
        assert_weights_close(base, scaled, rtol)


def assert_scale_invariant(
    weighting: Weighting,
    gramian: Tensor,
    factor: float,
    rtol: float = 1e-6,
    *,
    check_weights: bool = True,
) -> None:
    assert_scale_law(weighting, gramian, factor, 0.0, rtol, check_weights=check_weights)


def assert_permutation_equivariant(
    weighting: Weighting,
    gramian: Tensor,
    permutation: list[int],
    rtol: float = 1e-6,
    *,
    check_weights: bool = True,
) -> None:
    """Relabelling the tasks by ``permutation`` relabels the weights (or the update) alike."""
    index = torch.tensor(permutation)
    base = weighting(gramian)
    permuted = weighting(gramian[index][:, index])
    assert_updates_close(gramian[index][:, index], base[index], permuted, rtol)
    if check_weights:
        assert_weights_close(base[index], permuted, rtol)
