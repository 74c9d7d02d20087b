"""Krum, TrimmedMean, CR-MOGM and PCD (the TorchJD 0.18 catalog): each rule against a
hand-written reference on explicit vectors, end to end through the pipeline, and (when TorchJD
is installed) against TorchJD's implementation."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import jacobians
from test_aggregators import assert_grads_close, build, jacobian, reference_grads

from mtlhooks import MTL, ConfigError, Space, functional
from mtlhooks.errors import InputError

# -- Krum -----------------------------------------------------------------------------------


def krum_by_hand(vectors: torch.Tensor, byzantine: int, selected: int) -> torch.Tensor:
    """Blanchard et al. 2017: score = Σ of the squared distances to the n − f − 2 nearest
    others; average the m best (ties: lower index)."""
    count = len(vectors)
    scores = []
    for i in range(count):
        distances = sorted(
            float(((vectors[i] - vectors[j]) ** 2).sum()) for j in range(count) if j != i
        )
        scores.append(sum(distances[: count - byzantine - 2]))
    best = sorted(range(count), key=lambda i: (scores[i], i))[:selected]
    return vectors[best].mean(0)


@settings(max_examples=30)
@given(
    jacobian=jacobians(min_tasks=4, max_tasks=8, kinds=("dense",), degenerate=False),
    byzantine=st.integers(0, 2),
    selected=st.integers(1, 3),
)
def test_krum_matches_the_papers_rule_on_vectors(jacobian, byzantine, selected):
    count = jacobian.shape[0]
    byzantine = min(byzantine, count - 3)
    weights = functional.krum(jacobian @ jacobian.T, n_byzantine=byzantine, n_selected=selected)
    expected = krum_by_hand(jacobian, byzantine, selected)
    scale = jacobian.norm(dim=1).max()
    assert (weights @ jacobian - expected).norm() <= 1e-9 * scale


def test_krum_ignores_an_outlier_that_the_mean_follows():
    honest = torch.tensor([[1.0, 0.0], [1.1, 0.1], [0.9, -0.1], [1.0, 0.05]], dtype=torch.float64)
    vectors = torch.cat([honest, torch.tensor([[-50.0, 80.0]], dtype=torch.float64)])
    weights = functional.krum(vectors @ vectors.T, n_byzantine=1)
    assert weights[-1] == 0 and weights.sum() == 1


def test_krum_task_count_is_checked_at_validation_and_call():
    with pytest.raises(ConfigError, match=r"n_byzantine \+ 3 = 5 tasks"):
        MTL({"tasks": ["a", "b", "c", "d"], "plugins": [{"name": "krum", "n_byzantine": 2}]})
    with pytest.raises(ConfigError, match="n_selected"):
        MTL({"tasks": ["a", "b", "c", "d"], "plugins": [{"name": "krum", "n_selected": 5}]})
    with pytest.raises(InputError, match="at least"):
        functional.krum(torch.eye(3), n_byzantine=1)


def test_krum_end_to_end(make_problem):
    problem = make_problem(tasks=("a", "b", "c", "d"))
    jac = jacobian(problem, Space.PARAMS)
    expected = functional.krum(jac @ jac.T)
    report = build(problem, "krum", Space.PARAMS).backward(problem.losses()[1])
    torch.testing.assert_close(report.weights, expected, rtol=0, atol=0)
    assert_grads_close(problem.grads(), reference_grads(problem, expected))


# -- TrimmedMean ----------------------------------------------------------------------------


def trimmed_by_hand(vectors: torch.Tensor, trim: int) -> torch.Tensor:
    out = torch.empty(vectors.shape[1:], dtype=vectors.dtype)
    for k in range(vectors.shape[1]):
        column = sorted(float(v) for v in vectors[:, k])
        kept = column[trim : len(column) - trim]
        out[k] = sum(kept) / len(kept)
    return out


@given(jacobian=jacobians(min_tasks=3, max_tasks=7), trim=st.integers(0, 3))
def test_trimmed_mean_matches_the_rule_by_hand(jacobian, trim):
    trim = min(trim, (jacobian.shape[0] - 1) // 2)
    combined = functional.trimmed_mean(jacobian, trim=trim)
    torch.testing.assert_close(combined, trimmed_by_hand(jacobian, trim), rtol=1e-12, atol=0)


@pytest.mark.parametrize("space", [Space.PARAMS, Space.FEATURES], ids=lambda s: s.value)
def test_trimmed_mean_end_to_end(problem, space):
    """The shared part receives the trimmed mean of the per-task gradients (in params: of the
    parameters' gradients; in features: of the features', back-propagated), the heads Σ∇Lᵢ."""
    mtl = build(problem, "trimmed_mean", space)
    clone = copy.deepcopy(problem.model)
    z_ref, losses_ref = problem.losses(clone)
    trunk = list(clone.encoder.parameters())
    if space is Space.PARAMS:
        rows = [torch.autograd.grad(losses_ref[t], trunk, retain_graph=True) for t in problem.tasks]
        expected = [
            functional.trimmed_mean(torch.stack([row[k] for row in rows]), trim=1)
            for k in range(len(trunk))
        ]
    else:
        grads = torch.stack(
            [torch.autograd.grad(losses_ref[t], z_ref, retain_graph=True)[0] for t in problem.tasks]
        )
        combined = functional.trimmed_mean(grads, trim=1)
        expected = list(torch.autograd.grad(z_ref, trunk, grad_outputs=combined))
    z, losses = problem.losses()
    mtl.backward(losses, features=z)
    for p, want in zip(problem.model.encoder.parameters(), expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12)
    plain = reference_grads(problem, torch.ones(3, dtype=torch.float64))
    for name, p in problem.model.heads.named_parameters():
        torch.testing.assert_close(p.grad, plain[f"heads.{name}"], rtol=1e-10, atol=1e-12)


def test_trimmed_mean_needs_2_trim_plus_1_tasks():
    with pytest.raises(ConfigError, match="2·trim"):
        MTL({"tasks": ["a", "b", "c"], "plugins": [{"name": "trimmed_mean", "trim": 2}]})
    with pytest.raises(ConfigError, match="cannot work in space 'last_shared'"):
        MTL({"tasks": ["a", "b", "c"], "plugins": ["trimmed_mean"], "space": "last_shared"})


# -- CR-MOGM --------------------------------------------------------------------------------


def _steps(problem, count):
    """A fresh gradient at each step: the model drifts between calls."""
    for _ in range(count):
        problem.zero_grad()
        with torch.no_grad():
            for parameter in problem.model.parameters():
                parameter.mul_(0.95).add_(0.01)
        yield


@pytest.mark.parametrize(("inner", "options"), [("upgrad", {}), ("nash_mtl", {"tol": 1e-10})])
def test_cr_mogm_is_the_ema_of_the_wrapped_weights(make_problem, inner, options):
    problem = make_problem()
    mtl = build(problem, {"name": "cr_mogm", "method": inner, "options": options, "alpha": 0.7})
    reference = getattr(functional, inner)
    smoothed = None
    for _ in _steps(problem, 4):
        jac = jacobian(problem, Space.PARAMS)
        current = reference(jac @ jac.T, **options)
        smoothed = current if smoothed is None else 0.7 * smoothed + 0.3 * current
        report = mtl.backward(problem.losses()[1])
        torch.testing.assert_close(report.weights, smoothed, rtol=1e-9, atol=0)
    assert_grads_close(problem.grads(), reference_grads(problem, smoothed))


def test_cr_mogm_keeps_the_wrapped_methods_state_and_resumes(make_problem):
    plugin = {"name": "cr_mogm", "method": "gradvac", "alpha": 0.5}
    problem = make_problem()
    mtl = build(problem, plugin, seed=3)
    for _ in _steps(problem, 2):
        mtl.backward(problem.losses()[1])
    saved = copy.deepcopy(mtl.state_dict())
    (state,) = saved["plugins"].values()
    assert state["inner"]["targets"].abs().sum() > 0 and state["weights"] is not None
    twin = copy.deepcopy(problem)
    resumed = build(twin, plugin, seed=3)
    resumed.load_state_dict(saved)
    for _ in zip(_steps(problem, 2), _steps(twin, 2)):
        first = mtl.backward(problem.losses()[1]).weights
        second = resumed.backward(twin.losses()[1]).weights
        assert torch.equal(first, second)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "graddrop"}, "not an aggregator that returns task weights"),
        ({"method": "static"}, "not an aggregator that returns task weights"),
        ({"method": "cagrad", "options": {"c": -1}}, "field 'options' for 'cagrad'"),
        ({"method": "upgard"}, "did you mean 'upgrad'"),
    ],
)
def test_cr_mogm_refuses_what_it_cannot_smooth(options, message):
    with pytest.raises(ConfigError, match=message):
        MTL({"tasks": ["a", "b"], "plugins": [{"name": "cr_mogm", **options}]})


# -- PCD ------------------------------------------------------------------------------------


def pcd_kkt(gramian, weights, scales, tau):
    """The primal solution d̃ = g̃₁ + Σμⱼg̃ⱼ: μ ≥ 0, g̃ⱼᵀd̃ ≥ τ‖g̃ⱼ‖², complementarity."""
    scaled = gramian * scales[:, None] * scales[None, :]
    coefficients = weights / scales
    coefficients = coefficients / coefficients[0]  # [1, μ]
    progress = scaled[1:] @ coefficients
    required = tau * scaled.diagonal()[1:]
    scale = scaled.diagonal().max()
    return coefficients[1:], progress - required, scale


@settings(max_examples=30)
@given(
    jacobian=jacobians(
        min_tasks=2, max_tasks=7, kinds=("dense",), degenerate=False, max_exponent=3
    ),
    tau=st.sampled_from([0.02, 0.3, 1.0]),
)
def test_pcd_first_step_satisfies_its_kkt_conditions(jacobian, tau):
    gramian = jacobian @ jacobian.T
    weights, state = functional.pcd(gramian, None, tau=tau, eps=0.0)
    assert state.steps == 1
    scales = gramian.diagonal().rsqrt()  # first step: the debiased average is ‖gᵢ‖²
    multipliers, slack, scale = pcd_kkt(gramian, weights, scales, tau)
    if bool((multipliers == 0).all()) and bool((slack < -1e-9 * scale).any()):
        # infeasible constraints: dropped, the update is g₁
        torch.testing.assert_close(weights, torch.eye(len(weights), dtype=weights.dtype)[0])
        return
    assert bool((multipliers >= 0).all())
    assert bool((slack >= -1e-9 * scale).all())
    assert bool(((multipliers * slack).abs() <= 1e-9 * scale * (1 + multipliers)).all())
    # rescaled to the primary gradient's norm
    torch.testing.assert_close((weights @ gramian @ weights).sqrt(), gramian[0, 0].sqrt())


def test_pcd_drops_constraints_that_cannot_hold_and_follows_the_primary():
    jac = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    weights, _ = functional.pcd(jac @ jac.T, None, tau=0.5, eps=0.0)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_pcd_state_is_the_bias_corrected_moving_average(make_problem):
    problem = make_problem()
    mtl = build(problem, {"name": "pcd", "beta": 0.5}, Space.PARAMS)
    average = torch.zeros(3, dtype=torch.float64)
    for index, _ in enumerate(_steps(problem, 3)):
        jac = jacobian(problem, Space.PARAMS)
        average = 0.5 * average + 0.5 * (jac @ jac.T).diagonal()
        mtl.backward(problem.losses()[1])
        (state,) = mtl.state_dict()["plugins"].values()
        assert state["steps"] == index + 1
        torch.testing.assert_close(state["squared_norms"], average, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", range(3))
def test_pcd_matches_torchjd(seed):
    aggregation = pytest.importorskip("torchjd.aggregation")
    generator = torch.Generator().manual_seed(seed)
    theirs = aggregation.PCDWeighting(tau=0.1, beta=0.9)
    state = None
    for _, scale in itertools.product(range(4), [1.0]):
        jac = torch.randn(5, 9, generator=generator, dtype=torch.float64) * scale
        gramian = jac @ jac.T
        ours, state = functional.pcd(gramian, state, tau=0.1, beta=0.9)
        torch.testing.assert_close(ours, theirs(gramian), rtol=1e-9, atol=1e-12)


def test_trimmed_mean_and_cr_mogm_match_torchjd():
    aggregation = pytest.importorskip("torchjd.aggregation")
    generator = torch.Generator().manual_seed(0)
    jac = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        functional.trimmed_mean(jac, trim=2), aggregation.TrimmedMean(trim_number=2)(jac)
    )
    theirs = aggregation.CRMOGMWeighting(aggregation.MeanWeighting(), alpha=0.8)
    previous = None
    for _ in range(3):
        gramian = (jac := jac + 0.1) @ jac.T
        ours, previous = functional.cr_mogm(gramian, previous, alpha=0.8, weighting=functional.mean)
        torch.testing.assert_close(ours, theirs(gramian))
