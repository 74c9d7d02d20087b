"""``mtlhooks bench``: the cost of one training step, as ratios measured side by side.

Every case runs one step (forward, gradients into ``.grad``) of the same model on the same
batch. Cases are interleaved round-robin and each reports the median of its step times, so the
machine's noise hits all of them alike. References measured in the same run:

- ``plain``: ``sum(losses).backward()``, the loop without mtlhooks;
- ``floor``: one forward and T single-task ``torch.autograd.grad`` calls w.r.t. every parameter
  with ``retain_graph``: the unavoidable cost of per-task gradients of all shared parameters;
- ``libmtl``: T ``.backward(retain_graph=True)`` passes, each task's shared gradients flattened
  into a T×P matrix (how LibMTL takes per-task gradients), then the sum written back.
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mtlhooks.core import MTL

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


MODELS: dict[str, tuple[Callable[[int], nn.Module], tuple[int, ...]]] = {
    "mlp": (_MLP, (64, 256)),
    "cnn": (_CNN, (32, 3, 32, 32)),
}

CASES: tuple[tuple[str, str, str], ...] = (
    ("none", "static", "auto"),
    ("features", "mgda", "auto"),
    ("last_shared", "avgnorm", "auto"),
    ("params", "pcgrad", "materialize"),
    ("params", "pcgrad", "layerwise"),
    ("params", "mgda", "materialize"),
    ("params", "mgda", "layerwise"),
)
"""(space, plugin, params_gramian) measured for each model and task count."""

TORCHJD_METHODS = {"pcgrad": "PCGrad", "mgda": "MGDA"}
"""Our plugin → the TorchJD aggregator compared with it (``mtl_backward`` + ``jac_to_grad``)."""


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tasks": self.tasks,
            "space": self.space,
            "method": self.method,
            "median_ms": round(self.seconds * 1e3, 4),
            "ratio_to_plain": round(self.ratio_to_plain, 4),
            "ratio_to_floor": None
            if self.ratio_to_floor is None
            else round(self.ratio_to_floor, 4),
            "ratio_to_libmtl": (
                None if self.ratio_to_libmtl is None else round(self.ratio_to_libmtl, 4)
            ),
            "ratio_to_torchjd": (
                None if self.ratio_to_torchjd is None else round(self.ratio_to_torchjd, 4)
            ),
            "peak_mem_bytes": self.peak_mem_bytes,
        }


def _losses(model: nn.Module, x: Tensor, targets: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    z, outputs = model(x)
    return z, [(out - t).pow(2).mean() for out, t in zip(outputs, targets)]


def _steps(model: nn.Module, x: Tensor, targets: list[Tensor]) -> tuple[dict[str, Step], Step]:
    """The reference steps and one step per (space, method) case, all on the same model."""
    tasks = len(targets)
    names = [f"t{i}" for i in range(tasks)]
    params = [p for p in model.parameters()]
    encoder = model.get_submodule("encoder")
    shared = list(encoder.parameters())

    def zero() -> None:
        for p in params:
            p.grad = None

    def plain() -> None:
        zero()
        _, losses = _losses(model, x, targets)
        sum(losses).backward()  # type: ignore[union-attr]

    def floor() -> None:
        zero()
        _, losses = _losses(model, x, targets)
        for i, loss in enumerate(losses):
            torch.autograd.grad(loss, params, retain_graph=i < tasks - 1, allow_unused=True)

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

    steps: dict[str, Step] = {"plain": plain, "floor": floor, "libmtl": libmtl}
    for space, method, mode in CASES:
        config = {"tasks": names, "space": space, "plugins": [method], "params_gramian": mode}
        # One MTL per model, as in real use: an MTL's forward hooks (layerwise Gramian) would
        # otherwise record the other cases' forwards too.
        steps[_key(space, method, mode)] = _own_model_step(model, x, targets, config)
    steps.update(_torchjd_steps(model, x, targets, zero, shared))
    return steps, zero


def _own_model_step(
    model: nn.Module, x: Tensor, targets: list[Tensor], config: dict[str, Any]
) -> Step:
    twin = copy.deepcopy(model)
    mtl = MTL(config, shared=twin.get_submodule("encoder"))
    names = list(config["tasks"])
    params = list(twin.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        z, losses = _losses(twin, x, targets)
        mtl.backward(dict(zip(names, losses)), features=z)

    return step


def _grad(parameter: Tensor) -> Tensor:
    assert parameter.grad is not None
    return parameter.grad


def _key(space: str, method: str, mode: str) -> str:
    return f"{space}/{method}" + (f" [{mode}]" if space == "params" else "")


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


def measure(
    model_name: str, tasks: int, *, repeats: int, warmup: int = 3, seed: int = 0
) -> list[Case]:
    """Interleave every step ``repeats`` times; return each case's median and ratios."""
    torch.manual_seed(seed)
    factory, shape = MODELS[model_name]
    model = factory(tasks)
    x = torch.randn(*shape)
    with torch.no_grad():
        _, outputs = model(x)
    targets = [torch.randn_like(out) for out in outputs]
    steps, zero = _steps(model, x, targets)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}
    memory = _peak_memory(steps, zero) if memory_supported() else {}
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
                method=method + (f" [{mode}]" if per_task else ""),
                seconds=seconds,
                ratio_to_plain=seconds / median["plain"],
                ratio_to_floor=seconds / median["floor"] if per_task else None,
                ratio_to_libmtl=seconds / median["libmtl"] if per_task else None,
                ratio_to_torchjd=None if torchjd is None else seconds / torchjd,
                peak_mem_bytes=memory.get(key),
            )
        )
    references = [("plain", "plain", "-"), ("floor", "floor", "-"), ("libmtl", "libmtl", "sum")]
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
            )
        )
    return cases


MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


def memory_supported() -> bool:
    """Peak memory is measured from the kernel's peak resident size (``VmHWM``), reset before
    each step. It is only meaningful when large allocations go back to the OS when freed:
    ``mtlhooks bench`` sets glibc's ``MALLOC_MMAP_THRESHOLD_`` for that; on CUDA,
    ``torch.cuda.max_memory_allocated`` is used instead."""
    return os.environ.get(MMAP_THRESHOLD) is not None and os.path.exists("/proc/self/clear_refs")


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _peak_memory(steps: dict[str, Step], zero: Step) -> dict[str, int]:
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


def run(*, quick: bool = False) -> dict[str, Any]:
    """Every model × task count; ``quick`` runs a few rounds of the MLP only (for tests)."""
    configs = [("mlp", 4)] if quick else [("mlp", 4), ("mlp", 8), ("cnn", 4), ("cnn", 8)]
    repeats = 3 if quick else 30
    cases: list[Case] = []
    for model_name, tasks in configs:
        cases += measure(model_name, tasks, repeats=repeats, warmup=1 if quick else 3)
    return {
        "device": f"cpu ({torch.get_num_threads()} threads), torch {torch.__version__}",
        "memory": "peak resident bytes above the step's start (VmHWM)"
        if memory_supported()
        else None,
        "cases": [case.as_dict() for case in cases],
    }


def format_table(result: dict[str, Any]) -> str:
    header = [
        "model",
        "T",
        "space",
        "method",
        "ms",
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
                f"{case['median_ms']:.2f}",
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
    return "\n".join(lines) + f"\n\ndevice: {result['device']}"
