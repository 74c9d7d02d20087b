"""Functional core of gradient aggregation: Gramian → per-task weights.

Each function maps the T×T Gramian ``G = J Jᵀ`` of the task gradients ``gᵢ`` (rows of J) to
weights ``α`` such that the update is ``d = Σᵢ αᵢ gᵢ = Jᵀα``. They are pure functions of their
arguments (random methods take a :class:`torch.Generator`; GradVac returns its new state), run
on the device and in the dtype of ``G``, and never need the T×P matrix J. The one exception is
:func:`graddrop`, which is coordinate-wise and takes the gradients themselves.

:data:`METHODS` declares, per method, the function and the properties it claims. It is the single
source of truth for the property tests and for the generated documentation table
(:func:`property_table_markdown`).

All functions return finite weights for every finite Gramian, or raise
:class:`~mtlhooks.errors.SolverError` where the method is undefined (documented per function).
A non-finite Gramian yields non-finite weights (so a GradScaler skips the step), never an error.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mtlhooks.errors import InputError, SolverError
from mtlhooks.solvers import (
    default_ridge,
    dual_cone_qp,
    gramian_scales,
    min_norm_weights,
    normalize_gramian,
    penalized_simplex_weights,
    psd_pinv_solve,
    working_dtype,
)

__all__ = [
    "METHODS",
    "MethodSpec",
    "Property",
    "aligned_mtl",
    "cagrad",
    "config",
    "dualproj",
    "fairgrad",
    "graddrop",
    "gradvac",
    "imgrad",
    "imtl_g",
    "mean",
    "mgda",
    "nash_mtl",
    "pcgrad",
    "pcgrad_from_orders",
    "property_table_markdown",
    "sum",
    "upgrad",
]


def _uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """U(0, 1) float32 draws from ``generator`` on the generator's own device (the pipeline's is
    on the CPU, so draws do not depend on where the tensors live or on their dtype), moved to
    ``device``."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _check_gramian(gramian: Tensor) -> None:
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise InputError(
            f"expected a square (T, T) Gramian with T ≥ 1, got shape {tuple(gramian.shape)}"
        )


def _nan_weights(gramian: Tensor) -> Tensor:
    return torch.full(gramian.shape[:1], float("nan"), dtype=gramian.dtype, device=gramian.device)


def _is_finite(gramian: Tensor) -> bool:
    # x·0 is NaN exactly for non-finite x; three cheap kernels instead of isfinite's six
    return bool((gramian * 0 == 0).all())


# --------------------------------------------------------------------------- trivial weightings


def mean(gramian: Tensor) -> Tensor:
    """Equal weights ``1/T``: the update is the mean gradient."""
    _check_gramian(gramian)
    num_tasks = gramian.shape[0]
    return torch.full((num_tasks,), 1.0 / num_tasks, dtype=gramian.dtype, device=gramian.device)


def sum(gramian: Tensor) -> Tensor:
    """Unit weights: the update is the sum of the gradients (a plain ``Σ Lᵢ`` backward)."""
    _check_gramian(gramian)
    return torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)


# --------------------------------------------------------------------------- MGDA


def mgda(gramian: Tensor) -> Tensor:
    """MGDA: weights of the minimum-norm point of the convex hull of the gradients.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
    (Désidéri's MGDA, 2012): ``α = argmin_{α ∈ Δ} ‖Σ αᵢ gᵢ‖²``.

    Solved exactly (active set with closed-form steps, :func:`mtlhooks.solvers.simplex_qp`)
    rather than by the reference Frank-Wolfe loop. The KKT conditions ``⟨d, gᵢ⟩ ≥ ‖d‖²``, with
    equality where ``αᵢ > 0``, hold to ~1e-10 relative in float64. No gradient normalisation is
    applied here: normalise the Gramian first (``normalize_gramian``) for the "l2" variant.
    """
    _check_gramian(gramian)
    if not _is_finite(gramian):
        return _nan_weights(gramian)
    return min_norm_weights(gramian)


# --------------------------------------------------------------------------- PCGrad


def pcgrad_from_orders(
    gramian: Tensor, orders: Tensor, *, reduction: Literal["sum", "mean"] = "sum"
) -> Tensor:
    """PCGrad with explicit projection orders: ``orders[i]`` is task i's order over all tasks.

    Entries equal to ``i`` in ``orders[i]`` are skipped (a task never projects onto itself), so a
    permutation of ``range(T)`` per row is a valid input. See :func:`pcgrad`.
    """
    _check_gramian(gramian)
    if reduction not in ("sum", "mean"):
        raise InputError(f"pcgrad: reduction must be 'sum' or 'mean', got {reduction!r}")
    dtype = working_dtype(gramian.dtype)
    matrix = gramian.to(dtype)
    num_tasks = matrix.shape[0]
    device = matrix.device
    tasks = torch.arange(num_tasks, device=device)
    diag = matrix.diagonal()
    scales = diag.clamp_min(0).sqrt()
    rounding = 4 * num_tasks * torch.finfo(dtype).eps
    # everything a round needs, gathered once: round k pairs task i with partner rounds[k, i]
    rounds = orders.T.to(device)
    partner_rows = matrix[rounds].unbind(0)  # rows[k][i] = G[rounds[k, i]]
    partner_sq = diag[rounds]
    valid = (rounds != tasks) & (partner_sq > 0)
    neg_inverse = torch.where(valid, -1 / torch.where(valid, partner_sq, 1.0), 0.0).unbind(0)
    # an inner product within its own rounding error is no conflict: projecting on noise
    # would make the result depend on the last bits of G (e.g. of a common scale)
    neg_noise = (-rounding * scales[rounds]).unbind(0)
    partner_scales = scales[rounds].unbind(0)
    flat_index = (tasks * num_tasks + rounds).unbind(0)
    # row i holds the coefficients of the projected gradient g̃ᵢ = Σₖ Cᵢₖ gₖ; they are ≥ 0
    # off the diagonal (a projection adds a positive multiple), so Σₖ|Cᵢₖ|sₖ = (C s)ᵢ
    coefficients = torch.eye(num_tasks, dtype=dtype, device=device)
    flat = coefficients.view(-1)
    magnitude = scales.clone()
    zero = torch.zeros((), dtype=dtype, device=device)
    for step in range(rounds.shape[0]):
        dots = (coefficients * partner_rows[step]).sum(1)  # ⟨g̃ᵢ, g_partner⟩
        conflict = dots < neg_noise[step] * magnitude
        amount = torch.where(conflict, dots * neg_inverse[step], zero)
        flat.index_add_(0, flat_index[step], amount)
        magnitude.addcmul_(amount, partner_scales[step])
    weights = coefficients.sum(0)
    if reduction == "mean":
        weights = weights / num_tasks
    return weights.to(gramian.dtype)


def pcgrad(
    gramian: Tensor,
    *,
    generator: torch.Generator | None = None,
    reduction: Literal["sum", "mean"] = "sum",
) -> Tensor:
    """PCGrad ("gradient surgery") expressed as weights on the Gramian.

    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1: for each
    task i, ``g̃ᵢ = gᵢ``; for every other task j in a random order, if ``⟨g̃ᵢ, gⱼ⟩ < 0`` then
    ``g̃ᵢ ← g̃ᵢ − ⟨g̃ᵢ, gⱼ⟩/‖gⱼ‖² gⱼ``; the update is ``Σ g̃ᵢ`` (``reduction="mean"``: the mean).

    Every g̃ᵢ is tracked as a row of coefficients on the original gradients, so the weights are
    ``αⱼ = Σᵢ Cᵢⱼ``. All tasks advance together: T rounds of (T, T) tensor operations. Each task
    has its own order, a random permutation drawn from ``generator`` (the official TF code never
    really shuffled). Zero gradients are never projected onto. Weights are ≥ 1 (sum) because a
    projection only ever adds a positive multiple of a conflicting gradient.
    """
    _check_gramian(gramian)
    num_tasks = gramian.shape[0]
    draws = _uniform((num_tasks, num_tasks), generator, gramian.device)
    orders = draws.argsort(dim=1)
    return pcgrad_from_orders(gramian, orders, reduction=reduction)


# --------------------------------------------------------------------------- dual-cone methods


def _preference(gramian: Tensor, pref: Tensor | None) -> Tensor:
    if pref is None:
        return mean(gramian)
    if pref.shape != gramian.shape[:1] or bool((pref < 0).any()):
        raise InputError(f"pref must be a nonnegative vector of length {gramian.shape[0]}")
    return pref.to(gramian)


def upgrad(gramian: Tensor, *, pref: Tensor | None = None) -> Tensor:
    """UPGrad: average of the projections of the (preference-weighted) gradients onto the dual cone.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232 (2024),
    Sec. 4: ``vᵢ = argmin_{v ≥ prefᵢ eᵢ} vᵀGv`` and ``α = Σᵢ vᵢ``. With the default
    ``pref = 1/T`` the result equals the mean when no gradient conflicts with the others. All T
    QPs are solved together (:func:`mtlhooks.solvers.dual_cone_qp`).
    """
    _check_gramian(gramian)
    if not _is_finite(gramian):
        return _nan_weights(gramian)
    lower = torch.diag(_preference(gramian, pref))
    return dual_cone_qp(gramian, lower).sum(0)


def dualproj(gramian: Tensor, *, pref: Tensor | None = None) -> Tensor:
    """DualProj: projection of the (preference-weighted) mean gradient onto the dual cone.

    Quinton & Rey, arXiv 2406.16232 (2024), Sec. 5 (baseline built from the same projection):
    ``α = argmin_{v ≥ pref} vᵀGv`` with ``pref = 1/T`` by default.
    """
    _check_gramian(gramian)
    if not _is_finite(gramian):
        return _nan_weights(gramian)
    return dual_cone_qp(gramian, _preference(gramian, pref))


# --------------------------------------------------------------------------- CAGrad, IMGrad


def _worst_case_weights(gramian: Tensor, linear: Tensor, radius: float) -> Tensor:
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


def _cancellation_level(gramian: Tensor) -> float:
    """Relative size below which ``‖Σ wᵢgᵢ‖`` computed from G is rounding: ``8T√eps``."""
    return 8 * gramian.shape[0] * float(torch.finfo(gramian.dtype).eps) ** 0.5


def _conflict_averse_weights(
    gramian: Tensor, weights: Tensor, coefficient: float, norm_mean: float
) -> Tensor:
    """``(1/T + (c‖g₀‖/‖g_w‖) w) / (1 + c²)``; the second term is dropped when ``g_w = 0``."""
    num_tasks = gramian.shape[0]
    norm_w = float((weights @ gramian @ weights).clamp_min(0).sqrt())
    # ‖g_w‖ below the rounding error of Σ wᵢgᵢ counts as zero
    scale = float((gramian_scales(gramian) * weights.abs()).sum())
    base = torch.full_like(weights, 1.0 / num_tasks)
    if norm_w <= _cancellation_level(gramian) * scale or norm_mean == 0:
        return base / (1 + coefficient**2)
    return (base + coefficient * norm_mean / norm_w * weights) / (1 + coefficient**2)


def _mean_gradient(gramian: Tensor) -> tuple[Tensor, Tensor, float]:
    """The Gramian in the working dtype, the mean's weights 1/T and the mean gradient's norm."""
    matrix = gramian.to(working_dtype(gramian.dtype))
    uniform = mean(matrix)
    return matrix, uniform, float((uniform @ matrix @ uniform).clamp_min(0).sqrt())


def cagrad(gramian: Tensor, *, c: float = 0.4) -> Tensor:
    """CAGrad: the update in the ball of radius ``c‖g₀‖`` around the mean that helps the worst task.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021, Alg. 1:
    ``w = argmin_{w∈Δ} g_wᵀg₀ + c‖g₀‖‖g_w‖``, ``d = (g₀ + c‖g₀‖/‖g_w‖ · g_w) / (1 + c²)``
    (the reference code's ``rescale=1``). ``c = 0`` gives the mean. When ``g_w = 0`` the
    second term is dropped, as the reference's ``+1e-8`` effectively does.
    """
    _check_gramian(gramian)
    if c < 0:
        raise InputError(f"cagrad: c must be ≥ 0, got {c}")
    if not _is_finite(gramian):
        return _nan_weights(gramian)
    matrix, uniform, norm_mean = _mean_gradient(gramian)
    if c == 0 or norm_mean == 0:
        return (uniform / (1 + c**2)).to(gramian.dtype)
    worst = _worst_case_weights(matrix, matrix @ uniform, c * norm_mean)
    return _conflict_averse_weights(matrix, worst, c, norm_mean).to(gramian.dtype)


def imgrad(gramian: Tensor, *, alpha: float = 0.8) -> Tensor:
    """IMGrad: CAGrad-style update whose conflict aversion is set by the MGDA direction.

    Zhou et al., "IMGrad" (2025), as summarised in METHODS.md: ``ρ = cos(g₀, g_MGDA)``,
    ``w* = argmin_{w∈Δ} (1.5 − ρ) g_wᵀg₀ + ρ c‖g_w‖`` with ``c = α‖g₀‖``, and
    ``d = (g₀ + c/‖g_w*‖ · g_w*) / (1 + α²)``. ``ρ ∈ [0, 1]`` because MGDA's direction has a
    nonnegative inner product with every gradient; ``ρ = 0`` when either direction is zero.
    """
    _check_gramian(gramian)
    if alpha < 0:
        raise InputError(f"imgrad: alpha must be ≥ 0, got {alpha}")
    if not _is_finite(gramian):
        return _nan_weights(gramian)
    matrix, uniform, norm_mean = _mean_gradient(gramian)
    if norm_mean == 0:
        return (uniform / (1 + alpha**2)).to(gramian.dtype)
    descent = min_norm_weights(matrix)
    norm_descent = float((descent @ matrix @ descent).clamp_min(0).sqrt())
    cosine = 0.0
    # a min-norm point within rounding of 0 (Pareto-stationary gradients) has no direction
    level = _cancellation_level(matrix) * float((gramian_scales(matrix) * descent).sum())
    if norm_descent > level:
        cosine = min(1.0, max(0.0, float(uniform @ matrix @ descent) / (norm_mean * norm_descent)))
    radius = cosine * alpha * norm_mean / (1.5 - cosine)
    worst = _worst_case_weights(matrix, matrix @ uniform, radius)
    return _conflict_averse_weights(matrix, worst, alpha, norm_mean).to(gramian.dtype)


# --------------------------------------------------------------------------- closed forms


def imtl_g(gramian: Tensor, *, eps: float = 1e-8) -> Tensor:
    """IMTL-G: weights summing to 1 whose update has equal projections on every unit gradient.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Sec. 3.2. With ``uᵢ = gᵢ/‖gᵢ‖``
    the conditions ``dᵀuᵢ = dᵀuⱼ`` and ``Σα = 1`` give ``α ∝ S⁻¹ Ĝ⁻¹ 1`` in terms of the cosine
    matrix ``Ĝ`` (equivalent to the paper's ``g₁Uᵀ(DUᵀ)⁻¹``). ``Ĝ`` is regularised as
    ``Ĝ + eps·I`` so collinear gradients give finite weights. Zero gradients get weight 0.

    :raises SolverError: when ``Σα = 1`` cannot be met with a positive common projection (the
        unnormalised weights sum to ≤ 0): the paper's normalisation would then flip the update
        against every task or divide by zero.
    """
    _check_gramian(gramian)
    if not _is_finite(gramian):
        return _nan_weights(gramian)
    dtype = working_dtype(gramian.dtype)
    matrix = gramian.to(dtype)
    scales = gramian_scales(matrix)
    nonzero = scales > 0
    if not bool(nonzero.any()):
        return mean(gramian)
    cosine = normalize_gramian(matrix, scales)
    both = nonzero.unsqueeze(0) & nonzero.unsqueeze(1)
    eye = torch.eye(matrix.shape[0], dtype=dtype, device=matrix.device)
    # below the dtype's resolution the ridge would not regularise anything (float32)
    ridge = max(eps, default_ridge(dtype))
    system = torch.where(both, cosine, eye) + ridge * eye
    solution = torch.linalg.solve(system, nonzero.to(dtype))
    raw = torch.where(nonzero, solution / torch.where(nonzero, scales, 1.0), 0.0)
    total = raw.sum()
    if not bool(total > 4 * matrix.shape[0] * torch.finfo(dtype).eps * raw.abs().sum()):
        raise SolverError(
            "imtl_g: the equal-projection direction has weights summing to ≤ 0, so Σα = 1 would "
            "make the update conflict with every task; use upgrad or config for such gradients"
        )
    return (raw / total).to(gramian.dtype)


def aligned_mtl(gramian: Tensor) -> Tensor:
    """Aligned-MTL: weights that make the gradient system's condition number 1.

    Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023,
    Alg. 1: ``G = VΛVᵀ`` truncated to its numerical rank (eigenvalues above ``T·eps·λ_max``),
    ``B = √λ_min · V Λ^{-1/2} Vᵀ``, ``α = B·1`` (the official code drops preference weights, so
    do we). An all-zero Gramian gives zero weights.
    """
    _check_gramian(gramian)
    if not _is_finite(gramian):
        return _nan_weights(gramian)
    dtype = working_dtype(gramian.dtype)
    values, vectors = torch.linalg.eigh(gramian.to(dtype))
    threshold = gramian.shape[0] * torch.finfo(dtype).eps * values.max().clamp_min(0)
    keep = values > threshold
    safe = torch.where(keep, values, torch.ones_like(values))
    smallest = torch.where(keep, values, torch.full_like(values, float("inf"))).min()
    smallest = torch.where(torch.isfinite(smallest), smallest, torch.zeros_like(smallest))
    inv_sqrt = torch.where(keep, safe.rsqrt(), torch.zeros_like(values))
    ones = torch.ones_like(values)
    weights = smallest.sqrt() * (vectors @ (inv_sqrt * (vectors.T @ ones)))
    return weights.to(gramian.dtype)


def config(gramian: Tensor) -> Tensor:
    """ConFIG: the direction with equal cosine to every gradient, with length ``Σ gᵢᵀd̂``.

    Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
    ICLR 2025 (arXiv 2408.11104), Eq. 4: ``d̂ = U⁺1 / ‖U⁺1‖`` with U the unit gradients,
    ``d = (Σᵢ gᵢᵀd̂) d̂``. In Gramian form ``U⁺1 = Σ zᵢ uᵢ`` with ``z = Ĝ⁺1`` (pseudo-inverse of the
    cosine matrix). Zero gradients get weight 0. The cosines are equal and positive only when the
    gradients are linearly independent; otherwise ``d̂`` is the least-squares compromise.
    """
    _check_gramian(gramian)
    if not _is_finite(gramian):
        return _nan_weights(gramian)
    dtype = working_dtype(gramian.dtype)
    matrix = gramian.to(dtype)
    scales = gramian_scales(matrix)
    nonzero = scales > 0
    cosine = normalize_gramian(matrix, scales)
    coefficients = psd_pinv_solve(cosine, nonzero.to(dtype))
    raw = torch.where(nonzero, coefficients / torch.where(nonzero, scales, 1.0), 0.0)
    squared_norm = (raw @ matrix @ raw).clamp_min(0)
    if not bool(squared_norm > 0):
        return torch.zeros_like(raw).to(gramian.dtype)
    length = (matrix @ raw).sum()
    return (length / squared_norm * raw).to(gramian.dtype)


# --------------------------------------------------------------------------- Nash-MTL, FairGrad


def _eye_like(matrix: Tensor) -> Tensor:
    return torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)


def _fair_weights(
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
    Converged when every relative residual ``|(Ĝβ)ᵢβᵢᵖ/κᵢ − 1|`` is at most ``tol`` or
    within the rounding error of ``(Ĝβ)ᵢ``.
    """
    _check_gramian(gramian)
    if not _is_finite(gramian):
        return _nan_weights(gramian)
    dtype = working_dtype(gramian.dtype)
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
    cosine = normalize_gramian(matrix, scales)
    abs_cosine = cosine.abs()
    p = 1.0 / power
    log_kappa = (p - 1.0) * scales.log()
    shift = float(log_kappa.max())
    kappa = (log_kappa - shift).exp()  # κ / max κ: a common factor, undone below

    def potential(beta: Tensor, log_beta: Tensor) -> float:
        if p == 1.0:
            barrier = (kappa * log_beta).sum()
        else:
            barrier = (kappa * beta ** (1 - p)).sum() / (1 - p)
        return float(0.5 * beta @ cosine @ beta - barrier)

    log_beta = (kappa.log() / (1 + p)).clone()
    beta = log_beta.exp()
    curvature = float(beta @ cosine @ beta)
    if curvature > 0:
        push = float((kappa * beta ** (1 - p)).sum())
        log_beta = log_beta + math.log(push / curvature) / (1 + p)
        beta = log_beta.exp()
    value = potential(beta, log_beta)
    converged = False
    for _ in range(max_iter):
        product = cosine @ beta
        target = kappa * beta ** (-p)
        gradient = product - target
        residual = gradient / target
        worst = float(residual.abs().max())
        # at the rounding floor of (Ĝβ)ᵢ no further progress is possible; a residual that is
        # still large there means that no solution exists (weights growing without bound)
        rounding = 8 * num * eps * (abs_cosine @ beta)
        floor = worst <= tol**0.5 and bool((gradient.abs() <= rounding).all())
        if worst <= tol or floor:
            converged = True
            break
        # Newton on the convex potential Φ, written in u: (DHD)Δu = D∇Φ
        system = beta.unsqueeze(1) * cosine * beta + torch.diag(p * target * beta)
        step, info = torch.linalg.solve_ex(system, beta * gradient)
        if bool(info != 0) or not bool(torch.isfinite(step).all()):
            break
        slope = float((beta * gradient) @ step)  # −dΦ/dt at t = 0
        size = min(1.0, 10.0 / max(float(step.abs().max()), 1e-300))
        noise = 64 * eps * (abs(value) + float(beta @ abs_cosine @ beta))
        for _ in range(60):
            candidate_log = log_beta - size * step
            candidate = candidate_log.exp()
            new_value = potential(candidate, candidate_log)
            if new_value <= value - 1e-4 * size * slope:
                break
            if new_value <= value + noise:
                # Φ's decrease is below its rounding: judge by the residual instead
                new_target = kappa * candidate ** (-p)
                new_worst = float(((cosine @ candidate - new_target) / new_target).abs().max())
                if new_worst < worst:
                    break
            size /= 2
        log_beta, beta, value = candidate_log, candidate, new_value
        if not math.isfinite(value) or float(log_beta.abs().max()) > 200:
            break
    if not converged:
        raise SolverError(
            f"{name}: Newton's method did not reach |wᵢ(Gw)ᵢ·wᵢ^(1/α) − 1| ≤ {tol} in {max_iter} "
            "iterations (iterates grow without bound); the gradients are probably "
            "Pareto-stationary (some nonnegative combination of them vanishes), where no "
            "solution exists"
        )
    # undo the normalisation of κ: β solves (Ĝβ) = (κ/m) β^{-p}, so m^{1/(1+p)}β solves the
    # original equations, with log m = shift
    weights = (log_beta + shift / (1 + p)).exp() / scales
    return weights.to(gramian.dtype)


def nash_mtl(gramian: Tensor, *, max_iter: int = 100, tol: float | None = None) -> Tensor:
    """Nash-MTL: the Nash bargaining solution, ``α > 0`` with ``(Gα)ᵢ = 1/αᵢ``.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Thm. 5.1. Instead of the
    reference's cvxpy CCP loop, a damped Newton method on the strictly convex
    ``½αᵀGα − Σ log αᵢ`` in log space (torch-native, in scaled coordinates; see
    :func:`_fair_weights`). Not scale-invariant: ``G → cG`` gives ``α → α/√c``,
    so unscale AMP-scaled gradients first. The reference's update-norm clipping is not part of
    the weighting.

    :param tol: on ``max |αᵢ(Gα)ᵢ − 1|``; default 1e-9 (float64) or 1e-4 (lower precision).
    :raises SolverError: when Newton's method does not converge in ``max_iter`` iterations,
        which happens exactly when no solution exists (a zero gradient, or gradients with a
        vanishing nonnegative combination). Never falls back to other weights.
    """
    return _fair_weights(gramian, 1.0, max_iter, tol, "nash_mtl")


def fairgrad(
    gramian: Tensor, *, alpha: float = 1.0, max_iter: int = 100, tol: float | None = None
) -> Tensor:
    """FairGrad: α-fair weights, ``w > 0`` with ``(Gw)ᵢ = wᵢ^{-1/α}``.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, Eq. (8). Solved by
    a damped Newton method in log space on a strictly convex potential (the reference uses
    scipy's least_squares); reliable to ~1e-9 for gradient norms within ~1e4 of each other; with
    α ≠ 1 and norms spread much wider it may raise :class:`SolverError` (never a fallback).
    ``alpha = 1`` is Nash-MTL. ``G → cG`` gives ``w → c^{-α/(1+α)} w``.

    :raises SolverError: as :func:`nash_mtl` (no solution, or no convergence).
    """
    if alpha <= 0:
        raise InputError(f"fairgrad: alpha must be > 0, got {alpha}")
    return _fair_weights(gramian, alpha, max_iter, tol, "fairgrad")


# --------------------------------------------------------------------------- GradVac


def gradvac(
    gramian: Tensor,
    targets: Tensor,
    *,
    beta: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """GradVac: raise every pairwise cosine towards an EMA target.

    Wang et al., "Gradient Vaccine", ICLR 2021, Alg. 1: for each task i and every other task j
    in a random order, with ``φ = cos(g̃ᵢ, gⱼ)`` and target ``φ̂ᵢⱼ``: if ``φ < φ̂``,
    ``g̃ᵢ += ‖g̃ᵢ‖(φ̂√(1−φ²) − φ√(1−φ̂²)) / (‖gⱼ‖√(1−φ̂²)) · gⱼ``; then
    ``φ̂ᵢⱼ ← (1−β)φ̂ᵢⱼ + βφ``. Update ``Σ g̃ᵢ``. Pure: returns ``(weights, new_targets)``.

    Zero gradients give ``φ = 0`` and are never added. Targets are clipped to
    ``[-1, 1 − √eps]`` inside the formula (a target of exactly 1 asks for an infinite step).
    Initialise ``targets`` with zeros, as the reference does.
    """
    _check_gramian(gramian)
    num_tasks = gramian.shape[0]
    if targets.shape != gramian.shape:
        raise InputError(f"gradvac: targets must have shape {tuple(gramian.shape)}")
    dtype = working_dtype(gramian.dtype)
    matrix = gramian.to(dtype)
    device = matrix.device
    ema = targets.to(dtype)
    diag = matrix.diagonal().clamp_min(0)
    scales = diag.sqrt()
    eps = torch.finfo(dtype).eps
    tasks = torch.arange(num_tasks, device=device)
    orders = _uniform((num_tasks, num_tasks), generator, device).argsort(1)
    rounds = orders.T  # round k pairs task i with partner rounds[k, i]
    # everything a round needs, gathered once
    partner_rows = matrix[rounds].unbind(0)
    partner_scales = scales[rounds]
    valid = (rounds != tasks) & (partner_scales > 0)
    target = ema[tasks, rounds].clamp(-1.0, 1.0 - eps**0.5)  # (rounds, tasks)
    # with θ = acos φ and θ̂ = acos φ̂ the step (φ̂√(1−φ²) − φ√(1−φ̂²))/√(1−φ̂²) is
    # sin(θ − θ̂)/sin θ̂; an invalid pair gets the target −2, which no cosine is below
    target_angle = target.acos().unbind(0)
    ratio = torch.where(valid, 1 / (partner_scales * target.acos().sin()), 0.0).unbind(0)
    threshold = torch.where(valid, target, -2.0).unbind(0)
    inverse_scales = torch.where(valid, 1 / torch.where(valid, partner_scales, 1.0), 0.0)
    inverse_scales_list = inverse_scales.unbind(0)
    partner_sq = diag[rounds].unbind(0)
    flat_index = (tasks * num_tasks + rounds).unbind(0)
    coefficients = torch.eye(num_tasks, dtype=dtype, device=device)
    flat = coefficients.view(-1)
    own_sq = diag.clone()  # ‖g̃ᵢ‖², updated as g̃ᵢ moves
    zero = torch.zeros((), dtype=dtype, device=device)
    cosines = []
    for step in range(num_tasks):
        dots = (coefficients * partner_rows[step]).sum(1)
        own = own_sq.clamp_min(0).sqrt()
        # zero gradients give φ = 0: their inner products are exactly 0
        cos = (dots * inverse_scales_list[step] / own.clamp_min(1e-300)).clamp(-1.0, 1.0)
        cosines.append(cos)
        amount = (cos.acos() - target_angle[step]).sin() * ratio[step] * own
        amount = torch.where(cos < threshold[step], amount, zero)
        flat.index_add_(0, flat_index[step], amount)
        own_sq = own_sq + amount * (2 * dots + amount * partner_sq[step])
    # every pair is visited once: the EMA reads the targets before this call, then updates
    phi = torch.stack(cosines)
    updated = torch.where(valid, (1 - beta) * ema[tasks, rounds] + beta * phi, ema[tasks, rounds])
    new_ema = ema.clone()
    new_ema[tasks, rounds] = updated
    return coefficients.sum(0).to(gramian.dtype), new_ema.to(targets.dtype)


# --------------------------------------------------------------------------- GradDrop


def graddrop(grads: Tensor, *, generator: torch.Generator | None, leak: float = 0.0) -> Tensor:
    """GradDrop: keep, per coordinate, only the gradients of one sign, chosen by sign purity.

    Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020, Alg. 1: ``P = ½(1 + Σgᵢ / Σ|gᵢ|)`` per coordinate, ``U ~ Unif(0, 1)``; task i
    keeps its positive entries where ``P > U`` and its negative entries where ``P < U``; the
    result is ``Σᵢ (ℓ + (1 − ℓ)·Mᵢ) gᵢ`` with leak ℓ. Coordinate-wise: takes the (T, ...)
    gradients (meant for a shared representation, as in the paper) and returns the combined
    gradient. ``P = ½`` where every gradient is zero.
    """
    if grads.dim() < 1 or grads.shape[0] == 0:
        raise InputError("graddrop: expected gradients of shape (T, ...) with T ≥ 1")
    if not 0.0 <= leak <= 1.0:
        raise InputError(f"graddrop: leak must be in [0, 1], got {leak}")
    total = grads.sum(0)
    magnitude = grads.abs().sum(0)
    purity = torch.where(
        magnitude > 0, 0.5 * (1 + total / torch.where(magnitude > 0, magnitude, 1)), 0.5
    )
    uniform = _uniform(tuple(purity.shape), generator, grads.device).to(purity.dtype)
    keep = ((purity > uniform) & (grads > 0)) | ((purity < uniform) & (grads < 0))
    return ((leak + (1 - leak) * keep.to(grads.dtype)) * grads).sum(0)


# --------------------------------------------------------------------------- declaration


class Property(str, enum.Enum):
    """Named properties a method may claim; each has a shared assertion helper in the tests."""

    NON_CONFLICTING = "non_conflicting"
    """``⟨d, gᵢ⟩ ≥ 0`` for every task (up to the solver's relative accuracy)."""
    SCALE_INVARIANT = "scale_invariant"
    """Weights unchanged when ``G → cG`` for ``c > 0``."""
    PERMUTATION_EQUIVARIANT = "permutation_equivariant"
    """Permuting the tasks permutes the weights (for random methods: with the same draw)."""
    NONNEGATIVE = "nonnegative"
    """Every weight is ≥ 0."""


@dataclass(frozen=True)
class MethodSpec:
    """Declaration of one aggregation method.

    :param function: the functional implementation.
    :param paper: short citation.
    :param properties: properties claimed (and property-tested).
    :param random: whether the method draws from a ``generator`` argument.
    :param input: ``"gramian"`` (returns weights) or ``"gradients"`` (returns a combined gradient).
    :param scale_exponent: if set, ``weights(cG) = c**scale_exponent · weights(G)`` (a scale law
        other than invariance; invariance is the exponent 0 and is declared as a property).
    :param may_raise: when the method raises :class:`SolverError` (empty: never).
    :param stateful: the function takes the state after G and returns ``(weights, new_state)``.
    :param notes: qualifications that a table reader needs.
    """

    function: Callable[..., object]
    paper: str
    properties: frozenset[Property]
    random: bool = False
    input: Literal["gramian", "gradients"] = "gramian"
    scale_exponent: float | None = None
    may_raise: str = ""
    stateful: bool = False
    notes: str = ""


_P = Property


METHODS: dict[str, MethodSpec] = {
    "mean": MethodSpec(
        mean,
        "—",
        frozenset({_P.SCALE_INVARIANT, _P.PERMUTATION_EQUIVARIANT, _P.NONNEGATIVE}),
    ),
    "sum": MethodSpec(
        sum,
        "—",
        frozenset({_P.SCALE_INVARIANT, _P.PERMUTATION_EQUIVARIANT, _P.NONNEGATIVE}),
    ),
    "mgda": MethodSpec(
        mgda,
        "Sener & Koltun 2018",
        frozenset(
            {_P.NON_CONFLICTING, _P.SCALE_INVARIANT, _P.PERMUTATION_EQUIVARIANT, _P.NONNEGATIVE}
        ),
    ),
    "pcgrad": MethodSpec(
        pcgrad,
        "Yu et al. 2020",
        frozenset({_P.SCALE_INVARIANT, _P.PERMUTATION_EQUIVARIANT, _P.NONNEGATIVE}),
        random=True,
        notes="permutation-equivariant given the same projection orders",
    ),
    "upgrad": MethodSpec(
        upgrad,
        "Quinton & Rey 2024",
        frozenset(
            {_P.NON_CONFLICTING, _P.SCALE_INVARIANT, _P.PERMUTATION_EQUIVARIANT, _P.NONNEGATIVE}
        ),
    ),
    "dualproj": MethodSpec(
        dualproj,
        "Quinton & Rey 2024",
        frozenset(
            {_P.NON_CONFLICTING, _P.SCALE_INVARIANT, _P.PERMUTATION_EQUIVARIANT, _P.NONNEGATIVE}
        ),
    ),
    "imtl_g": MethodSpec(
        imtl_g,
        "Liu et al. 2021",
        frozenset({_P.SCALE_INVARIANT, _P.PERMUTATION_EQUIVARIANT}),
        may_raise="when the equal-projection weights sum to ≤ 0",
    ),
    "aligned_mtl": MethodSpec(
        aligned_mtl,
        "Senushkin et al. 2023",
        frozenset(),
        notes=(
            "scale-invariant and permutation-equivariant in exact arithmetic only: the "
            "eigendecomposition of G loses λ_min when gradient norms differ by >1e4"
        ),
    ),
    "nash_mtl": MethodSpec(
        nash_mtl,
        "Navon et al. 2022",
        frozenset({_P.NON_CONFLICTING, _P.PERMUTATION_EQUIVARIANT, _P.NONNEGATIVE}),
        scale_exponent=-0.5,
        may_raise="when no solution exists (zero gradient, Pareto-stationary gradients)",
    ),
    "cagrad": MethodSpec(
        cagrad,
        "Liu et al. 2021",
        frozenset({_P.SCALE_INVARIANT, _P.PERMUTATION_EQUIVARIANT, _P.NONNEGATIVE}),
        notes="c = 0.4; non-conflicting only for small c; c = 0 is the mean",
    ),
    "imgrad": MethodSpec(
        imgrad,
        "Zhou et al. 2025",
        frozenset({_P.SCALE_INVARIANT, _P.PERMUTATION_EQUIVARIANT, _P.NONNEGATIVE}),
        notes="α = 0.8; conflict aversion set by cos(g₀, g_MGDA)",
    ),
    "fairgrad": MethodSpec(
        fairgrad,
        "Ban & Ji 2024",
        frozenset({_P.NON_CONFLICTING, _P.PERMUTATION_EQUIVARIANT, _P.NONNEGATIVE}),
        scale_exponent=-0.5,
        may_raise=(
            "when no solution exists (zero gradient, Pareto-stationary gradients) or when "
            "Newton's method does not converge (norms spread over more than ~1e4 with α ≠ 1)"
        ),
        notes="α = 1 (Nash-MTL's equations); weights(cG) = c^(−α/(1+α))·weights(G) in general",
    ),
    "config": MethodSpec(
        config,
        "Liu et al. 2024",
        frozenset({_P.SCALE_INVARIANT, _P.PERMUTATION_EQUIVARIANT}),
        notes="equal positive cosines (non-conflicting) only for linearly independent gradients",
    ),
    "gradvac": MethodSpec(
        gradvac,
        "Wang et al. 2021",
        frozenset({_P.SCALE_INVARIANT, _P.PERMUTATION_EQUIVARIANT, _P.NONNEGATIVE}),
        random=True,
        stateful=True,
        notes="stateful (EMA targets in, new targets out); equivariant given the same orders",
    ),
    "graddrop": MethodSpec(
        graddrop,
        "Chen et al. 2020",
        frozenset(),
        random=True,
        input="gradients",
        notes="coordinate-wise: returns the combined gradient, not weights",
    ),
}


# Every Gramian method is declared. Known limitation (see fairgrad): with α ≠ 1 and gradient
# norms spread over many orders of magnitude, Newton's method may stop with a SolverError.
UNDECLARED: tuple[str, ...] = ()


def property_table_markdown() -> str:
    """Render :data:`METHODS` as a Markdown table (for the generated docs)."""
    columns = [
        ("non-conflicting", _P.NON_CONFLICTING),
        ("scale-invariant", _P.SCALE_INVARIANT),
        ("perm.-equivariant", _P.PERMUTATION_EQUIVARIANT),
        ("nonnegative", _P.NONNEGATIVE),
    ]
    header = ["method", "paper", "input", *(name for name, _ in columns), "random", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, spec in METHODS.items():
        marks = ["✔" if prop in spec.properties else "✘" for _, prop in columns]
        notes = []
        if spec.scale_exponent is not None:
            notes.append(f"weights(cG) = c^{spec.scale_exponent:g}·weights(G)")
        if spec.notes:
            notes.append(spec.notes)
        if spec.may_raise:
            notes.append(f"raises SolverError {spec.may_raise}")
        row = [
            f"`{name}`",
            spec.paper,
            spec.input,
            *marks,
            "yes" if spec.random else "no",
            "; ".join(notes),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
