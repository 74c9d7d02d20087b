"""What an aggregation method is: a function Gramian → weights and the properties it claims.

Every Gramian-based aggregator is, first, a plain function of the T×T Gramian ``G = J Jᵀ`` of
the task gradients ``gᵢ`` (rows of J) to weights ``α``, the update being ``d = Σᵢ αᵢ gᵢ = Jᵀα``.
Its plugin class declares it in a :class:`MethodSpec` (``method = MethodSpec(...)``, next to the
function, in the method's one file): that declaration drives the property tests, the generated
table ``docs/aggregator-properties.md`` and :data:`mtlhooks.functional.METHODS`.

Conventions every method function follows (and the tests check):

- it is pure (random methods take a :class:`torch.Generator`; stateful ones take their state
  after G and return ``(weights, new_state)``), runs on the device and in the dtype of ``G``,
  and never needs the T×P matrix J (except coordinate-wise methods, ``input="gradients"``);
- it returns finite weights for every finite Gramian, or raises
  :class:`~mtlhooks.errors.SolverError` exactly where the method is undefined (declared in
  ``may_raise``); a non-finite Gramian yields non-finite weights (so a GradScaler skips the
  step), never an error;
- a Gramian with slightly negative eigenvalues (one computed in float32, ~1e-7 relative) is
  treated as the positive semi-definite matrix it stands for.

This module also holds the small helpers those functions share: input checks, NaN propagation,
the seeded uniform draws, and the trivial weightings :func:`mean` and :func:`sum`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from mtlhooks.errors import InputError

__all__ = [
    "IfUndefined",
    "MethodSpec",
    "Property",
    "Variant",
    "check_gramian",
    "is_finite",
    "mean",
    "nan_weights",
    "sum",
    "uniform_draws",
]


IfUndefined = Literal["raise", "mgda"]
"""What a method does where its weights are undefined (Nash-MTL and FairGrad without a
solution, IMTL-G whose weights cannot sum to 1 with positive projections): ``raise`` a
:class:`~mtlhooks.errors.SolverError`, or use ``mgda``'s min-norm weights (whose update is ~0
at a Pareto-stationary point, where these rules break down). The functional API raises by
default, the plugins fall back by default and say so in ``report.notes``."""


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
class Variant:
    """Properties a method has with other options than its defaults (e.g. CAGrad with c ≥ 1).

    :param label: the condition, as the documentation table shows it (``"c ≥ 1"``).
    :param options: keyword arguments of the function; the property tests check every one.
    :param properties: what the method claims under these options.
    """

    label: str
    options: tuple[Mapping[str, object], ...]
    properties: frozenset[Property]


@dataclass(frozen=True)
class MethodSpec:
    """Declaration of one aggregation method.

    :param function: the functional implementation (first argument: the Gramian, or the
        (T, ...) gradients when ``input="gradients"``).
    :param paper: short citation.
    :param properties: properties claimed (and property-tested) with the default options.
    :param random: whether the method draws from a ``generator`` argument.
    :param input: ``"gramian"`` (returns weights) or ``"gradients"`` (returns a combined gradient).
    :param scale_exponent: if set, ``weights(cG) = c**scale_exponent · weights(G)`` (a scale law
        other than invariance; invariance is the exponent 0 and is declared as a property).
    :param may_raise: when the method raises :class:`~mtlhooks.errors.SolverError` (empty:
        never, on any finite input).
    :param stateful: the function takes the state after G and returns ``(weights, new_state)``;
        ``initial_state(G)`` gives the state of a fresh plugin.
    :param min_tasks: the fewest tasks the method is defined for (Krum needs a majority).
    :param options: keyword arguments the property tests call ``function`` with (the plugin's
        defaults when the function's own defaults differ, or options a method needs).
    :param variants: properties under other options (:class:`Variant`), tested as well.
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
    initial_state: Callable[[Tensor], object] | None = None
    min_tasks: int = 1
    options: Mapping[str, object] = field(default_factory=dict)
    variants: tuple[Variant, ...] = ()
    notes: str = ""


def check_gramian(gramian: Tensor) -> None:
    """Refuse anything but a square (T, T) matrix with T ≥ 1."""
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise InputError(
            f"expected a square (T, T) Gramian with T ≥ 1, got shape {tuple(gramian.shape)}"
        )


def nan_weights(gramian: Tensor) -> Tensor:
    """One NaN weight per task: the answer to a non-finite Gramian."""
    return torch.full(gramian.shape[:1], float("nan"), dtype=gramian.dtype, device=gramian.device)


def is_finite(gramian: Tensor) -> bool:
    """Whether every entry is finite (one host synchronisation)."""
    # x·0 is NaN exactly for non-finite x; three cheap kernels instead of isfinite's six
    return bool((gramian * 0 == 0).all())


def uniform_draws(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """U(0, 1) float32 draws from ``generator`` on the generator's own device (the pipeline's is
    on the CPU, so draws do not depend on where the tensors live or on their dtype), moved to
    ``device``."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def mean(gramian: Tensor) -> Tensor:
    """Equal weights ``1/T``: the update is the mean gradient."""
    check_gramian(gramian)
    num_tasks = gramian.shape[0]
    return torch.full((num_tasks,), 1.0 / num_tasks, dtype=gramian.dtype, device=gramian.device)


def sum(gramian: Tensor) -> Tensor:
    """Unit weights: the update is the sum of the gradients (a plain ``Σ Lᵢ`` backward)."""
    check_gramian(gramian)
    return torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)


_P = Property
_TRIVIAL = frozenset({_P.SCALE_INVARIANT, _P.PERMUTATION_EQUIVARIANT, _P.NONNEGATIVE})

TRIVIAL_METHODS: dict[str, MethodSpec] = {
    "mean": MethodSpec(mean, "—", _TRIVIAL),
    "sum": MethodSpec(sum, "—", _TRIVIAL),
}
"""The weightings without a plugin of their own (``static`` gives the sum)."""
