"""The read-only record of one ``backward()`` call, handed to observers and kept as
``mtl.last_report``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import Tensor

from mtlhooks.plugin import Space
from mtlhooks.stats import norms


@dataclass(frozen=True, repr=False)
class StepReport:
    """What happened in one ``backward()`` call. Tensors are detached copies owned by the report.

    - ``losses``: loss values, shape ``(T,)``.
    - ``loss_weights``: the weights after loss scaling (before norm balancing).
    - ``weights``: the effective multiplier of each unweighted task gradient in the written
      update, ``α_i · weights[i]``; ``None`` for a coordinate-wise aggregator or a skipped step.
    - ``gramian``: Gramian of the unweighted task gradients ``∇L_i`` (``None`` in space ``none``).
    - ``block_gramians``: the Gramian of each block of the space (each shared parameter by name,
      or ``"features"``); they sum to ``gramian``. Per-layer statistics come from these.
    - ``timings``: seconds per stage, host wall-clock (on CUDA, launch time, not kernel time).
    """

    index: int
    tasks: tuple[str, ...]
    space: Space
    losses: Tensor
    loss_weights: Tensor | None
    weights: Tensor | None
    gramian: Tensor | None
    block_gramians: Mapping[str, Tensor] = field(default_factory=lambda: MappingProxyType({}))
    accumulating: bool = False
    """A micro-step of gradient accumulation whose gradients wait for the ``sync=True`` call."""
    skipped: bool = False
    reason: str | None = None
    notes: tuple[str, ...] = ()
    """Remarks of plugins on this call (:meth:`mtlhooks.Step.note`): e.g. a method that met a
    Pareto-stationary point and returned its documented update there."""
    timings: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def grad_norms(self) -> Tensor | None:
        """Norms of the unweighted task gradients (from the Gramian's diagonal)."""
        if self.gramian is None:
            return None
        return norms(self.gramian)

    def summary(self, *, width: int = 100, max_tasks: int = 8) -> str:
        """A few lines for a human: step, space, state, then losses, weights and gradient norms
        of at most ``max_tasks`` tasks, the notes and the timings; no line is longer than
        ``width``. The Gramians themselves are left to :attr:`gramian` and
        :attr:`block_gramians`. Synchronises with the device."""
        state = "skipped: " + (self.reason or "") if self.skipped else "written"
        if self.accumulating:
            state = "accumulating (gradients wait for the sync=True call)"
        lines = [
            f"StepReport(step {self.index}, space {self.space.value}, {len(self.tasks)} tasks, "
            f"{state})"
        ]
        rows = [("losses", self.losses), ("loss weights", self.loss_weights)]
        rows += [("weights", self.weights), ("|grad|", self.grad_norms())]
        for label, values in rows:
            if values is not None:
                cells = [f"{t}={v:.4g}" for t, v in zip(self.tasks, values.detach().cpu().tolist())]
                lines.append(_fitted(f"  {label:<13}", cells[:max_tasks], len(cells), width))
        if self.gramian is not None:
            blocks = f", {len(self.block_gramians)} blocks" if self.block_gramians else ""
            lines.append(
                f"  gramian       {self.gramian.shape[0]}×{self.gramian.shape[1]} "
                f"{str(self.gramian.dtype).removeprefix('torch.')}{blocks} "
                "(.gramian, .block_gramians)"
            )
        lines += [f"  note          {note}" for note in self.notes]
        if self.timings:
            timings = dict(self.timings)
            total = timings.pop("total", sum(timings.values()))
            cells = [f"{name} {seconds * 1e3:.2f}" for name, seconds in timings.items()]
            lines.append(
                _fitted(f"  time [ms]     total {total * 1e3:.2f}:", cells, len(cells), width)
            )
        return "\n".join(line if len(line) <= width else line[: width - 1] + "…" for line in lines)

    def __repr__(self) -> str:
        return self.summary()

    def as_dict(self) -> dict[str, object]:
        """Plain Python values (floats and lists), e.g. for JSON. Synchronises with the device."""

        def to_list(t: Tensor | None) -> object:
            return None if t is None else t.detach().cpu().tolist()

        return {
            "step": self.index,
            "tasks": list(self.tasks),
            "space": self.space.value,
            "skipped": self.skipped,
            "reason": self.reason,
            "notes": list(self.notes),
            "losses": to_list(self.losses),
            "loss_weights": to_list(self.loss_weights),
            "weights": to_list(self.weights),
            "gramian": to_list(self.gramian),
            "timings": dict(self.timings),
        }


def _fitted(prefix: str, cells: list[str], count: int, width: int) -> str:
    """``prefix`` and as many ``cells`` as fit in ``width``, then how many of ``count`` were
    left out."""
    line = prefix
    for shown, cell in enumerate(cells):
        rest = count - shown - 1
        suffix = f" … (+{rest})" if rest else ""
        if len(line) + 1 + len(cell) + len(suffix) > width and shown:
            return f"{line} … (+{count - shown})"
        line += " " + cell
    return line if len(cells) == count else f"{line} … (+{count - len(cells)})"
