"""``mtlhooks bench``: the cost of one training step, as ratios measured side by side.

Every case runs one step (forward, gradients into ``.grad``) of the same model on the same
batch. Cases are interleaved round-robin, in a new shuffled order each round (so that no case
always runs in the cache state another one leaves), and each reports the median of its step
times, so the machine's noise hits all of them alike. References measured in the same run:

- ``plain``: ``sum(losses).backward()``, the loop without mtlhooks;
- ``plain`` / ``twin``: the same plain step on a deep copy of the model, as every mtlhooks case
  runs on a copy of its own. Its ratio to ``plain`` is the bench's A/A control: two identical
  steps on two copies of one model differ by their memory layouts and cache states alone, so
  a case's ratio to ``plain`` is only resolved beyond that row's distance from 1;
- ``plain`` / ``checked``: the plain step on another copy, then every gradient checked for
  NaN/inf by hand (the pipeline's own fused check, :func:`mtlhooks.hostsync.all_finite`, and
  one host read): the least any step that guarantees finite gradients can cost, with no
  pipeline around it. Space ``none`` with the check on cannot be cheaper than this row;
- ``floor``: one forward and T single-task ``torch.autograd.grad`` calls w.r.t. every parameter
  with ``retain_graph``: the unavoidable cost of per-task gradients of all shared parameters;
- ``floor_batched``: the same T products as one batched call (``is_grads_batched``, vmap), to
  tell whether batching them pays on this device;
- ``libmtl``: T ``.backward(retain_graph=True)`` passes, each task's shared gradients flattened
  into a T×P matrix (how LibMTL takes per-task gradients), then the sum written back;
- ``torchjd``: TorchJD's ``mtl_backward`` + ``jac_to_grad``, when TorchJD is installed.

On CUDA, steps are timed with CUDA events (the device synchronised before each step) and peak
memory is ``torch.cuda.max_memory_allocated`` above the step's start. On the CPU, time is wall
clock and peak memory is the kernel's peak resident size, measured in a separate process (see
:func:`memory_supported`): the allocator setting it needs would slow every allocation down.

Suites: ``cpu`` (an MLP, a small CNN and a small transformer encoder, T = 4 and 8) and ``gpu``
(a ResNet-18 trunk at batch 64 and a transformer encoder of about the same size, T = 3 and 10).
``dry_run`` runs each model of a suite once at toy size, to test the machinery on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlhooks import hostsync
from mtlhooks.core import MTL
from mtlhooks.errors import InputError

Step = Callable[[], None]


class _MLP(nn.Module):
    """MLP trunk of about 0.66 M parameters (256 → 512 → 512 → 512) and one head per task."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)
        )
        self.heads = nn.ModuleList(nn.Linear(512, 16) for _ in range(tasks))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.encoder(x)
        return z, [head(z) for head in self.heads]


class _CNN(nn.Module):
    """Small CNN trunk for 3×32×32 images and one head per task."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 128),
        )
        self.heads = nn.ModuleList(nn.Linear(128, 10) for _ in range(tasks))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.encoder(x)
        return z, [head(z) for head in self.heads]


class _BasicBlock(nn.Module):
    """ResNet's two 3×3 convolutions with batch norm and an identity (or 1×1) shortcut."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class _ResNet18(nn.Module):
    """ResNet-18 trunk (He et al., 2016) with the 3×3 stem for 32×32 images: 11.2 M parameters
    at ``width`` 64; global average pooling gives z; one linear head per task."""

    def __init__(self, tasks: int, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        channels = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out = width * 2**stage
            layers += [_BasicBlock(channels, out, stride), _BasicBlock(out, out, 1)]
            channels = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(channels, 10) for _ in range(tasks))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.encoder(x)
        return z, [head(z) for head in self.heads]


class _EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: multi-head self-attention and a 4× GELU MLP, each
    behind a LayerNorm and a residual connection; every projection is an ``nn.Linear``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        h = self.norm1(x)

        def split(t: Tensor) -> Tensor:
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split(self.query(h)), split(self.key(h)), split(self.value(h))
        )
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class _TransformerTrunk(nn.Module):
    def __init__(self, inputs: int, width: int, depth: int, heads: int, length: int) -> None:
        super().__init__()
        self.embed = nn.Linear(inputs, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        self.layers = nn.Sequential(*(_EncoderLayer(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.layers(self.embed(x) + self.position)
        return self.norm(tokens).mean(dim=1)


class _Transformer(nn.Module):
    """Transformer-encoder trunk over sequences of feature vectors (mean-pooled into z) and one
    linear head per task."""

    def __init__(
        self, tasks: int, *, inputs: int, width: int, depth: int, heads: int, length: int
    ) -> None:
        super().__init__()
        self.encoder = _TransformerTrunk(inputs, width, depth, heads, length)
        self.heads = nn.ModuleList(nn.Linear(width, 8) for _ in range(tasks))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.encoder(x)
        return z, [head(z) for head in self.heads]


@dataclass(frozen=True)
class Model:
    """A benchmark model: its builder (given T) and the shape of its input batch."""

    build: Callable[[int], nn.Module]
    batch: tuple[int, ...]
    about: str


def _transformer(inputs: int, width: int, depth: int, heads: int, length: int):  # type: ignore[no-untyped-def]
    def build(tasks: int) -> nn.Module:
        return _Transformer(
            tasks, inputs=inputs, width=width, depth=depth, heads=heads, length=length
        )

    return build


MODELS: dict[str, Model] = {
    "mlp": Model(_MLP, (64, 256), "MLP 256→512→512→512, batch 64"),
    "cnn": Model(_CNN, (32, 3, 32, 32), "2-conv CNN, batch 32 of 3×32×32"),
    "transformer": Model(
        _transformer(32, 128, 2, 4, 32),
        (16, 32, 32),
        "transformer encoder, width 128, 2 layers, 4 heads, batch 16 × 32 tokens",
    ),
    "resnet18": Model(_ResNet18, (64, 3, 32, 32), "ResNet-18, batch 64 of 3×32×32"),
    "transformer-base": Model(
        _transformer(64, 384, 6, 6, 128),
        (64, 128, 64),
        "transformer encoder, width 384, 6 layers, 6 heads, batch 64 × 128 tokens",
    ),
}
"""Every model the suites use, by name."""

TINY: dict[str, Model] = {
    "mlp": MODELS["mlp"],
    "cnn": MODELS["cnn"],
    "transformer": Model(_transformer(8, 16, 1, 2, 6), (3, 6, 8), "tiny transformer"),
    "resnet18": Model(lambda tasks: _ResNet18(tasks, width=4), (3, 3, 8, 8), "tiny ResNet-18"),
    "transformer-base": Model(_transformer(8, 16, 2, 2, 6), (3, 6, 8), "tiny transformer"),
}
"""The same architectures at toy sizes, for dry runs of a suite on a CPU."""

SUITES: dict[str, tuple[tuple[str, int], ...]] = {
    "cpu": (
        ("mlp", 4),
        ("mlp", 8),
        ("cnn", 4),
        ("cnn", 8),
        ("transformer", 4),
        ("transformer", 8),
    ),
    "gpu": (("resnet18", 3), ("resnet18", 10), ("transformer-base", 3), ("transformer-base", 10)),
}
"""(model, T) measured by each suite."""

CASES: tuple[tuple[str, str, str], ...] = (
    ("none", "static", "auto"),
    ("none", "static", "unchecked"),
    ("features", "mgda", "auto"),
    ("last_shared", "avgnorm", "auto"),
    ("params", "pcgrad", "materialize"),
    ("params", "pcgrad", "layerwise"),
    ("params", "mgda", "materialize"),
    ("params", "mgda", "layerwise"),
)
"""(space, plugin, params_gramian) measured for each model and task count; ``unchecked``:
``check_gradients: false`` (only losses, weights and Gramian checked for NaN/inf)."""


def case_config(names: list[str], space: str, method: str, mode: str) -> dict[str, Any]:
    """The pipeline config of one case of :data:`CASES`."""
    config: dict[str, Any] = {"tasks": names, "space": space, "plugins": [method]}
    if mode == "unchecked":
        config["check_gradients"] = False
    else:
        config["params_gramian"] = mode
    return config


TORCHJD_METHODS = {"pcgrad": "PCGrad", "mgda": "MGDA"}
"""Our plugin → the TorchJD aggregator compared with it (``mtl_backward`` + ``jac_to_grad``)."""

REFERENCES = ("plain", "plain_twin", "plain_checked", "floor", "floor_batched", "libmtl")


@dataclass(frozen=True)
class Case:
    model: str
    tasks: int
    space: str
    method: str
    seconds: float
    ratio_to_plain: float
    ratio_to_floor: float | None
    ratio_to_libmtl: float | None
    ratio_to_torchjd: float | None = None
    peak_mem_bytes: int | None = None
    gramian: str | None = None
    spread: float | None = None
    stages: dict[str, float] | None = None
    """Median host seconds of each pipeline stage (``report.timings``)."""

    def as_dict(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return {
            "model": self.model,
            "tasks": self.tasks,
            "space": self.space,
            "method": self.method,
            "median_ms": round(self.seconds * 1e3, 4),
            "iqr_ms": rounded(None if self.spread is None else self.spread * 1e3),
            "ratio_to_plain": rounded(self.ratio_to_plain),
            "ratio_to_floor": rounded(self.ratio_to_floor),
            "ratio_to_libmtl": rounded(self.ratio_to_libmtl),
            "ratio_to_torchjd": rounded(self.ratio_to_torchjd),
            "peak_mem_bytes": self.peak_mem_bytes,
            "gramian": self.gramian,
            "stages_ms": None
            if self.stages is None
            else {name: round(value * 1e3, 4) for name, value in self.stages.items()},
        }


def _losses(model: nn.Module, x: Tensor, targets: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    z, outputs = model(x)
    return z, [(out - t).pow(2).mean() for out, t in zip(outputs, targets)]


@dataclass
class _Setup:
    """One model, batch and targets, with every step to measure."""

    steps: dict[str, Step]
    zero: Step
    mtls: dict[str, MTL]
    notes: list[str]
    stages: dict[str, list[dict[str, float]]]
    """Per mtlhooks case, the ``report.timings`` of each of its calls, in order."""
    twin: nn.Module
    """The copy of the model that the A/A control ``plain_twin`` steps."""
    checked: nn.Module
    """The copy of the model that ``plain_checked`` (plain, then a hand-written check) steps."""


def _steps(model: nn.Module, x: Tensor, targets: list[Tensor]) -> _Setup:
    """The reference steps and one step per (space, method) case, all on the same batch."""
    tasks = len(targets)
    names = [f"t{i}" for i in range(tasks)]
    params = [p for p in model.parameters()]
    encoder = model.get_submodule("encoder")
    shared = list(encoder.parameters())
    notes: list[str] = []

    def zero() -> None:
        for p in params:
            p.grad = None

    plain = _plain_on(model, x, targets, check=False)

    def floor() -> None:
        zero()
        _, losses = _losses(model, x, targets)
        for i, loss in enumerate(losses):
            torch.autograd.grad(loss, params, retain_graph=i < tasks - 1, allow_unused=True)

    identity = torch.eye(tasks, device=x.device)

    def floor_batched() -> None:
        zero()
        _, losses = _losses(model, x, targets)
        torch.autograd.grad(
            torch.stack(losses),
            params,
            grad_outputs=identity,
            is_grads_batched=True,
            allow_unused=True,
        )

    def libmtl() -> None:
        zero()
        _, losses = _losses(model, x, targets)
        rows = []
        for i, loss in enumerate(losses):
            for p in shared:
                p.grad = None
            loss.backward(retain_graph=i < tasks - 1)
            rows.append(torch.cat([_grad(p).reshape(-1) for p in shared]))
        combined = torch.stack(rows).sum(0)
        offset = 0
        for p in shared:
            p.grad = combined[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    twin = copy.deepcopy(model)
    plain_twin = _plain_on(twin, x, targets, check=False)
    checked = copy.deepcopy(model)
    plain_checked = _plain_on(checked, x, targets, check=True)

    steps: dict[str, Step] = {
        "plain": plain,
        "plain_twin": plain_twin,
        "plain_checked": plain_checked,
        "floor": floor,
    }
    problem = _try_once(floor_batched)
    if problem is None:
        steps["floor_batched"] = floor_batched
    else:
        notes.append(f"floor_batched left out: {problem}")
    steps["libmtl"] = libmtl
    mtls: dict[str, MTL] = {}
    stages: dict[str, list[dict[str, float]]] = {}
    for space, method, mode in CASES:
        config = case_config(names, space, method, mode)
        # One MTL per model, as in real use: an MTL's forward hooks (layerwise Gramian) would
        # otherwise record the other cases' forwards too.
        key = _key(space, method, mode)
        stages[key] = []
        steps[key], mtls[key] = _own_model_step(model, x, targets, config, stages[key])
    steps.update(_torchjd_steps(model, x, targets, zero, shared))
    return _Setup(steps, zero, mtls, notes, stages, twin, checked)


def _plain_on(model: nn.Module, x: Tensor, targets: list[Tensor], check: bool) -> Step:
    """The plain step on ``model`` (the model itself or a copy); with ``check``, followed by the
    least a checked step does: one fused finiteness test of every gradient, read once on the
    host (it raises ``FloatingPointError`` on a NaN or an infinity, which no benchmark batch
    produces)."""
    params = list(model.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        _, losses = _losses(model, x, targets)
        sum(losses).backward()  # type: ignore[union-attr]
        if check:
            grads = [p.grad for p in params if p.grad is not None]
            # the pipeline's test: a sum that overflowed on finite entries is settled entry by
            # entry, on the failure path only
            if not bool(hostsync.all_finite(grads)) and hostsync.confirm_nonfinite(grads):
                raise FloatingPointError("a benchmark step produced a non-finite gradient")

    return step


def _try_once(step: Step) -> str | None:
    """Run ``step`` once; return why it cannot be measured (an error, a slow-path warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            step()
        except (RuntimeError, NotImplementedError) as error:
            return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    slow = [str(w.message).splitlines()[0] for w in caught if "performance" in str(w.message)]
    return f"vmap falls back to a loop: {slow[0]}" if slow else None


def _own_model_step(
    model: nn.Module,
    x: Tensor,
    targets: list[Tensor],
    config: dict[str, Any],
    log: list[dict[str, float]] | None = None,
) -> tuple[Step, MTL]:
    twin = copy.deepcopy(model)
    mtl = MTL(config, shared=twin.get_submodule("encoder")).to(device=x.device)
    names = list(config["tasks"])
    params = list(twin.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        z, losses = _losses(twin, x, targets)
        report = mtl.backward(dict(zip(names, losses)), features=_at(mtl, z))
        if log is not None:
            log.append(dict(report.timings))

    return step, mtl


def _at(mtl: MTL, features: Tensor) -> Tensor | None:
    """``features=`` for ``mtl.backward``: z in space ``features``, nothing elsewhere."""
    return features if mtl.space.value == "features" else None


def _grad(parameter: Tensor) -> Tensor:
    assert parameter.grad is not None
    return parameter.grad


def _key(space: str, method: str, mode: str) -> str:
    return f"{space}/{method}" + (f" [{mode}]" if space == "params" or mode == "unchecked" else "")


def _torchjd_steps(
    model: nn.Module, x: Tensor, targets: list[Tensor], zero: Step, shared: Sequence[Tensor]
) -> dict[str, Step]:
    """TorchJD's ``mtl_backward`` + ``jac_to_grad`` for each compared method, if installed."""
    try:
        from torchjd import aggregation
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError:
        return {}
    steps: dict[str, Step] = {}
    for method, class_name in TORCHJD_METHODS.items():
        aggregator = getattr(aggregation, class_name)()

        def step(aggregator: Any = aggregator) -> None:
            zero()
            z, losses = _losses(model, x, targets)
            mtl_backward(losses, features=z)
            jac_to_grad(shared, aggregator)

        steps[f"torchjd/{method}"] = step
    return steps


class _Clock:
    """Times one step: CUDA events on a CUDA device (synchronised before the step, so the
    events span exactly this step's work), the wall clock elsewhere, or with ``cpu_time`` the
    CPU time of the calling thread (meaningful with one intra-op thread only)."""

    def __init__(self, device: torch.device, cpu_time: bool = False) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.now = time.thread_time if cpu_time else time.perf_counter

    def time(self, step: Step) -> float:
        if not self.cuda:
            start = self.now()
            step()
            return self.now() - start
        torch.cuda.synchronize(self.device)
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        end.synchronize()
        return float(begin.elapsed_time(end)) / 1e3


def _build(
    model_name: str, tasks: int, device: torch.device, tiny: bool, seed: int
) -> tuple[nn.Module, Tensor, list[Tensor]]:
    torch.manual_seed(seed)
    spec = (TINY if tiny else MODELS)[model_name]
    model = spec.build(tasks).to(device)
    x = torch.randn(*spec.batch, device=device)
    with torch.no_grad():
        _, outputs = model(x)
    targets = [torch.randn_like(out) for out in outputs]
    return model, x, targets


def auto_choices(model: nn.Module, x: Tensor, targets: list[Tensor]) -> dict[str, dict[str, str]]:
    """Which Gramian ``params_gramian: auto`` takes in spaces ``params`` and ``last_shared``
    for this model and batch, and why (one step of MGDA on a copy of the model each)."""
    names = [f"t{i}" for i in range(len(targets))]
    choices = {}
    for space in ("params", "last_shared"):
        config = {"tasks": names, "space": space, "plugins": ["mgda"], "params_gramian": "auto"}
        step, mtl = _own_model_step(model, x, targets, config)
        step()
        choice = mtl._engine.last_gramian_choice
        assert choice is not None
        choices[space] = {"mode": choice.mode, "reason": choice.reason}
        mtl.close()
    return choices


def measure(
    model_name: str,
    tasks: int,
    *,
    repeats: int,
    warmup: int = 3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    tiny: bool = False,
    memory: dict[str, int] | None = None,
    cpu_time: bool = False,
) -> tuple[list[Case], dict[str, Any]]:
    """Interleave every step ``repeats`` times; return each case's median and ratios, and a
    summary of the model (size, what ``auto`` chose and why, notes). On CUDA, peak memory is
    measured here; on the CPU it comes in ``memory`` (see :func:`cpu_peak_memory`)."""
    device = torch.device(device)
    model, x, targets = _build(model_name, tasks, device, tiny, seed)
    setup = _steps(model, x, targets)
    steps = setup.steps
    clock = _Clock(device, cpu_time)
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    shuffle = random.Random(seed)
    for round_index in range(warmup + repeats):
        shuffle.shuffle(order)
        for name in order:
            elapsed = clock.time(steps[name])
            if round_index >= warmup:
                times[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}
    spread = {name: _iqr(values) for name, values in times.items()}
    if device.type == "cuda":
        memory = _cuda_peak_memory(steps, setup.zero, device)
    memory = memory or {}
    modes = {key: _gramian_mode(mtl) for key, mtl in setup.mtls.items()}
    stages = {
        key: _median_stages(log[warmup : warmup + repeats]) for key, log in setup.stages.items()
    }
    cases = []
    for space, method, mode in CASES:
        key = _key(space, method, mode)
        seconds = median[key]
        per_task = space == "params"
        torchjd = median.get(f"torchjd/{method}") if per_task else None
        cases.append(
            Case(
                model=model_name,
                tasks=tasks,
                space=space,
                method=method + (f" [{mode}]" if per_task or mode == "unchecked" else ""),
                seconds=seconds,
                ratio_to_plain=seconds / median["plain"],
                ratio_to_floor=seconds / median["floor"] if per_task else None,
                ratio_to_libmtl=seconds / median["libmtl"] if per_task else None,
                ratio_to_torchjd=None if torchjd is None else seconds / torchjd,
                peak_mem_bytes=memory.get(key),
                gramian=modes[key] if space != "none" else None,
                spread=spread[key],
                stages=stages[key],
            )
        )
    references = [
        ("plain", "plain", "-"),
        ("plain_twin", "plain", "twin"),
        ("plain_checked", "plain", "checked"),
        ("floor", "floor", "-"),
        ("floor_batched", "floor", "batched"),
        ("libmtl", "libmtl", "sum"),
    ]
    references += [(f"torchjd/{m}", "torchjd", m) for m in TORCHJD_METHODS]
    for key, space, method in references:
        if key not in median:
            continue
        cases.append(
            Case(
                model=model_name,
                tasks=tasks,
                space=space,
                method=method,
                seconds=median[key],
                ratio_to_plain=median[key] / median["plain"],
                ratio_to_floor=median[key] / median["floor"],
                ratio_to_libmtl=median[key] / median["libmtl"],
                peak_mem_bytes=memory.get(key),
                spread=spread[key],
            )
        )
    summary = {
        "model": model_name,
        "tasks": tasks,
        "about": (TINY if tiny else MODELS)[model_name].about,
        "shared_parameters": sum(p.numel() for p in model.get_submodule("encoder").parameters()),
        "auto": auto_choices(model, x, targets),
        "notes": setup.notes,
    }
    for mtl in setup.mtls.values():
        mtl.close()
    return cases, summary


def _median_stages(log: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each stage's median over the calls (a stage a call skipped counts as 0)."""
    names = list(dict.fromkeys(name for timings in log for name in timings))
    return {name: statistics.median(t.get(name, 0.0) for t in log) for name in names}


def _gramian_mode(mtl: MTL) -> str | None:
    """How the MTL's last call took the Gramian (``None`` in space ``none``)."""
    choice = mtl._engine.last_gramian_choice
    return None if choice is None else choice.mode


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


def _cuda_peak_memory(steps: dict[str, Step], zero: Step, device: torch.device) -> dict[str, int]:
    """Bytes allocated above the step's start (gradients freed), at the step's peak."""
    peaks = {}
    for name, step in steps.items():
        zero()
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peaks[name] = int(torch.cuda.max_memory_allocated(device) - base)
    return peaks


MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


def memory_supported() -> bool:
    """Peak memory on the CPU is the kernel's peak resident size (``VmHWM``), reset before each
    step. It is only meaningful when large allocations go back to the OS when freed: glibc's
    ``MALLOC_MMAP_THRESHOLD_`` does that, but it also makes every large allocation fault its
    pages in anew, which would slow the very steps being timed (materialising J the most). So
    :func:`cpu_peak_memory` measures memory in a child process with that setting, and the
    timings are taken without it."""
    return os.path.exists("/proc/self/clear_refs")


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _resident_peaks(steps: dict[str, Step], zero: Step) -> dict[str, int]:
    """Bytes above the resident size before the step (gradients freed), at the step's peak
    (median of 3)."""
    peaks: dict[str, int] = {}
    for name, step in steps.items():
        values = []
        for _ in range(3):
            zero()
            gc.collect()
            with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
                refs.write("5")
            base = _status("VmRSS:")
            step()
            values.append(max(_status("VmHWM:") - base, 0))
        peaks[name] = int(statistics.median(values))
    return peaks


def cpu_peak_memory(configs: Sequence[tuple[str, int]], tiny: bool) -> dict[str, dict[str, int]]:
    """Peak resident memory of every step of every (model, T), measured in a child process
    run with ``MALLOC_MMAP_THRESHOLD_`` (see :func:`memory_supported`); keys ``"model/T"``."""
    if not memory_supported():
        return {}
    request = json.dumps({"configs": list(configs), "tiny": tiny})
    env = {**os.environ, MMAP_THRESHOLD: "65536"}
    command = [sys.executable, "-m", "mtlhooks.bench", "--memory-of", request]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    result: dict[str, dict[str, int]] = json.loads(done.stdout)
    return result


def _memory_child(request: str) -> None:
    spec = json.loads(request)
    out = {}
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for model_name, tasks in spec["configs"]:
        model, x, targets = _build(model_name, tasks, torch.device("cpu"), spec["tiny"], 0)
        setup = _steps(model, x, targets)
        for step in setup.steps.values():
            step()  # warm up: the first call of a step allocates its one-off buffers
        out[f"{model_name}/{tasks}"] = _resident_peaks(setup.steps, setup.zero)
    print(json.dumps(out))


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    return f"cpu ({torch.get_num_threads()} threads), torch {torch.__version__}"


def run(
    *,
    quick: bool = False,
    suite: str = "cpu",
    device: str | torch.device | None = None,
    dry_run: bool = False,
    repeats: int | None = None,
    only: Sequence[str] | None = None,
    cpu_time: bool = False,
) -> dict[str, Any]:
    """Every (model, T) of ``suite``. ``quick``: a few rounds of the MLP only (for tests);
    ``dry_run``: each model of the suite at toy size, T = 2, one round (tests the machinery
    on a CPU; no memory measurement there)."""
    if suite not in SUITES:
        raise InputError(f"unknown suite {suite!r}; choose one of {sorted(SUITES)}")
    chosen = torch.device(device if device is not None else "cpu")
    if cpu_time:
        if chosen.type != "cpu":
            raise InputError("--cpu-time times CPU steps; on CUDA the bench uses CUDA events")
        # The calling thread's CPU time counts its own work only: one intra-op thread.
        torch.set_num_threads(1)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "device 'cuda' asked for, but torch.cuda.is_available() is False: run on a CUDA "
            "machine, or use --device cpu (--dry-run tests the gpu suite on a CPU)"
        )
    configs: Sequence[tuple[str, int]] = SUITES[suite]
    if only:
        unknown = sorted(set(only) - {name for name, _ in configs})
        if unknown:
            names = sorted({name for name, _ in configs})
            raise InputError(f"suite {suite!r} has no model {unknown}; it has {names}")
        configs = [(name, tasks) for name, tasks in configs if name in only]
    if quick:
        configs, rounds, warmup = configs[:1], repeats or 3, 1
    elif dry_run:
        # Every model of the suite once, at T = 2 and toy size: tests the machinery only.
        configs = list(dict.fromkeys((name, 2) for name, _ in configs))
        rounds, warmup = repeats or 1, 0
    else:
        rounds, warmup = repeats or (20 if chosen.type == "cuda" else 30), 5
    memory = {}
    if chosen.type == "cpu" and not dry_run:
        memory = cpu_peak_memory(configs, tiny=False)
    cases: list[Case] = []
    models = []
    for model_name, tasks in configs:
        found, summary = measure(
            model_name,
            tasks,
            repeats=rounds,
            warmup=warmup,
            device=chosen,
            tiny=dry_run,
            memory=memory.get(f"{model_name}/{tasks}"),
            cpu_time=cpu_time,
        )
        cases += found
        models.append(summary)
    memory_kind: str | None
    if chosen.type == "cuda":
        timing = "CUDA events"
        memory_kind = "torch.cuda.max_memory_allocated above the step's start"
    else:
        timing = "CPU time of the one thread (time.thread_time)" if cpu_time else "wall clock"
        memory_kind = None
        if memory:
            memory_kind = "peak resident bytes above the step's start (VmHWM), in a child process"
    notes = []
    if MMAP_THRESHOLD in os.environ:
        notes.append(
            f"{MMAP_THRESHOLD} is set: every large allocation faults its pages in anew, which "
            "slows allocation-heavy steps (materialised J) in these timings"
        )
    return {
        "device": describe_device(chosen),
        "torch": torch.__version__,
        "suite": suite + (" (dry run: toy sizes, T = 2, timings meaningless)" if dry_run else ""),
        "rounds": rounds,
        "timing": f"{timing}; median of {rounds} interleaved rounds in shuffled order",
        "memory": memory_kind,
        "models": models,
        "cases": [case.as_dict() for case in cases],
        "notes": notes,
    }


def format_table(result: dict[str, Any]) -> str:
    header = [
        "model",
        "T",
        "space",
        "method",
        "gramian",
        "ms",
        "±iqr",
        "÷plain",
        "÷floor",
        "÷libmtl",
        "÷torchjd",
        "peak MB",
    ]
    rows = []
    for case in result["cases"]:

        def ratio(value: float | None) -> str:
            return "—" if value is None else f"{value:.2f}×"

        rows.append(
            [
                case["model"],
                str(case["tasks"]),
                case["space"],
                case["method"],
                case.get("gramian") or "—",
                f"{case['median_ms']:.2f}",
                "—" if case.get("iqr_ms") is None else f"{case['iqr_ms']:.2f}",
                ratio(case["ratio_to_plain"]),
                ratio(case["ratio_to_floor"]),
                ratio(case["ratio_to_libmtl"]),
                ratio(case["ratio_to_torchjd"]),
                "—" if case["peak_mem_bytes"] is None else f"{case['peak_mem_bytes'] / 1e6:.1f}",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines += ["", "params_gramian: auto chose"]
    for model in result.get("models", []):
        for space, choice in model["auto"].items():
            lines.append(
                f"  {model['model']}, T={model['tasks']}, {space}: {choice['mode']} "
                f"({choice['reason']})"
            )
        lines += [f"  note ({model['model']}, T={model['tasks']}): {n}" for n in model["notes"]]
    lines += [f"note: {note}" for note in result.get("notes", [])]
    lines += ["", f"device: {result['device']}", f"timing: {result.get('timing', '?')}"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a few rounds of one model (tests)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--suite", choices=sorted(SUITES), default=None, help="default: gpu on cuda, else cpu"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="each model of the suite at toy size, one round (tests only)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="rounds to take medians of")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="one thread, timed by its CPU time: robust to other processes on a shared machine",
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated models of the suite to run (e.g. mlp,cnn)"
    )


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    suite = args.suite or ("gpu" if device.type == "cuda" else "cpu")
    result = run(
        quick=args.quick,
        suite=suite,
        device=device,
        dry_run=args.dry_run,
        repeats=args.repeats,
        only=args.only.split(",") if args.only else None,
        cpu_time=args.cpu_time,
    )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-of":
        _memory_child(sys.argv[2])
    else:  # pragma: no cover - the command is `mtlhooks bench`
        parser = argparse.ArgumentParser(prog="python -m mtlhooks.bench")
        add_arguments(parser)
        raise SystemExit(main(parser.parse_args()))
