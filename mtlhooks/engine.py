"""The gradient engine: per-task gradients in one space, synchronised across processes, and the
write-back into ``.grad``. Knows nothing of plugins; :class:`mtlhooks.MTL` drives it.

Spaces and what each costs (T tasks):

- ``features``: T vector-Jacobian products from the losses to z (through the heads only), then
  one backward of ``Σ cᵢLᵢ`` (which DDP synchronises as usual).
- ``last_shared``: T products from the losses to the last shared layer, then one backward.
- ``params``: T products to every parameter; ``.grad`` is written from them directly, with no
  further backward. Task-specific leaves are found by walking the autograd graph.

Across processes (a :class:`mtlhooks.distributed.Communicator` with more than one process):
``features`` sums the per-rank Gramians (exact: the ranks' samples are disjoint coordinates of
z); ``last_shared`` and ``params`` (``sync: exact``) average the per-task gradients themselves,
so every rank aggregates the gradients of the global batch; ``params`` with ``sync: gramian``
averages only the per-rank Gramians and leaves the weighted backward to DDP (approximate).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mtlhooks import layerwise
from mtlhooks.distributed import Communicator
from mtlhooks.errors import InputError, PluginError
from mtlhooks.plugin import Space
from mtlhooks.step import TaskGradients

NamedParameters = Sequence[tuple[str, Tensor]]


def graph_leaves(root: Tensor, exclude: set[int]) -> list[Tensor]:
    """Leaf tensors that ``root.backward()`` would accumulate into, except those in ``exclude``
    (by ``id``), in a deterministic order (depth-first from ``root``)."""
    leaves: list[Tensor] = []
    seen: set[int] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in exclude:
                leaves.append(variable)
            continue
        stack.extend(next_node for next_node, _ in reversed(node.next_functions))
    return leaves


def task_leaves(roots: Sequence[Tensor], exclude: set[int]) -> list[list[Tensor]]:
    """For each root, the leaves ``graph_leaves(root, exclude)`` finds (as a set), from one
    walk of the union of their graphs: each node's leaves are gathered once and shared by
    every root above it, so T losses over one trunk cost one walk of the trunk, not T."""
    below: dict[int, tuple[Tensor, ...]] = {}
    for root in roots:
        stack: list[tuple[object, bool]] = [(root.grad_fn, False)]
        while stack:
            node, expanded = stack.pop()
            if node is None or id(node) in below:
                continue
            variable = getattr(node, "variable", None)
            if variable is not None:
                below[id(node)] = () if id(variable) in exclude else (variable,)
                continue
            children = [child for child, _ in node.next_functions if child is not None]  # type: ignore[attr-defined]
            if not expanded:
                # A DAG: the node's children are all done before it is popped expanded.
                stack.append((node, True))
                stack.extend((child, False) for child in reversed(children))
                continue
            found: dict[int, Tensor] = {}
            for child in children:
                for leaf in below[id(child)]:
                    found.setdefault(id(leaf), leaf)
            below[id(node)] = tuple(found.values())
    return [[] if root.grad_fn is None else list(below[id(root.grad_fn)]) for root in roots]


def accumulate(parameter: Tensor, gradient: Tensor, *, owned: bool = False) -> None:
    """Add ``gradient`` into ``parameter.grad`` as ``Tensor.backward`` would. ``owned``: the
    caller hands over a tensor it just computed and keeps no other reference to, so that it
    can become ``.grad`` itself (as autograd steals a fresh gradient) instead of a copy."""
    gradient = gradient.detach().reshape(parameter.shape)
    if parameter.grad is None:
        gradient = gradient.to(parameter.dtype)
        if owned and gradient.is_contiguous():
            parameter.grad = gradient
        else:
            parameter.grad = gradient.clone(memory_format=torch.contiguous_format)
    else:
        parameter.grad.add_(gradient.to(parameter.grad.dtype))


def _flat_all_reduce(comm: Communicator, tensors: Sequence[Tensor], op: str) -> list[Tensor]:
    """All-reduce several tensors in one collective (one flat buffer)."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors])
    flat = comm.all_reduce(flat, op)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


@dataclass
class PerTask:
    """One call's (or one accumulation window's) per-task gradients, before aggregation."""

    names: list[str]
    blocks: list[Tensor]
    """T×n per block of the space (scaled by the loss scale, if any)."""
    extras: list[dict[int, Tensor]] = field(default_factory=list)
    """Space ``params``: each task's gradients of its task-specific leaves, by ``id``."""
    gramians: list[Tensor] = field(default_factory=list)
    """Layerwise mode: Gramians of the first ``len(gramians)`` names, whose per-task gradients
    were never formed; ``blocks`` then hold the remaining names only."""

    @property
    def materialized(self) -> bool:
        """Whether ``blocks`` hold every column of J."""
        return not self.gramians

    def add(self, other: PerTask) -> None:
        for mine, theirs in zip(self.blocks, other.blocks):
            mine.add_(theirs)
        for mine_extra, their_extra in zip(self.extras, other.extras):
            for key, grad in their_extra.items():
                if key in mine_extra:
                    mine_extra[key].add_(grad)
                else:
                    mine_extra[key] = grad


@dataclass(frozen=True)
class GramianChoice:
    """How one call takes the Gramian of the per-task gradients."""

    mode: str
    """``"layerwise"`` (J is never formed for the tapped linear layers) or ``"materialize"``."""
    reason: str


class GradientEngine:
    """Computes, synchronises and writes per-task gradients for one :class:`mtlhooks.MTL`."""

    def __init__(
        self,
        space: Space,
        *,
        shared: NamedParameters,
        last_shared: NamedParameters,
        communicator: Communicator | None,
        exact_params: bool,
        layerwise_mode: str = "materialize",
        module: nn.Module | None = None,
        backward_fn: Callable[[Tensor], None] | None = None,
    ) -> None:
        self.space = space
        self.backward_fn = backward_fn
        self.named = list(shared if space is Space.PARAMS else last_shared)
        self.shared = list(shared)
        self.comm = (
            communicator if communicator is not None and communicator.world_size > 1 else None
        )
        self.exact_params = exact_params
        self._leaves: dict[int, Tensor] = {}
        self.layerwise_mode = layerwise_mode
        self.taps: layerwise.LayerTaps | None = None
        self._module_missing = module is None
        self.last_gramian_choice: GramianChoice | None = None
        """How the last :meth:`compute` took the Gramian and why (read-only, for reports)."""
        # The module holding the space's parameters (space params: shared; last_shared: the last
        # shared layer): its nn.Linear layers can give their Gramians without J.
        if space in (Space.PARAMS, Space.LAST_SHARED) and layerwise_mode != "materialize":
            names = {id(p): name for name, p in self.named}
            self.taps = layerwise.LayerTaps(module, names) if module is not None else None
        if self.taps is not None:
            covered = self.taps.covered()
            self._untapped = [(name, p) for name, p in self.named if id(p) not in covered]
            if not self.taps.layers:
                self.taps.remove()
                self.taps = None

    def gramian_choice(self, accumulating: bool) -> GramianChoice:
        """How this call would take the Gramian, and why (decided from the recorded shapes)."""
        if self.space not in (Space.PARAMS, Space.LAST_SHARED):
            return GramianChoice("materialize", f"space {self.space.value!r} has one block")
        if self.taps is None:
            if self.layerwise_mode == "materialize":
                why = "params_gramian is 'materialize' (configured, or a plugin reads J)"
            elif self._module_missing:
                why = "the space's parameters were given as tensors, not a module"
            else:
                why = "no nn.Linear layer holds the space's parameters"
            return GramianChoice("materialize", why)
        if accumulating:
            return GramianChoice("materialize", "gradient accumulation sums J over micro-steps")
        if not all(layer.records for layer in self.taps.layers):
            # The forward ran before the hooks existed (or skipped a layer): materialise.
            return GramianChoice(
                "materialize", "a tapped nn.Linear recorded no forward call in this step"
            )
        if self.layerwise_mode == "layerwise":
            return GramianChoice("layerwise", "params_gramian is 'layerwise'")
        # auto: the cheaper in memory, and exact across processes only when materialised.
        if self.comm is not None and (self.exact_params or self.space is Space.LAST_SHARED):
            return GramianChoice("materialize", "exact synchronisation across processes needs J")
        total = sum(p.numel() for _, p in self.named)
        untapped = sum(p.numel() for _, p in self._untapped)
        share = 100.0 * (total - untapped) / total
        if untapped > 0.01 * total:
            # Convolutions and other untapped layers would pay for their weight gradients in
            # the T passes *and* in the final backward: materialising is faster there.
            return GramianChoice(
                "materialize", f"nn.Linear layers hold {share:.1f}% of the parameters (≤ 99%)"
            )
        rows = self.taps.pending_rows()
        if rows + untapped >= total:
            return GramianChoice(
                "materialize",
                f"the linear layers' rows × outputs ({rows}) are not fewer than their "
                f"parameters ({total - untapped})",
            )
        return GramianChoice(
            "layerwise",
            f"nn.Linear layers hold {share:.1f}% of the parameters and their rows × outputs "
            f"({rows}) are fewer than their parameters ({total - untapped})",
        )

    def use_layerwise(self, accumulating: bool) -> bool:
        """Whether this call takes the layerwise Gramian (see :meth:`gramian_choice`)."""
        return self.gramian_choice(accumulating).mode == "layerwise"

    @property
    def writes_directly(self) -> bool:
        """Whether ``.grad`` is written from materialised per-task gradients (no final
        backward) when the call materialises them."""
        return self.space is Space.PARAMS and self.exact_params

    # -- per-task gradients ------------------------------------------------------------------

    def compute(
        self,
        losses: Sequence[Tensor],
        features: Tensor | None,
        scale: Tensor | None,
        *,
        accumulating: bool = False,
    ) -> PerTask:
        """This process's per-task gradients of the unweighted losses (times ``scale``)."""
        count = len(losses)
        self.last_gramian_choice = self.gramian_choice(accumulating)
        if self.last_gramian_choice.mode == "layerwise":
            assert self.taps is not None
            seeds = [_seed(loss, scale) for loss in losses]
            names, gramians, blocks = layerwise.collect(self.taps, losses, self._untapped, seeds)
            return PerTask(names, blocks, gramians=gramians)
        if self.taps is not None:
            self.taps.clear()
        if self.space is Space.FEATURES:
            assert features is not None
            found = [
                torch.autograd.grad(
                    loss,
                    features,
                    grad_outputs=_seed(loss, scale),
                    retain_graph=True,
                    allow_unused=True,
                )[0]
                for loss in losses
            ]
            if all(g is None for g in found):
                raise InputError("features= is not in the graph of any loss: pass the trunk output")
            rows = [torch.zeros_like(features) if g is None else g for g in found]
            return PerTask(["features"], [torch.stack(rows).reshape(count, -1)])

        params = [p for _, p in self.named]
        shared_ids = {id(p) for p in params}
        direct = self.writes_directly
        # Each task's gradients go straight into preallocated T×n blocks and are dropped, so
        # the peak holds J once (not J plus T gradient lists).
        blocks = [p.new_empty((count, p.numel())) for p in params]
        reached = [False] * len(params)
        extras: list[dict[int, Tensor]] = []
        task_specific = task_leaves(losses, shared_ids) if direct else [[] for _ in losses]
        for i, loss in enumerate(losses):
            leaves = task_specific[i]
            grads: Sequence[Tensor | None] = torch.autograd.grad(
                loss,
                params + leaves,
                grad_outputs=_seed(loss, scale),
                retain_graph=not direct or i < count - 1,
                allow_unused=True,
            )
            for j, grad in enumerate(grads[: len(params)]):
                if grad is None:
                    blocks[j][i].zero_()
                else:
                    blocks[j][i].copy_(grad.reshape(-1))
                    reached[j] = True
            extras.append(
                {id(leaf): g for leaf, g in zip(leaves, grads[len(params) :]) if g is not None}
            )
            self._leaves.update((id(leaf), leaf) for leaf in leaves)
            del grads
        for (name, _), hit in zip(self.named, reached):
            if not hit:
                raise InputError(
                    f"shared parameter {name!r} receives no gradient from any task: remove it "
                    "from shared= (or set requires_grad=False), or check the forward pass"
                )
        return PerTask([name for name, _ in self.named], blocks, extras)

    def gradients(self, per_task: PerTask, scale: Tensor | None) -> TaskGradients:
        """Synchronise across processes and build the Gramians (unscaled by ``scale``²)."""
        blocks = per_task.blocks
        exact = self.space is Space.LAST_SHARED or (
            self.space is Space.PARAMS and self.exact_params and per_task.materialized
        )
        if self.comm is not None and exact:
            blocks = _flat_all_reduce(self.comm, blocks, "mean")
            per_task.blocks = blocks
        if per_task.materialized:
            gradients = TaskGradients.from_blocks(self.space, per_task.names, blocks)
        else:
            partial = TaskGradients.from_blocks(self.space, [], blocks) if blocks else None
            parts = per_task.gramians + (list(partial.block_gramians) if partial else [])
            total = torch.stack(parts).sum(0)
            gradients = TaskGradients(self.space, per_task.names, [], parts, total)
        parts = list(gradients.block_gramians)
        changed = False
        if self.comm is not None and self.space is Space.FEATURES:
            # Disjoint samples: the global Gramian is Σ_r G_r / R² for a loss averaged over ranks.
            world = self.comm.world_size
            parts = [p / world**2 for p in _flat_all_reduce(self.comm, parts, "sum")]
            changed = True
        elif self.comm is not None and self.space is Space.PARAMS and not exact:
            parts = _flat_all_reduce(self.comm, parts, "mean")
            changed = True
        if scale is not None:
            parts = [p / (scale * scale).to(p.dtype) for p in parts]
            changed = True
        if not changed:
            return gradients
        total = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
        return TaskGradients(self.space, gradients.names, blocks, parts, total)

    # -- writing ----------------------------------------------------------------------------------

    def weighted_backward(
        self, losses: Sequence[Tensor], weights: Tensor | None, scale: Tensor | None
    ) -> None:
        """One backward of ``Σ wᵢLᵢ`` (``Σ Lᵢ`` when ``weights`` is None), times ``scale``."""
        if weights is None:
            total = losses[0] if len(losses) == 1 else torch.stack(list(losses)).sum()
        else:
            total = (torch.stack(list(losses)) * weights.to(losses[0].dtype)).sum()
        if scale is not None:
            total = total * scale.to(total.dtype)
        if self.writes_directly and self.comm is not None:
            # The forward ran under DDP's no_sync (needs_no_sync), so DDP does not average this
            # backward: average its gradients here, as DDP would have.
            shared = [p for _, p in self.shared]
            leaves = shared + graph_leaves(total, {id(p) for p in shared})
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
            found = [(leaf, g) for leaf, g in zip(leaves, grads) if g is not None]
            averaged = _flat_all_reduce(self.comm, [g for _, g in found], "mean")
            for (leaf, _), grad in zip(found, averaged):
                accumulate(leaf, grad)
            return
        if self.backward_fn is None:
            total.backward()
        else:
            self.backward_fn(total)

    def write_weighted(
        self,
        losses: Sequence[Tensor],
        per_task: PerTask,
        coefficients: Tensor,
        scale: Tensor | None,
    ) -> None:
        """``.grad += Σ cᵢ ∇Lᵢ`` on every parameter."""
        if not (self.writes_directly and per_task.materialized):
            # The gradient of Σ cᵢLᵢ is Σ cᵢ∇Lᵢ everywhere (chain rule): one backward writes
            # shared and task-specific parameters alike.
            self.weighted_backward(losses, coefficients, scale)
            return
        for (_, p), block in zip(self.shared, per_task.blocks):
            accumulate(p, coefficients.to(block.dtype) @ block, owned=True)
        self._write_task_specific(per_task, coefficients)

    def write_combined(
        self,
        losses: Sequence[Tensor],
        per_task: PerTask,
        features: Tensor | None,
        combined: Tensor,
        weights: Tensor,
        scale: Tensor | None,
    ) -> None:
        """Shared part: ``combined`` (a coordinate-wise aggregation); the rest: ``Σ wᵢ∇Lᵢ``."""
        width = sum(block.shape[1] for block in per_task.blocks)
        if combined.shape != (width,):
            raise PluginError(
                f"combined gradient has shape {tuple(combined.shape)}, expected ({width},)"
            )
        if self.space is Space.FEATURES:
            assert features is not None
            # Already in the units of the (scaled) per-task gradients it was combined from.
            replacement = combined.reshape(features.shape).to(features.dtype)
            handle = features.register_hook(lambda _grad: replacement)
            try:
                self.weighted_backward(losses, weights, scale)
            finally:
                handle.remove()
            return
        if self.writes_directly and per_task.materialized:
            offset = 0
            for (_, p), block in zip(self.shared, per_task.blocks):
                size = block.shape[1]
                accumulate(p, combined[offset : offset + size])
                offset += size
            self._write_task_specific(per_task, weights)
            return
        raise PluginError(
            "coordinate-wise aggregation is defined in spaces 'features' and 'params' "
            f"(sync: exact), not {self.space.value!r}"
        )

    def _write_task_specific(self, per_task: PerTask, coefficients: Tensor) -> None:
        totals: dict[int, Tensor] = {}
        for c, grads in zip(coefficients, per_task.extras):
            for key, grad in grads.items():
                term = grad * c.to(grad.dtype)
                totals[key] = term if key not in totals else totals[key] + term
        keys = list(totals)
        values = [totals[k] for k in keys]
        if self.comm is not None:
            # Same graph on every rank, so the same leaves in the same order.
            values = _flat_all_reduce(self.comm, values, "mean")
        for key, value in zip(keys, values):
            # Each value is a fresh product (or sum) made above; across processes, a view of
            # the all-reduced buffer, which is copied.
            accumulate(self._leaves[key], value, owned=self.comm is None)
        self._leaves.clear()

    def close(self) -> None:
        """Remove the forward hooks of the layerwise Gramian."""
        if self.taps is not None:
            self.taps.remove()
            self.taps = None

    def discard(self) -> None:
        """Forget the leaves and layer records of a call whose gradients are not written."""
        self._leaves.clear()
        if self.taps is not None:
            self.taps.clear()


def _seed(loss: Tensor, scale: Tensor | None) -> Tensor | None:
    return None if scale is None else scale.to(loss.dtype).expand_as(loss)
