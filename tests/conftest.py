"""Shared fixtures and the deterministic hypothesis profile used everywhere (CI included)."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=40,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


class TwoHeadNet(nn.Module):
    """A small trunk with one head per task; forward returns (z, outputs)."""

    def __init__(self, tasks: tuple[str, ...] = ("a", "b", "c"), width: int = 6) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, width))
        self.heads = nn.ModuleDict({t: nn.Linear(width, i + 1) for i, t in enumerate(tasks)})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.encoder(x)
        return z, {t: head(z) for t, head in self.heads.items()}


@dataclass
class Problem:
    model: TwoHeadNet
    x: torch.Tensor
    tasks: tuple[str, ...]

    def losses(
        self, model: TwoHeadNet | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-task losses of very different scales (task i scaled by 10**i)."""
        z, outputs = (model or self.model)(self.x)
        losses = {
            t: (outputs[t] - 0.5 * (i + 1)).pow(2).mean() * 10.0**i
            for i, t in enumerate(self.tasks)
        }
        return z, losses

    def reference_grads(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gradients of Σ cᵢ Lᵢ computed by plain autograd on a copy of the model."""
        clone = copy.deepcopy(self.model)
        for p in clone.parameters():
            p.grad = None
        _, losses = self.losses(clone)
        total = sum(c * losses[t] for c, t in zip(coefficients.tolist(), self.tasks))
        assert isinstance(total, torch.Tensor)
        total.backward()
        return {n: p.grad.clone() for n, p in clone.named_parameters() if p.grad is not None}

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None


@pytest.fixture
def problem() -> Problem:
    torch.manual_seed(0)
    tasks = ("a", "b", "c")
    return Problem(TwoHeadNet(tasks).double(), torch.randn(9, 5, dtype=torch.float64), tasks)


@pytest.fixture(scope="session")
def make_problem() -> Callable[..., Problem]:
    def make(tasks: tuple[str, ...] = ("a", "b", "c"), seed: int = 0) -> Problem:
        torch.manual_seed(seed)
        return Problem(TwoHeadNet(tasks).double(), torch.randn(9, 5, dtype=torch.float64), tasks)

    return make


@pytest.fixture
def registered() -> Iterator[Callable[[type], type]]:
    """Register plugin classes for one test and forget them afterwards."""
    from mtlhooks import registry

    names: list[str] = []

    def add(cls: type) -> type:
        registry.register(cls)
        names.append(cls.name)
        return cls

    yield add
    for name in names:
        registry.unregister(name)
