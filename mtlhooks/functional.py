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
    psd_pinv_solve,
    simplex_qp,
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


def _check_gramian(gramian: Tensor) -> None:
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise InputError(
            f"expected a square (T, T) Gramian with T ≥ 1, got shape {tuple(gramian.shape)}"
        )


def _nan_weights(gramian: Tensor) -> Tensor:
    return torch.full(gramian.shape[:1], float("nan"), dtype=gramian.dtype, device=gramian.device)


def _is_finite(gramian: Tensor) -> bool:
    return bool(torch.isfinite(gramian).all())


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
    dtype = working_dtype(gramian.dtype)
    matrix = gramian.to(dtype)
    num_tasks = matrix.shape[0]
    tasks = torch.arange(num_tasks, device=matrix.device)
    diag = matrix.diagonal()
    scales = diag.clamp_min(0).sqrt()
    rounding = 4 * num_tasks * torch.finfo(dtype).eps
    # row i holds the coefficients of the projected gradient g̃ᵢ = Σₖ Cᵢₖ gₖ
    coefficients = torch.eye(num_tasks, dtype=dtype, device=matrix.device)
    for step in range(orders.shape[1]):
        partner = orders[:, step]
        # ⟨g̃ᵢ, g_{partner(i)}⟩ for every i at once
        dots = (coefficients * matrix[:, partner].T).sum(1)
        norms = diag[partner]
        # an inner product within its own rounding error is no conflict: projecting on noise
        # would make the result depend on the last bits of G (e.g. of a common scale)
        noise = rounding * scales[partner] * (coefficients.abs() @ scales)
        conflict = (dots < -noise) & (partner != tasks) & (norms > 0)
        step_size = torch.where(conflict, dots / torch.where(norms > 0, norms, 1.0), 0.0)
        coefficients[tasks, partner] -= step_size
    weights = coefficients.sum(0)
    if reduction == "mean":
        weights = weights / num_tasks
    elif reduction != "sum":
        raise InputError(f"pcgrad: reduction must be 'sum' or 'mean', got {reduction!r}")
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
    draws = torch.rand(num_tasks, num_tasks, generator=generator, device=gramian.device)
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

    For ``t > 0`` let ``w(t) = argmin_{w∈Δ} wᵀGw + t·wᵀb`` (a QP). The optimum is ``w(t*)`` where
    ``‖g_{w(t)}‖ = r t / 2`` (majorising ``r√q`` by ``r(q/n + n)/2`` at ``n = ‖g_w‖``): the left
    side is nondecreasing in t and the right side increasing, so the root is unique. It is
    bracketed in ``[0, 2 max‖gᵢ‖/r]`` and found by batched grid refinement; between two grid
    points with the same support ``w(t)`` is affine, so the last step solves the scalar equation
    exactly.
    """
    num_tasks = gramian.shape[0]
    if radius <= 0:
        ties = linear <= linear.min() + 4 * num_tasks * torch.finfo(linear.dtype).eps * (
            linear.abs().max()
        )
        return ties.to(linear.dtype) / ties.sum()
    low, high = 0.0, 2.0 * float(gramian_scales(gramian).max()) / radius * 1.001
    points = 16
    weights_low = weights_high = None
    for _ in range(8):
        ts = torch.linspace(low, high, points, dtype=linear.dtype, device=linear.device)
        weights = simplex_qp(gramian, ts.unsqueeze(1) * linear)
        norms = ((weights @ gramian) * weights).sum(1).clamp_min(0).sqrt()
        residual = norms - radius * ts / 2
        index = int((residual >= 0).nonzero().max()) if bool((residual >= 0).any()) else 0
        index = min(index, points - 2)
        low, high = float(ts[index]), float(ts[index + 1])
        weights_low, weights_high = weights[index], weights[index + 1]
        if torch.equal(weights_low > 0, weights_high > 0):
            break
    assert weights_low is not None and weights_high is not None
    # w(τ) = w_low + τ δ on [low, high]; solve q(τ) = (r (low + τ Δ) / 2)² for τ ∈ [0, 1]
    delta = weights_high - weights_low
    span = high - low
    a_q = float(weights_low @ gramian @ weights_low)
    b_q = float(weights_low @ gramian @ delta)
    c_q = float(delta @ gramian @ delta)
    quad = c_q - (radius * span) ** 2 / 4
    lin = 2 * (b_q - radius**2 * low * span / 4)
    const = a_q - (radius * low) ** 2 / 4
    tau = _root_in_unit_interval(quad, lin, const)
    return weights_low + tau * delta


def _root_in_unit_interval(quad: float, lin: float, const: float) -> float:
    """A root in [0, 1] of ``quad τ² + lin τ + const`` with ``const ≥ 0 ≥`` value at 1."""
    if const <= 0:
        return 0.0
    if abs(quad) <= 1e-300:
        return min(1.0, max(0.0, -const / lin)) if lin != 0 else 0.0
    disc = max(lin * lin - 4 * quad * const, 0.0)
    root = disc**0.5
    # numerically stable pair of roots
    q = -(lin + (root if lin >= 0 else -root)) / 2
    candidates = [q / quad] + ([const / q] if q != 0 else [])
    inside = [c for c in candidates if -1e-9 <= c <= 1 + 1e-9]
    return min(1.0, max(0.0, min(inside))) if inside else 1.0


def _conflict_averse_weights(
    gramian: Tensor, weights: Tensor, coefficient: float, norm_mean: float
) -> Tensor:
    """``(1/T + (c‖g₀‖/‖g_w‖) w) / (1 + c²)``; the second term is dropped when ``g_w = 0``."""
    num_tasks = gramian.shape[0]
    norm_w = float((weights @ gramian @ weights).clamp_min(0).sqrt())
    scale = float(gramian_scales(gramian).max())
    base = torch.full_like(weights, 1.0 / num_tasks)
    if norm_w <= 1e-12 * scale or norm_mean == 0:
        return base / (1 + coefficient**2)
    return (base + coefficient * norm_mean / norm_w * weights) / (1 + coefficient**2)


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
    dtype = working_dtype(gramian.dtype)
    matrix = gramian.to(dtype)
    uniform = mean(matrix)
    norm_mean = float((uniform @ matrix @ uniform).clamp_min(0).sqrt())
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
    dtype = working_dtype(gramian.dtype)
    matrix = gramian.to(dtype)
    uniform = mean(matrix)
    norm_mean = float((uniform @ matrix @ uniform).clamp_min(0).sqrt())
    if norm_mean == 0:
        return (uniform / (1 + alpha**2)).to(gramian.dtype)
    descent = min_norm_weights(matrix)
    norm_descent = float((descent @ matrix @ descent).clamp_min(0).sqrt())
    cosine = 0.0
    if norm_descent > 0:
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


def _fair_weights(
    gramian: Tensor, power: float, max_iter: int, tol: float | None, name: str
) -> Tensor:
    """Solve ``(Gw)ᵢ = wᵢ^{-1/power}``, ``w > 0``, by Newton's method with backtracking.

    The equations are the stationarity conditions of the strictly convex
    ``½wᵀGw − Σ φ(wᵢ)`` with ``φ' (w) = w^{-1/power}``. Solved in scaled coordinates
    ``β = S w``, where they read ``(Ĝβ)ᵢ = κᵢ βᵢ^{-1/power}`` with ``κᵢ = sᵢ^{1/power − 1}``
    (``κ = 1`` for Nash-MTL): the iteration only sees the cosines.
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
    cosine = normalize_gramian(matrix, scales)
    exponent = -1.0 / power
    kappa = scales ** (1.0 / power - 1.0)
    kappa = kappa / kappa.max()  # common factor, undone below
    # start on the ray β = c·1 at the minimiser of the objective along it
    curvature = float(cosine.sum().clamp_min(1e-12))
    start = (float(kappa.sum()) / curvature) ** (power / (power + 1))
    beta = torch.full_like(scales, start)

    def objective(point: Tensor) -> Tensor:
        potential = torch.log(point) if power == 1.0 else point ** (1 + exponent) / (1 + exponent)
        return 0.5 * point @ cosine @ point - (kappa * potential).sum()

    value = objective(beta)
    for _ in range(max_iter):
        product = cosine @ beta
        residual = beta * product / (kappa * beta ** (1 + exponent)) - 1
        if bool(residual.abs().max() <= tol):
            break
        gradient = product - kappa * beta**exponent
        hessian = cosine + torch.diag(kappa * (-exponent) * beta ** (exponent - 1))
        step, info = torch.linalg.solve_ex(hessian, gradient)
        if bool(info != 0) or not bool(torch.isfinite(step).all()):
            # the Hessian is ≥ Ĝ + diag(κ/β²) ≻ 0; it only turns singular as β → ∞
            raise SolverError(
                f"{name}: Newton's method diverged (iterates grow without bound); the "
                "gradients are probably Pareto-stationary, where no solution exists"
            )
        size = 1.0
        # largest step keeping β > 0, then Armijo backtracking on the convex objective
        shrink = step > 0
        if bool(shrink.any()):
            size = min(1.0, 0.99 * float((beta[shrink] / step[shrink]).min()))
        decrease = float(gradient @ step)
        for _ in range(60):
            candidate = beta - size * step
            new_value = objective(candidate)
            if bool(new_value <= value - 1e-4 * size * decrease) or decrease <= 0:
                break
            size /= 2
        beta, value = candidate, new_value
        if not bool(torch.isfinite(beta).all()):
            break
    else:
        raise SolverError(
            f"{name}: Newton's method did not reach |wᵢ(Gw)ᵢ·wᵢ^(1/α) − 1| ≤ {tol} in {max_iter} "
            "iterations; the gradients are probably Pareto-stationary (some nonnegative "
            "combination of them vanishes), where no solution exists"
        )
    if not bool(torch.isfinite(beta).all()):
        raise SolverError(f"{name}: Newton's method diverged (non-finite iterate)")
    # undo the normalisation of κ: (Ĝβ) = κ β^e scales as β → m β with m^{1-e} = max κ factor
    factor = float((scales ** (1.0 / power - 1.0)).max() ** (1.0 / (1.0 - exponent)))
    return (beta * factor / scales).to(gramian.dtype)


def nash_mtl(gramian: Tensor, *, max_iter: int = 100, tol: float | None = None) -> Tensor:
    """Nash-MTL: the Nash bargaining solution, ``α > 0`` with ``(Gα)ᵢ = 1/αᵢ``.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Thm. 5.1. Instead of the
    reference's cvxpy CCP loop, Newton's method on the strictly convex ``½αᵀGα − Σ log αᵢ``
    (torch-native, in scaled coordinates). Not scale-invariant: ``G → cG`` gives ``α → α/√c``,
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
    Newton's method on a strictly convex potential (the reference uses scipy's least_squares).
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
    ema = targets.to(dtype).clone()
    scales = gramian_scales(matrix)
    eps = torch.finfo(dtype).eps
    tasks = torch.arange(num_tasks, device=matrix.device)
    orders = torch.rand(num_tasks, num_tasks, generator=generator, device=matrix.device).argsort(1)
    coefficients = torch.eye(num_tasks, dtype=dtype, device=matrix.device)
    for step in range(num_tasks):
        partner = orders[:, step]
        valid = partner != tasks
        dots = (coefficients * matrix[:, partner].T).sum(1)
        own_norm = ((coefficients @ matrix) * coefficients).sum(1).clamp_min(0).sqrt()
        other_norm = scales[partner]
        denominator = own_norm * other_norm
        positive = denominator > 0
        cos = torch.where(positive, dots / torch.where(positive, denominator, 1.0), 0.0)
        cos = cos.clamp(-1.0, 1.0)
        target = ema[tasks, partner].clamp(-1.0, 1.0 - eps**0.5)
        act = valid & positive & (cos < target)
        sin_target = (1 - target**2).sqrt()
        amount = (target * (1 - cos**2).sqrt() - cos * sin_target) / sin_target
        amount = torch.where(act, own_norm * amount / torch.where(positive, other_norm, 1.0), 0.0)
        coefficients[tasks, partner] += amount
        updated = (1 - beta) * ema[tasks, partner] + beta * cos
        ema[tasks, partner] = torch.where(valid, updated, ema[tasks, partner])
    return coefficients.sum(0).to(gramian.dtype), ema.to(targets.dtype)


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
    uniform = torch.rand(purity.shape, generator=generator, device=grads.device, dtype=grads.dtype)
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


# Implemented but not declared yet, because their property tests do not pass (see the docstrings):
# cagrad and imgrad (the inner solver of _worst_case_weights can fail to terminate and is slow),
# fairgrad with alpha != 1 (Newton does not always reach its tolerance).
UNDECLARED = ("cagrad", "imgrad", "fairgrad")


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
