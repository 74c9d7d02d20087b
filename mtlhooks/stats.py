"""Gradient statistics computed from a Gramian G = J Jᵀ (no T×P matrix needed).

Used by the ``gradstats`` observer and the studies; plain functions, usable on their own.
:func:`gramian_of` and :func:`split_batch_statistics` take gradients themselves (from losses with
a graph): they give the single-task baseline of the seed papers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.solvers import cosine_from_gramian, gramian_scales


def norms(gramian: Tensor) -> Tensor:
    """Per-task gradient norms ‖gᵢ‖ = √Gᵢᵢ."""
    return gramian_scales(gramian)


def cosine_matrix(gramian: Tensor) -> Tensor:
    """cos(gᵢ, gⱼ); 0 where either gradient is zero (1 on the diagonal of non-zero rows)."""
    return cosine_from_gramian(gramian)


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


def gramian_of(losses: Sequence[Tensor], inputs: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """The Gramian of the gradients of several scalar ``losses`` w.r.t. ``inputs`` (parameters
    or a representation), and one Gramian per input (they sum to the first).

    Takes ``len(losses)`` vector-Jacobian products with ``retain_graph=True``, so the graph stays
    usable for the training step that follows. An input that a loss does not reach counts as a
    zero gradient.
    """
    inputs = list(inputs)
    if not losses or not inputs:
        raise InputError("gramian_of needs at least one loss and one input")
    rows: list[list[Tensor]] = []
    for loss in losses:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        rows.append(
            [
                (torch.zeros_like(x) if g is None else g).reshape(-1)
                for g, x in zip(grads, inputs, strict=True)
            ]
        )
    blocks = []
    for column in range(len(inputs)):
        matrix = torch.stack([row[column] for row in rows])
        if matrix.dtype in (torch.float16, torch.bfloat16):
            matrix = matrix.float()
        blocks.append(matrix @ matrix.T)
    return torch.stack(blocks).sum(0), blocks


def split_batch_statistics(
    per_sample_losses: Mapping[str, Tensor], inputs: Sequence[Tensor]
) -> dict[str, Any]:
    """Task-vs-task statistics next to their single-task baseline, from one batch.

    Each task's per-sample losses (shape ``(n,)``, n ≥ 2) are split into two halves A and B of
    ⌊n/2⌋ samples (an odd last sample is dropped), giving 2T gradients of equal sample size:

    - ``stl``: for each task i, cosine and magnitude similarity between gᵢᴬ and gᵢᴮ — the
      baseline of Elich et al. ("Challenging Common Assumptions in Multi-task Learning", §5):
      how much two batches of *one* task disagree;
    - ``mtl``: for each pair i < j, the same statistics between gᵢ and gⱼ on the same half,
      averaged over the two halves — how much *tasks* disagree at the same sample size;
    - ``stl_conflict_rate`` / ``mtl_conflict_rate``: the fraction of those comparisons with a
      negative inner product.

    Comparing tasks on half batches (not full batches) keeps the gradient noise equal on both
    sides of the comparison. Costs 2T vector-Jacobian products; the graph is retained.

    :param per_sample_losses: task name → per-sample losses with a graph, all of one length.
    :param inputs: what the gradients are taken of (usually the shared parameters).
    :return: nested plain Python values (floats), JSON-ready.
    """
    tasks = list(per_sample_losses)
    sizes = {tuple(v.shape) for v in per_sample_losses.values()}
    if not tasks or len(sizes) != 1 or len(next(iter(sizes))) != 1 or next(iter(sizes))[0] < 2:
        raise InputError(
            "split_batch_statistics needs per-sample losses of one shape (n,), n >= 2, got "
            f"{ {t: tuple(v.shape) for t, v in per_sample_losses.items()} }"
        )
    half = next(iter(sizes))[0] // 2
    halves = []
    for task in tasks:
        values = per_sample_losses[task]
        halves += [values[:half].mean(), values[half : 2 * half].mean()]
    gramian, _ = gramian_of(halves, inputs)
    gramian = gramian.double()
    cosine = cosine_matrix(gramian)
    similarity = magnitude_similarity(gramian)
    count = len(tasks)
    stl = {
        task: {
            "cosine": float(cosine[2 * i, 2 * i + 1]),
            "magnitude_similarity": float(similarity[2 * i, 2 * i + 1]),
        }
        for i, task in enumerate(tasks)
    }
    stl_conflicts = [float(gramian[2 * i, 2 * i + 1] < 0) for i in range(count)]
    mtl_cosine: dict[str, dict[str, float]] = {}
    mtl_similarity: dict[str, dict[str, float]] = {}
    mtl_conflicts: list[float] = []
    for i in range(count):
        for j in range(i + 1, count):
            same_half = [(2 * i + h, 2 * j + h) for h in (0, 1)]
            mtl_cosine.setdefault(tasks[i], {})[tasks[j]] = (
                sum(float(cosine[a, b]) for a, b in same_half) / 2
            )
            mtl_similarity.setdefault(tasks[i], {})[tasks[j]] = (
                sum(float(similarity[a, b]) for a, b in same_half) / 2
            )
            mtl_conflicts += [float(gramian[a, b] < 0) for a, b in same_half]
    result: dict[str, Any] = {
        "samples_per_half": half,
        "stl": stl,
        "stl_conflict_rate": sum(stl_conflicts) / count,
    }
    if count > 1:
        result["mtl"] = {"cosine": mtl_cosine, "magnitude_similarity": mtl_similarity}
        result["mtl_conflict_rate"] = sum(mtl_conflicts) / len(mtl_conflicts)
    return result
