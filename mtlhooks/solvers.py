"""Shared numerical kernels for Gramian-based gradient aggregation.

Every aggregator in :mod:`mtlhooks.functional` reduces to a handful of small problems on the
T×T Gramian ``G = J Jᵀ`` of the task gradients: a projection onto the simplex, a quadratic
program on the simplex (MGDA, CAGrad, IMGrad), a projection onto the dual cone of the
gradients (UPGrad, DualProj), a regularised or pseudo-inverse solve (IMTL-G, ConFIG,
Aligned-MTL). They live here, written once, as vectorised torch code that runs on the device and
in the dtype of ``G``.

Conventions used throughout:

* ``scales`` are the gradient norms ``sᵢ = √Gᵢᵢ``. The quadratic programs are solved in the
  *diagonally scaled* coordinates ``Ĝ = S⁻¹ G S⁻¹`` (the cosine matrix, unit diagonal), so that
  gradients whose norms differ by 24 orders of magnitude stay well conditioned: the conditioning
  of the scaled problem only depends on the angles between the gradients.
* A zero gradient (``Gᵢᵢ = 0``) gets ``sᵢ = 1`` and an all-zero row in ``Ĝ``.
* Strict convexity, hence a unique and permutation-equivariant answer even for duplicated or
  collinear gradients, comes from a tiny ridge ``ε·I`` added to ``Ĝ`` (``ε ≈ 1.6e-10`` in
  float64, ``≈ 5e-5`` in float32; see :func:`default_ridge`). In the original coordinates this
  is ``ε·diag(G)``: every constraint is met to a relative accuracy of about ``ε``.
* float16 / bfloat16 inputs are solved in float32 and cast back (the LAPACK kernels have no
  half-precision path).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlhooks.errors import SolverError

__all__ = [
    "cosine_from_gramian",
    "default_ridge",
    "dual_cone_qp",
    "gramian_scales",
    "min_norm_weights",
    "normalize_gramian",
    "project_onto_simplex",
    "psd_pinv_solve",
    "regularized_solve",
    "simplex_qp",
]

# Backup budget of the block principal pivoting method (Júdice & Pires 1994): how many
# non-improving full exchanges are tried before falling back to single (Murty) exchanges.
_BPP_BACKUP = 3
# Proximal-point steps that remove the ridge's O(ε) bias once the active set is known: usually
# two suffice, near-singular problems with badly spread scales contract more slowly.
_MAX_REFINEMENTS = 40


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype solvers compute in: ``dtype`` itself, or float32 for half precisions."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if not dtype.is_floating_point:
        return torch.get_default_dtype()
    return dtype


def default_ridge(dtype: torch.dtype) -> float:
    """Relative ridge added to the cosine matrix by the QP solvers: ``eps(dtype)^0.625``.

    Large enough to make every principal submatrix of ``Ĝ + εI`` safely positive definite after
    rounding (``Ĝ`` computed from a float Jacobian can be indefinite at the level
    ``T·eps``), small enough that the KKT conditions of the original problem hold to ~1e-10
    relative in float64.
    """
    return float(torch.finfo(working_dtype(dtype)).eps) ** 0.625


def gramian_scales(gramian: Tensor) -> Tensor:
    """The gradient norms ``sᵢ = √max(Gᵢᵢ, 0)``, shape ``(..., T)``."""
    return gramian.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()


def normalize_gramian(gramian: Tensor, scales: Tensor) -> Tensor:
    """Return ``Gᵢⱼ / (sᵢ sⱼ)``; a zero scale is treated as 1 (its row and column stay zero).

    Dividing twice rather than by the product avoids overflow when the scales span many
    orders of magnitude.
    """
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    return gramian / safe.unsqueeze(-1) / safe.unsqueeze(-2)


def cosine_from_gramian(gramian: Tensor) -> Tensor:
    """Cosines ``⟨gᵢ, gⱼ⟩ / (‖gᵢ‖‖gⱼ‖)``; 0 where a gradient is zero, clamped to [-1, 1]."""
    return normalize_gramian(gramian, gramian_scales(gramian)).clamp(-1.0, 1.0)


def _scaled_problem(gramian: Tensor, ridge: float | None) -> tuple[Tensor, Tensor, float]:
    """``(Ĝ + εI, safe_scales, ε)`` for a (T, T) Gramian."""
    scales = gramian_scales(gramian)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    cosine = gramian / safe.unsqueeze(-1) / safe.unsqueeze(-2)
    eps = default_ridge(gramian.dtype) if ridge is None else ridge
    eye = torch.eye(gramian.shape[-1], dtype=gramian.dtype, device=gramian.device)
    return cosine + eps * eye, safe, eps


def project_onto_simplex(points: Tensor) -> Tensor:
    """Euclidean projection of each row of ``points`` (``(..., T)``) onto the probability simplex.

    Sort-based algorithm of Held, Wolfe & Crowder (1974), see also Duchi et al., "Efficient
    projections onto the l1-ball for learning in high dimensions", ICML 2008: the projection is
    ``max(x − θ, 0)`` with the threshold ``θ`` read off the sorted cumulative sums.
    """
    sorted_desc = torch.sort(points, dim=-1, descending=True).values
    cumsum = sorted_desc.cumsum(-1) - 1
    ks = torch.arange(1, points.shape[-1] + 1, dtype=points.dtype, device=points.device)
    support = sorted_desc - cumsum / ks > 0
    # the support is a prefix of the sorted order; its size is the number of True entries
    count = support.sum(-1, keepdim=True).clamp_min(1)
    theta = cumsum.gather(-1, count - 1) / count.to(points.dtype)
    return (points - theta).clamp_min(0)


def _solve_on_free(matrix: Tensor, free: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``M_FF x_F = rhs_F`` for each batch member, with ``x = 0`` outside the free set F.

    ``matrix`` is (T, T), ``free`` is (B, T) bool, ``rhs`` is (B, T, K). Rows and columns outside
    F are replaced by the identity so that all B systems are solved in one batched call, with no
    data-dependent indexing.
    """
    both = free.unsqueeze(-1) & free.unsqueeze(-2)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    system = torch.where(both, matrix, eye)
    return torch.linalg.solve(system, rhs * free.unsqueeze(-1))


def _pivot(
    free: Tensor, infeasible: Tensor, best_count: Tensor, backup: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One exchange of block principal pivoting (Júdice & Pires 1994; Kim & Park 2011).

    Exchange every infeasible index while the number of infeasibilities keeps decreasing (or
    the backup budget lasts); otherwise exchange only the largest infeasible index (Murty's
    rule), which terminates finitely for positive-definite problems.
    """
    count = infeasible.sum(-1)
    improved = count < best_count
    use_block = improved | (backup > 0)
    best_count = torch.where(improved, count, best_count)
    backup = torch.where(
        improved, torch.full_like(backup, _BPP_BACKUP), backup - (~improved).long()
    )
    index = torch.arange(free.shape[-1], device=free.device)
    last = torch.where(infeasible, index, -1).amax(-1, keepdim=True)
    single = index == last
    flip = torch.where(use_block.unsqueeze(-1), infeasible, single)
    return free ^ flip, best_count, backup


def _converged(current: Tensor, previous: Tensor, tol: float) -> bool:
    change = (current - previous).abs().amax(-1)
    return bool((change <= tol * current.abs().amax(-1)).all())


def _max_pivots(num_tasks: int) -> int:
    return 20 * num_tasks + 50


def simplex_qp(
    gramian: Tensor, linear: Tensor | None = None, *, ridge: float | None = None
) -> Tensor:
    """Solve ``min_{w ∈ Δ} wᵀ G w + cᵀ w`` exactly, for one or several linear terms ``c``.

    :param gramian: (T, T) positive semi-definite matrix.
    :param linear: (T,) or (B, T) linear terms; ``None`` means 0 (the min-norm point of MGDA).
    :param ridge: relative ridge ``ε`` (see :func:`default_ridge`).
    :returns: (T,) or (B, T) weights on the simplex.
    :raises SolverError: if the active-set method does not terminate (never observed; it is
        finite in exact arithmetic).

    Method: block principal pivoting on the KKT system ``2Gw + c − μ1 = λ ≥ 0, w ≥ 0, λᵀw = 0,
    1ᵀw = 1`` (Júdice & Pires 1994; Kim & Park, "Fast nonnegative matrix factorization", SIAM
    J. Sci. Comput. 2011). For a free set F the equality-constrained minimiser is closed form
    and is computed in the scaled coordinates ``β = S w``; all B problems advance together with
    one batched linear solve per pivot. Scaled zero gradients count as unit vectors of norm 1.
    """
    squeeze = linear is None or linear.dim() == 1
    dtype = working_dtype(gramian.dtype)
    matrix = gramian.to(dtype)
    num_tasks = matrix.shape[-1]
    if linear is None:
        linear = torch.zeros(1, num_tasks, dtype=dtype, device=matrix.device)
    linear = linear.to(dtype).reshape(-1, num_tasks)
    batch = linear.shape[0]

    regularized, scales, ridge_value = _scaled_problem(matrix, ridge)
    inv_scales = scales.reciprocal()
    linear_hat = linear * inv_scales
    rhs = torch.stack([inv_scales.expand(batch, num_tasks), linear_hat], dim=-1)
    abs_regularized = regularized.abs()
    eps = torch.finfo(dtype).eps
    tol = 64 * num_tasks * eps

    free = torch.ones(batch, num_tasks, dtype=torch.bool, device=matrix.device)
    best_count = torch.full((batch,), num_tasks + 1, device=matrix.device)
    backup = torch.full((batch,), _BPP_BACKUP, device=matrix.device)
    for _ in range(_max_pivots(num_tasks)):
        solution = _solve_on_free(regularized, free, rhs)
        z_unit, z_lin = solution[..., 0], solution[..., 1]
        nonempty = free.any(-1, keepdim=True)
        denominator = (inv_scales * z_unit).sum(-1, keepdim=True)
        denominator = torch.where(nonempty, denominator, torch.ones_like(denominator))
        mu = (2 + (inv_scales * z_lin).sum(-1, keepdim=True)) / denominator
        beta = torch.where(free, (mu * z_unit - z_lin) / 2, torch.zeros_like(z_unit))
        multipliers = 2 * beta @ regularized + linear_hat - mu * inv_scales
        # an empty free set is infeasible (Σw = 1 cannot hold): free every index
        multipliers = torch.where(nonempty, multipliers, -torch.ones_like(multipliers))
        # feasibility is judged on the scaled weights β = S w: a weight of -1e-14 on a gradient
        # of norm 1e12 is a large violation, the same weight on a gradient of norm 1 is rounding
        beta_tol = tol * beta.abs().amax(-1, keepdim=True)
        multiplier_tol = tol * (
            2 * beta.abs() @ abs_regularized + linear_hat.abs() + mu.abs() * inv_scales
        )
        infeasible = (free & (beta < -beta_tol)) | (~free & (multipliers < -multiplier_tol))
        if not bool(infeasible.any()):
            break
        free, best_count, backup = _pivot(free, infeasible, best_count, backup)
    else:
        raise SolverError(
            f"simplex QP: active-set method did not terminate after {_max_pivots(num_tasks)} "
            "pivots; the Gramian is probably not positive semi-definite or not finite"
        )
    for _ in range(_MAX_REFINEMENTS):
        # proximal-point refinement on the final free set: min βᵀĜβ + ĉᵀβ + ε‖β − β_k‖², which
        # removes the O(ε) bias of the ridge while keeping its tie-breaking in null directions
        previous = beta
        rhs_prox = torch.cat([rhs, (ridge_value * beta).unsqueeze(-1)], dim=-1)
        solution = _solve_on_free(regularized, free, rhs_prox)
        z_unit, z_lin, z_prox = solution[..., 0], solution[..., 1], solution[..., 2]
        denominator = (inv_scales * z_unit).sum(-1, keepdim=True)
        mu = (
            2
            + (inv_scales * z_lin).sum(-1, keepdim=True)
            - 2 * (inv_scales * z_prox).sum(-1, keepdim=True)
        ) / denominator
        beta = torch.where(free, (mu * z_unit - z_lin) / 2 + z_prox, torch.zeros_like(z_unit))
        if _converged(beta, previous, tol):
            break
    weights = beta.clamp_min(0) * inv_scales
    weights = weights / weights.sum(-1, keepdim=True)
    weights = weights.to(gramian.dtype)
    return weights[0] if squeeze else weights


def min_norm_weights(gramian: Tensor, *, ridge: float | None = None) -> Tensor:
    """Weights of the minimum-norm point of the convex hull of the gradients (MGDA's QP).

    ``α = argmin_{α ∈ Δ} αᵀ G α``. When some gradients are zero the minimum norm is 0 and the
    answer is the uniform distribution over the zero gradients (the only permutation-equivariant
    choice).
    """
    diag = gramian.diagonal(dim1=-2, dim2=-1)
    zero = diag <= 0
    if bool(zero.any()):
        return zero.to(gramian.dtype) / zero.sum()
    return simplex_qp(gramian, None, ridge=ridge)


def dual_cone_qp(gramian: Tensor, lower: Tensor, *, ridge: float | None = None) -> Tensor:
    """Solve ``min_v vᵀ G v  s.t. v ≥ u`` for each row ``u`` of ``lower``.

    This is the weight-space form of the projection of ``Jᵀu`` onto the dual cone
    ``{x : Jx ≥ 0}`` of the gradients (Quinton & Rey, "Jacobian Descent for Multi-Objective
    Optimization", arXiv 2406.16232, Prop. 1): the projection is ``Jᵀv`` and its KKT condition
    ``Gv = λ ≥ 0`` says that it conflicts with no gradient.

    :param gramian: (T, T) positive semi-definite matrix.
    :param lower: (T,) or (B, T) lower bounds ``u``.
    :returns: (T,) or (B, T) solutions ``v``.

    Solved by block principal pivoting (see :func:`simplex_qp`) in scaled coordinates, starting
    from ``v = u`` (all bounds active), which is already optimal when ``Jᵀu`` is in the cone.
    """
    squeeze = lower.dim() == 1
    dtype = working_dtype(gramian.dtype)
    matrix = gramian.to(dtype)
    num_tasks = matrix.shape[-1]
    regularized, scales, ridge_value = _scaled_problem(matrix, ridge)
    bound = lower.to(dtype).reshape(-1, num_tasks) * scales
    batch = bound.shape[0]
    abs_regularized = regularized.abs()
    tol = 64 * num_tasks * torch.finfo(dtype).eps

    free = torch.zeros(batch, num_tasks, dtype=torch.bool, device=matrix.device)
    best_count = torch.full((batch,), num_tasks + 1, device=matrix.device)
    backup = torch.full((batch,), _BPP_BACKUP, device=matrix.device)
    for _ in range(_max_pivots(num_tasks)):
        fixed = torch.where(free, torch.zeros_like(bound), bound)
        rhs = -(fixed @ regularized)
        solved = _solve_on_free(regularized, free, rhs.unsqueeze(-1)).squeeze(-1)
        point = torch.where(free, solved, bound)
        multipliers = point @ regularized
        point_tol = tol * torch.maximum(point.abs(), bound.abs()).amax(-1, keepdim=True)
        multiplier_tol = tol * (point.abs() @ abs_regularized)
        infeasible = (free & (point < bound - point_tol)) | (
            ~free & (multipliers < -multiplier_tol)
        )
        if not bool(infeasible.any()):
            break
        free, best_count, backup = _pivot(free, infeasible, best_count, backup)
    else:
        raise SolverError(
            f"dual-cone QP: active-set method did not terminate after {_max_pivots(num_tasks)} "
            "pivots; the Gramian is probably not positive semi-definite or not finite"
        )
    for _ in range(_MAX_REFINEMENTS):
        # proximal-point refinement, as in simplex_qp
        previous = point
        rhs_prox = rhs + ridge_value * point
        solved = _solve_on_free(regularized, free, rhs_prox.unsqueeze(-1)).squeeze(-1)
        point = torch.where(free, solved, bound)
        if _converged(point, previous, tol):
            break
    solution = (torch.maximum(point, bound) / scales).to(gramian.dtype)
    return solution[0] if squeeze else solution


def regularized_solve(matrix: Tensor, rhs: Tensor, ridge: float) -> Tensor:
    """Solve ``(A + ε·mean(diag A)·I) x = b`` for a positive semi-definite ``A``.

    The ridge is relative to the mean diagonal so the result does not depend on a common scale
    of ``A``; an all-zero ``A`` gets an absolute ridge ``ε`` and yields ``x = b / ε``.
    """
    num = matrix.shape[-1]
    level = matrix.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1)
    level = torch.where(level > 0, level, torch.ones_like(level))
    eye = torch.eye(num, dtype=matrix.dtype, device=matrix.device)
    return torch.linalg.solve(matrix + ridge * level * eye, rhs)


def psd_pinv_solve(matrix: Tensor, rhs: Tensor, *, rtol: float | None = None) -> Tensor:
    """Minimum-norm least-squares solution ``A⁺ b`` of a symmetric PSD system, via ``eigh``.

    Eigenvalues at or below ``rtol · λ_max`` are treated as zero (default rtol
    ``T · eps(dtype)``, the numpy/LAPACK rank convention).
    """
    dtype = working_dtype(matrix.dtype)
    values, vectors = torch.linalg.eigh(matrix.to(dtype))
    num = matrix.shape[-1]
    threshold = (num * torch.finfo(dtype).eps if rtol is None else rtol) * values.amax(
        -1, keepdim=True
    ).clamp_min(0)
    keep = values > threshold
    inverse = torch.where(keep, 1 / torch.where(keep, values, torch.ones_like(values)), 0.0)
    coefficients = (vectors.transpose(-2, -1) @ rhs.to(dtype).unsqueeze(-1)).squeeze(-1)
    result = (vectors @ (inverse * coefficients).unsqueeze(-1)).squeeze(-1)
    return result.to(matrix.dtype)
