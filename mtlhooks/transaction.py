"""All or nothing: what lets one ``backward()`` call complete or change nothing.

Two kinds of change happen in a call, and both can be undone until the call returns:

- **``.grad`` writes** (:class:`GradWrites`): before the first write to a tensor's ``.grad``
  the tensor's gradient is remembered (``None``, or a copy when it already holds gradients,
  e.g. of earlier accumulation micro-steps); :meth:`GradWrites.rollback` puts every one back
  bit for bit. Copies are made only of gradients that exist, so a call after
  ``zero_grad(set_to_none=True)`` copies nothing; gradients that will not be checked can be
  held aside instead of copied (the unchecked fast path while accumulating).
- **plugin state and the generator** (:func:`clone_tree`): the pipeline keeps a deep copy of
  every plugin's ``state_dict()`` and of the generator's state from before the call, and loads
  it back when the call raises or skips.

:func:`check_state` compares a state loaded from disk with the structure a plugin has now
(keys, tensor shapes and dtypes), so a mismatch is refused before anything is loaded.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from mtlhooks.errors import InputError


def clone_tree(value: Any) -> Any:
    """A copy of nested dicts/lists/tuples whose tensors are cloned (detached) and whose other
    mutable leaves are deep-copied, so later in-place changes of the original never reach it."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {key: clone_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [clone_tree(item) for item in value]
    if isinstance(value, tuple):
        return tuple(clone_tree(item) for item in value)
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    return copy.deepcopy(value)


def share_tree(value: Any) -> Any:
    """Like :func:`clone_tree`, but tensors are kept by reference: for states whose tensors
    are replaced, never changed in place (``Plugin.replaces_state``)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping):
        return {key: share_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [share_tree(item) for item in value]
    if isinstance(value, tuple):
        return tuple(share_tree(item) for item in value)
    return clone_tree(value)


def check_state(saved: Any, current: Any, where: str) -> None:
    """Raise :class:`InputError` when ``saved`` cannot be the state of something whose state is
    ``current`` now: other keys, a tensor of another shape or kind of dtype (floating point,
    integer, boolean), a tensor where a number was (or the reverse). ``None`` on either side
    and an empty mapping now are accepted (state not yet initialised), and lists may differ in
    length (histories grow)."""
    if saved is None or current is None:
        return
    if isinstance(current, Tensor) or isinstance(saved, Tensor):
        if not (isinstance(current, Tensor) and isinstance(saved, Tensor)):
            raise InputError(
                f"{where}: expected {_describe(current)}, the saved state has {_describe(saved)}"
            )
        if saved.shape != current.shape or _kind(saved) != _kind(current):
            raise InputError(
                f"{where}: expected {_describe(current)}, the saved state has {_describe(saved)}"
                " (saved with other tasks or options?)"
            )
        return
    if isinstance(current, Mapping):
        if not isinstance(saved, Mapping):
            raise InputError(f"{where}: expected a mapping, the saved state has {_describe(saved)}")
        if not current:
            return  # filled as the run goes (an optimizer's per-parameter state)
        if set(saved) != set(current):
            missing = sorted(map(str, set(current) - set(saved)))
            unknown = sorted(map(str, set(saved) - set(current)))
            raise InputError(
                f"{where}: the saved state's keys differ; missing {missing}, unknown {unknown}"
            )
        for key in current:
            check_state(saved[key], current[key], f"{where}.{key}")
        return
    if isinstance(current, (list, tuple)):
        if not isinstance(saved, (list, tuple)):
            raise InputError(f"{where}: expected a list, the saved state has {_describe(saved)}")
        for position, (mine, theirs) in enumerate(zip(saved, current)):
            check_state(mine, theirs, f"{where}[{position}]")
        return
    numbers = (bool, int, float)
    if isinstance(current, numbers) != isinstance(saved, numbers):
        raise InputError(
            f"{where}: expected {_describe(current)}, the saved state has {_describe(saved)}"
        )


def _kind(tensor: Tensor) -> str:
    """Floating point states may change precision with the model (a float32 run's state loads
    into a fresh float64 pipeline); an integer or boolean state may not become a float."""
    if tensor.is_floating_point():
        return "floating"
    if tensor.is_complex():
        return "complex"
    return str(tensor.dtype)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


class GradWrites:
    """The ``.grad`` writes of one call, undoable until the call returns.

    A tensor's gradient is either copied before it is written (:meth:`record`), or, for one
    weighted backward that accumulates into each leaf once (:meth:`record` with ``hold``),
    *held*: the existing gradient is set aside untouched, the backward writes this call's
    gradient alone into ``.grad``, and :meth:`commit` adds it into the held tensor in place
    (``old += new``, the very operation autograd's accumulation performs, on the same tensor
    object). Holding costs no copy; rolling back puts the held tensor back as it was."""

    def __init__(self) -> None:
        self._before: dict[int, tuple[Tensor, Tensor | None, Tensor | None]] = {}
        self._held: dict[int, tuple[Tensor, Tensor]] = {}

    def record(self, tensors: Iterable[Tensor], *, hold: bool = False) -> None:
        """Remember the gradients of ``tensors`` before they are written (first time only);
        with ``hold``, set the existing ones that can be held aside instead of copying them."""
        before, held = self._before, self._held  # it runs on every call: locals, one branch
        for tensor in tensors:
            key = id(tensor)
            if key in before or key in held:
                continue
            grad = tensor.grad
            if grad is None:
                before[key] = (tensor, None, None)
            elif hold and _holdable(tensor, grad):
                held[key] = (tensor, grad)
                tensor.grad = None
            else:
                before[key] = (tensor, grad, grad.detach().clone())

    def tensors(self) -> list[Tensor]:
        """Every recorded tensor (whose ``.grad`` this call wrote or may have written)."""
        return [t for t, _, _ in self._before.values()] + [t for t, _ in self._held.values()]

    def written(self) -> list[Tensor]:
        """The current gradients of every tensor recorded without holding (those that have
        one): the values ``.grad`` will keep. (Holding is for gradients nobody checks.)"""
        return [t.grad for t, _, _ in self._before.values() if t.grad is not None]

    def rollback(self) -> None:
        """Put every recorded gradient back as it was (the same tensor object, same values)."""
        if not self._before and not self._held:
            return
        with torch.no_grad():
            for tensor, grad, saved in self._before.values():
                if grad is not None and saved is not None:
                    grad.copy_(saved)
                tensor.grad = grad
            for tensor, old in self._held.values():
                tensor.grad = old
        self._before.clear()
        self._held.clear()

    def commit(self) -> None:
        """Keep the writes: add each held tensor's new gradient into it; forget the copies."""
        if not self._held:
            self._before.clear()
            return
        with torch.no_grad():
            for tensor, old in self._held.values():
                new = tensor.grad
                if new is not None:
                    old.add_(new)
                tensor.grad = old
        self._before.clear()
        self._held.clear()


def _holdable(tensor: Tensor, grad: Tensor) -> bool:
    """Whether ``tensor``'s gradient can be held aside during a backward: a dense gradient
    outside autograd, and no post-accumulate hook on the tensor (it would see the new gradient
    alone instead of the sum)."""
    return (
        grad.layout == torch.strided
        and grad.is_floating_point()
        and not grad.requires_grad
        and not getattr(tensor, "_post_accumulate_grad_hooks", None)
    )
