"""Plugin ``torchjd``: TorchJD 0.18's aggregators inside the pipeline, against TorchJD itself.

The reference is TorchJD's own ``aggregator(J)`` on the Jacobian of the weighted task losses,
computed here by plain autograd: what mtlhooks writes to the shared parameters must equal it.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import pytest
import torch

from mtlhooks import MTL, ConfigError

aggregation = pytest.importorskip("torchjd.aggregation")

STATIC = {"name": "static", "weights": {"a": 1.0, "b": 0.3, "c": 2.0}}
WEIGHTS = torch.tensor([1.0, 0.3, 2.0], dtype=torch.float64)


SEED = 5


def config(aggregator: str, space: str = "params", **options: Any) -> dict[str, Any]:
    entry = {"name": "torchjd", "aggregator": aggregator, "options": options}
    return {"tasks": ["a", "b", "c"], "space": space, "seed": SEED, "plugins": [STATIC, entry]}


def like_the_pipeline(function: Any, *args: Any) -> Any:
    """``function(*args)`` with the global generator seeded as the plugin seeds it at the first
    call of a pipeline with seed ``SEED`` (TorchJD's PCGrad, GradVac, Random draw from it)."""
    generator = torch.Generator().manual_seed(SEED)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return function(*args)


def shared_jacobian(problem: Any, model: torch.nn.Module) -> tuple[torch.Tensor, list[Any]]:
    """J of the weighted losses w.r.t. the encoder (T×P), and each task's head gradients."""
    _, losses = problem.losses(model)
    shared = list(model.encoder.parameters())
    rows, heads = [], []
    everything = shared + list(model.heads.parameters())
    for w, task in zip(WEIGHTS, problem.tasks):
        found = torch.autograd.grad(
            w * losses[task], everything, retain_graph=True, allow_unused=True
        )
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(everything, found)]
        rows.append(torch.cat([g.reshape(-1) for g in grads[: len(shared)]]))
        heads.append(grads[len(shared) :])
    return torch.stack(rows), heads


def encoder_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.encoder.parameters()])


def heads_grad(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.heads.parameters()]


GRAMIAN_BASED = [
    ("UPGrad", {}),
    ("UPGradWeighting", {}),
    ("MGDA", {}),
    ("DualProj", {"pref_vector": [1.0, 2.0, 1.0]}),
    ("CAGrad", {"c": 0.5}),
    ("PCGrad", {}),
    ("IMTLG", {}),
    ("AlignedMTL", {}),
    ("NashMTL", {}),  # n_tasks filled in
]
MATRIX_BASED = [("Mean", {}), ("Sum", {}), ("Constant", {"weights": [0.5, 1.0, 2.0]})]
COMBINED = [("ConFIG", {}), ("TrimmedMean", {"trim_number": 1})]


@pytest.mark.parametrize(("name", "options"), GRAMIAN_BASED + MATRIX_BASED + COMBINED)
def test_shared_gradient_equals_torchjd_on_the_same_jacobian(problem, name, options) -> None:
    """Space params: the encoder's ``.grad`` is TorchJD's ``aggregator(J)`` for J the Jacobian
    of the weighted losses; the heads receive Σ αᵢwᵢ∇Lᵢ with TorchJD's weights (a weighting) or
    Σ wᵢ∇Lᵢ (a coordinate-wise aggregator)."""
    reference_model = copy.deepcopy(problem.model)
    jacobian, head_grads = shared_jacobian(problem, reference_model)
    # Built from the same options the plugin got, as a user of TorchJD would.
    kwargs = {
        k: torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v
        for k, v in options.items()
    }
    if name == "NashMTL":
        kwargs["n_tasks"] = 3
    method = getattr(aggregation, name)(**kwargs)
    if isinstance(method, aggregation.Weighting):
        alphas = like_the_pipeline(method, jacobian @ jacobian.T)
        expected = alphas @ jacobian
    else:
        expected = like_the_pipeline(method, jacobian)
        weighted = isinstance(method, aggregation.WeightedAggregator)
        alphas = like_the_pipeline(method.weighting, jacobian) if weighted else None

    mtl = MTL(config(name, **options), shared=problem.model.encoder)
    report = mtl.backward(problem.losses()[1])
    got = encoder_grad(problem.model)
    # Nash-MTL's solver works in float32 internally: the ~1e-16 rounding differences between
    # the two Jacobians are amplified to ~1e-9.
    rtol = 1e-6 if name == "NashMTL" else 1e-10
    assert (got - expected).abs().max() <= rtol * expected.abs().max()
    if alphas is None:  # coordinate-wise: the heads get the weighted sum
        assert report.weights is None
        coefficients = torch.ones(3, dtype=torch.float64)
    else:
        torch.testing.assert_close(report.weights, alphas.double() * WEIGHTS, rtol=rtol, atol=0)
        coefficients = alphas.double()
    for got_head, *per_task in zip(heads_grad(problem.model), *head_grads):
        want = sum(c * g for c, g in zip(coefficients, per_task))
        torch.testing.assert_close(got_head, want, rtol=rtol, atol=1e-12)


def test_gramian_based_methods_keep_the_layerwise_gramian(problem) -> None:
    """A Gramian weighting never needs J: space params takes the layerwise Gramian (no T×P
    matrix), a matrix weighting materialises J."""
    upgrad = MTL(config("UPGrad"), shared=problem.model.encoder)
    mean = MTL(config("Mean"), shared=problem.model.encoder)
    assert upgrad._engine.layerwise_mode == "auto"
    assert mean._engine.layerwise_mode == "materialize"


@pytest.mark.parametrize("name", ["UPGrad", "ConFIG"])
def test_features_space_equals_torchjd_on_the_features_jacobian(problem, name) -> None:
    """Space features: the gradient reaching z is TorchJD's aggregation of the per-task
    gradients of z; the encoder gets its backward."""
    reference_model = copy.deepcopy(problem.model)
    z, losses = problem.losses(reference_model)
    rows = [
        torch.autograd.grad(w * losses[t], z, retain_graph=True)[0].reshape(-1)
        for w, t in zip(WEIGHTS, problem.tasks)
    ]
    combined = getattr(aggregation, name)()(torch.stack(rows))
    expected = torch.autograd.grad(
        z, list(reference_model.encoder.parameters()), grad_outputs=combined.reshape(z.shape)
    )
    mtl = MTL(config(name, space="features"))
    z, losses = problem.losses()
    mtl.backward(losses, features=z)
    for got, want in zip(problem.model.encoder.parameters(), expected):
        torch.testing.assert_close(got.grad, want, rtol=1e-9, atol=1e-12)


def test_random_methods_draw_from_the_pipeline_seed(problem) -> None:
    """TorchJD's Random draws from the global generator; inside the pipeline it draws under a
    generator seeded from ``seed``: the same seed gives the same weights, another seed others,
    and the caller's global random state is untouched."""

    def weights(seed: int) -> torch.Tensor:
        mtl = MTL({**config("Random"), "seed": seed}, shared=problem.model.encoder)
        problem.zero_grad()
        return mtl.backward(problem.losses()[1]).weights

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first, again, other = weights(0), weights(0), weights(1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_stateful_method_resumes_bit_for_bit(problem) -> None:
    """GradVac keeps an EMA of cosines and draws a random order: four calls straight equal two,
    a state_dict round trip through a new pipeline, and two more; without the state they do
    not."""

    def run(mtl: MTL, calls: int) -> list[torch.Tensor]:
        out = []
        for _ in range(calls):
            problem.zero_grad()
            out.append(mtl.backward(problem.losses()[1]).weights)
        return out

    gradvac = config("GradVac", beta=0.5)
    straight = run(MTL(gradvac, shared=problem.model.encoder), 4)
    first = MTL(gradvac, shared=problem.model.encoder)
    run(first, 2)
    state = first.state_dict()
    resumed = MTL(gradvac, shared=problem.model.encoder)
    resumed.load_state_dict(copy.deepcopy(state))
    assert all(torch.equal(a, b) for a, b in zip(straight[2:], run(resumed, 2)))
    fresh = run(MTL(gradvac, shared=problem.model.encoder), 2)
    assert not all(torch.equal(a, b) for a, b in zip(straight[2:], fresh))


def test_unknown_class_and_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"no class 'UPGard'; did you mean 'UPGrad'"):
        MTL(config("UPGard"))
    with pytest.raises(ConfigError, match=r"CAGrad takes no option 'cc'.*c, norm_eps"):
        MTL(config("CAGrad", cc=0.5))
    with pytest.raises(ConfigError, match=r"CAGrad\(\) failed"):
        MTL(config("CAGrad"))  # c is required
    with pytest.raises(ConfigError, match=r"coordinate by coordinate.*not 'last_shared'"):
        MTL(config("ConFIG", space="last_shared"), shared=torch.nn.Linear(2, 2))


def test_missing_torchjd_is_a_config_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchjd", None)
    monkeypatch.setitem(sys.modules, "torchjd.aggregation", None)
    with pytest.raises(ConfigError, match=r"TorchJD is not installed.*mtlhooks\[torchjd\]"):
        MTL(config("UPGrad"))
