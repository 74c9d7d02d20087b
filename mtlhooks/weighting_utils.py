"""Math and conventions shared by the loss-scaling and norm-balancing plugins.

Conventions every plugin built on this module follows:

- **Composition.** A plugin treats ``ℓᵢ = weights[i] · Lᵢ`` (the losses as weighted by the
  plugins before it, :func:`effective_losses`) as its input losses and *multiplies*
  ``step.weights`` by its own factor. So ``static`` then ``slaw`` normalises the scaled losses
  (constant static weights cancel), while ``slaw`` then ``static`` keeps the static weights on
  top: the config order is the order of composition of loss transforms.
- **Statistics** (moving averages, loss histories) are kept in float64
  (:func:`statistics_dtype`) on the device of the losses, whatever the loss dtype, so that
  float32 training keeps accurate histories and a resumed run continues bit-for-bit.
- **Learnable vectors** (:class:`LearnablePlugin`) are created as float32 on the CPU and cast,
  differentiably, to the losses' device and dtype where they are used; ``plugin.to(device)``
  moves them once (before the optimizer's first step) to avoid that per-step copy.
- **Bad loss values** for a method that takes logs or ratios raise
  :class:`~mtlhooks.errors.InputError` naming the task and the fix
  (:func:`check_lower_bound`), before any state changes: never NaN in ``.grad``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlhooks.errors import InputError
from mtlhooks.plugin import Plugin
from mtlhooks.step import Step

__all__ = [
    "LOG_WEIGHT_BOUND",
    "LearnablePlugin",
    "check_lower_bound",
    "effective_losses",
    "moving_average",
    "softmax_with_temperature",
    "statistics_dtype",
]


LOG_WEIGHT_BOUND = 80.0
"""Largest |s| for a learnable log-weight's initial value: e^{±80} ≈ 5.5e34 still leaves room
below float32's 3.4e38 (the learnable vectors are float32), so the first weights are finite."""


def effective_losses(step: Step) -> Tensor:
    """``ℓᵢ = weights[i] · Lᵢ``: the losses as the plugins before this one left them."""
    return step.weights * step.losses


def statistics_dtype(device: torch.device) -> torch.dtype:
    """float64 for running statistics, except on devices without it (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def softmax_with_temperature(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``softmax(logits / τ)``; numerically stable for any finite logits (max subtracted)."""
    return torch.softmax(logits / temperature, dim=-1)


def moving_average(previous: Tensor, current: Tensor, beta: float) -> Tensor:
    """``β · previous + (1 − β) · current`` (β = 0 returns ``current``)."""
    return beta * previous + (1.0 - beta) * current


def check_lower_bound(
    values: Tensor,
    bound: Tensor | float,
    tasks: Sequence[str],
    *,
    method: str,
    strict: bool,
    why: str,
    fix: str,
) -> None:
    """Raise :class:`InputError` naming every task whose value is below ``bound`` (or equal to
    it when ``strict``).

    :param why: what the method does with the value (e.g. "takes log(L)").
    :param fix: what the user should do.
    """
    bounds = torch.as_tensor(bound, dtype=values.dtype, device=values.device).expand_as(values)
    bad = values <= bounds if strict else values < bounds
    if not bool(bad.any()):
        return
    relation = "≤" if strict else "<"
    listing = ", ".join(
        f"{task!r} = {value:.6g} {relation} {limit:.6g}"
        for task, value, limit, wrong in zip(tasks, values.tolist(), bounds.tolist(), bad.tolist())
        if wrong
    )
    raise InputError(f"{method}: loss of task {listing}; {method} {why}. {fix}")


class LearnablePlugin(Plugin):
    """Base of plugins with one learnable per-task vector trained through an auxiliary loss.

    The vector is an :class:`torch.nn.Parameter` of shape ``(T,)``, float32 on the CPU when
    created. :meth:`parameters` yields it, so ``mtl.parameters()`` hands it to the user's
    optimizer; :meth:`learnable_like` casts it (differentiably) to the losses' device and dtype
    where it is used. :meth:`to` moves it in place (the same ``Parameter`` object, so an
    optimizer built before still holds it; call it before the optimizer's first step).
    """

    _learnable: nn.Parameter

    def _init_learnable(self, value: float) -> None:
        self._learnable = nn.Parameter(
            torch.full((self.setup.num_tasks,), float(value), dtype=torch.float32)
        )

    def parameters(self) -> Iterator[nn.Parameter]:
        yield self._learnable

    def learnable_like(self, like: Tensor) -> Tensor:
        """The learnable vector on ``like``'s device and dtype, still in the autograd graph."""
        return self._learnable.to(device=like.device, dtype=like.dtype)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LearnablePlugin:
        """Move the learnable vector in place (keeps the ``Parameter`` object); returns self."""
        with torch.no_grad():
            self._learnable.data = self._learnable.data.to(device=device, dtype=dtype)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"parameter": self._learnable.detach().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            self._learnable.copy_(state["parameter"])
