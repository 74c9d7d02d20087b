"""Shared numerical kernels for Gramian-based gradient aggregation.

Every aggregator in :mod:`mtlhooks.functional` reduces to a handful of small problems on the
T×T Gramian ``G = J Jᵀ`` of the task gradients: a projection onto the simplex, a quadratic
program on the simplex (MGDA), a norm-penalised linear program on the simplex (CAGrad, IMGrad),
a projection onto the dual cone of the gradients (UPGrad, DualProj), a regularised or
pseudo-inverse solve (IMTL-G, ConFIG, Aligned-MTL). They live here, written once, as vectorised
torch code that runs on the device and in the dtype of ``G``.

Conventions used throughout:

* ``scales`` are the gradient norms ``sᵢ = √Gᵢᵢ``. The programs are solved in the *diagonally
  scaled* coordinates ``β = S w`` with ``Ĝ = S⁻¹ G S⁻¹`` (the cosine matrix, unit diagonal), so
  that gradients whose norms differ by 24 orders of magnitude stay well conditioned: the
  conditioning of the scaled problem only depends on the angles between the gradients.
* A zero gradient (``Gᵢᵢ = 0``) gets ``sᵢ = 1`` and an all-zero row in ``Ĝ``.
* The active set (which weights are zero, which bounds hold with equality) is found on the
  strictly convex problem with a tiny ridge ``Ĝ + ε·I`` (``ε ≈ 1.6e-10`` in float64,
  ``≈ 5e-5`` in float32; :func:`default_ridge`), which makes the answer unique, hence
  permutation-equivariant, even for duplicated or collinear gradients. The final point is then
  *polished*: the equality-constrained problem on that active set is solved again without the
  ridge and the result is kept when it satisfies the KKT conditions of the original problem (it
  does whenever that face is not singular). So the QP solutions are exact up to rounding; where
  the exact optimum is not unique, the ridge's choice (the limit of the ridge solutions) is kept.
* Small problems (few tasks) are solved by enumerating every face of the feasible set in one
  batched solve and keeping the best feasible candidate, with no iteration. Larger ones use
  block principal pivoting with one batched linear solve per pivot and one convergence test
  per pivot.
* The QPs are solved on float64 host copies of the Gramian (in :func:`working_dtype`), the
  cosine matrix included: the active-set methods test convergence on the host at every pivot
  anyway, and on T×T arrays numpy's cost per operation is a fraction of torch's, which is what
  these solvers spend their time on (the batched factorisations run in torch, on zero-copy
  views). :func:`psd_cosine` is the same matrix formed in torch, on the Gramian's device, for
  the methods that stay there. Results are cast back to the input's dtype and device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from mtlhooks.errors import SolverError
from mtlhooks.method import check_gramian, is_finite, mean, nan_weights

__all__ = [
    "cosine_from_gramian",
    "default_ridge",
    "dual_cone_qp",
    "equal_projection_weights",
    "fair_weights",
    "fair_weights_or_fallback",
    "gramian_scales",
    "input_eps",
    "min_norm_weights",
    "nonnegative_qp",
    "normalize_gramian",
    "penalized_simplex_weights",
    "project_onto_simplex",
    "psd_cosine",
    "psd_pinv_solve",
    "rank_rtol",
    "regularized_solve",
    "simplex_qp",
    "working_dtype",
]

# Backup budget of the block principal pivoting method (Júdice & Pires 1994): how many
# non-improving full exchanges are tried before falling back to single (Murty) exchanges.
_BPP_BACKUP = 3
# Block pivots tried before the problems still open switch to the monotone active-set method.
_BPP_ATTEMPTS = 6
# Relative accuracy to which Nash-MTL's and FairGrad's equations must provably hold (their
# residual plus the rounding error of (Gw)ᵢ) for weights to be returned when rounding keeps
# Newton's method from reaching the requested tolerance.
_VERIFIED = 1e-4
# Largest number of face systems (batch × faces) solved at once by enumeration, and of faces
# per problem (measured at T = 3–8: UPGrad's 5 and 6 problems of T = 5 and 6 enumerate in
# 0.4–0.8× the time of block pivoting; 256 faces of one problem take 1.3–1.6× its time).
_ENUMERATION_LIMIT = 512
_ENUMERATION_FACES = 128
# Batched problems with at least this many tasks solve on gathered free sets (smaller systems)
# when the largest free set has at most this fraction of the tasks (below, or with larger free
# sets, the gathering costs more than it saves: measured at T = 16–40).
_GATHER_MIN_TASKS = 24
_GATHER_MAX_FRACTION = 0.8
# A simplex face point β = z + μ·z_a whose terms exceed |β| by this factor is refined once
# (:func:`_refine_on_simplex`): their cancellation would cost more than the tolerance of the
# KKT tests (64·T·eps) allows.
_CANCELLATION = 16.0
# Smallest squared Cholesky pivot of Ĝ + εI above which the dual-cone QP does not look for
# solutions that hold a single bound. A heuristic that saves an inverse: such solutions come
# from a nearly vanishing positive combination of the gradients, whose null vector makes the
# pivots small (d_T² ≤ λ_min / n_T²); a case it misses only costs the usual pivots.
_SINGLE_BOUND_PIVOT = 1e-3
# Ratio of the largest to the smallest gradient norm beyond which CAGrad's homotopy brackets its
# root from below by MGDA's point when two QPs have not done so.
_WIDE_SPREAD = 1e6


def working_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype solvers compute in: float64 whatever the input (float32 on MPS, which has no
    float64). The problems are T×T, so the cost is nil, and float32's seven digits are not enough
    for the active-set decisions and Newton steps of ill-conditioned Gramians (gradient norms
    spread over many orders of magnitude); results are cast back to the input's dtype."""
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def input_eps(tensor: Tensor) -> float:
    """Machine epsilon of the input's own dtype: the relative precision of the Gramian itself,
    which bounds what rank decisions (pseudo-inverses, truncated eigendecompositions) can
    resolve."""
    dtype = tensor.dtype if tensor.dtype.is_floating_point else torch.get_default_dtype()
    return float(torch.finfo(dtype).eps)


def default_ridge(dtype: torch.dtype) -> float:
    """Relative ridge added to the cosine matrix by the QP solvers: ``eps(dtype)^0.625``
    (``dtype``: the working dtype; about 1.6e-10 in float64).

    Large enough to make every principal submatrix of ``Ĝ + εI`` safely positive definite after
    rounding (an indefiniteness beyond it is removed first, :func:`psd_cosine`), small enough
    that the active set it selects is that of the original problem up to ties at the level ``ε``.
    """
    return float(torch.finfo(dtype).eps) ** 0.625


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


def project_onto_simplex(points: Tensor) -> Tensor:
    """Euclidean projection of each row of ``points`` (``(..., T)``) onto the probability simplex.

    Sort-based algorithm of Held, Wolfe & Crowder (1974), see also Duchi et al., "Efficient
    projections onto the l1-ball for learning in high dimensions", ICML 2008: the projection is
    ``max(x − θ, 0)`` with the threshold ``θ`` read off the sorted cumulative sums.

    The projection does not change when a constant is added to every entry, so the largest
    entry is subtracted first: ``x₁ − (x₁ − 1)`` would round to 0 for entries ≳ 1e16 and leave
    no support at all (every weight 0), while ``0 − (0 − 1)`` is exact.
    """
    points = points - points.max(dim=-1, keepdim=True).values
    sorted_desc = torch.sort(points, dim=-1, descending=True).values
    cumsum = sorted_desc.cumsum(-1) - 1
    ks = torch.arange(1, points.shape[-1] + 1, dtype=points.dtype, device=points.device)
    support = sorted_desc - cumsum / ks > 0
    # the support is a prefix of the sorted order; its size is the number of True entries
    count = support.sum(-1, keepdim=True).clamp_min(1)
    theta = cumsum.gather(-1, count - 1) / count.to(points.dtype)
    return (points - theta).clamp_min(0)


# --------------------------------------------------------------------------- shared machinery

_EYES: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
_HOST_EYES: dict[int, np.ndarray] = {}
_FACES: dict[tuple[int, bool], np.ndarray] = {}


def _eye(num: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached identity matrix (never written to)."""
    key = (num, dtype, device)
    eye = _EYES.get(key)
    if eye is None:
        eye = _EYES[key] = torch.eye(num, dtype=dtype, device=device)
    return eye


def _host_eye(num: int) -> np.ndarray:
    """A cached float64 identity matrix on the host (never written to)."""
    eye = _HOST_EYES.get(num)
    if eye is None:
        eye = _HOST_EYES[num] = np.eye(num)
    return eye


def _faces(num: int, include_empty: bool) -> np.ndarray:
    """Every subset of ``range(num)`` as a (2^num or 2^num − 1, num) bool matrix (cached)."""
    key = (num, include_empty)
    faces = _FACES.get(key)
    if faces is None:
        codes = np.arange(0 if include_empty else 1, 2**num)
        faces = _FACES[key] = ((codes[:, None] >> np.arange(num)) & 1) == 1
    return faces


class _Scaled(NamedTuple):
    """A problem in scaled coordinates, as float64 arrays on the host: the active-set methods
    below take a host synchronisation per step anyway, and on arrays this small numpy's
    per-operation cost is a fraction of torch's (the batched factorisations still run in torch,
    on zero-copy views)."""

    cosine: np.ndarray  # Ĝ, (T, T)
    regularized: np.ndarray  # Ĝ + εI
    scales: np.ndarray  # safe scales (zero → 1)
    tol: float  # relative feasibility tolerance
    ridge: float  # ε
    pivot: float = 0.0  # smallest squared Cholesky pivot of Ĝ + εI (0: not known)


def psd_cosine(gramian: Tensor) -> tuple[Tensor, Tensor, float]:
    """The cosine matrix ``Ĝ = S⁻¹GS⁻¹``, the safe scales S (zero gradients: scale 1 and a
    zero row) and the shift σ ≥ 0: ``Ĝ`` is shifted by ``σ = −λ_min`` when rounding has made it
    indefinite.

    A Gramian computed in float32 (or from a float32 Jacobian) has eigenvalues down to about
    ``−T·eps32`` relative where the exact one has zeros; treated as the positive semi-definite
    matrix it stands for, it is exact to its own precision. Costs one Cholesky factorisation
    (and one ``eigvalsh`` only when the matrix is indefinite).
    """
    scales = gramian_scales(gramian)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    cosine = gramian / safe.unsqueeze(-1) / safe.unsqueeze(-2)
    eye = _eye(gramian.shape[-1], gramian.dtype, gramian.device)
    _, info = torch.linalg.cholesky_ex(cosine + default_ridge(gramian.dtype) * eye)
    if bool(info == 0):
        return cosine, safe, 0.0
    shift = -min(float(torch.linalg.eigvalsh(cosine)[0]), 0.0)
    return cosine + shift * eye, safe, shift


def _host(tensor: Tensor) -> np.ndarray:
    """A float64 host copy (a view where it already is one) of a tensor."""
    return tensor.detach().to("cpu", torch.float64).numpy()


def _to_tensor(array: np.ndarray, like: Tensor) -> Tensor:
    """``array`` as a tensor of ``like``'s dtype, on its device."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(like.device, like.dtype)


def _solve_on_free(
    matrix: np.ndarray, free: np.ndarray, rhs: np.ndarray, definite: bool = False
) -> np.ndarray:
    """Solve ``M_FF x_F = rhs_F`` for each batch member, with ``x = 0`` outside the free set F.

    ``matrix`` is (T, T), ``free`` is (B, T) bool, ``rhs`` is (B, T, K). A single problem is
    solved on its free indices; small batches replace the rows and columns outside F by the
    identity, so that all B systems are solved in one batched call of size T; large batches
    gather each free set first (free indices first, then padding by the identity), which
    shrinks the systems to the largest free set. ``definite``:
    M is known to be positive definite (Cholesky; LU if that fails after rounding).
    """
    batch, num = free.shape
    if batch == 1:
        # one problem: solve on its free indices only
        index = np.flatnonzero(free[0])
        result = np.zeros_like(rhs)
        if index.size:
            system = matrix[np.ix_(index, index)][None]
            result[0, index] = _batched_solve(system, rhs[:, index], definite)[0]
        return result
    if num >= _GATHER_MIN_TASKS:
        count = free.sum(-1)
        size = int(count.max())
        if size == 0:
            return np.zeros_like(rhs)
        if size <= _GATHER_MAX_FRACTION * num:
            order = np.argsort(~free, axis=-1, kind="stable")[:, :size]
            valid = np.arange(size) < count[:, None]
            both = valid[:, :, None] & valid[:, None, :]
            # one flat take: numpy's two-index fancy indexing costs several times more
            block = np.take(matrix, order[:, :, None] * num + order[:, None, :])
            system = np.where(both, block, _host_eye(size))
            rows = np.arange(batch)[:, None]
            sub_rhs = rhs[rows, order] * valid[:, :, None]
            solution = _batched_solve(system, sub_rhs, definite) * valid[:, :, None]
            result = np.zeros_like(rhs)
            result[rows, order] = solution
            return result
    both = free[:, :, None] & free[:, None, :]
    system = np.where(both, matrix, _host_eye(num))
    return _batched_solve(system, rhs * free[:, :, None], definite)


def _batched_solve(system: np.ndarray, rhs: np.ndarray, definite: bool) -> np.ndarray:
    """Batched solves in torch on zero-copy views (numpy has no batched Cholesky solve, and
    its LU raises on singular systems where torch's returns non-finite values, which the
    callers' checks reject)."""
    matrices, right = torch.from_numpy(system), torch.from_numpy(np.ascontiguousarray(rhs))
    if definite:
        factor, info = torch.linalg.cholesky_ex(matrices)
        if not bool(info.any()):
            return torch.cholesky_solve(right, factor).numpy()
    return torch.linalg.solve_ex(matrices, right)[0].numpy()


class _FacePoint(NamedTuple):
    beta: np.ndarray  # (B, T)
    mu: np.ndarray  # (B, 1) multiplier of aᵀβ = 1 (0 without the equality)
    multipliers: np.ndarray  # (B, T) Mβ + c − μa
    valid: np.ndarray  # (B, 1) the face's equality-constrained problem has a solution


def _face_points(
    matrix: np.ndarray,
    free: np.ndarray,
    lower: np.ndarray | None,
    linear: np.ndarray | None,
    unit: np.ndarray | None,
    definite: bool = False,
) -> _FacePoint:
    """Minimiser of ``½βᵀMβ + cᵀβ`` on each face ``{β_C = l_C}`` (and ``aᵀβ = 1`` if ``unit``).

    ``free`` (B, T) is the set F of coordinates not held at their bound ``l`` (``lower``, None
    meaning 0); ``linear`` is ``c`` (None meaning 0), ``unit`` the vector ``a`` of the equality.
    The stationarity conditions on F are ``M_FF β_F = −c_F − M_FC l_C + μ a_F``; one batched
    solve with two right-hand sides gives β for the μ that meets the equality.
    """
    rhs = np.zeros(free.shape) if linear is None else -linear
    fixed = None
    if lower is not None:
        fixed = np.where(free, 0.0, lower)
        rhs = rhs - fixed @ matrix
    if unit is None:
        solution = _solve_on_free(matrix, free, rhs[:, :, None], definite)[:, :, 0]
        beta = solution if lower is None else np.where(free, solution, lower)
        mu = np.zeros((free.shape[0], 1))
        valid = np.ones((free.shape[0], 1), dtype=bool)
        multipliers = beta @ matrix
    else:
        units = np.broadcast_to(unit, rhs.shape)
        if linear is None and lower is None:
            z_unit = _solve_on_free(matrix, free, units[:, :, None], definite)[:, :, 0]
            z_lin = None
        else:
            solved = _solve_on_free(matrix, free, np.stack([rhs, units], -1), definite)
            z_lin, z_unit = solved[:, :, 0], solved[:, :, 1]
        beta, mu, valid = _simplex_point(
            matrix, free, fixed, lower, linear, unit, z_lin, z_unit, definite
        )
        multipliers = beta @ matrix - mu * unit
    if linear is not None:
        multipliers = multipliers + linear
    return _FacePoint(beta, mu, multipliers, valid)


def _simplex_point(
    matrix: np.ndarray,
    free: np.ndarray,
    fixed: np.ndarray | None,
    lower: np.ndarray | None,
    linear: np.ndarray | None,
    unit: np.ndarray,
    z_lin: np.ndarray | None,
    z_unit: np.ndarray,
    definite: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A simplex face's point ``β = z + μ·z_a`` from the solutions ``z = M_FF⁻¹r`` (None when
    r = 0) and ``z_a = M_FF⁻¹a_F``, with the μ that meets ``aᵀβ = 1``: ``(β, μ, valid)``."""
    denominator = (z_unit * unit).sum(-1, keepdims=True)
    valid = denominator > 0
    numerator = np.ones_like(denominator)
    if fixed is not None:
        numerator = numerator - (fixed * unit).sum(-1, keepdims=True)
    if z_lin is not None:
        numerator = numerator - (z_lin * unit).sum(-1, keepdims=True)
    mu = numerator / np.where(valid, denominator, 1.0)
    beta = mu * z_unit if z_lin is None else z_lin + mu * z_unit
    if lower is not None:
        beta = np.where(free, beta, lower)
    if z_lin is not None:
        beta, mu = _refine_on_simplex(
            matrix, free, linear, unit, beta, mu, z_lin, z_unit, valid, definite
        )
    return beta, mu, valid


def _refine_on_simplex(
    matrix: np.ndarray,
    free: np.ndarray,
    linear: np.ndarray | None,
    unit: np.ndarray,
    beta: np.ndarray,
    mu: np.ndarray,
    z_lin: np.ndarray,
    z_unit: np.ndarray,
    valid: np.ndarray,
    definite: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """One step of iterative refinement of a simplex face point where ``β = z + μ·z_a``
    cancelled (:data:`_CANCELLATION`).

    That happens when the equality's coefficients ``a = 1/s`` span many orders of magnitude
    and a linear term is large where ``a`` is small: e.g. gradient norms from 1e-12 to 1e12
    and a linear term of order 1 make the weight of the smallest gradient come out as −1e4
    instead of 1, so that the active-set method cycled or returned non-finite weights. The
    residuals ``ρ = −c − Mβ + μa`` (on F) and ``1 − aᵀβ`` are small where the terms were
    large, so the correction ``δβ = M_FF⁻¹ρ + δμ·z_a`` is exact to rounding.
    """
    magnitude = (np.abs(z_lin) + np.abs(mu * z_unit)).max(-1)
    need = valid[:, 0] & (magnitude > _CANCELLATION * np.abs(beta).max(-1))
    if not need.any():
        return beta, mu
    rows = np.flatnonzero(need)
    point, level, face = beta[rows], mu[rows], free[rows]
    residual = level * unit - point @ matrix
    if linear is not None:
        residual = residual - linear[rows]
    residual = np.where(face, residual, 0.0)
    equality = 1.0 - (point * unit).sum(-1, keepdims=True)
    step = _solve_on_free(matrix, face, residual[:, :, None], definite)[:, :, 0]
    toward = z_unit[rows]
    correction = (equality - (step * unit).sum(-1, keepdims=True)) / (toward * unit).sum(
        -1, keepdims=True
    )
    beta, mu = beta.copy(), mu.copy()
    beta[rows] = point + np.where(face, step + correction * toward, 0.0)
    mu[rows] = level + correction
    return beta, mu


def _violations(
    point: _FacePoint,
    free: np.ndarray,
    abs_matrix: np.ndarray,
    lower: np.ndarray | None,
    linear: np.ndarray | None,
    unit: np.ndarray | None,
    tol: float,
    dual_tol: float | None = None,
) -> np.ndarray:
    """Where ``point`` violates primal feasibility (on F) or dual feasibility (off F).

    Both are judged relative to their natural scale: a bound violated by 1e-14 on a weight of
    1e12 is rounding, the same violation on a weight of 1 is not.
    """
    return _violation_mask(
        point.beta,
        point.mu,
        point.multipliers,
        free,
        abs_matrix,
        lower,
        linear,
        unit,
        tol,
        tol if dual_tol is None else dual_tol,
    )


def _violation_mask(
    beta: np.ndarray,
    mu: np.ndarray,
    multipliers: np.ndarray,
    free: np.ndarray,
    abs_matrix: np.ndarray,
    lower: np.ndarray | None,
    linear: np.ndarray | None,
    unit: np.ndarray | None,
    tol: float,
    dual_tol: float,
) -> np.ndarray:
    """:func:`_violations` on a face point's parts (the single-problem routes have no
    :class:`_FacePoint`)."""
    size = np.abs(beta) if lower is None else np.maximum(np.abs(beta), np.abs(lower))
    beta_tol = tol * size.max(-1, keepdims=True)
    if unit is not None:
        # on the simplex also judge the weights wᵢ = βᵢaᵢ themselves (they sum to 1): a scaled
        # weight tiny next to the others can still be a large weight on a tiny gradient
        beta_tol = np.minimum(beta_tol, tol * (size * unit).sum(-1, keepdims=True) / unit)
    scale = _multiplier_scale(size, abs_matrix, linear, mu, unit)
    primal = free & (beta < (0.0 if lower is None else lower) - beta_tol)
    return primal | (~free & (multipliers < -dual_tol * scale))


def _multiplier_scale(
    size: np.ndarray,
    abs_matrix: np.ndarray,
    linear: np.ndarray | None,
    mu: np.ndarray,
    unit: np.ndarray | None,
) -> np.ndarray:
    """The natural scale of the multipliers ``Mβ + c − μa`` at a point of magnitudes ``size``."""
    scale = size @ abs_matrix
    if linear is not None:
        scale = scale + np.abs(linear)
    if unit is not None:
        scale = scale + np.abs(mu) * unit
    return scale


def _pivot(
    free: np.ndarray, infeasible: np.ndarray, best_count: np.ndarray, backup: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One exchange of block principal pivoting (Júdice & Pires 1994; Kim & Park 2011).

    Exchange every infeasible index while the number of infeasibilities keeps decreasing (or
    the backup budget lasts); otherwise exchange only the largest infeasible index (Murty's
    rule), which terminates finitely for positive-definite problems.
    """
    count = infeasible.sum(-1)
    improved = count < best_count
    use_block = improved | (backup > 0)
    best_count = np.where(improved, count, best_count)
    backup = np.where(improved, _BPP_BACKUP, backup - ~improved)
    index = np.arange(free.shape[-1])
    last = np.where(infeasible, index, -1).max(-1, keepdims=True)
    flip = np.where(use_block[:, None], infeasible, index == last)
    return free ^ flip, best_count, backup


def _max_pivots(num_tasks: int) -> int:
    return 20 * num_tasks + 50


def _solve_lcp(
    problem: _Scaled,
    lower: np.ndarray | None,
    linear: np.ndarray | None,
    unit: np.ndarray | None,
    batch: int,
    name: str,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """``min ½βᵀĜβ + cᵀβ`` s.t. ``β ≥ l`` (and ``aᵀβ = 1``), for B problems sharing Ĝ.

    Returns β (B, T); ``start`` (B, T): the solutions of nearby problems, a warm start. Small
    problems without a linear term are solved by enumeration
    (:func:`_enumerate_faces`); the others by block principal pivoting (Júdice & Pires, "A
    block principal pivoting algorithm for large-scale strictly monotone linear complementarity
    problems", Comput. Oper. Res. 1994; Kim & Park, "Fast nonnegative matrix factorization",
    SIAM J. Sci. Comput. 2011) on the ridge-regularised matrix, then one polishing solve
    without the ridge on the final face.
    """
    with np.errstate(all="ignore"):  # non-finite face points are rejected explicitly
        return _solve_lcp_on_host(problem, lower, linear, unit, batch, name, start)


def _solve_lcp_on_host(
    problem: _Scaled,
    lower: np.ndarray | None,
    linear: np.ndarray | None,
    unit: np.ndarray | None,
    batch: int,
    name: str,
    start: np.ndarray | None,
) -> np.ndarray:
    matrix = problem.regularized
    num = matrix.shape[-1]
    if unit is None and start is None:
        bound = lower if lower is not None else np.zeros((batch, num))
        free = _bounds_start(problem, bound, linear)
        if not free.any():
            # β = l satisfies the KKT conditions (the test is block pivoting's first one, and
            # the polish would keep l): e.g. DualProj's mean when nothing conflicts
            return bound.copy()
    else:
        free = np.ones((batch, num), dtype=bool)
    num_faces = 2**num - (0 if unit is None else 1)
    if (
        linear is None
        and num_faces <= _ENUMERATION_FACES
        and batch * num_faces <= _ENUMERATION_LIMIT
    ):
        return _enumerate_faces(problem, lower, unit)
    if start is not None:
        # a warm start from a nearby problem's solution: the monotone method from that point
        # changes only the few indices that differ (block pivoting from its face cycles as
        # often as it does from scratch)
        descend = _descend_single if batch == 1 else _descend_faces
        free, beta = descend(problem, start, lower, linear, unit, name)
        return _polish(problem, free, beta, lower, linear, unit)
    if batch == 1:
        free, beta, done = _pivot_single(problem, free, lower, linear, unit, _BPP_ATTEMPTS)
        if done:
            return _polish_single(problem, free, beta, lower, linear, unit)
        free, beta = _descend_single(problem, beta, lower, linear, unit, name)
        return _polish_single(problem, free, beta, lower, linear, unit)
    free, beta, solved = _pivot_until_optimal(problem, free, lower, linear, unit, _BPP_ATTEMPTS)
    if not solved.all():
        rest = np.flatnonzero(~solved)
        rest_free, rest_beta = _descend_faces(
            problem,
            beta[rest],
            None if lower is None else lower[rest],
            None if linear is None else linear[rest],
            unit,
            name,
        )
        free[rest], beta[rest] = rest_free, rest_beta
    return _polish(problem, free, beta, lower, linear, unit)


def _bounds_start(problem: _Scaled, bound: np.ndarray, linear: np.ndarray | None) -> np.ndarray:
    """The starting faces without the simplex equality: every bound active (β = l), freed
    where the multipliers ``Ĝl + c`` are significantly negative."""
    multipliers = bound @ problem.regularized
    scale = np.abs(bound) @ np.abs(problem.regularized)
    if linear is not None:
        multipliers, scale = multipliers + linear, scale + np.abs(linear)
    return multipliers < -problem.tol * scale


def _single_face_point(
    matrix: np.ndarray,
    free: np.ndarray,
    lower: np.ndarray | None,
    linear: np.ndarray | None,
    unit: np.ndarray | None,
    definite: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """:func:`_face_points` of one problem, (1, T) arrays: the same operations in the same
    order (bit for bit the same point, μ and multipliers), without the batch bookkeeping that
    dominates a single problem's pivot. Returns ``(β, μ, multipliers, valid)``."""
    rhs = np.zeros(free.shape) if linear is None else -linear
    fixed = None
    if lower is not None:
        fixed = np.where(free, 0.0, lower)
        rhs = rhs - fixed @ matrix
    index = np.flatnonzero(free[0])
    system = matrix[index[:, None], index[None, :]][None]
    if unit is None:
        beta = np.zeros(free.shape) if lower is None else lower.copy()
        if index.size:
            beta[0, index] = _batched_solve(system, rhs[:, index, None], definite)[0, :, 0]
        multipliers = beta @ matrix
        if linear is not None:
            multipliers = multipliers + linear
        return beta, np.zeros((1, 1)), multipliers, True
    columns = 1 if linear is None and lower is None else 2
    solved = np.zeros((*free.shape, columns))
    if index.size:
        right = (
            unit[None, index, None]
            if columns == 1
            else np.stack([rhs, np.broadcast_to(unit, rhs.shape)], -1)[:, index]
        )
        solved[0, index] = _batched_solve(system, right, definite)[0]
    z_lin = None if columns == 1 else solved[:, :, 0]
    beta, mu, valid = _simplex_point(
        matrix, free, fixed, lower, linear, unit, z_lin, solved[:, :, -1], definite
    )
    multipliers = beta @ matrix - mu * unit
    if linear is not None:
        multipliers = multipliers + linear
    return beta, mu, multipliers, bool(valid[0, 0])


def _pivot_single(
    problem: _Scaled,
    free: np.ndarray,
    lower: np.ndarray | None,
    linear: np.ndarray | None,
    unit: np.ndarray | None,
    attempts: int,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """:func:`_pivot_until_optimal` for one problem (DualProj, MGDA, PCD), (1, T) arrays:
    the same pivots and points, bit for bit, at about two thirds of the cost per pivot
    (tests/test_qp_speed_paths.py checks both routes on every family)."""
    matrix = problem.regularized
    abs_matrix = np.abs(matrix)
    best_count, backup = free.shape[-1] + 1, _BPP_BACKUP
    index = np.arange(free.shape[-1])
    beta = np.zeros(free.shape)
    for attempt in range(attempts):
        beta, mu, multipliers, valid = _single_face_point(matrix, free, lower, linear, unit, True)
        infeasible = _violation_mask(
            beta, mu, multipliers, free, abs_matrix, lower, linear, unit, problem.tol, problem.tol
        )
        if unit is not None and not valid:
            # a face without a solution (the empty face of the simplex): free everything
            infeasible = infeasible | ~free
        count = int(infeasible.sum())
        if count == 0:
            return free, beta, True
        if attempt == 0 and lower is not None and linear is None and unit is None:
            found, single, point = _single_bound_faces(problem, lower)
            if found[0]:
                return single, point, True
        # one exchange of _pivot's rule on scalars (its arrays cost ~30 µs a pivot here)
        improved = count < best_count
        use_block = improved or backup > 0
        if improved:
            best_count, backup = count, _BPP_BACKUP
        else:
            backup -= 1
        flip = infeasible if use_block else index == int(np.flatnonzero(infeasible[0])[-1])
        free = free ^ flip
    return free, beta, False


def _polish_single(
    problem: _Scaled,
    free: np.ndarray,
    beta: np.ndarray,
    lower: np.ndarray | None,
    linear: np.ndarray | None,
    unit: np.ndarray | None,
) -> np.ndarray:
    """:func:`_polish` for one problem (the same tests)."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        exact, mu, multipliers, valid = _single_face_point(
            problem.cosine, free, lower, linear, unit, False
        )
        loose = max(problem.tol, problem.ridge**0.5)
        bad = _violation_mask(
            exact,
            mu,
            multipliers,
            free,
            np.abs(problem.cosine),
            lower,
            linear,
            unit,
            problem.tol,
            loose,
        )
    finite = np.isfinite(exact).all() and np.isfinite(multipliers).all()
    return exact if valid and finite and not bad.any() else beta


def _single_bound_faces(
    problem: _Scaled, lower: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dual-cone QP's solutions that hold a single bound: ``(found, free, beta)``.

    With one bound ``β_j = l_j`` held and every other coordinate free, the face minimiser is
    ``β = (l_j / H_jj)·H_j`` with ``H = M⁻¹``, and its multiplier ``l_j / H_jj`` is positive
    when ``l_j > 0``: when that point is feasible it satisfies the KKT conditions, so it is
    the solution (M is positive definite). All candidates of every problem come from one
    inverse of M, for less than one batched solve. This is the case near Pareto stationarity
    (a positive combination of the gradients nearly vanishes), where every coordinate but one
    is free and block pivoting from the bounds that ``Ĝl`` shows to be active takes 6–9 pivots
    (:func:`_pivot_until_optimal` tries these faces after its first pivot). A candidate is
    accepted only when its stationarity residual ``(Mβ)_k``, k ≠ j, is rounding relative to
    ``|β|ᵀ|M|`` (as accurate as a face solve), so rounding in the inverse cannot pass a wrong
    point. ``found`` (B,) marks the problems solved this way, ``free`` and ``beta`` (B, T)
    their faces (everything free but j) and points.
    """
    found = np.zeros(lower.shape[0], dtype=bool)
    free, beta = np.ones(lower.shape, dtype=bool), lower
    if problem.pivot > _SINGLE_BOUND_PIVOT:
        # Ĝ is not nearly singular (the heuristic of _SINGLE_BOUND_PIVOT): skip the inverse
        return found, free, beta
    matrix = problem.regularized
    try:
        inverse = np.linalg.inv(matrix)
    except np.linalg.LinAlgError:
        return found, free, beta
    diagonal = inverse.diagonal()
    if not (np.isfinite(inverse).all() and (diagonal > 0).all()):
        return found, free, beta
    positive = lower > 0
    if (lower >= 0).all():
        # with l ≥ 0 a feasible candidate needs a row H_j that is nonnegative (to rounding):
        # on most inputs no row is, and nothing more is computed
        row_tol = problem.tol * np.abs(inverse).max(-1, keepdims=True)
        positive = positive & (inverse >= -row_tol).all(-1)
    rows, cols = np.nonzero(positive)
    if rows.size == 0:
        return found, free, beta
    # one candidate β⁽ʲ⁾ = (l_j / H_jj)·H_j per problem b and bound j with l_bj > 0
    bounds = lower[rows]  # (P, T)
    multiplier = lower[rows, cols] / diagonal[cols]
    candidates = multiplier[:, None] * inverse[cols]
    candidates[np.arange(rows.size), cols] = bounds[np.arange(rows.size), cols]
    size = np.maximum(np.abs(candidates), np.abs(bounds))
    tol = problem.tol
    feasible = (candidates >= bounds - tol * size.max(-1, keepdims=True)).all(-1)
    if not feasible.any():
        return found, free, beta
    rows, cols = rows[feasible], cols[feasible]
    candidates, size = candidates[feasible], size[feasible]
    residual = candidates @ matrix
    residual[np.arange(rows.size), cols] = 0.0
    stationary = (np.abs(residual) <= tol * (size @ np.abs(matrix))).all(-1)
    beta = lower.copy()
    for pair in np.flatnonzero(stationary).tolist():
        row = int(rows[pair])
        if not found[row]:  # the first accepted candidate (every accepted one is optimal)
            found[row] = True
            free[row, cols[pair]] = False
            beta[row] = candidates[pair]
    return found, free, beta


_PAIRS: dict[tuple[int, bool], np.ndarray] = {}


def _enumerate_faces(
    problem: _Scaled, lower: np.ndarray | None, unit: np.ndarray | None
) -> np.ndarray:
    """Solve ``min ½βᵀĜβ`` on the simplex (``unit``) or above ``lower`` by trying every face.

    Every face's equality-constrained minimiser is computed in one batched solve, with and
    without the ridge. The optimum lies in the relative interior of some face, where it is
    that face's minimiser; every other feasible face minimiser is a feasible point, so the
    feasible ridge candidate of least objective is the ridge optimum (unique by strict
    convexity). Its face's exact candidate replaces it when that is KKT-optimal (see
    :func:`_polish`). No iteration.
    """
    cosine, regularized = problem.cosine, problem.regularized
    num = cosine.shape[-1]
    include_empty = unit is None
    faces = _faces(num, include_empty)  # (K, T)
    key = (num, include_empty)
    pairs = _PAIRS.get(key)
    if pairs is None:
        pairs = _PAIRS[key] = faces[:, :, None] & faces[:, None, :]
    matrices = np.stack([regularized, cosine])[:, None]  # (2, 1, T, T)
    systems = torch.from_numpy(np.where(pairs, matrices, _host_eye(num)))  # (2, K, T, T)
    tol = problem.tol
    if unit is not None:
        # simplex: β_F ∝ M_FF⁻¹ a_F, objective ½βᵀMβ = 1 / (2 aᵀM_FF⁻¹a_F)
        rhs = torch.from_numpy(np.ascontiguousarray((faces * unit)[None, :, :, None]))
        z = torch.linalg.solve_ex(systems, rhs.expand(2, -1, -1, 1))[0].numpy()[..., 0]
        denominator = (z * unit).sum(-1, keepdims=True)  # (2, K, 1)
        beta = z / denominator
        ridge_beta = beta[0]
        weights = ridge_beta * unit
        feasible = (
            (denominator[0] > 0)
            & (weights >= -tol * np.abs(weights).sum(-1, keepdims=True)).all(-1, keepdims=True)
            & (ridge_beta >= -tol * np.abs(ridge_beta).max(-1, keepdims=True)).all(
                -1, keepdims=True
            )
        )
        best = int(np.where(feasible, denominator[0], -math.inf).argmax())
        exact, chosen, face = beta[1, best], ridge_beta[best], faces[best]
        mu = 1 / denominator[1, best]
        multipliers = exact @ cosine - mu * unit
        scale = np.abs(exact) @ np.abs(cosine) + np.abs(mu) * unit
        primal_ok = (exact * unit >= -tol * (np.abs(exact) * unit).sum()).all() & (
            exact >= -tol * np.abs(exact).max()
        ).all()
        valid = denominator[1, best, 0] > 0
        exact, chosen, face = exact[None], chosen[None], face[None]
        multipliers, scale = multipliers[None], scale[None]
        primal_ok = np.asarray([primal_ok & valid])
    else:
        assert lower is not None
        # dual cone: β_C = l_C, β_F = −M_FF⁻¹ M_FC l_C
        fixed = lower[:, None] * ~faces  # (B, K, T)
        rhs = -(fixed @ matrices) * faces  # (2, B, K, T)
        z = torch.linalg.solve_ex(systems[:, None], torch.from_numpy(rhs[..., None]))[0]
        beta = np.where(faces, z.numpy()[..., 0], lower[:, None])  # (2, B, K, T)
        ridge_beta = beta[0]
        size = np.maximum(np.abs(ridge_beta), np.abs(lower)[:, None]).max(-1, keepdims=True)
        feasible = (~faces | (ridge_beta >= lower[:, None] - tol * size)).all(-1)
        objective = ((ridge_beta @ regularized) * ridge_beta).sum(-1)  # (B, K)
        best = np.where(feasible, objective, math.inf).argmin(-1)  # (B,)
        rows = np.arange(lower.shape[0])
        exact, chosen, face = beta[1, rows, best], ridge_beta[rows, best], faces[best]
        multipliers = exact @ cosine
        size = np.maximum(np.abs(exact), np.abs(lower))
        scale = size @ np.abs(cosine)
        primal_ok = (~face | (exact >= lower - tol * size.max(-1, keepdims=True))).all(-1)
    loose = max(tol, problem.ridge**0.5)
    dual_ok = (face | (multipliers >= -loose * scale)).all(-1)
    finite = np.isfinite(exact).all(-1)
    accept = (primal_ok & dual_ok & finite)[:, None]
    return np.where(accept, exact, chosen)


def _pivot_until_optimal(
    problem: _Scaled,
    free: np.ndarray,
    lower: np.ndarray | None,
    linear: np.ndarray | None,
    unit: np.ndarray | None,
    attempts: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block principal pivoting from ``free`` for at most ``attempts`` pivots.

    Returns the faces and points of every problem (B, T) and a (B,) mask of those solved;
    the others hold their last face point. Problems that are solved leave the batch, so later
    pivots only solve the others.
    """
    matrix = problem.regularized
    abs_matrix = np.abs(matrix)
    batch, num = free.shape
    final_free = free.copy()
    final_beta = np.empty(free.shape)
    solved = np.zeros(batch, dtype=bool)
    pending = np.arange(batch)
    best_count = np.full(batch, num + 1)
    backup = np.full(batch, _BPP_BACKUP)
    for attempt in range(attempts):
        point = _face_points(matrix, free, lower, linear, unit, definite=True)
        infeasible = _violations(point, free, abs_matrix, lower, linear, unit, problem.tol)
        if unit is not None:
            # a face without a solution (the empty face of the simplex): free everything
            infeasible = infeasible | (~point.valid & ~free)
        open_ = infeasible.any(-1)
        final_free[pending] = free
        final_beta[pending] = point.beta
        num_open = int(open_.sum())
        if num_open < open_.shape[0]:
            solved[pending[~open_]] = True
            if num_open == 0:
                break
            pending, free, infeasible = pending[open_], free[open_], infeasible[open_]
            best_count, backup = best_count[open_], backup[open_]
            lower = None if lower is None else lower[open_]
            linear = None if linear is None else linear[open_]
        if attempt == 0 and lower is not None and linear is None and unit is None:
            # the starting face was not optimal: try the solutions that hold a single bound
            found, single, point_beta = _single_bound_faces(problem, lower)
            if found.any():
                final_free[pending[found]] = single[found]
                final_beta[pending[found]] = point_beta[found]
                solved[pending[found]] = True
                if found.all():
                    break
                keep = ~found
                pending, free, infeasible = pending[keep], free[keep], infeasible[keep]
                best_count, backup, lower = best_count[keep], backup[keep], lower[keep]
        free, best_count, backup = _pivot(free, infeasible, best_count, backup)
    return final_free, final_beta, solved


def _line_search(
    beta: np.ndarray,
    target: np.ndarray,
    bound: np.ndarray,
    below: np.ndarray,
    free: np.ndarray,
    tol: float,
) -> tuple[np.ndarray, np.ndarray]:
    """From the feasible iterate β towards the face minimiser, as far as the bounds that
    ``below`` marks allow: the new iterate (those that hit a bound set onto it) and the hits."""
    gap = np.maximum(beta - bound, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = gap / np.where(below, gap + bound - target, 1.0)
    step_to = np.where(below, ratio, 2.0)
    step = np.clip(step_to.min(-1, keepdims=True), 0.0, 1.0)
    hits = below & (step_to <= step * (1 + 4 * tol) + tol)
    moved = beta + step * (target - beta)
    return np.where(hits | ~free, bound, np.maximum(moved, bound)), hits


def _descend_faces(
    problem: _Scaled,
    start: np.ndarray,
    lower: np.ndarray | None,
    linear: np.ndarray | None,
    unit: np.ndarray | None,
    name: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Primal active-set method with block additions (Lawson & Hanson's NNLS method, "Solving
    Least Squares Problems", 1974, ch. 23, generalised to bounds, a linear term and the simplex
    equality), for B problems sharing the ridge-regularised Ĝ: the optimal faces and points.

    The iterate β stays feasible. Each iteration solves the current face's equality-constrained
    problem once (one batched solve for all open problems): when that minimiser is feasible
    it becomes the iterate and the coordinates whose multipliers are significantly negative are
    freed (all of them; only the most negative one after an addition that the line search undid
    entirely, which is Lawson & Hanson's rule and always makes progress); otherwise the iterate
    moves towards it until a bound is hit and the coordinates that hit one are fixed. The
    objective decreases strictly at every addition, so no face is visited twice: the method
    terminates (unlike block principal pivoting, which cycles on rank-deficient Gramians).
    Starts from ``start`` (B, T), made feasible (clamped to the bounds; on the simplex, also
    rescaled onto it).
    """
    matrix = problem.regularized
    abs_matrix = np.abs(matrix)
    num = matrix.shape[-1]
    tol = problem.tol
    batch = start.shape[0]
    bound = np.zeros_like(start) if lower is None else lower
    beta = np.maximum(start, bound)
    if unit is not None:
        total = (beta * unit).sum(-1, keepdims=True)
        uniform = np.broadcast_to(1.0 / (num * unit), beta.shape)  # the weights wᵢ = 1/T
        beta = np.where(total > 0, beta / np.where(total > 0, total, 1.0), uniform)
    free = beta > bound
    single = np.zeros(batch, dtype=bool)  # next addition: one index
    before = free.copy()  # the free set before the last addition
    final_free = free.copy()
    final_beta = beta.copy()
    pending = np.arange(batch)
    limit = _max_pivots(num)
    for _ in range(limit):
        point = _face_points(matrix, free, lower, linear, unit, definite=True)
        target = point.beta
        size = np.maximum(np.abs(target), np.abs(bound)).max(-1, keepdims=True)
        below = free & (target < bound - tol * size)
        blocked = below.any(-1)
        moved, hits = _line_search(beta, target, bound, below, free, tol)
        shrunk = free & ~hits
        # an addition that the line search undid entirely: next time add one index only
        undone = blocked & ~(shrunk & ~before).any(-1) & (before != free).any(-1)
        single = single | undone
        # at a feasible face minimiser: optimal, or free the descent coordinates
        size = np.maximum(np.abs(target), np.abs(bound))
        scale = _multiplier_scale(size, abs_matrix, linear, point.mu, unit)
        descent = ~free & (point.multipliers < -tol * scale)
        descent = descent & (point.valid | free.any(-1, keepdims=True))
        most = np.where(descent, point.multipliers / np.maximum(scale, 1e-300), math.inf)
        strongest = np.zeros_like(descent)
        strongest[np.arange(strongest.shape[0]), most.argmin(-1)] = True
        add = np.where(single[:, None], descent & strongest, descent)
        done = ~blocked & ~descent.any(-1)
        beta = np.where(blocked[:, None], moved, target)
        before = np.where(blocked[:, None], before, free)
        free = np.where(blocked[:, None], shrunk, free | add)
        single = np.where(blocked, single, False)
        if done.any():
            final_free[pending[done]] = free[done]
            final_beta[pending[done]] = beta[done]
            keep = ~done
            if not keep.any():
                return final_free, final_beta
            pending, beta, free, bound = pending[keep], beta[keep], free[keep], bound[keep]
            before, single = before[keep], single[keep]
            lower = None if lower is None else lower[keep]
            linear = None if linear is None else linear[keep]
    raise SolverError(
        f"{name}: active-set method did not terminate after {limit} steps; the Gramian is "
        "probably not positive semi-definite or not finite"
    )


def _descend_single(
    problem: _Scaled,
    start: np.ndarray,
    lower: np.ndarray | None,
    linear: np.ndarray | None,
    unit: np.ndarray | None,
    name: str,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_descend_faces` for one problem, (1, T) arrays: the same iterates, bit for bit,
    without the batch bookkeeping (tests/test_qp_speed_paths.py checks both routes)."""
    matrix = problem.regularized
    abs_matrix = np.abs(matrix)
    num = matrix.shape[-1]
    tol = problem.tol
    bound = np.zeros_like(start) if lower is None else lower
    beta = np.maximum(start, bound)
    if unit is not None:
        total = (beta * unit).sum(-1, keepdims=True)
        uniform = np.broadcast_to(1.0 / (num * unit), beta.shape)  # the weights wᵢ = 1/T
        beta = np.where(total > 0, beta / np.where(total > 0, total, 1.0), uniform)
    free = beta > bound
    single = False  # next addition: one index
    before = free.copy()  # the free set before the last addition
    limit = _max_pivots(num)
    for _ in range(limit):
        target, mu, multipliers, valid = _single_face_point(matrix, free, lower, linear, unit, True)
        size = np.maximum(np.abs(target), np.abs(bound)).max(-1, keepdims=True)
        below = free & (target < bound - tol * size)
        if below.any():
            beta, hits = _line_search(beta, target, bound, below, free, tol)
            shrunk = free & ~hits
            # an addition that the line search undid entirely: next time add one index only
            if not (shrunk & ~before).any() and (before != free).any():
                single = True
            free = shrunk
            continue
        # at a feasible face minimiser: optimal, or free the descent coordinates
        size = np.maximum(np.abs(target), np.abs(bound))
        scale = _multiplier_scale(size, abs_matrix, linear, mu, unit)
        descent = ~free & (multipliers < -tol * scale)
        if not (valid or free.any()):
            descent[:] = False
        beta, before = target, free
        if not descent.any():
            return free, beta
        if single:
            most = np.where(descent, multipliers / np.maximum(scale, 1e-300), math.inf)
            add = np.zeros_like(descent)
            add[0, int(most.argmin())] = True
        else:
            add = descent
        free = free | add
        single = False
    raise SolverError(
        f"{name}: active-set method did not terminate after {limit} steps; the Gramian is "
        "probably not positive semi-definite or not finite"
    )


def _polish(
    problem: _Scaled,
    free: np.ndarray,
    beta: np.ndarray,
    lower: np.ndarray | None,
    linear: np.ndarray | None,
    unit: np.ndarray | None,
) -> np.ndarray:
    """Re-solve the final face without the ridge; keep the result where it is feasible.

    The exact face minimiser, when it is feasible, is never worse than the ridge point (which
    lies on the same face); its multipliers are checked loosely (``√ε`` relative) only to
    reject garbage from a numerically singular face, where the ridge point is kept.
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        # LU, not Cholesky: on a nearly singular face Cholesky can succeed with a point far
        # along the near-null direction that the loose test below does not reject
        exact = _face_points(problem.cosine, free, lower, linear, unit)
        loose = max(problem.tol, problem.ridge**0.5)
        bad = _violations(
            exact, free, np.abs(problem.cosine), lower, linear, unit, problem.tol, loose
        )
    finite = np.isfinite(exact.beta).all(-1, keepdims=True)
    finite = finite & np.isfinite(exact.multipliers).all(-1, keepdims=True)
    accept = exact.valid & finite & ~bad.any(-1, keepdims=True)
    return np.where(accept, exact.beta, beta)


# --------------------------------------------------------------------------- public solvers


def simplex_qp(
    gramian: Tensor, linear: Tensor | None = None, *, ridge: float | None = None
) -> Tensor:
    """Solve ``min_{w ∈ Δ} ½ wᵀ G w + cᵀ w`` exactly, for one or several linear terms ``c``.

    :param gramian: (T, T) positive semi-definite matrix.
    :param linear: (T,) or (B, T) linear terms; ``None`` means 0 (the min-norm point of MGDA).
    :param ridge: relative ridge ``ε`` used to select the active set (see :func:`default_ridge`).
    :returns: (T,) or (B, T) weights on the simplex.
    :raises SolverError: if the active-set method does not terminate (never observed; it is
        finite in exact arithmetic for positive semi-definite G).

    Solved in the scaled coordinates ``β = S w`` (``Σ wᵢ = Σ βᵢ/sᵢ``), where the KKT conditions
    are ``Ĝβ + Ŝ⁻¹c − μ s⁻¹ = λ ≥ 0``, ``β ≥ 0``, ``λᵀβ = 0``. For T ≤ 7 every face is
    solved at once (see :func:`_best_face`); above, block principal pivoting from the full
    support. Scaled zero gradients count as unit vectors of norm 1.
    """
    squeeze = linear is None or linear.dim() == 1
    dtype = working_dtype(gramian)
    matrix = gramian.to(dtype)
    num_tasks = matrix.shape[-1]
    problem = _scaled_problem(matrix, ridge)
    inv_scales = 1 / problem.scales
    scaled_linear = None
    batch = 1
    if linear is not None:
        scaled_linear = _host(linear.to(dtype)).reshape(-1, num_tasks) * inv_scales
        batch = scaled_linear.shape[0]
    if num_tasks == 1:
        weights = np.ones((batch, 1))
    else:
        beta = _solve_lcp(problem, None, scaled_linear, inv_scales, batch, "simplex QP")
        weights = np.maximum(beta, 0.0) * inv_scales
        weights = weights / weights.sum(-1, keepdims=True)
    result = _to_tensor(weights, gramian)
    return result[0] if squeeze else result


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

    All B problems are solved together in scaled coordinates: by enumeration of the faces
    when ``B·2^T ≤ 512`` and ``T ≤ 7``, otherwise by block principal pivoting started from
    the bounds that the unconstrained multipliers ``Ĝu`` already show to be active (one
    batched solve per pivot, on the gathered free sets when T ≥ 24 and they are small
    enough). The bounds are returned at once when they satisfy the KKT conditions.
    """
    squeeze = lower.dim() == 1
    dtype = working_dtype(gramian)
    matrix = gramian.to(dtype)
    num_tasks = matrix.shape[-1]
    problem = _scaled_problem(matrix, ridge)
    bound = _host(lower.to(dtype)).reshape(-1, num_tasks) * problem.scales
    beta = _solve_lcp(problem, bound, None, None, bound.shape[0], "dual-cone QP")
    solution = _to_tensor(np.maximum(beta, bound) / problem.scales, gramian)
    return solution[0] if squeeze else solution


def _scaled_problem(matrix: Tensor, ridge: float | None) -> _Scaled:
    """The QP data of one (T, T) working-dtype Gramian, computed on its float64 host copy.

    The same formulas as :func:`psd_cosine` (the cosine matrix divided twice, the same
    Cholesky test at :func:`default_ridge`, equal to it to the last bit or two: torch's
    vectorised kernels round some entries differently), in numpy: a dozen torch dispatches on
    a T×T matrix cost ~10× more than the numbers (0.05–0.25 ms of a dual-cone or simplex QP
    at T = 40). An indefinite Gramian (the Cholesky test fails) is shifted by ``−λ_min`` as
    there. The test's factor gives :attr:`_Scaled.pivot`.
    """
    host = _host(matrix)
    num = host.shape[-1]
    scales = np.sqrt(np.maximum(host.diagonal(), 0.0))
    safe = np.where(scales > 0, scales, 1.0)
    cosine = host / safe[:, None] / safe[None, :]
    test_ridge = default_ridge(matrix.dtype)
    eps = test_ridge if ridge is None else ridge
    eye = _host_eye(num)
    regularized = cosine + eps * eye
    try:
        factor = np.linalg.cholesky(regularized if eps == test_ridge else cosine + test_ridge * eye)
        pivot = float(factor.diagonal().min()) ** 2
    except np.linalg.LinAlgError:
        # indefinite after rounding: shifted by −λ_min as in psd_cosine (torch's eigvalsh on a
        # zero-copy view costs half of numpy's here)
        lowest = float(torch.linalg.eigvalsh(torch.from_numpy(cosine))[0])
        cosine = cosine + -min(lowest, 0.0) * eye
        regularized = cosine + eps * eye
        pivot = 0.0
    tol = 64 * num * float(torch.finfo(matrix.dtype).eps)
    return _Scaled(cosine, regularized, safe, tol, eps, pivot)


def penalized_simplex_weights(
    gramian: Tensor, linear: Tensor, radius: float, *, ridge: float | None = None
) -> Tensor:
    """Solve ``min_{w ∈ Δ} cᵀw + r·√(wᵀGw)`` (the inner problem of CAGrad and IMGrad).

    :param gramian: (T, T) positive semi-definite matrix.
    :param linear: (T,) linear term ``c``.
    :param radius: ``r > 0``.
    :returns: (T,) weights on the simplex.
    :raises SolverError: if the search does not terminate (never observed).

    The problem is convex. On a face F (the support of w) its stationary point is closed form:
    with ``p = G_FF⁻¹1``, ``q = G_FF⁻¹c``, ``A = 1ᵀp``, ``B = 1ᵀq``, ``C = cᵀq`` and
    ``D = B² − A(C − r²)``, the conditions ``c + (r/‖g_w‖)Gw = ν1``, ``1ᵀw = 1`` give
    ``ν = (B + √D)/A`` and ``w_F = (νp − q)/√D`` (no stationary point when ``D ≤ 0``). For
    T ≤ 8 every face is tried at once and the best feasible candidate kept. Above, a primal
    active-set method on the problem itself moves from face to face with one closed form per
    step (:func:`_penalized_by_active_set`; a handful of steps at T = 40). Should it not meet
    the KKT conditions within its budget (not seen on the test families), the
    optimal face is found by following the QPs ``w(t) = argmin_{w∈Δ} ½wᵀGw + t·cᵀw`` (whose
    KKT conditions match the problem's for ``t = ‖g_w‖/r``; ``‖g_{w(t)}‖ − rt`` is strictly
    decreasing, so the root is unique): each QP is solved by the monotone active-set method
    warm started from the previous solution, and t moves to the root of the current face's
    closed form (bisection when that leaves the bracket) until the closed form is KKT-optimal.

    Accuracy: computed in scaled coordinates with the ridge ``ε`` of :func:`default_ridge` on
    the cosine matrix, i.e. exact for ``G + ε·diag(G)``: the KKT conditions of the original
    problem hold to ``~ε`` relative (~1e-10 in float64).
    """
    dtype = working_dtype(gramian)
    matrix = gramian.to(dtype)
    num = matrix.shape[-1]
    if num == 1:
        return torch.ones(1, dtype=gramian.dtype, device=gramian.device)
    zero = matrix.diagonal() <= 0
    if bool(zero.any()):
        # a zero gradient scales the objective: F((1−t)w + t·eᵢ) = (1−t)F(w), so the optimum
        # is the best w over the other tasks when that is negative, else the zero gradients
        uniform_zero = (zero.to(dtype) / zero.sum()).to(gramian.dtype)
        keep = (~zero).nonzero().squeeze(-1)
        if keep.numel() == 0:
            return uniform_zero
        sub = matrix[keep][:, keep]
        sub_linear = linear.to(dtype)[keep]
        partial = penalized_simplex_weights(sub, sub_linear, radius, ridge=ridge).to(dtype)
        value = partial @ sub_linear + radius * (partial @ sub @ partial).clamp_min(0).sqrt()
        if not bool(value < 0):
            return uniform_zero
        full = torch.zeros(num, dtype=dtype, device=matrix.device).index_copy(0, keep, partial)
        return full.to(gramian.dtype)
    problem = _scaled_problem(matrix, ridge)
    unit = 1 / problem.scales
    scaled_linear = _host(linear.to(dtype)) * unit
    with np.errstate(all="ignore"):  # non-finite candidates are rejected explicitly
        if 2**num - 1 <= 2 * _ENUMERATION_FACES:
            beta = _penalized_by_enumeration(problem, unit, scaled_linear, radius)
        else:
            found = _penalized_by_active_set(problem, unit, scaled_linear, radius)
            if found is None:
                found = _penalized_by_homotopy(problem, unit, scaled_linear, radius)
            beta = found
    weights = np.maximum(beta, 0.0) * unit
    return _to_tensor(weights / weights.sum(), gramian)


def _penalized_face_candidates(
    matrix: np.ndarray, free: np.ndarray, unit: np.ndarray, linear: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Closed-form stationary points on faces: ``(β, ν, √D, valid, (p, q) stacked)``.

    Written without cancellation: with ``e = q − (B/A)p`` (the part of ``M⁻¹c`` that changes
    along the face), ``D = A(r² − eᵀMe)`` and ``β = p/A − e/√D``. The textbook
    ``B² − A(C − r²)`` loses everything when ``r`` is small and the face is a vertex.
    """
    columns = np.stack([np.broadcast_to(unit, free.shape), np.broadcast_to(linear, free.shape)], -1)
    both = _solve_on_free(matrix, free, columns, definite=True)
    p, q = both[..., 0], both[..., 1]
    a_p = (unit * p).sum(-1, keepdims=True)
    positive = a_p > 0
    safe_a_p = np.where(positive, a_p, 1.0)
    ratio = (unit * q).sum(-1, keepdims=True) / safe_a_p
    # on a vertex e = 0 exactly (aᵀe = 0 in one dimension); computed, it keeps the rounding of
    # q, which the tiny √D of a small radius blows up into a wrong (even negative) weight
    moving = np.where(free.sum(-1, keepdims=True) > 1, q - ratio * p, 0.0)
    spread = ((moving @ matrix) * moving).sum(-1, keepdims=True)
    reduced = radius * radius - spread  # D / A
    valid = (reduced > 0) & positive
    root = np.sqrt(np.where(valid, reduced, 1.0) * safe_a_p)  # √D
    nu = ratio + root / safe_a_p
    beta = p / safe_a_p - moving / root
    return beta, nu, root, valid, both


def _penalized_by_enumeration(
    problem: _Scaled, unit: np.ndarray, linear: np.ndarray, radius: float
) -> np.ndarray:
    matrix = problem.regularized
    free = _faces(matrix.shape[-1], False)
    beta, _, _, valid, _ = _penalized_face_candidates(matrix, free, unit, linear, radius)
    # A vertex is a candidate as it is: its closed form (a stationary point on a one-task face)
    # is the vertex itself, but it divides by √D = √(r² − rounding), which a small radius next to
    # a large linear term makes invalid, and then no vertex would be left to compare with.
    vertex = free.sum(-1) == 1
    beta = np.where(vertex[:, None], free / unit, beta)
    valid = valid | vertex[:, None]
    weights = beta * unit
    slack = problem.tol * np.abs(weights).sum(-1, keepdims=True)
    beta_slack = problem.tol * np.abs(beta).max(-1, keepdims=True)
    infeasible = free & ((weights < -slack) | (beta < -beta_slack))
    # Each candidate is compared at the simplex point it stands for (clipped, normalised), so
    # that a closed form whose entries cancel to 1 within rounding is judged at a real point.
    clipped = np.maximum(weights, 0.0)
    total = clipped.sum(-1, keepdims=True)
    feasible = valid[:, 0] & ~infeasible.any(-1) & (total[:, 0] > 0)
    point = clipped / np.where(total > 0, total, 1.0) / unit
    norm = np.sqrt(np.maximum(((point @ matrix) * point).sum(-1), 0.0))
    objective = np.where(feasible, point @ linear + radius * norm, math.inf)
    return point[objective.argmin()]


def _penalized_by_active_set(
    problem: _Scaled, unit: np.ndarray, linear: np.ndarray, radius: float
) -> np.ndarray | None:
    """Primal active-set method on ``min_{aᵀβ=1, β≥0} cᵀβ + r‖β‖_M`` itself (M = Ĝ + εI).

    Lawson & Hanson's scheme ("Solving Least Squares Problems", 1974, ch. 23) carried over to
    this objective, which is smooth (M is definite, so ‖β‖_M > 0 on the simplex) and strictly
    convex on the plane ``aᵀβ = 1`` (no two of its points lie on one ray). The iterate stays
    feasible. Each step solves the current face's closed form once
    (:func:`_penalized_face_candidates`, on the face's own rows and columns): where it is
    feasible it becomes the iterate and the coordinates with significantly negative
    multipliers join the face (all of them; only the most negative after an addition the line
    search undid, which always makes progress: the minimiser over the larger face then has that
    coordinate positive, by convexity). Otherwise the iterate moves towards it, or along the
    face's direction of unbounded descent when the closed form has none (``D ≤ 0``), until a
    weight reaches 0, and leaves those coordinates out. The objective never increases. Starts
    from the best vertex, since CAGrad's optimum mixes few tasks; a handful of steps at T = 40
    against one QP per step of :func:`_penalized_by_homotopy`.

    Returns β (T,), which meets the same KKT test as the homotopy's answer, or None when the
    method did not reach it within its step budget (the caller then runs the homotopy).
    """
    matrix = problem.regularized
    num = matrix.shape[-1]
    tol = problem.tol
    abs_matrix = np.abs(matrix)
    abs_linear = np.abs(linear)
    columns = np.stack([unit, linear], -1)  # (T, 2): a and c
    vertex = int(np.argmin((linear + radius * np.sqrt(matrix.diagonal())) / unit))
    index = np.array([vertex])  # the face F, ascending
    beta_f = np.array([1 / unit[vertex]])  # β on F (0 elsewhere)
    added: np.ndarray | None = None  # (T,) mask of the last addition, until the next step
    single = False
    for _ in range(4 * num + 20):
        rows = matrix[index]
        system = rows[:, index]
        a_f = unit[index]
        try:
            both = np.linalg.solve(system, columns[index])
        except np.linalg.LinAlgError:
            return None  # exactly singular after rounding: leave it to the homotopy
        p, q = both[:, 0], both[:, 1]
        a_p = float(a_f @ p)
        ratio = float(a_f @ q) / a_p
        moving = q - ratio * p if index.size > 1 else 0 * p  # exact on a vertex, see above
        reduced = radius * radius - float(moving @ (system @ moving))  # D / A
        if reduced > 0 and a_p > 0:
            root = math.sqrt(reduced * a_p)  # √D = r / ‖β‖_M at the closed form
            target = p / a_p - moving / root
            size = np.abs(target)
            # _violations' primal test: relative to the largest β and to the weights' sum
            feasible = (
                float(target.min()) >= 0
                or not (
                    target < -np.minimum(tol * float(size.max()), tol * float(size @ a_f) / a_f)
                ).any()
            )
            if feasible:
                nu = ratio + root / a_p
                multipliers = linear + root * (target @ rows) - nu * unit
                # _violations' dual test, off F: c + √D·Mβ − νa ≥ −tol·(its scale)
                scale = root * (size @ abs_matrix[index]) + abs_linear + abs(nu) * unit
                descent = multipliers < -tol * scale
                descent[index] = False
                if not descent.any():
                    beta = np.zeros(num)
                    beta[index] = target
                    return beta
                if single:
                    strongest = int(np.argmin(np.where(descent, multipliers / scale, math.inf)))
                    descent = np.zeros(num, dtype=bool)
                    descent[strongest] = True
                single = False
                added = descent.copy()
                descent[index] = True
                beta = np.zeros(num)
                beta[index] = np.maximum(target, 0.0)
                index = np.flatnonzero(descent)
                beta_f = beta[index]
                continue
            direction = target - beta_f
            cap = 1.0
        else:
            # no stationary point on the face: f decreases along −(M⁻¹c − (B/A)M⁻¹a) for ever
            direction = -moving
            cap = math.inf
        falling = direction < 0
        steps = np.where(falling, beta_f / -direction, math.inf)  # under the caller's errstate
        step = min(float(steps.min()), cap)
        if not math.isfinite(step):
            return None  # cannot happen in exact arithmetic: the face is bounded
        kept = steps > step * (1 + 4 * tol)
        if added is not None and not added[index[kept]].any():
            single = True  # the line search undid the whole addition
        added = None
        beta_f = np.maximum(beta_f[kept] + step * direction[kept], 0.0)
        index = index[kept]
        if index.size == 0:
            return None
    return None


def _penalized_by_homotopy(
    problem: _Scaled, unit: np.ndarray, linear: np.ndarray, radius: float
) -> np.ndarray:
    """Follow ``w(t) = argmin_{w∈Δ} ½wᵀGw + t·cᵀw`` to the root of ``‖g_{w(t)}‖ = r·t``.

    Each QP(t) is solved by :func:`_solve_lcp` (exact, and robust on rank-deficient Gramians);
    t moves to the root of the closed form on QP(t)'s optimal face when that lies in the
    current bracket, and to the bracket's midpoint otherwise. At the root, QP(t)'s KKT
    conditions are the problem's, so the bisection alone converges; the closed form only makes
    it exact in a step or two. A root at t = 0 (the gradients are Pareto-stationary, so MGDA's
    point has norm 0) returns the limit t → 0⁺, see :func:`penalized_simplex_weights`.
    """
    matrix = problem.regularized
    abs_matrix = np.abs(matrix)
    num = matrix.shape[-1]
    tol = problem.tol
    # ‖g_w‖ ≤ max ‖gᵢ‖, so ‖g_{w(t)}‖ − rt < 0 beyond `high`
    low, high = 0.0, 1.01 * float(problem.scales.max()) / radius
    everything = np.ones((1, num), dtype=bool)
    _, _, root, valid, _ = _penalized_face_candidates(matrix, everything, unit, linear, radius)
    guess = 1.0 / float(root[0, 0]) if valid.all() else math.nan
    t = guess if low < guess < high else high / 2
    wide = problem.scales.max() > _WIDE_SPREAD * problem.scales.min()
    best: np.ndarray | None = None
    previous: np.ndarray | None = None
    for step in range(200):
        scaled = t * linear[None]
        qp = _solve_lcp(problem, None, scaled, unit, 1, "penalised simplex", start=previous)
        previous = qp
        support = qp > tol * np.abs(qp).max(-1, keepdims=True)
        beta, nu, root, valid, _ = _penalized_face_candidates(matrix, support, unit, linear, radius)
        if valid.all():
            # CAGrad's KKT: c + √D·Ĝβ − νa ≥ 0 off F (√D = r/‖g_w‖)
            candidate = _FacePoint(beta, nu, linear + root * (beta @ matrix) - nu * unit, valid)
            bad = _violations(candidate, support, abs_matrix * root, None, linear, unit, tol)
            if not bad.any():
                return beta[0]
        norm = math.sqrt(max(float(((qp @ matrix) * qp).sum()), 0.0))
        if norm > radius * t:
            low = t
        else:
            high = t
        best = qp[0]
        guess = 1.0 / float(root[0, 0]) if valid.all() else math.nan
        if step == 1 and low == 0 and wide:
            # still unbracketed from below after two QPs, with gradient norms so widely spread
            # that the closed-form steps walk down a few orders of magnitude per QP: w(0) is
            # MGDA's min-norm point and ‖g_w‖ ≥ its norm for every w, so the root is at least
            # ‖g_{w(0)}‖/r, and w(0)'s face gives the next guess
            mgda = _solve_lcp(problem, None, None, unit, 1, "penalised simplex")
            low = min(math.sqrt(max(float(((mgda @ matrix) * mgda).sum()), 0.0)) / radius, high)
            mgda_support = mgda > tol * np.abs(mgda).max(-1, keepdims=True)
            _, _, root, valid, _ = _penalized_face_candidates(
                matrix, mgda_support, unit, linear, radius
            )
            guess = 1.0 / float(root[0, 0]) if valid.all() else math.sqrt(low * high)
        t = guess if low < guess < high else 0.5 * (low + high)
        if high - low <= tol * high:
            break
    assert best is not None
    return best


# --------------------------------------------------------------------------- linear algebra


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


def rank_rtol(num_tasks: int, eps: float) -> float:
    """Relative eigenvalue below which a T×T Gramian counts as singular: ``64·T·eps``.

    The eigenvalues of a Gramian are the squared singular values of its gradients; rounding
    the Gramian (relative ``eps``) moves them by about ``T·eps·λ_max``, so a rank decision at
    that level flips with the last bits of G (a common scale of G changes them): the margin 64
    makes it scale-invariant in practice. Directions whose singular values are below
    ``√(64·T·eps) ≈ 2e-6`` (float64, T = 4) of the largest cannot be resolved from G.
    """
    return 64 * num_tasks * eps


def psd_pinv_solve(matrix: Tensor, rhs: Tensor, *, rtol: float | None = None) -> Tensor:
    """Minimum-norm least-squares solution ``A⁺ b`` of a symmetric PSD system, via ``eigh``.

    Eigenvalues at or below ``rtol · λ_max`` are treated as zero (default
    :func:`rank_rtol` at the input's precision), and so are the components of ``b`` along an
    eigenvector that are within the rounding error of ``Vᵀb`` (``T·eps·‖b‖``): ``b`` is then
    orthogonal to it, and dividing noise by its eigenvalue would make the answer depend on the
    last bits of the matrix.
    """
    num = matrix.shape[-1]
    eps = input_eps(matrix)
    relative = rank_rtol(num, eps) if rtol is None else rtol
    dtype = working_dtype(matrix)
    result = _host_pinv_solve(_host(matrix.to(dtype)), _host(rhs.to(dtype)), relative, eps)
    return torch.from_numpy(result).to(matrix.device, matrix.dtype)


def _host_pinv_solve(
    matrix: np.ndarray, rhs: np.ndarray, relative: float, eps: float
) -> np.ndarray:
    """:func:`psd_pinv_solve` on float64 host arrays (``eps``: the input's precision).

    The decomposition runs in torch on a zero-copy view (LAPACK's divide-and-conquer ``eigh``,
    faster than numpy's at these sizes), the rest in numpy, whose per-operation cost on
    T-sized arrays is a fraction of torch's.
    """
    single = matrix.ndim == 2 and rhs.ndim == 1
    if single:
        solution = _well_conditioned_solve(matrix, rhs, relative, eps)
        if solution is not None:
            return solution
    values_t, vectors_t = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(matrix)))
    values, vectors = values_t.numpy(), vectors_t.numpy()
    if single:
        # the same rules with scalars where they are scalars (eigenvalues come ascending)
        coefficients = rhs @ vectors
        noise = matrix.shape[-1] * eps * math.sqrt(float(rhs @ rhs))
        used = (values > relative * max(float(values[-1]), 0.0)) & (np.abs(coefficients) > noise)
        return vectors[:, used] @ (coefficients[used] / values[used])
    threshold = relative * np.maximum(values.max(-1, keepdims=True), 0.0)
    keep = values > threshold
    inverse = np.where(keep, 1 / np.where(keep, values, 1.0), 0.0)
    coefficients = (np.swapaxes(vectors, -2, -1) @ rhs[..., None])[..., 0]
    # components of b within the rounding of Vᵀb are noise: b ⊥ that eigenvector
    noise = matrix.shape[-1] * eps * np.linalg.norm(rhs, axis=-1, keepdims=True)
    coefficients = np.where(np.abs(coefficients) > noise, coefficients, 0.0)
    return (vectors @ (inverse * coefficients)[..., None])[..., 0]


# bound on the relative change of the update ``Σ xᵢuᵢ`` that the eigen path's noise rule could
# make, below which a Cholesky solve stands for the pseudo-inverse (rounding, not a choice)
_PINV_AGREEMENT = 1e-12


def _well_conditioned_solve(
    matrix: np.ndarray, rhs: np.ndarray, relative: float, eps: float
) -> np.ndarray | None:
    """``A⁻¹b`` by Cholesky where that provably is :func:`psd_pinv_solve`'s answer, else None.

    With ``L Lᵀ = A``: ``λ_min ≥ 1/‖L⁻¹‖²_F`` (that is ``1/tr A⁻¹``) and ``λ_max ≤ tr A``, so
    when ``1/tr A⁻¹ > rtol·tr A`` the eigen path keeps every eigenvalue, and its only
    other rule, dropping components of ``b`` below ``noise = T·eps·‖b‖``, changes
    ``xᵀAx = bᵀA⁻¹b`` (the squared size of the update) by at most ``T·noise²·tr A⁻¹``: when that is
    below ``_PINV_AGREEMENT²·bᵀA⁻¹b`` the two answers agree to rounding. So for well-conditioned
    systems (dense gradients, float64 inputs) one Cholesky factorisation and one triangular
    inverse replace the eigendecomposition (~50 µs instead of ~250 µs at T = 40); a rank-deficient
    or float32 input (whose noise level is 10⁹ times higher) takes the eigen path.
    """
    num = matrix.shape[-1]
    if not num**3 * eps * eps <= _PINV_AGREEMENT**2:
        return None  # bᵀA⁻¹b ≤ ‖b‖²·tr A⁻¹ makes the noise test fail whatever A (float32)
    factor, info = torch.linalg.cholesky_ex(torch.from_numpy(matrix))
    if int(info) != 0:
        return None
    bound = relative * float(matrix.trace())  # rtol · (a bound on λ_max)
    if not float(factor.numpy().diagonal().min()) ** 2 > bound:
        return None  # λ_min ≤ min Lᵢᵢ²: the trace test below would fail
    inverse_factor = torch.linalg.solve_triangular(
        factor, torch.from_numpy(_host_eye(num)), upper=False
    ).numpy()  # L⁻¹, so A⁻¹ = L⁻ᵀL⁻¹
    trace = float((inverse_factor * inverse_factor).sum())  # tr A⁻¹
    if not trace * bound < 1:
        return None
    half = inverse_factor @ rhs
    size = float(half @ half)  # bᵀA⁻¹b
    noise = num * eps * float(np.linalg.norm(rhs))
    if not num * noise * noise * trace <= _PINV_AGREEMENT**2 * size:
        return None
    return inverse_factor.T @ half


def equal_projection_weights(gramian: Tensor) -> Tensor:
    """``z/s`` with ``z = Ĝ⁺1`` on the non-zero gradients (0 on zero ones), in the working dtype.

    ``Σ zᵢuᵢ`` (``uᵢ = gᵢ/‖gᵢ‖``) is the combination of the unit gradients whose projection
    on every ``uᵢ`` is 1 — exactly when they are linearly independent, in the least-squares
    sense otherwise — so ``d = Σ (zᵢ/sᵢ) gᵢ`` has equal projections on all unit gradients:
    ConFIG's direction and IMTL-G's weights before their normalisations. The pseudo-inverse
    decides the rank at :func:`rank_rtol` of the input's precision, so that the result does not
    depend on a common scale of G (Liu et al. 2021 assume independent gradients; TorchJD's
    generalisation, arXiv 2406.16232, uses the pseudo-inverse as well).
    """
    dtype = working_dtype(gramian)
    host = _host(gramian.to(dtype))
    scales = np.sqrt(np.maximum(host.diagonal(), 0.0))
    nonzero = scales > 0
    safe = np.where(nonzero, scales, 1.0)
    cosine = host / safe[:, None] / safe[None, :]
    eps = input_eps(gramian)
    relative = rank_rtol(host.shape[-1], eps)
    coefficients = _host_pinv_solve(cosine, nonzero.astype(np.float64), relative, eps)
    weights = np.where(nonzero, coefficients / safe, 0.0)
    return torch.from_numpy(weights).to(gramian.device, dtype)


# --------------------------------------------------------------------------- CAGrad, IMGrad


def worst_case_weights(gramian: Tensor, linear: Tensor, radius: float) -> Tensor:
    """``argmin_{w ∈ Δ} wᵀb + r‖Σ wᵢ gᵢ‖`` (the inner problem of CAGrad and IMGrad).

    Solved exactly by :func:`mtlhooks.solvers.penalized_simplex_weights` (closed form per face,
    KKT to ~1e-10 relative in float64). With ``r = 0`` the problem is linear: the answer is
    the uniform distribution over the minimisers of ``b`` (ties within rounding).
    """
    num_tasks = gramian.shape[0]
    if radius <= 0:
        ties = linear <= linear.min() + 4 * num_tasks * torch.finfo(linear.dtype).eps * (
            linear.abs().max()
        )
        return ties.to(linear.dtype) / ties.sum()
    return penalized_simplex_weights(gramian, linear, radius)


def cancellation_level(gramian: Tensor) -> float:
    """Relative size below which ``‖Σ wᵢgᵢ‖`` computed from G is rounding: ``8T√eps``."""
    return 8 * gramian.shape[0] * float(torch.finfo(gramian.dtype).eps) ** 0.5


def conflict_averse_weights(
    gramian: Tensor, weights: Tensor, coefficient: float, norm_mean: float
) -> Tensor:
    """CAGrad's update ``(g₀ + (c‖g₀‖/‖g_w‖) g_w) / (1 + c²)`` as weights on the gradients.

    Where ``g_w`` vanishes (to the rounding of ``Σ wᵢgᵢ``: the gradients are Pareto-stationary,
    or a task's gradient is zero) that formula is undefined, and the inner problem only
    locates ``w`` to ~√eps, so ``g_w``'s direction is noise. The problem's optimal value is then
    0 and its optimal updates are the non-conflicting points of the ball: the one closest to
    ``g₀`` is taken, the projection of ``g₀`` onto the dual cone (DualProj's update, inside the
    ball by duality), scaled by ``1/(1 + c²)`` like the regular update.
    """
    num_tasks = gramian.shape[0]
    # on host copies: a handful of T-sized operations, cheaper in numpy than as torch dispatches
    host, host_weights = _host(gramian), _host(weights)
    norm_w = math.sqrt(max(float(host_weights @ host @ host_weights), 0.0))
    norms = np.sqrt(np.maximum(host.diagonal(), 0.0))
    scale = float(norms @ np.abs(host_weights))
    if norm_mean == 0:
        return torch.full_like(weights, 1.0 / num_tasks) / (1 + coefficient**2)
    if norm_w <= cancellation_level(gramian) * scale:
        base = torch.full_like(weights, 1.0 / num_tasks)
        return dual_cone_qp(gramian, base) / (1 + coefficient**2)
    update = (1.0 / num_tasks + coefficient * norm_mean / norm_w * host_weights) / (
        1 + coefficient**2
    )
    return _to_tensor(update, weights)


def mean_gradient(gramian: Tensor) -> tuple[Tensor, Tensor, float]:
    """The Gramian in the working dtype, the mean's weights 1/T and the mean gradient's norm."""
    matrix = gramian.to(working_dtype(gramian))
    uniform = mean(matrix)
    # ‖g₀‖² = uᵀGu with u = 1/T, on the host copy (one reduction instead of two torch matmuls)
    host_uniform = np.full(matrix.shape[0], 1.0 / matrix.shape[0])
    return matrix, uniform, math.sqrt(max(float(host_uniform @ _host(matrix) @ host_uniform), 0.0))


# --------------------------------------------------------------------------- Nash-MTL, FairGrad


def fair_weights(
    gramian: Tensor, power: float, max_iter: int, tol: float | None, name: str
) -> Tensor:
    """Solve ``(Gw)ᵢ = wᵢ^{-1/power}``, ``w > 0``, by a damped Newton method in log space.

    The equations are the stationarity conditions of the strictly convex potential
    ``Φ(w) = ½wᵀGw − Σ φ(wᵢ)`` with ``φ'(w) = w^{-1/power}``. In scaled coordinates
    ``β = S w`` they read ``(Ĝβ)ᵢ = κᵢ βᵢ^{-p}`` with ``p = 1/power`` and
    ``κᵢ = sᵢ^{p − 1}`` (``κ = 1`` for Nash-MTL), so the iteration only sees the cosines.

    Iterates stay positive by construction, ``βᵢ = e^{uᵢ}``: the step is Newton's step on Φ
    expressed in u (``(DHD)Δu = D∇Φ`` with ``D = diag(β)``, which also equilibrates the
    system), moved along ``β·e^{−tΔu}``, a descent curve for Φ; t is found by Armijo
    backtracking on Φ, and a step that lowers the largest relative residual is accepted as well
    (near the solution Φ's decrease drowns in rounding). The start is the solution for
    orthogonal gradients, ``βᵢ = κᵢ^{1/(1+p)}``, rescaled to the best multiple along that ray.
    Stops when every relative residual ``|(Ĝβ)ᵢβᵢᵖ/κᵢ − 1|`` is at most ``tol`` or at the
    rounding floor of ``(Ĝβ)ᵢ``; the weights are returned only when the residual plus the
    rounding error of ``(Ĝβ)ᵢ`` (relative) is within ``max(tol, 1e-4)``, i.e. when they
    provably solve the equations (near Pareto-stationarity ``(Ĝβ)ᵢ`` is a cancellation, and a
    small computed residual proves nothing). Otherwise :class:`SolverError`, as when no
    solution exists at all.
    """
    check_gramian(gramian)
    if not is_finite(gramian):
        return nan_weights(gramian)
    dtype = working_dtype(gramian)
    matrix = gramian.to(dtype)
    scales = gramian_scales(matrix)
    if not bool((scales > 0).all()):
        raise SolverError(
            f"{name}: a task gradient is zero, so (Gw)ᵢ = wᵢ^(-1/α) has no solution; drop the "
            "task or use a method that tolerates zero gradients (mgda, upgrad)"
        )
    if tol is None:
        tol = 1e-9 if dtype == torch.float64 else 1e-4
    num = matrix.shape[0]
    eps = float(torch.finfo(dtype).eps)
    verified = max(_VERIFIED, eps**0.5)
    output_eps = input_eps(gramian)
    # the iteration runs on float64 host arrays, like the QPs' (a host sync per step anyway)
    torch_cosine, _, shift_psd = psd_cosine(matrix)
    cosine = _host(torch_cosine)
    abs_cosine = np.abs(cosine)
    p = 1.0 / power
    log_kappa = (p - 1.0) * np.log(_host(scales))
    shift = float(log_kappa.max())
    kappa = np.exp(log_kappa - shift)  # κ / max κ: a common factor, undone below

    def potential(beta: np.ndarray, log_beta: np.ndarray) -> float:
        if p == 1.0:
            barrier = float((kappa * log_beta).sum())
        else:
            barrier = float((kappa * beta ** (1 - p)).sum()) / (1 - p)
        return float(0.5 * beta @ cosine @ beta) - barrier

    log_beta = np.log(kappa) / (1 + p)
    beta = np.exp(log_beta)
    curvature = float(beta @ cosine @ beta)
    if curvature > 0:
        push = float((kappa * beta ** (1 - p)).sum())
        log_beta = log_beta + math.log(push / curvature) / (1 + p)
        beta = np.exp(log_beta)
    value = potential(beta, log_beta)
    converged = False
    for _ in range(max_iter):
        product = cosine @ beta
        target = kappa * beta ** (-p)
        gradient = product - target
        residual = gradient / target
        worst = float(np.abs(residual).max())
        # (Ĝβ)ᵢ is only known to its rounding error (at most T·eps·(|Ĝ|β)ᵢ, relative ρᵢ): stop
        # at tol or at that floor, and accept when the residual plus ρ is within
        # max(tol, `verified`) (near Pareto-stationarity (Ĝβ)ᵢ is a cancellation: ρ is large
        # and a small computed residual proves nothing)
        rounding = num * eps * (abs_cosine @ beta)
        floor = bool((np.abs(gradient) <= 8 * rounding).all())
        if worst <= tol or floor:
            # what (Gw)ᵢ can be trusted to: rounding here, the indefiniteness removed from Ĝ
            # and the rounding of the weights to the output's dtype
            doubt = rounding + shift_psd * beta + output_eps * (abs_cosine @ beta)
            bound = worst + float((doubt / np.maximum(np.abs(product), 1e-300)).max())
            converged = bound <= max(tol, verified)
            break
        # Newton on the convex potential Φ, written in u: (DHD)Δu = D∇Φ
        system = beta[:, None] * cosine * beta + np.diag(p * target * beta)
        solved, info = torch.linalg.solve_ex(
            torch.from_numpy(system), torch.from_numpy(beta * gradient)
        )
        step = solved.numpy()
        if bool(info != 0) or not bool(np.isfinite(step).all()):
            break
        slope = float((beta * gradient) @ step)  # −dΦ/dt at t = 0
        size = min(1.0, 10.0 / max(float(np.abs(step).max()), 1e-300))
        noise = 64 * eps * (abs(value) + float(beta @ abs_cosine @ beta))
        for _ in range(60):
            candidate_log = log_beta - size * step
            candidate = np.exp(candidate_log)
            new_value = potential(candidate, candidate_log)
            if new_value <= value - 1e-4 * size * slope:
                break
            if new_value <= value + noise:
                # Φ's decrease is below its rounding: judge by the residual instead
                new_target = kappa * candidate ** (-p)
                new_worst = float(np.abs((cosine @ candidate - new_target) / new_target).max())
                if new_worst < worst:
                    break
            size /= 2
        log_beta, beta, value = candidate_log, candidate, new_value
        if not math.isfinite(value) or float(np.abs(log_beta).max()) > 200:
            break
    if not converged:
        raise SolverError(
            f"{name}: no weights verified to solve (Gw)ᵢ = wᵢ^(-1/α) within tol = {tol} in "
            f"{max_iter} Newton iterations: the gradients are Pareto-stationary (some "
            "nonnegative combination of them vanishes), or so nearly that (Gw)ᵢ is lost in "
            "rounding, and no solution exists to working precision"
        )
    # undo the normalisation of κ: β solves (Ĝβ) = (κ/m) β^{-p}, so m^{1/(1+p)}β solves the
    # original equations, with log m = shift
    weights = _to_tensor(np.exp(log_beta + shift / (1 + p)) / _host(scales), gramian)
    if not bool(((weights > 0) & (weights < math.inf)).all()):
        raise SolverError(
            f"{name}: the weights leave the range of {gramian.dtype} (gradient norms spread "
            "too widely for it); pass the Gramian in float64"
        )
    return weights


def fair_weights_or_fallback(
    gramian: Tensor,
    power: float,
    max_iter: int,
    tol: float | None,
    name: str,
    tasks: Sequence[str] | None = None,
) -> tuple[Tensor, str | None]:
    """:func:`fair_weights`, or where they do not exist (or cannot be verified) a defined
    update, with a remark saying which: ``(weights, remark)``, remark ``None`` when solved.

    - Tasks whose gradient is zero have no progress to bargain for: weight 0, and the
      equations are solved for the others.
    - Otherwise (the gradients are Pareto-stationary: a nonnegative combination of them
      vanishes, or nearly, up to rounding) MGDA's min-norm weights: a convex combination whose
      update on the shared parameters is (close to) zero, the limit the bargaining solution
      diverges towards; the task-specific parameters still get those weights.
    """
    try:
        return fair_weights(gramian, power, max_iter, tol, name), None
    except SolverError as error:
        failure = str(error).removeprefix(f"{name}: ")
    names = list(tasks) if tasks is not None else [str(i) for i in range(gramian.shape[0])]
    zero = gramian_scales(gramian.to(working_dtype(gramian))) == 0
    if bool(zero.any()) and not bool(zero.all()):
        keep = (~zero).nonzero().squeeze(-1)
        partial, remark = fair_weights_or_fallback(
            gramian[keep][:, keep], power, max_iter, tol, name, [names[i] for i in keep]
        )
        weights = torch.zeros_like(gramian[0]).index_copy(0, keep, partial)
        dropped = [names[i] for i in zero.nonzero().squeeze(-1).tolist()]
        note = f"{name}: zero gradient for task(s) {dropped}: weight 0"
        return weights, note if remark is None else f"{note}; {remark}"
    return min_norm_weights(gramian), (
        f"{name}: {failure}; used MGDA's min-norm weights (the update on the shared parameters "
        "is ~0 where the gradients are Pareto-stationary)"
    )


def nonnegative_qp(matrix: Tensor, linear: Tensor, *, ridge: float | None = None) -> Tensor:
    """Solve ``min_{x ≥ 0} ½ xᵀMx + cᵀx`` for a positive semi-definite M (the dual of a
    projection onto a polyhedron given by its Gramian, as in PCD).

    Same machinery as :func:`dual_cone_qp` (scaled coordinates, block pivoting then the
    monotone active-set method, a polishing solve). Where the problem is unbounded below (the
    primal polyhedron is empty) the ridge keeps the answer finite but large: callers check the
    primal constraints.
    """
    dtype = working_dtype(matrix)
    square = matrix.to(dtype)
    problem = _scaled_problem(square, ridge)
    scaled_linear = (_host(linear.to(dtype)) / problem.scales)[None]
    beta = _solve_lcp(problem, None, scaled_linear, None, 1, "nonnegative QP")
    return _to_tensor(np.maximum(beta[0], 0.0) / problem.scales, matrix)
