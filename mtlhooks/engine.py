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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from mtlhooks import layerwise
from mtlhooks.distributed import Communicator
from mtlhooks.errors import ConfigError, InputError, PluginError
from mtlhooks.graph import graph_leaves, task_leaves, unreached
from mtlhooks.plugin import Space
from mtlhooks.step import TaskGradients
from mtlhooks.transaction import GradWrites

NamedParameters = Sequence[tuple[str, Tensor]]


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


def _flat_all_reduce(
    comm: Communicator, tensors: Sequence[Tensor], op: str, dtype: torch.dtype | None = None
) -> list[Tensor]:
    """All-reduce several tensors in one collective (one flat buffer, in ``dtype`` if given:
    then every rank sends the same layout whatever the tensors' dtypes)."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).to(dtype) if dtype else t.reshape(-1) for t in tensors])
    flat = comm.all_reduce(flat, op)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t).to(t.dtype))
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

    def scale_(self, factor: Tensor) -> None:
        """Multiply every gradient by ``factor`` (a scalar), in place."""
        for block in self.blocks:
            block.mul_(factor.to(block.dtype))
        for extra in self.extras:
            for key, grad in extra.items():
                extra[key] = grad * factor.to(grad.dtype)
        self.gramians = [g * (factor * factor).to(g.dtype) for g in self.gramians]

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
        model: nn.Module | None = None,
        num_tasks: int = 0,
    ) -> None:
        self.space = space
        self.backward_fn = backward_fn
        self.num_tasks = num_tasks
        self.named = list(shared if space is Space.PARAMS else last_shared)
        self.shared = list(shared)
        self.comm = (
            communicator if communicator is not None and communicator.world_size > 1 else None
        )
        self.exact_params = exact_params
        self._leaves: dict[int, Tensor] = {}
        shared_ids = {id(p) for _, p in self.shared}
        self.task_parameters: list[Tensor] | None = None
        """With ``model=``: its parameters outside shared=, the order the ranks reduce the
        task-specific gradients in (by name, so ranks may reach different ones)."""
        if model is not None:
            self.task_parameters = [
                p for p in model.parameters() if p.requires_grad and id(p) not in shared_ids
            ]
        if (
            self.comm is not None
            and layerwise_mode == "layerwise"
            and (space is Space.LAST_SHARED or (space is Space.PARAMS and exact_params))
        ):
            raise ConfigError(
                "params_gramian: layerwise is not exact under data parallelism: the Gramian of "
                "the gradients averaged over ranks has cross-rank terms that per-rank layer "
                "Gramians do not hold. Use params_gramian: auto (it materialises across "
                "processes) or materialize; or sync: gramian for the documented approximation"
            )
        self.layerwise_mode = layerwise_mode
        self.layerwise_off: str | None = None
        """Why ``auto`` stopped taking the layerwise Gramian, if it did."""
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

    def _layerwise_unusable(self) -> None:
        """The recorded layer calls are not those of the losses' graph (a torch.compile'd
        trunk): materialise from now on, or refuse when ``layerwise`` was asked for."""
        assert self.taps is not None
        if self.layerwise_mode == "layerwise":
            raise InputError(
                "params_gramian: layerwise cannot see the shared linear layers' calls in these "
                "losses' graph (a torch.compile'd trunk runs its layers inside one compiled "
                "graph): use params_gramian: materialize (or auto, which falls back to it)"
            )
        self.taps.remove()
        self.taps = None
        self.layerwise_off = "the shared layers' calls are not visible in the losses' graph"

    @property
    def writes_directly(self) -> bool:
        """Whether ``.grad`` is written from materialised per-task gradients (no final
        backward) when the call materialises them."""
        return self.space is Space.PARAMS and self.exact_params

    @property
    def needs_no_sync(self) -> bool:
        """Whether DDP must not synchronise the backward passes (see ``MTL.needs_no_sync``)."""
        return self.writes_directly

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded (FSDP2, :mod:`mtlhooks.fsdp`): taking the per-task
        gradients then makes collectives, and each rank writes other shards."""
        return False

    # -- per-task gradients ------------------------------------------------------------------

    def check_graph(self, losses: Sequence[Tensor]) -> None:
        """Checks of the losses' graph that a sharded engine makes before the call's first
        collective (:meth:`mtlhooks.fsdp.ShardedEngine.check_graph`); none here, where taking
        the per-task gradients makes no collective."""

    def compute(
        self,
        losses: Sequence[Tensor],
        features: Tensor | None,
        scale: Tensor | None,
        *,
        accumulating: bool = False,
        writes: GradWrites | None = None,
    ) -> PerTask:
        """This process's per-task gradients of the unweighted losses (times ``scale``).
        ``writes`` records the ``.grad`` an engine changes while taking them (none here)."""
        count = len(losses)
        self.last_gramian_choice = self.gramian_choice(accumulating)
        if self.last_gramian_choice.mode == "layerwise":
            assert self.taps is not None
            seeds = [_seed(loss, scale) for loss in losses]
            collected = layerwise.collect(self.taps, losses, self._untapped, seeds)
            if collected is not None:
                names, gramians, layer_blocks = collected
                return PerTask(names, layer_blocks, gramians=gramians)
            self._layerwise_unusable()
        if self.taps is not None:
            self.taps.clear()
        if self.space is Space.FEATURES:
            assert features is not None
            target = features_target(features)
            found = [
                torch.autograd.grad(
                    loss,
                    target,
                    grad_outputs=_seed(loss, scale),
                    retain_graph=True,
                    allow_unused=True,
                )[0]
                for loss in losses
            ]
            if all(g is None for g in found):
                raise _features_not_in_graph(features)
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
                raise unreached(name, losses)
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
            reduced = _flat_all_reduce(self.comm, parts, "sum", torch.float64)
            parts = [p / world**2 for p in reduced]
            changed = True
        elif self.comm is not None and self.space is Space.PARAMS and not exact:
            parts = _flat_all_reduce(self.comm, parts, "mean", torch.float64)
            changed = True
        if scale is not None:
            parts = [p / (scale * scale).to(p.dtype) for p in parts]
            changed = True
        if not changed:
            return gradients
        total = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
        return TaskGradients(self.space, gradients.names, blocks, parts, total)

    def join_gradient_sync(self, count: int) -> None:
        """The collective :meth:`gradients` makes, with zeros: a rank that failed before it
        joins it (then raises), so the other ranks reach the status check instead of waiting
        (:mod:`mtlhooks.ranks`)."""
        if self.comm is None:
            return
        if self.space is Space.FEATURES:
            self.comm.all_reduce(torch.zeros(count * count, dtype=torch.float64), "sum")
        elif self.space is Space.LAST_SHARED or self.exact_params:
            dtype = self.named[0][1].dtype
            for _, p in self.named[1:]:
                dtype = torch.promote_types(dtype, p.dtype)
            size = count * sum(p.numel() for _, p in self.named)
            self.comm.all_reduce(torch.zeros(size, dtype=dtype), "mean")
        else:
            size = len(self.named) * count * count
            self.comm.all_reduce(torch.zeros(size, dtype=torch.float64), "mean")

    @property
    def task_parameter_ids(self) -> set[int] | None:
        return None if self.task_parameters is None else {id(p) for p in self.task_parameters}

    # -- writing ----------------------------------------------------------------------------------
    #
    # Every write goes through a GradWrites record, so that the pipeline can put every .grad back
    # as it was when the call fails or is skipped after writing (see mtlhooks.transaction).

    def weighted_backward(
        self,
        losses: Sequence[Tensor],
        weights: Tensor | None,
        scale: Tensor | None,
        *,
        auxiliary: Sequence[Tensor] = (),
        writes: GradWrites,
        hold: bool = False,
    ) -> None:
        """One backward of ``Σ wᵢLᵢ`` (``Σ Lᵢ`` when ``weights`` is None) plus the plugins'
        auxiliary objectives, times ``scale``. ``hold``: existing gradients are held aside
        and added at commit instead of copied (:class:`GradWrites`); for a caller whose one
        backward accumulates into each leaf once (no ``backward_fn``, no data parallelism).

        The auxiliary objectives (of plugin parameters only) ride along in the same backward, so
        under a loss scale their gradients are scaled like the model's and a GradScaler unscales
        them correctly when they are in its optimizer."""
        total = self._weighted_total(losses, weights, scale, auxiliary)
        if self.writes_directly and self.comm is not None:
            # The forward ran under DDP's no_sync (needs_no_sync), so DDP does not average this
            # backward: average its gradients here, as DDP would have.
            shared = [p for _, p in self.shared]
            leaves = shared + graph_leaves(total, {id(p) for p in shared})
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
            found = [(leaf, g) for leaf, g in zip(leaves, grads) if g is not None]
            averaged = _flat_all_reduce(self.comm, [g for _, g in found], "mean")
            for (leaf, _), grad in zip(found, averaged):
                writes.record([leaf])
                accumulate(leaf, grad)
            return
        self._backward(total, writes, hold=hold)

    @staticmethod
    def _weighted_total(
        losses: Sequence[Tensor],
        weights: Tensor | None,
        scale: Tensor | None,
        auxiliary: Sequence[Tensor],
    ) -> Tensor:
        """``Σ wᵢLᵢ`` (``Σ Lᵢ`` when ``weights`` is None) plus the auxiliary objectives, times
        ``scale``."""
        if weights is None:
            total = losses[0] if len(losses) == 1 else torch.stack(list(losses)).sum()
        else:
            total = (
                torch.stack(list(losses)) * weights.to(losses[0].device, losses[0].dtype)
            ).sum()
        if auxiliary:
            total = total + torch.stack(list(auxiliary)).sum().to(total.dtype)
        if scale is not None:
            total = total * scale.to(total.dtype)
        return total

    def _backward(self, total: Tensor, writes: GradWrites, *, hold: bool = False) -> None:
        """``total.backward()``, or through the framework's ``backward_fn``."""
        writes.record(graph_leaves(total, set()), hold=hold and self.backward_fn is None)
        if self.backward_fn is None:
            total.backward()
        else:
            self.backward_fn(total)

    def _auxiliary_backward(
        self, auxiliary: Sequence[Tensor], scale: Tensor | None, writes: GradWrites
    ) -> None:
        if not auxiliary:
            return
        total = torch.stack(list(auxiliary)).sum()
        if scale is not None:
            total = total * scale.to(total.dtype)
        writes.record(graph_leaves(total, set()))
        total.backward()

    def write_weighted(
        self,
        losses: Sequence[Tensor],
        per_task: PerTask,
        coefficients: Tensor,
        scale: Tensor | None,
        *,
        heads: Tensor | None = None,
        features: Tensor | None = None,
        auxiliary: Sequence[Tensor] = (),
        writes: GradWrites,
    ) -> None:
        """``.grad += Σ cᵢ ∇Lᵢ`` on the shared parameters and ``Σ hᵢ ∇Lᵢ`` on the task-specific
        ones (``h = c`` when ``heads`` is None), plus the auxiliary objectives' gradients."""
        if self.writes_directly and per_task.materialized:
            for (_, p), block in zip(self.shared, per_task.blocks):
                update = coefficients.to(block.device, block.dtype) @ block
                writes.record([p])
                accumulate(p, update, owned=True)
            self._write_task_specific(per_task, coefficients if heads is None else heads, writes)
            self._auxiliary_backward(auxiliary, scale, writes)
            return
        if heads is None:
            # The gradient of Σ cᵢLᵢ is Σ cᵢ∇Lᵢ everywhere (chain rule): one backward writes
            # shared and task-specific parameters alike.
            self.weighted_backward(losses, coefficients, scale, auxiliary=auxiliary, writes=writes)
            return
        self.split_backward(
            losses, per_task, coefficients, heads, features, scale, auxiliary, writes
        )

    def split_backward(
        self,
        losses: Sequence[Tensor],
        per_task: PerTask | None,
        coefficients: Tensor,
        heads: Tensor,
        features: Tensor | None,
        scale: Tensor | None,
        auxiliary: Sequence[Tensor],
        writes: GradWrites,
    ) -> None:
        """One backward of ``Σ hᵢLᵢ`` whose gradient at z is replaced by that of ``Σ cᵢLᵢ``:
        the heads (between z and the losses) receive ``Σ hᵢ∇Lᵢ`` and the trunk (below z)
        ``Σ cᵢ∇Lᵢ``. Still one backward through the trunk, so DDP synchronises it as usual."""
        if features is None:
            raise InputError(
                "task_specific other than 'aggregated' tells the heads from the trunk by z: "
                "pass features=z (the trunk's output) to backward()"
            )
        if self.space is Space.FEATURES and per_task is not None:
            # The per-task gradients at z are in hand (of the scaled losses, like the backward).
            (block,) = per_task.blocks
            trunk = (coefficients.to(block.device, block.dtype) @ block).reshape(features.shape)
        else:
            total = (torch.stack(list(losses)) * coefficients.to(losses[0].dtype)).sum()
            if scale is not None:
                total = total * scale.to(total.dtype)
            (trunk,) = torch.autograd.grad(total, features_target(features), retain_graph=True)
        with replaced_gradient(features, trunk.reshape(features.shape).to(features.dtype)):
            self.weighted_backward(losses, heads, scale, auxiliary=auxiliary, writes=writes)

    def write_combined(
        self,
        losses: Sequence[Tensor],
        per_task: PerTask,
        features: Tensor | None,
        combined: Tensor,
        weights: Tensor,
        scale: Tensor | None,
        *,
        auxiliary: Sequence[Tensor] = (),
        writes: GradWrites,
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
            replacement = combined.reshape(features.shape).to(features.device, features.dtype)
            with replaced_gradient(features, replacement):
                self.weighted_backward(losses, weights, scale, auxiliary=auxiliary, writes=writes)
            return
        if self.writes_directly and per_task.materialized:
            offset = 0
            for (_, p), block in zip(self.shared, per_task.blocks):
                size = block.shape[1]
                writes.record([p])
                accumulate(p, combined[offset : offset + size].to(block.device))
                offset += size
            self._write_task_specific(per_task, weights, writes)
            self._auxiliary_backward(auxiliary, scale, writes)
            return
        raise PluginError(
            "coordinate-wise aggregation is defined in spaces 'features' and 'params' "
            f"(sync: exact), not {self.space.value!r}"
        )

    def _write_task_specific(
        self, per_task: PerTask, coefficients: Tensor, writes: GradWrites
    ) -> None:
        totals: dict[int, Tensor] = {}
        for c, grads in zip(coefficients, per_task.extras):
            for key, grad in grads.items():
                term = grad * c.to(grad.device, grad.dtype)
                totals[key] = term if key not in totals else totals[key] + term
        if self.comm is not None and self.task_parameters is not None:
            self._reduce_task_specific_by_parameter(totals, writes)
            return
        keys = list(totals)
        values = [totals[k] for k in keys]
        if self.comm is not None:
            # The ranks checked that they reach the same leaves (mtlhooks.ranks): same graph,
            # so the same leaves in the same order.
            values = _flat_all_reduce(self.comm, values, "mean")
        for key, value in zip(keys, values):
            leaf = self._leaves[key]
            writes.record([leaf])
            # Each value is a fresh product (or sum) made above; across processes, a view of
            # the all-reduced buffer, which is copied.
            accumulate(leaf, value, owned=self.comm is None)
        self._leaves.clear()

    def _reduce_task_specific_by_parameter(
        self, totals: dict[int, Tensor], writes: GradWrites
    ) -> None:
        """Every rank sends a gradient for every task parameter of the model (zeros where its
        losses do not reach it) and how many ranks reached it: parameters that some rank's
        branch skipped are still averaged over all ranks, as DDP would."""
        assert self.comm is not None and self.task_parameters is not None
        params = self.task_parameters
        values = [
            totals[id(p)].reshape(p.shape) if id(p) in totals else torch.zeros_like(p)
            for p in params
        ]
        reached = torch.tensor([1.0 if id(p) in totals else 0.0 for p in params])
        reduced = _flat_all_reduce(self.comm, [*values, reached.to(values[0])], "mean")
        counts = reduced[-1]
        for p, value, count in zip(params, reduced[:-1], counts.tolist()):
            if count > 0:
                writes.record([p])
                accumulate(p, value)
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


_DDP_SINK = "_DDPSinkBackward"


def features_target(features: Tensor) -> Tensor | GradientEdge:
    """What to take gradients with respect to for ``features=z``: z itself, or, when z went out
    of a ``DistributedDataParallel(find_unused_parameters=True)`` forward, the tensor it copies.

    DDP then passes every output of the model through one autograd node (its "sink"); the heads
    consumed z inside the forward, so the losses depend on the z before the sink, which the
    graph still holds as the sink's input."""
    node = features.grad_fn
    if node is not None and type(node).__name__ == _DDP_SINK:
        inner, index = node.next_functions[features.output_nr]
        if inner is not None:
            return GradientEdge(inner, index)
    return features


@contextmanager
def replaced_gradient(features: Tensor, replacement: Tensor) -> Iterator[None]:
    """During the block, the gradient that reaches z (see :func:`features_target`) is
    ``replacement``, whatever flows from the losses."""
    target = features_target(features)
    if isinstance(target, Tensor):
        handle = target.register_hook(lambda _grad: replacement)
    else:
        index = target.output_nr

        def swap(grad_outputs: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
            return tuple(replacement if i == index else g for i, g in enumerate(grad_outputs))

        handle = target.node.register_prehook(swap)
    try:
        yield
    finally:
        handle.remove()


def _features_not_in_graph(features: Tensor) -> InputError:
    node = features.grad_fn
    name = "" if node is None else type(node).__name__
    if "CompiledFunction" in name:
        return InputError(
            "features= and the losses come out of one torch.compile'd graph: the heads use the "
            "graph's own copy of z, so no loss depends on the z returned. Compile the trunk "
            "alone (model.encoder = torch.compile(model.encoder)) and keep the heads outside, "
            "or use space 'params' or 'last_shared'"
        )
    return InputError(
        "features= is not in the graph of any loss: pass the trunk output that the heads "
        f"consume (got a tensor whose grad_fn is {name or None})"
    )


def _seed(loss: Tensor, scale: Tensor | None) -> Tensor | None:
    return None if scale is None else scale.to(loss.dtype).expand_as(loss)
