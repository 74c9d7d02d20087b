"""FSDP2 (``torch.distributed.fsdp.fully_shard``): per-task gradients of a sharded model.

Under FSDP2 every parameter of the model is a ``DTensor`` sharded over the ranks; the forward
all-gathers each module's parameters into plain tensors (the leaves of the autograd graph) and
the backward reduce-scatters their gradients into the shards' ``.grad``, averaged over ranks.
:class:`ShardedEngine` is the :class:`~mtlhooks.engine.GradientEngine` for such a model; the
pipeline picks it when the parameters it is given are ``DTensor`` s.

Space ``params`` (exact). One backward per task, ``.grad`` set aside before and cleared between
tasks, leaves in each shard's ``.grad`` this rank's **shard of that task's gradient of the global
batch** (FSDP reduce-scatters and averages it). The shards of the ranks are disjoint coordinates
of J, so

    G = J Jᵀ = Σ_r J_r J_rᵀ        (J_r: rank r's columns of J)

is one all-reduce of the T×T per-shard Gramians (one per shared parameter, for the report). Every
rank then runs the same aggregation on the same G and combines its own shards,
``.grad += Σ cᵢ gᵢ``, on the shared parameters and (with the heads' coefficients) on the
task-specific ones, which the same backward passes reduced. Memory: T shards, T·P/R; traffic:
T reduce-scatters (and the all-gathers FSDP makes in each backward) plus the T² Gramian.

Space ``features``: as under DDP (the ranks' samples are disjoint coordinates of z, the Gramian
is Σ_r G_r / R²), then one weighted backward, which FSDP reduces as usual.

Space ``last_shared``: the per-task gradients are taken with respect to the last shared layer's
*unsharded* parameters, the tensors its forward used (a forward pre-hook records them), averaged
over ranks like DDP's, then one weighted backward through FSDP.

Because FSDP's backward passes are collectives, the ranks' status (mtlhooks.ranks) is checked
before any per-task gradient is taken: a rank that failed before them stops every rank there.
Every ``.grad`` FSDP writes lands on the sharded parameters of ``model=``, which are recorded
before each call (all or nothing, mtlhooks.transaction); the finiteness of what was written is
agreed across ranks, each holding other shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mtlhooks.distributed import Communicator
from mtlhooks.engine import GradientEngine, NamedParameters, PerTask, _seed
from mtlhooks.errors import ConfigError, InputError, PluginError
from mtlhooks.graph import graph_leaves, unreached
from mtlhooks.plugin import Space
from mtlhooks.step import TaskGradients
from mtlhooks.transaction import GradWrites

try:  # torch >= 2.4 has DTensor in torch.distributed.tensor; FSDP2 itself needs >= 2.6
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - old torch or no distributed support
    DTensor = None  # type: ignore[assignment,misc]

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - torch < 2.6
    FSDPModule = None  # type: ignore[assignment,misc]


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter or gradient sharded by FSDP2)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (the same storage), or the tensor itself."""
    if is_sharded(tensor):
        with torch.no_grad():
            return tensor.to_local()  # type: ignore[attr-defined]
    return tensor


def any_sharded(*groups: Sequence[tuple[str, Tensor]]) -> bool:
    """Whether any parameter of ``groups`` is sharded."""
    return any(is_sharded(p) for group in groups for _, p in group)


def _param_groups(module: nn.Module) -> list[Any]:
    """FSDP2's parameter groups of one ``fully_shard`` module (FSDP2 keeps them private)."""
    state = module._get_fsdp_state()  # type: ignore[operator]
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch < 2.13: at most one group per module
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def sharded_twins(model: nn.Module | None) -> dict[int, Tensor]:
    """``id`` of each unsharded parameter FSDP2 has built in ``model`` → its sharded parameter.

    Between a forward and its backward, a module whose parameters FSDP did not reshard after
    the forward (the root's, by default) holds the unsharded parameters: ``named_parameters()``
    then returns plain tensors; the sharded ones (where ``.grad`` lands) are their twins."""
    if model is None or FSDPModule is None:
        return {}
    twins: dict[int, Tensor] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in _param_groups(module):
            for fsdp_param in getattr(group, "fsdp_params", ()):
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    twins[id(unsharded)] = fsdp_param.sharded_param
    return twins


def unsharded_parameters(model: nn.Module | None) -> dict[int, Tensor]:
    """``id`` of each sharded parameter of ``model`` → the unsharded parameter FSDP2 built for
    it (the tensor its module's forward uses: a leaf of that forward's graph)."""
    twins = sharded_twins(model)
    if model is None or FSDPModule is None:
        return {}
    out: dict[int, Tensor] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in _param_groups(module):
            for fsdp_param in getattr(group, "fsdp_params", ()):
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None and id(unsharded) in twins:
                    out[id(fsdp_param.sharded_param)] = unsharded
    return out


def sharded_view(
    named: Sequence[tuple[str, Tensor]], twins: dict[int, Tensor]
) -> list[tuple[str, Tensor]]:
    """``named`` with every unsharded parameter replaced by its sharded twin."""
    return [(name, twins.get(id(p), p)) for name, p in named]


def _add_to_shard(parameter: Tensor, shard: Tensor) -> None:
    """``parameter.grad += shard`` where ``shard`` is this rank's part of the gradient, as FSDP
    would accumulate it."""
    mine = local(parameter)
    shard = shard.detach().reshape(mine.shape).to(mine.dtype)
    if parameter.grad is None:
        parameter.grad = DTensor.from_local(
            shard.clone(memory_format=torch.contiguous_format),
            parameter.device_mesh,  # type: ignore[attr-defined]
            parameter.placements,  # type: ignore[attr-defined]
            shape=parameter.shape,
            stride=parameter.stride(),
            run_check=False,
        )
    else:
        local(parameter.grad).add_(shard)


def check_sharding(
    named: NamedParameters, model: nn.Module | None, communicator: Communicator | None
) -> list[Tensor]:
    """The parameters FSDP writes gradients to (``model=``'s), after checking that the setup is
    one mtlhooks can make exact: every parameter of ``model=`` sharded over a 1-D mesh of all
    the processes (plain FSDP2, not HSDP or tensor parallelism)."""
    if model is None:
        raise ConfigError(
            "the shared parameters are sharded (FSDP2's fully_shard): pass the whole model as "
            "MTL(..., model=model), the module fully_shard was applied to last (the root), so "
            "that every gradient FSDP writes is known to the pipeline (all-or-nothing calls, "
            "task-specific gradients)"
        )
    names = dict(named)
    parameters = sharded_view(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad], sharded_twins(model)
    )
    in_model = {id(p) for _, p in parameters}
    outside = [name for name, p in names.items() if id(p) not in in_model]
    if outside:
        raise ConfigError(
            f"shared parameters {outside[:3]} are not parameters of model=: pass the model "
            "that holds the shared trunk"
        )
    plain = [name for name, p in parameters if not is_sharded(p)]
    if plain:
        raise ConfigError(
            f"parameters {plain[:3]} of model= are not sharded while others are: FSDP2 does not "
            "reduce their gradients across ranks. Apply fully_shard to the root module too "
            "(fully_shard(model) after the sub-modules)"
        )
    world = 1 if communicator is None else communicator.world_size
    for name, p in parameters:
        mesh = p.device_mesh  # type: ignore[attr-defined]
        placements = p.placements  # type: ignore[attr-defined]
        if mesh.ndim != 1 or mesh.size() != world or not all(pl.is_shard() for pl in placements):
            raise ConfigError(
                f"parameter {name!r} is sharded as {placements} over a mesh of shape "
                f"{tuple(mesh.shape)}, with {world} process(es): mtlhooks supports FSDP2 "
                "sharding over one 1-D mesh of every process (not HSDP's replicated dimension "
                "or tensor parallelism)"
            )
    return [p for _, p in parameters]


class ShardedEngine(GradientEngine):
    """The gradient engine of a model sharded by FSDP2 (see the module docstring)."""

    def __init__(
        self,
        space: Space,
        *,
        shared: NamedParameters,
        last_shared: NamedParameters,
        communicator: Communicator | None,
        model: nn.Module | None,
        last_module: nn.Module | None,
        backward_fn: Callable[[Tensor], None] | None = None,
        num_tasks: int = 0,
    ) -> None:
        super().__init__(
            space,
            shared=shared,
            last_shared=last_shared,
            communicator=communicator,
            exact_params=True,
            layerwise_mode="materialize",
            backward_fn=backward_fn,
            num_tasks=num_tasks,
        )
        self.sharded_parameters = check_sharding(self.named or self.shared, model, self.comm)
        assert model is not None
        self.fsdp_modules = [m for m in model.modules() if _is_fsdp_module(m)]
        self._model = model
        self._twins = sharded_twins(model)
        self._leaves_seen: list[Tensor] = []
        self._hook: RemovableHandle | None = None
        self._captured: dict[str, Tensor] = {}
        self._attributes: list[str] = []
        if space is Space.LAST_SHARED:
            self._watch_last_layer(last_module)

    @property
    def sharded(self) -> bool:
        return True

    @property
    def writes_directly(self) -> bool:
        return self.space is Space.PARAMS

    @property
    def needs_no_sync(self) -> bool:
        return False

    # -- space last_shared: the unsharded parameters the forward used ---------------------------

    def _watch_last_layer(self, module: nn.Module | None) -> None:
        if module is None:
            raise ConfigError(
                "space 'last_shared' under FSDP2 needs the last shared layer as a module "
                "(last_shared=model.encoder[-1], or a shared= module whose last layer it is): "
                "its forward is where the unsharded parameters are seen"
            )
        attributes = {
            id(p): name for name, p in sharded_view(list(module.named_parameters()), self._twins)
        }
        missing = [name for name, p in self.named if id(p) not in attributes]
        if missing:
            raise ConfigError(
                f"last_shared parameters {missing} are not parameters of the last shared layer "
                f"{type(module).__name__}: pass that layer as last_shared="
            )
        self._attributes = [attributes[id(p)] for _, p in self.named]

        def record(layer: nn.Module, _inputs: Any) -> None:
            # FSDP's own pre-forward (registered before this hook) has just put the unsharded
            # parameters in place: these are the leaves of this forward's graph.
            self._captured = dict(layer.named_parameters())

        self._hook = module.register_forward_pre_hook(record)

    def _unsharded_last_layer(self) -> list[Tensor]:
        captured = self._captured
        if captured and not any(is_sharded(captured.get(a)) for a in self._attributes):
            return [captured[a] for a in self._attributes]
        # No forward since this engine was built (it was built at this call, after the
        # forward, to follow the parameters prepare/fully_shard replaced): the unsharded
        # parameters FSDP keeps are the ones that forward used.
        unsharded = unsharded_parameters(self._model)
        tensors = [unsharded.get(id(p)) for _, p in self.named]
        if any(t is None for t in tensors):
            raise InputError(
                "space 'last_shared' under FSDP2: the last shared layer's unsharded parameters "
                "are not known (no forward since the pipeline was built?): run the forward pass "
                "of this step after building the MTL"
            )
        return [t for t in tensors if t is not None]

    # -- per-task gradients ----------------------------------------------------------------------

    def check_graph(self, losses: Sequence[Tensor]) -> None:
        """What can fail on one rank alone, checked on the losses' graph before the first
        collective of the call (its error joins the ranks' status): a tensor outside the
        sharded model that the losses reach, whose gradient FSDP would not reduce, and a space
        parameter that no loss reaches."""
        self._leaves_seen = []
        if self.space is Space.FEATURES:
            return
        leaves = {id(leaf): leaf for loss in losses for leaf in graph_leaves(loss, set())}
        if self.space is Space.LAST_SHARED:
            tensors = self._unsharded_last_layer()
            for (name, _), tensor in zip(self.named, tensors):
                if id(tensor) not in leaves:
                    raise unreached(name, losses)
            return
        twins = sharded_twins(self._model)
        sharded = {id(p) for p in self.sharded_parameters}
        foreign = [
            leaf
            for key, leaf in leaves.items()
            if leaf.requires_grad and key not in twins and key not in sharded
        ]
        if foreign:
            raise InputError(
                f"{len(foreign)} tensor(s) of shape(s) {[tuple(t.shape) for t in foreign][:3]} "
                "outside the FSDP-sharded model receive gradients from the losses: FSDP does not "
                "reduce them across ranks. Make them parameters of model= (under fully_shard) or "
                "stop them requiring grad"
            )
        reached = {id(twins[key]) for key in leaves if key in twins}
        for name, p in self.named:
            if id(p) not in reached:
                raise unreached(name, losses)
        self._leaves_seen = list(leaves.values())

    def compute(
        self,
        losses: Sequence[Tensor],
        features: Tensor | None,
        scale: Tensor | None,
        *,
        accumulating: bool = False,
        writes: GradWrites | None = None,
    ) -> PerTask:
        if self.space is Space.FEATURES:
            return super().compute(losses, features, scale, accumulating=accumulating)
        if self.space is Space.LAST_SHARED:
            return self._compute_last_shared(losses, scale)
        assert writes is not None
        return self._compute_params(losses, scale, writes)

    def _compute_last_shared(self, losses: Sequence[Tensor], scale: Tensor | None) -> PerTask:
        tensors = self._unsharded_last_layer()
        self._captured = {}
        blocks = [t.new_zeros((len(losses), t.numel())) for t in tensors]
        reached = [False] * len(tensors)
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(
                loss, tensors, grad_outputs=_seed(loss, scale), retain_graph=True, allow_unused=True
            )
            for j, grad in enumerate(grads):
                if grad is not None:
                    blocks[j][i].copy_(grad.reshape(-1))
                    reached[j] = True
        for (name, _), hit in zip(self.named, reached):
            if not hit:
                raise unreached(name, losses)
        return PerTask([name for name, _ in self.named], blocks)

    def _compute_params(
        self, losses: Sequence[Tensor], scale: Tensor | None, writes: GradWrites
    ) -> PerTask:
        count = len(losses)
        parameters = self.sharded_parameters
        position = {id(p): j for j, (_, p) in enumerate(self.named)}
        # The graph's leaves (FSDP's unsharded parameters, which FSDP empties after each
        # backward; check_graph refused any other) are set aside and put back like the shards.
        others = self._leaves_seen
        writes.record(parameters)
        writes.record(others)
        saved = [p.grad for p in parameters]
        saved_others = [leaf.grad for leaf in others]
        blocks = [local(p).new_zeros((count, local(p).numel())) for _, p in self.named]
        reached = [False] * len(blocks)
        extras: list[dict[int, Tensor]] = []
        try:
            for p in parameters:
                p.grad = None
            for leaf in others:
                leaf.grad = None
            with _gradient_sync(self.fsdp_modules):
                for i, loss in enumerate(losses):
                    torch.autograd.backward(
                        loss, grad_tensors=_seed(loss, scale), retain_graph=i < count - 1
                    )
                    extra: dict[int, Tensor] = {}
                    for p in parameters:
                        grad = p.grad
                        if grad is None:
                            continue
                        p.grad = None
                        j = position.get(id(p))
                        if j is None:
                            extra[id(p)] = local(grad)
                        else:
                            blocks[j][i].copy_(local(grad).reshape(-1))
                            reached[j] = True
                    extras.append(extra)
        finally:
            for p, grad in zip(parameters, saved):
                p.grad = grad
            for leaf, grad in zip(others, saved_others):
                leaf.grad = grad
        for (name, _), hit in zip(self.named, reached):
            if not hit:
                raise unreached(name, losses)
        return PerTask([name for name, _ in self.named], blocks, extras)

    def gradients(self, per_task: PerTask, scale: Tensor | None) -> TaskGradients:
        if self.space is not Space.PARAMS:
            return super().gradients(per_task, scale)
        local_gradients = TaskGradients.from_blocks(self.space, per_task.names, per_task.blocks)
        parts = list(local_gradients.block_gramians)
        dtype = parts[0].dtype
        stacked = torch.stack(parts)
        if self.comm is not None:
            # The shards are disjoint coordinates of J: the Gramian is the sum of theirs.
            stacked = self.comm.all_reduce(stacked.to(torch.float64), "sum").to(dtype)
        if scale is not None:
            stacked = stacked / (scale * scale).to(dtype)
        parts = list(stacked.unbind(0))
        return TaskGradients(self.space, per_task.names, per_task.blocks, parts, stacked.sum(0))

    def join_gradient_sync(self, count: int) -> None:
        """Nothing to join: under FSDP the ranks' status is read before any per-task gradient
        (whose backward passes are FSDP's collectives), so no rank waits past it."""

    # -- writing --------------------------------------------------------------------------------

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
        # FSDP writes the gradients of this backward to the shards, not to the graph's leaves
        # (and reduce-scatters them into existing ones itself: nothing is held here).
        del hold
        writes.record(self.sharded_parameters)
        self._backward(self._weighted_total(losses, weights, scale, auxiliary), writes)

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
        if self.space is not Space.PARAMS:
            super().write_weighted(
                losses,
                per_task,
                coefficients,
                scale,
                heads=heads,
                features=features,
                auxiliary=auxiliary,
                writes=writes,
            )
            return
        for (_, p), block in zip(self.named, per_task.blocks):
            writes.record([p])
            _add_to_shard(p, coefficients.to(block.device, block.dtype) @ block)
        by_id = {id(p): p for p in self.sharded_parameters}
        totals: dict[int, Tensor] = {}
        for c, grads in zip(coefficients if heads is None else heads, per_task.extras):
            for key, grad in grads.items():
                term = grad * c.to(grad.device, grad.dtype)
                totals[key] = term if key not in totals else totals[key] + term
        for key, total in totals.items():
            writes.record([by_id[key]])
            _add_to_shard(by_id[key], total)
        self._auxiliary_backward(auxiliary, scale, writes)

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
        if self.space is Space.PARAMS:  # pragma: no cover - refused when the pipeline is built
            raise PluginError("coordinate-wise aggregation in space 'params' under FSDP2")
        super().write_combined(
            losses, per_task, features, combined, weights, scale, auxiliary=auxiliary, writes=writes
        )

    def close(self) -> None:
        super().close()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def discard(self) -> None:
        super().discard()
        self._captured = {}


def _is_fsdp_module(module: nn.Module) -> bool:
    return FSDPModule is not None and isinstance(module, FSDPModule)


@contextmanager
def _gradient_sync(modules: list[nn.Module]) -> Iterator[None]:
    """FSDP reduce-scatters every per-task backward, even inside ``no_sync`` (Accelerate's
    ``accumulate`` turns FSDP2's gradient sync off on the micro-steps that do not synchronise:
    the per-task gradients must be reduced all the same, they are kept apart, not in ``.grad``).
    """
    before = [_requires_gradient_sync(m) for m in modules]
    for module in modules:
        module.set_requires_gradient_sync(True, recurse=False)  # type: ignore[operator]
    try:
        yield
    finally:
        for module, flag in zip(modules, before):
            module.set_requires_gradient_sync(flag, recurse=False)  # type: ignore[operator]


def _requires_gradient_sync(module: nn.Module) -> bool:
    # FSDP2 has a setter but no getter: read the flag the setter writes.
    return all(bool(getattr(group, "reduce_grads", True)) for group in _param_groups(module))
