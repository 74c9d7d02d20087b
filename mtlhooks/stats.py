"""Gradient statistics computed from a Gramian G = J Jᵀ (no T×P matrix needed).

Used by the ``gradstats`` observer and the studies; plain functions, usable on their own.
"""

from __future__ import annotations

import torch
from torch import Tensor


def norms(gramian: Tensor) -> Tensor:
    """Per-task gradient norms ‖gᵢ‖ = √Gᵢᵢ."""
    return torch.diagonal(gramian).clamp_min(0).sqrt()


def cosine_matrix(gramian: Tensor) -> Tensor:
    """cos(gᵢ, gⱼ); 0 where either gradient is zero (1 on the diagonal of non-zero rows)."""
    n = norms(gramian)
    denominator = n[:, None] * n[None, :]
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, gramian / safe, torch.zeros_like(gramian)).clamp(-1, 1)


def magnitude_similarity(gramian: Tensor) -> Tensor:
    """Gradient magnitude similarity 2‖gᵢ‖‖gⱼ‖ / (‖gᵢ‖² + ‖gⱼ‖²) (Yu et al. 2020, PCGrad §3);
    1 means equal norms, → 0 as they diverge; 1 where both gradients are zero."""
    n = norms(gramian)
    squares = n[:, None] ** 2 + n[None, :] ** 2
    safe = torch.where(squares > 0, squares, torch.ones_like(squares))
    return torch.where(squares > 0, 2 * n[:, None] * n[None, :] / safe, torch.ones_like(squares))


def conflict_rate(gramian: Tensor) -> float:
    """Fraction of task pairs i < j whose gradients conflict (⟨gᵢ, gⱼ⟩ < 0); 0 for one task."""
    count = gramian.shape[0]
    if count < 2:
        return 0.0
    upper = torch.triu_indices(count, count, offset=1, device=gramian.device)
    return float((gramian[upper[0], upper[1]] < 0).double().mean())


def norm_imbalance(gramian: Tensor) -> dict[str, float]:
    """Imbalance of the task-gradient norms: max/min ratio (inf if a norm is zero) and the
    coefficient of variation (std/mean)."""
    n = norms(gramian).double()
    smallest, largest = float(n.min()), float(n.max())
    ratio = largest / smallest if smallest > 0 else (1.0 if largest == 0 else float("inf"))
    mean = float(n.mean())
    variation = float(n.std(unbiased=False)) / mean if mean > 0 else 0.0
    return {"max_min_ratio": ratio, "coefficient_of_variation": variation}
