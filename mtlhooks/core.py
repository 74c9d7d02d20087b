"""The pipeline: :class:`MTL` turns per-task losses into ``.grad`` on every parameter.

See :mod:`mtlhooks.hookspecs` for the hooks it fires and their order.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mtlhooks import fsdp, hostsync, registry, support
from mtlhooks.config import MTLConfig, load_config
from mtlhooks.distributed import Communicator, default_communicator
from mtlhooks.engine import GradientEngine, PerTask
from mtlhooks.errors import (
    ConfigError,
    GradientError,
    InputError,
    MTLError,
    MTLWarning,
    NonFiniteError,
    PluginError,
)
from mtlhooks.graph import graph_leaves
from mtlhooks.plugin import Family, Need, Plugin, Setup, Space, hookimpl
from mtlhooks.ranks import Ranks, leaves_signature
from mtlhooks.report import StepReport
from mtlhooks.step import Step
from mtlhooks.transaction import GradWrites, check_state, clone_tree, share_tree

ParameterSource = nn.Module | Iterable[Tensor]

_ORDERED_HOOKS = (
    "mtl_scale_losses",
    "mtl_balance",
    "mtl_aggregate",
    "mtl_combine",
    "mtl_observe",
    "mtl_after_step",
)


def _named_parameters(source: ParameterSource | None, label: str) -> list[tuple[str, Tensor]]:
    if source is None:
        return []
    named: list[tuple[str, Tensor]]
    # A torch.compile'd module: name the parameters as in the module it wraps.
    source = getattr(source, "_orig_mod", source)
    if isinstance(source, nn.Module):
        named = [(n, p) for n, p in source.named_parameters() if p.requires_grad]
    elif isinstance(source, Tensor):
        raise InputError(f"{label}= takes a module or an iterable of parameters, not one tensor")
    else:
        named = [(f"{label}[{i}]", p) for i, p in enumerate(source) if p.requires_grad]
    if not named:
        raise InputError(f"{label}= holds no parameter that requires grad")
    return named


def _first_parameter(module: nn.Module) -> Tensor | None:
    """The module's first parameter that requires grad (what :meth:`MTL._follow` watches)."""
    module = getattr(module, "_orig_mod", module)
    return next((p for p in module.parameters() if p.requires_grad), None)


def _parameter_slot(module: nn.Module, parameter: Tensor | None) -> tuple[nn.Module, str] | None:
    """Where ``module`` holds ``parameter``: its owning sub-module and its name there."""
    module = getattr(module, "_orig_mod", module)
    for qualified, candidate in module.named_parameters():
        if candidate is parameter:
            owner, _, name = qualified.rpartition(".")
            return module.get_submodule(owner), name
    return None


def _last_layer(module: nn.Module) -> nn.Module:
    """The last sub-module (in registration order) owning parameters that require grad."""
    last: nn.Module | None = None
    for sub in module.modules():
        if any(p.requires_grad for p in sub.parameters(recurse=False)):
            last = sub
    if last is None:  # pragma: no cover - _named_parameters already refused an empty module
        raise InputError("shared module has no parameter")
    return last


_Snapshot = tuple[dict[str, Any], Tensor, "tuple[PerTask, Tensor] | None"]
"""Plugin states, generator state and accumulation window from before a call."""


class GradScalerLike(Protocol):
    """Anything with ``scale(outputs)`` returning ``outputs`` times the loss scale."""

    def scale(self, outputs: Tensor) -> Tensor: ...


def _scale_tensor(
    loss_scale: float | Tensor | GradScalerLike | None, like: Tensor
) -> Tensor | None:
    """The loss scale as a float32 scalar tensor on the losses' device (no host sync)."""
    if loss_scale is None:
        return None
    if isinstance(loss_scale, Tensor):
        scale = loss_scale
    elif isinstance(loss_scale, (int, float)):
        scale = torch.tensor(float(loss_scale))
    elif hasattr(loss_scale, "scale"):
        # GradScaler initialises its scale lazily in scale(): this also does that.
        scale = loss_scale.scale(torch.ones((), device=like.device))
    else:
        raise InputError(
            "loss_scale must be a number, a tensor or a GradScaler, "
            f"got {type(loss_scale).__name__}"
        )
    return scale.detach().to(device=like.device, dtype=torch.float32).reshape(())


class _Core:
    """The innermost implementation of ``mtl_backward``: the pipeline itself."""

    def __init__(self, mtl: MTL) -> None:
        self._mtl = mtl

    @hookimpl
    def mtl_backward(self, step: Step) -> StepReport:
        return self._mtl._run(step)


class MTL:
    """Middleware between per-task losses and ``.grad``: replace ``loss.backward()`` with
    ``mtl.backward({"task": loss, ...})``.

    :param config: an :class:`MTLConfig`, a mapping, or a path to a YAML/TOML/JSON file.
    :param shared: the shared trunk (module or parameters). Needed by spaces ``params`` and
        ``last_shared``; in space ``params`` its parameters are the ones whose per-task gradients
        are combined, every other parameter reached by the losses is task-specific.
    :param last_shared: the last shared layer (module or parameters) for space ``last_shared``;
        default: the last sub-module of ``shared`` that owns parameters.
    :param communicator: how to reach the other processes of a distributed run; default: the
        initialised ``torch.distributed`` world when it has several processes, else none.
        Pass ``False`` to keep every process on its own.
    :param backward_fn: what runs the one weighted backward of a call (``total.backward()`` by
        default). Frameworks that must see the backward pass give theirs (Lightning's
        ``manual_backward``, a DeepSpeed engine's ``backward``); it receives the weighted total,
        already multiplied by any ``loss_scale``, and must not scale it again.
    :param steps_in_backward: ``backward_fn`` also applies the optimizer step (a DeepSpeed
        engine under Accelerate steps inside its backward at the end of each accumulation
        window): the losses and weights are then checked before it runs, since nothing it did
        can be undone after it, and what it wrote is not checked (the engine consumed it).
    :param model: the whole model (optional). Under data parallelism in space ``params``
        (``sync: exact``), the task-specific gradients are then reduced across processes by
        parameter, so heads that only some ranks use in a step (conditional branches, routing)
        stay exact; without it such steps are refused with an error.

    What every parameter receives: with per-task weights ``w`` (loss scaling and norm
    balancing) and aggregator weights ``α``, ``.grad += Σ_i α_i w_i ∇L_i`` for shared and
    task-specific parameters alike, accumulated like ``Tensor.backward``. A coordinate-wise
    aggregator writes its combined gradient to the shared part and ``Σ_i w_i ∇L_i`` to the rest.
    """

    def __init__(
        self,
        config: MTLConfig | Mapping[str, Any] | str | Path,
        *,
        shared: ParameterSource | None = None,
        last_shared: ParameterSource | None = None,
        communicator: Communicator | bool | None = None,
        backward_fn: Callable[[Tensor], None] | None = None,
        model: nn.Module | None = None,
        steps_in_backward: bool = False,
    ) -> None:
        self.config = load_config(config)
        if steps_in_backward and backward_fn is None:
            raise InputError("steps_in_backward=True needs the backward_fn that steps")
        self._steps_in_backward = steps_in_backward
        self.tasks: tuple[str, ...] = self.config.tasks
        self._shared = _named_parameters(shared, "shared")
        if last_shared is None and isinstance(shared, nn.Module):
            last_shared = _last_layer(shared)
        # Name the last shared layer's parameters by their path in the shared trunk when they
        # are in it ('block.1.weight', not 'weight'): errors and reports name them so.
        in_shared = {id(p): name for name, p in self._shared}
        self._last_shared = [
            (in_shared.get(id(p), name), p)
            for name, p in _named_parameters(last_shared, "last_shared")
        ]
        self.space = self._resolve_space()
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self._index = 0
        self.last_report: StepReport | None = None
        if communicator is None or communicator is True:
            communicator = default_communicator()
        self.communicator: Communicator | None = communicator or None
        # Space 'params' with sync: exact, between micro-steps of gradient accumulation.
        self._pending: tuple[PerTask, Tensor] | None = None
        self._writes = GradWrites()
        self._warned_features = False
        self._window_on_fast_path = False
        self._call = _Call("fast", None)

        space_parameters = {Space.PARAMS: self._shared, Space.LAST_SHARED: self._last_shared}
        setup = Setup(
            tasks=self.tasks,
            space=self.space,
            seed=self.config.seed,
            parameter_names=tuple(name for name, _ in space_parameters.get(self.space, [])),
            **_ranks_of(self.communicator),
        )
        self.plugins: dict[str, Plugin] = {}
        for position, entry in enumerate(self.config.plugins):
            key = entry.name if entry.name not in self.plugins else f"{entry.name}#{position}"
            self.plugins[key] = entry.info.cls(entry.options, setup)
        self._has_scaling = any(p.family is Family.LOSS_SCALING for p in self.plugins.values())
        self._gradient_plugins = [
            plugin for plugin in self.plugins.values() if plugin.needs is not Need.NOTHING
        ]
        # Plugins whose work is once per optimizer step (all but observers).
        self._acts_per_step = any(p.family is not Family.OBSERVER for p in self.plugins.values())
        # The modules given, to follow when fully_shard replaces their parameters (_follow).
        self._sources = _Sources(
            shared if isinstance(shared, nn.Module) else None,
            last_shared if isinstance(last_shared, nn.Module) else None,
            model,
            backward_fn,
        )
        self._engine = self._build_engine()
        self._refuse_local_combination()
        self._ranks = None if self._engine.comm is None else Ranks(self._engine.comm, self.tasks)
        if self._ranks is not None:
            self._ranks.check_same_pipeline(self._settings())
        self._manager = registry.new_plugin_manager()
        self._manager.register(_Core(self), name="mtlhooks.core")
        # pluggy calls implementations last-registered-first: register in reverse of the order
        # we want (config order, observers last) and check the result below.
        wanted = self._call_order()
        for key in reversed(wanted):
            self._manager.register(self.plugins[key], name=key)
        self._check_call_order(wanted)
        # The plugins are fixed from here on: a call skips pluggy's dispatch where nothing but
        # the core implements mtl_backward, and where nothing observes.
        hooks = self._manager.hook
        self._core_only = [i.plugin_name for i in hooks.mtl_backward.get_hookimpls()] == [
            "mtlhooks.core"
        ]
        self._observed = bool(hooks.mtl_observe.get_hookimpls())
        self._ones = _Ones()
        self._direct = self._direct_path()

    def _direct_path(self) -> _Direct | None:
        """The direct path, when this pipeline can take it: space ``none``, nothing but the core
        implements ``mtl_backward``, nothing observes, and at most one plugin, which declares
        constant loss weights (``static``) and weights the heads too. A call then runs
        :meth:`_direct_call`: no hook is dispatched and no plugin state or generator snapshot
        is taken (there is none to change); whether the engine allows it is checked per call
        (:meth:`_direct_ready`)."""
        if self.space is not Space.NONE or not self._core_only or self._observed:
            return None
        plugins = list(self.plugins.values())
        if len(plugins) > 1:
            return None
        if not plugins:
            return _Direct(None)
        if self.config.task_specific == "unweighted":
            return None  # the heads get Σ ∇Lᵢ, the trunk Σ wᵢ∇Lᵢ: two backward passes at z
        weights = plugins[0].constant_weights()
        if weights is None or plugins[0].family is not Family.LOSS_SCALING:
            return None
        # Weights of one multiply nothing: the total is the plain sum (x·1 = x exactly).
        return _Direct(None if bool((weights == 1).all()) else weights)

    def _direct_ready(self) -> bool:
        """Whether this call can take the direct path: one process, an unsharded engine that
        runs the backward itself (no framework ``backward_fn``)."""
        engine = self._engine
        return (
            self._ranks is None
            and engine.comm is None
            and not engine.sharded
            and engine.backward_fn is None
        )

    def _refuse_local_combination(self) -> None:
        """A plugin that builds the update from J itself (MoCo, TrimmedMean) needs the global
        batch's J: under ``sync: gramian`` each process holds only its own, so each would write
        a different update. Refused here, not at the first call."""
        comm = self._engine.comm
        if comm is None or comm.world_size <= 1 or self._engine.writes_directly:
            return
        if self.space is not Space.PARAMS:
            return
        # Plugins whose mtl_combine can answer: those that read J itself here (GradVac's
        # whole-model mode and the TorchJD adapter's Gramian methods implement the hook but
        # work from the Gramian, which sync: gramian does make global).
        combining = [
            key
            for key, p in self.plugins.items()
            if p.needs is Need.JACOBIAN and hasattr(p, "mtl_combine")
        ]
        if combining:
            raise ConfigError(
                f"plugin(s) {', '.join(map(repr, combining))} build the update from the task "
                "gradients themselves, which under sync: gramian are each process's own: every "
                "process would write a different update. Use sync: exact (the per-task "
                "gradients are all-reduced first)"
            )

    @classmethod
    def from_config(
        cls,
        config: MTLConfig | Mapping[str, Any] | str | Path,
        *,
        shared: ParameterSource | None = None,
        last_shared: ParameterSource | None = None,
        communicator: Communicator | bool | None = None,
        backward_fn: Callable[[Tensor], None] | None = None,
        model: nn.Module | None = None,
        steps_in_backward: bool = False,
    ) -> MTL:
        """Build from a config object, mapping or file; same arguments as the constructor."""
        return cls(
            config,
            shared=shared,
            last_shared=last_shared,
            communicator=communicator,
            backward_fn=backward_fn,
            model=model,
            steps_in_backward=steps_in_backward,
        )

    def _build_engine(self) -> GradientEngine:
        """The gradient engine for the parameters as they are now: :class:`ShardedEngine` when
        they are sharded by FSDP2 (``DTensor`` s), else :class:`GradientEngine`."""
        sources = self._sources
        self._held = [
            (module, _first_parameter(module))
            for module in (sources.shared, sources.last_shared, sources.model)
            if module is not None
        ]
        space_module = sources.shared if self.space is Space.PARAMS else sources.last_shared
        model_named = _named_parameters(sources.model, "model") if sources.model else []
        # Between a forward and its backward FSDP2's root holds unsharded parameters: name
        # the sharded ones, where the gradients land.
        twins = fsdp.sharded_twins(sources.model)
        if twins:
            self._shared = fsdp.sharded_view(self._shared, twins)
            self._last_shared = fsdp.sharded_view(self._last_shared, twins)
            model_named = fsdp.sharded_view(model_named, twins)
            self._held = [(module, twins.get(id(p), p)) for module, p in self._held]
        # Where each watched parameter sits, so that _follow sees it still there in O(1).
        self._slots = None if twins else [(_parameter_slot(m, p), p) for m, p in self._held]
        if fsdp.any_sharded(self._shared, self._last_shared, model_named):
            self._check_sharded_config()
            return fsdp.ShardedEngine(
                self.space,
                shared=self._shared,
                last_shared=self._last_shared,
                communicator=self.communicator,
                model=sources.model,
                last_module=sources.last_shared,
                backward_fn=sources.backward_fn,
                num_tasks=len(self.tasks),
            )
        return GradientEngine(
            self.space,
            shared=self._shared,
            last_shared=self._last_shared,
            communicator=self.communicator,
            exact_params=self.config.sync == "exact",
            layerwise_mode=(
                # Plugins that read J, and heads weighted apart from the trunk (written from
                # their own per-task gradients), need the per-task gradients materialised.
                "materialize"
                if any(p.needs is Need.JACOBIAN for p in self._gradient_plugins)
                or self.config.task_specific != "aggregated"
                else self.config.params_gramian
            ),
            module=space_module,
            backward_fn=sources.backward_fn,
            model=sources.model,
            num_tasks=len(self.tasks),
        )

    def _check_sharded_config(self) -> None:
        """What space ``params`` cannot do exactly on a sharded model: refused here."""
        if self.space is not Space.PARAMS:
            return
        readers = [key for key, p in self.plugins.items() if p.needs is Need.JACOBIAN]
        if readers:
            raise ConfigError(
                f"plugins {readers} read the per-task gradients themselves (coordinate-wise), "
                "which FSDP2 shards across ranks: in space 'params' each rank holds other "
                "coordinates. Use space 'features' for them, or a Gramian-based method"
            )
        support.check(support.Engine.FSDP2, support.space_key(self.space.value, self.config.sync))
        if self.config.params_gramian == "layerwise":
            raise ConfigError(
                "params_gramian: layerwise is not available under FSDP2 (the per-task gradients "
                "are taken as FSDP's reduced shards): use params_gramian: auto or materialize"
            )

    def _follow(self) -> None:
        """Follow the modules given when their parameters were replaced since the pipeline was
        built (``fully_shard``, and Accelerate's ``prepare`` under FSDP2, replace them by
        sharded ones): same names and shapes, new tensors."""
        if self._slots is not None and all(
            slot is not None and slot[0]._parameters.get(slot[1]) is held
            for slot, held in self._slots
        ):
            return  # every watched parameter is where it was (checked once per call: cheap)
        current = [_first_parameter(module) for module, _ in self._held]
        if all(p is held for p, (_, held) in zip(current, self._held)):
            return
        # The root module of FSDP2 holds its unsharded parameters between forward and backward.
        twins = fsdp.sharded_twins(self._sources.model)
        if all(p is held or twins.get(id(p)) is held for p, (_, held) in zip(current, self._held)):
            return
        if self._pending is not None:
            raise InputError(
                "the shared module's parameters were replaced in the middle of an "
                "accumulation window of space params: apply fully_shard (or prepare) before "
                "the first backward() of a window"
            )
        sources = self._sources
        shared = _named_parameters(sources.shared, "shared") if sources.shared else self._shared
        in_shared = {id(p): name for name, p in shared}
        last = self._last_shared
        if sources.last_shared is not None:
            named = _named_parameters(sources.last_shared, "last_shared")
            last = [(in_shared.get(id(p), name), p) for name, p in named]

        def described(named: list[tuple[str, Tensor]]) -> list[Any]:
            return [(name, tuple(p.shape)) for name, p in named]

        if described(shared) != described(self._shared) or described(last) != described(
            self._last_shared
        ):
            raise InputError(
                "the shared modules' parameters changed names or shapes since MTL was built: "
                "build the MTL after the model is final"
            )
        self._engine.close()
        self._shared, self._last_shared = shared, last
        self._engine = self._build_engine()

    def _settings(self) -> dict[str, Any]:
        """What every rank's pipeline must have alike (compared across ranks when built)."""

        def described(named: list[tuple[str, Tensor]]) -> list[Any]:
            return [(name, list(p.shape), str(p.dtype)) for name, p in named]

        config = self.config
        return {
            "tasks": list(self.tasks),
            "plugins": [entry.as_dict() for entry in config.plugins],
            "space": self.space.value,
            "seed": config.seed,
            "sync": config.sync,
            "on_nonfinite": config.on_nonfinite,
            "params_gramian": config.params_gramian,
            "task_specific": config.task_specific,
            "check_gradients": config.check_gradients,
            "shared parameters": described(self._shared),
            "last_shared parameters": described(self._last_shared),
        }

    # -- construction -----------------------------------------------------------------------

    def _call_order(self) -> list[str]:
        keys = list(self.plugins)
        first = [k for k in keys if self.plugins[k].family is not Family.OBSERVER]
        return first + [k for k in keys if self.plugins[k].family is Family.OBSERVER]

    def _check_call_order(self, wanted: list[str]) -> None:
        rank = {key: i for i, key in enumerate(wanted)}
        for hook_name in _ORDERED_HOOKS:
            impls = getattr(self._manager.hook, hook_name).get_hookimpls()
            called = [i.plugin_name for i in reversed(impls) if not (i.wrapper or i.hookwrapper)]
            if called != sorted(called, key=rank.__getitem__):  # pragma: no cover - guard
                raise PluginError(f"{hook_name} would run in order {called}, not config order")

    def _resolve_space(self) -> Space:
        return self.config.resolve_space(
            shared=bool(self._shared), last_shared=bool(self._last_shared)
        )

    # -- public API -----------------------------------------------------------------------------

    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        features: Tensor | None = None,
        sync: bool = True,
        loss_scale: float | Tensor | GradScalerLike | None = None,
        batch_size: int | None = None,
    ) -> StepReport:
        """Fill ``.grad`` from per-task losses, through the configured plugins.

        :param losses: task name → scalar loss tensor with a graph, one per configured task.
        :param features: the shared representation z, needed in space ``features``.
        :param sync: ``False`` on the micro-steps of gradient accumulation before the one that
            precedes ``optimizer.step()``. In space ``params`` (``sync: exact``) the per-task
            gradients are then summed over the micro-steps and aggregated once, at the call
            with ``sync=True``: the same result as one batch holding every micro-batch (divide
            each loss by the number of micro-steps, as for ``loss.backward()``). In the other
            spaces each micro-step is aggregated on its own and ``.grad`` accumulates.
        :param loss_scale: the mixed-precision loss scale: a ``torch.amp.GradScaler`` (or its
            scale as a number or tensor). Gradients
            are taken of the scaled losses, as ``scaler.scale(loss).backward()`` would, and
            written scaled for ``scaler.step``; Gramians are unscaled before any plugin sees
            them. A non-finite Gramian then does not raise: the gradients are written as they
            are, so that the scaler skips the step and lowers its scale.
        :param batch_size: this process's number of samples, under data parallelism with
            shards that may differ in size (the last batch of an epoch, a sampler that does not
            pad): the global losses and gradients are then the mean over every sample of every
            rank, exactly. Give it on every rank or on none; without it every rank counts the
            same (the mean over ranks of the per-rank means).
        :returns: the :class:`StepReport` of this call (also ``mtl.last_report``).
        """
        self._follow()
        if self._direct is not None and loss_scale is None and self._direct_ready():
            direct = self._direct_call(losses, features, sync, batch_size)
            self._index += 1
            self.last_report = direct
            return direct
        kind = self._call_kind(sync)
        try:
            ordered = self._validate(losses, features)
            batch_size = _checked_batch_size(batch_size)
            scale = _scale_tensor(loss_scale, ordered[0])
        except Exception as error:
            self._fail_together(kind)
            raise error from None
        dtype = _working_dtype(ordered[0].dtype)
        values = torch.stack(ordered).detach().to(dtype)  # stack promotes mixed dtypes
        step = self._new_step(values, self._ones.like(values), ordered, features, sync, scale)
        self._call = _Call(kind, batch_size)
        # All or nothing (mtlhooks.transaction): until this call returns, every .grad it wrote,
        # every plugin's state and the generator can be put back as they were.
        before = self._snapshot()
        self._writes = GradWrites()
        try:
            # The pipeline's own arithmetic (Gramians, solvers, weights) in the tensors' own
            # precision, whatever the ambient autocast; the per-task backward passes keep the
            # precision autocast gave the forward.
            with _no_autocast(ordered[0].device):
                report: StepReport = (
                    self._run(step)
                    if self._core_only
                    else self._manager.hook.mtl_backward(step=step)
                )
            if report.skipped:
                # Nothing of a skipped step stays but the event itself (observers are told) and,
                # at a synchronising call, the end of the accumulation window it discarded.
                self._restore(before, keep_window=True)
            if self._observed:
                self._manager.hook.mtl_observe(report=report)
        except BaseException as error:
            self._restore(before)
            report = self._failed(error, step, values)
            if self._observed:
                self._manager.hook.mtl_observe(report=report)
        self._writes.commit()
        if self._engine.writes_directly:
            self._window_on_fast_path = not sync and kind == "fast"
        self._index += 1
        self.last_report = report
        return report

    def after_step(self, losses: Mapping[str, Tensor]) -> None:
        """Tell plugins the losses after ``optimizer.step()`` (fires ``mtl_after_step``).

        Methods such as FAMO learn from the change of each loss over one step; call this after
        ``optimizer.step()`` with the losses of the same batch recomputed (under
        ``torch.no_grad()`` is fine: only the values are used). Non-finite losses are refused
        (:class:`NonFiniteError`) and, like an error of a plugin, change nothing.
        """
        self._check_tasks(losses)
        for name in self.tasks:
            value = losses[name]
            if not isinstance(value, (Tensor, int, float)) or isinstance(value, bool):
                raise InputError(
                    f"after_step: loss of task {name!r} is a {type(value).__name__}, not a "
                    "tensor or a number"
                )
            if isinstance(value, Tensor) and value.numel() != 1:
                raise InputError(
                    f"after_step: loss of task {name!r} must be a scalar, got shape "
                    f"{tuple(value.shape)}"
                )
        first = next(iter(losses.values()))
        dtype = torch.promote_types(
            first.dtype if isinstance(first, Tensor) else torch.float32, torch.float32
        )
        values = torch.stack(
            [torch.as_tensor(losses[t]).detach().reshape(()).to(dtype) for t in self.tasks]
        )
        if self.communicator is not None:
            values = self.communicator.all_reduce(values, "mean")
        if not hostsync.host_flag(hostsync.all_finite([values])):
            raise NonFiniteError(
                f"after_step: {self._bad_losses(values)}; nothing was changed. Call it with the "
                "finite losses of the batch after optimizer.step()"
            )
        before = self._snapshot()
        try:
            self._manager.hook.mtl_after_step(index=self._index, losses=values)
        except BaseException as error:
            self._restore(before)
            if isinstance(error, Exception):
                raise _translate(error) from error
            raise

    def parameters(self) -> Iterator[nn.Parameter]:
        """Learnable parameters of the plugins (UW's log-variances, ...): give them to an
        optimizer, e.g. ``torch.optim.Adam([*model.parameters(), *mtl.parameters()])``."""
        for plugin in self.plugins.values():
            yield from plugin.parameters()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MTL:
        """Move every plugin's tensors, learnable parameters included (in place, so an
        optimizer that already holds them keeps working); returns self."""
        for plugin in self.plugins.values():
            plugin.to(device=device, dtype=dtype)
        return self

    @property
    def takes_features(self) -> bool:
        """Whether ``backward(..., features=z)`` uses z: in space ``features``, and for
        ``task_specific`` other than ``aggregated`` outside space ``params`` (exact). A loop
        shared by several configs passes ``features=z if mtl.takes_features else None``."""
        if self.space is Space.FEATURES:
            return True
        return self.config.task_specific != "aggregated" and not self._engine.writes_directly

    @property
    def needs_no_sync(self) -> bool:
        """Whether DDP must not synchronise the backward passes of this pipeline (space
        ``params`` with ``sync: exact`` writes ``.grad`` itself from all-reduced per-task
        gradients): run the forward under ``model.no_sync()`` then. Never under FSDP2."""
        self._follow()
        return self._engine.needs_no_sync

    def state_dict(self) -> dict[str, Any]:
        """Plugin states, the step counter and the generator: a resumed run continues
        bit-for-bit after :meth:`load_state_dict`."""
        self.check_can_save()
        return {
            "version": 1,
            "tasks": list(self.tasks),
            "index": self._index,
            "generator": self.generator.get_state(),
            "plugins": {key: plugin.state_dict() for key, plugin in self.plugins.items()},
        }

    def check_can_save(self) -> None:
        """Raise :class:`InputError` where :meth:`state_dict` would (in the middle of an
        accumulation window of space params, whose per-task gradients are not state): for
        checkpointing code that must refuse before it writes anything else."""
        if self._pending is not None:
            raise InputError(
                "cannot save in the middle of gradient accumulation: the per-task gradients "
                "of the window's micro-steps are not part of the state. Save after the "
                "backward(..., sync=True) of the optimizer step (nothing was written)"
            )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the config must have the same tasks and plugins.

        Everything is checked before anything is loaded (the version, the tasks, the plugins,
        the step counter, the generator, and each plugin's keys, tensor shapes and dtypes); a
        mismatch raises :class:`InputError` and changes nothing."""
        if not isinstance(state, Mapping):
            raise InputError(
                f"expected the mapping of MTL.state_dict(), got {type(state).__name__}"
            )
        if state.get("version") != 1:
            raise InputError(f"unknown mtlhooks state version {state.get('version')!r}")
        missing = sorted({"tasks", "index", "generator", "plugins"} - set(state))
        if missing:
            raise InputError(f"mtlhooks state lacks {missing}: not a MTL.state_dict()")
        if tuple(state["tasks"]) != self.tasks:
            raise InputError(
                f"state is for tasks {state['tasks']}, this MTL has {list(self.tasks)}"
            )
        saved = state["plugins"]
        if not isinstance(saved, Mapping) or set(saved) != set(self.plugins):
            found = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
            raise InputError(f"state has plugins {found}, this MTL has {sorted(self.plugins)}")
        index = state["index"]
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise InputError(f"state index must be an integer >= 0, got {index!r}")
        check_state(state["generator"], self.generator.get_state(), "generator")
        for key, plugin in self.plugins.items():
            check_state(saved[key], plugin.state_dict(), f"plugin {key!r}")
        before = self._snapshot()
        try:
            for key, plugin in self.plugins.items():
                plugin.load_state_dict(clone_tree(saved[key]))
            self.generator.set_state(state["generator"])
        except Exception as error:
            self._restore(before)
            raise InputError(f"cannot load the saved state: {error}; nothing was loaded") from error
        self._index = index
        self._pending = None
        self._window_on_fast_path = False

    def close(self) -> None:
        """Let plugins flush and close their outputs (fires ``mtl_close``) and remove the
        forward hooks of the layerwise Gramian; the object is not used afterwards."""
        self._manager.hook.mtl_close()
        self._engine.close()

    def __enter__(self) -> MTL:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def describe(self) -> str:
        """One line per stage: what runs, in which order, in which space."""
        lines = [f"tasks: {', '.join(self.tasks)}", f"gradient space: {self.space.value}"]
        for key in self._call_order():
            plugin = self.plugins[key]
            lines.append(f"  {plugin.family.value:<15} {key}: {plugin.config!r}")
        return "\n".join(lines)

    # -- the pipeline -----------------------------------------------------------------------------

    def _check_tasks(self, losses: Mapping[str, object]) -> None:
        if not isinstance(losses, Mapping):
            raise InputError(f"expected a mapping task name → loss, got {type(losses).__name__}")
        unknown = [name for name in losses if name not in self.tasks]
        missing = [name for name in self.tasks if name not in losses]
        if unknown or missing:
            raise InputError(
                f"losses must have exactly the configured tasks {list(self.tasks)}; "
                f"unknown: {unknown}, missing: {missing}"
            )

    def _validate(
        self, losses: Mapping[str, Tensor], features: Tensor | None
    ) -> tuple[Tensor, ...]:
        self._check_tasks(losses)
        ordered = []
        for name in self.tasks:
            loss = losses[name]
            if not isinstance(loss, Tensor):
                raise InputError(f"loss of task {name!r} is a {type(loss).__name__}, not a tensor")
            if loss.ndim != 0:
                raise InputError(
                    f"loss of task {name!r} must be a scalar, got shape {tuple(loss.shape)}; "
                    "reduce it (e.g. .mean()) first"
                )
            if not loss.is_floating_point():
                raise InputError(
                    f"loss of task {name!r} has dtype {loss.dtype}: a loss must be a floating "
                    "point tensor computed from the model's output (an integer or boolean "
                    "tensor has no gradient; compute the loss in float)"
                )
            if not loss.requires_grad:
                raise InputError(
                    f"loss of task {name!r} has no graph (requires_grad=False): compute it from "
                    "the model's output without torch.no_grad() or .detach()"
                )
            if loss.grad_fn is None:
                raise InputError(
                    f"loss of task {name!r} is a leaf tensor, connected to no parameter: it "
                    "must be computed from the model's output (a tensor created with "
                    "requires_grad=True is not a loss of the model)"
                )
            ordered.append(loss)
        if self.space is Space.FEATURES:
            if features is None:
                hint = ""
                if self.config.space == "auto" and not self._shared:
                    hint = (
                        " (space 'auto' chose 'features' because MTL got no shared=; pass "
                        "shared=model.encoder to MTL to take per-task gradients of the shared "
                        "parameters, space 'params', instead)"
                    )
                raise InputError(
                    "gradient space 'features' needs the shared representation: call "
                    f"mtl.backward(losses, features=z) with z the trunk's output{hint}"
                )
            if not (isinstance(features, Tensor) and features.requires_grad):
                raise InputError("features= must be a tensor in the graph (requires_grad=True)")
        elif features is not None and not self._warned_features and not self.takes_features:
            self._warned_features = True
            warnings.warn(
                f"features= is ignored: the gradient space is {self.space.value!r}, not "
                "'features' (set space: features in the config to take the per-task gradients "
                "at z, or stop passing features=)",
                MTLWarning,
                stacklevel=3,
            )
        return tuple(ordered)

    def _report(self, step: Step, start: float, **fields: Any) -> StepReport:
        timings = dict(fields.pop("timings", {}))
        timings["total"] = time.perf_counter() - start
        defaults: dict[str, Any] = {
            "space": self.space,
            "loss_weights": None,
            "weights": None,
            "gramian": None,
        }
        defaults.update(fields)
        defaults.setdefault("losses", step.losses)
        return StepReport(
            index=step.index,
            tasks=self.tasks,
            timings=MappingProxyType(timings),
            **defaults,
        )

    def _nonfinite(self, step: Step, what: str, start: float) -> StepReport:
        """Follow ``on_nonfinite`` for a call found non-finite: nothing it wrote stays."""
        self._writes.rollback()
        self._engine.discard()
        if self.config.on_nonfinite == "raise":
            raise NonFiniteError(
                f"{what} at step {step.index}; nothing was written. Set on_nonfinite: skip to "
                "skip such steps instead"
            )
        if step.sync:
            # The optimizer step is skipped: the window's earlier micro-steps go with it.
            self._pending = None
        gramian = None if step.gradients is None else step.gradients.gramian.detach().clone()
        return self._report(
            step, start, losses=step.losses.clone(), gramian=gramian, skipped=True, reason=what
        )

    def _bad_losses(self, values: Tensor) -> str:
        bad = [t for t, v in zip(self.tasks, values.tolist()) if not math.isfinite(v)]
        return f"non-finite loss for task(s) {bad}"

    def _bad_gradients(self) -> str:
        """Which written gradients are non-finite (failure path: reads every one)."""
        names = {id(p): name for name, p in self._shared}
        shared, specific = [], []
        for tensor in self._writes.tensors():
            grad = tensor.grad
            if grad is None or bool(torch.isfinite(fsdp.local(grad)).all()):
                continue
            if id(tensor) in names:
                shared.append(names[id(tensor)])
            else:
                specific.append(tuple(tensor.shape))
        parts = []
        if shared:
            parts.append(f"shared parameter(s) {shared}")
        if specific:
            parts.append(f"{len(specific)} task-specific tensor(s) of shape(s) {specific}")
        return "non-finite gradient in " + (" and ".join(parts) or "a written tensor")

    def _checked_weights(self, weights: object, stage: str) -> Tensor:
        if not isinstance(weights, Tensor) or weights.shape != (len(self.tasks),):
            shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise PluginError(
                f"{stage} produced weights of shape {shape}, expected ({len(self.tasks)},)"
            )
        if weights.requires_grad:
            raise PluginError(
                f"{stage} produced weights that require grad: weights must be detached; put a "
                "learnable objective in step.add_auxiliary_loss() instead"
            )
        return weights

    @staticmethod
    def _check_finite_weights(weights: Tensor, stage: str) -> None:
        """Host tensors only (no device sync)."""
        if not _all_finite_host(weights):
            raise PluginError(
                f"{stage} produced non-finite weights {weights.tolist()}; nothing was written"
            )

    def _scale_losses(self, step: Step, timings: dict[str, float]) -> Tensor:
        mark = time.perf_counter()
        self._manager.hook.mtl_scale_losses(step=step)
        step.weights = self._checked_weights(step.weights, "loss scaling")
        timings["scale_losses"] = time.perf_counter() - mark
        return step.weights.clone()

    def _wants_gradients(self, index: int, sync: bool) -> bool:
        """Whether this call takes per-task gradients.

        Space params (``sync: exact``) under gradient accumulation aggregates once per
        optimizer step: a window accumulates per-task gradients from its first micro-step
        whenever some plugin acts per optimizer step (loss scaling, norm balancing, an
        aggregator), so that those run once, at the call with ``sync=True``, on the whole
        window; a window begun on the fast path (only observers, which did not want gradients
        then) stays on it, so an observer never sees part of a window."""
        if self.space is Space.NONE:
            return False
        if self._pending is not None:
            return True
        if self._engine.writes_directly and (not sync or self._window_on_fast_path):
            if self._window_on_fast_path:
                return False
            return self._acts_per_step
        return any(plugin.wants_gradients(index) for plugin in self._gradient_plugins)

    def _ranks_check(self, status: Tensor) -> None:
        assert self._ranks is not None
        self._ranks.check(status)

    def _leaves_signature(self, per_task: PerTask) -> Tensor | None:
        """What the ranks compare of the task-specific leaves in space params (exact)."""
        if self._ranks is None or not self._engine.writes_directly or not per_task.extras:
            return None
        shapes: list[tuple[int, ...]] = []
        seen: set[int] = set()
        for grads in per_task.extras:
            for key, grad in grads.items():
                if key not in seen:
                    seen.add(key)
                    shapes.append(tuple(grad.shape))
        known = self._engine.task_parameter_ids
        if known is not None:
            # Reduced by name: the ranks may reach different parameters of the model.
            return leaves_signature([], foreign=bool(seen - known))
        return leaves_signature(shapes, foreign=False)

    def _checks_gradients(self, step: Step) -> bool:
        """Whether this call checks the gradients it writes (not under a loss scale, whose
        GradScaler checks them itself, nor with ``check_gradients: false``)."""
        return step.loss_scale is None and self.config.check_gradients

    def _written_finite(self, gradients: bool, extra: list[Tensor]) -> bool:
        """The one host sync after writing: ``extra`` and, when ``gradients`` (not under a loss
        scale, whose GradScaler checks them itself, nor ``check_gradients: false``), every
        gradient this call wrote. None when the backward stepped (``steps_in_backward``): it
        was all checked before."""
        if self._steps_in_backward:
            return True
        tensors = list(extra)
        if gradients:
            tensors += self._writes.written()
        if not tensors:
            return True  # everything was checked on the host before writing
        flag = hostsync.all_finite(tensors)
        sharded = self._engine.sharded and self._engine.comm is not None
        if sharded:
            # Each rank wrote other shards: every rank follows the verdict on all of them.
            flag = self._agree_all_ranks(flag)
        if hostsync.host_flag(flag):
            return True
        # The quick check can suspect entries near the dtype's largest value: make sure.
        bad = hostsync.confirm_nonfinite(tensors)
        if sharded:
            bad = not hostsync.host_flag(self._agree_all_ranks(torch.tensor(not bad)))
        return not bad

    def _agree_all_ranks(self, flag: Tensor) -> Tensor:
        """True on every rank when ``flag`` is True on every rank (one all-reduce, no sync)."""
        assert self._engine.comm is not None
        bad = self._engine.comm.all_reduce((~flag).to(torch.float64).reshape(1), "max")
        return bad[0] == 0

    def _call_kind(self, sync: bool) -> str:
        """How this call runs, decided alike on every rank: ``fast`` (one weighted backward),
        ``micro`` (an accumulation micro-step of space params, exact) or ``gradients``."""
        if not self._wants_gradients(self._index, sync):
            return "fast"
        if self._engine.writes_directly and not sync:
            return "micro"
        return "gradients"

    def _fail_together(self, kind: str) -> None:
        """This rank failed before its collectives: join them (with a failure flag and zeros)
        so that the other ranks raise too instead of waiting for this one."""
        if self._ranks is None:
            return
        try:
            self._ranks.reduce(None, batch_size=None, failed=True, device=torch.device("cpu"))
            if kind == "gradients":
                self._engine.join_gradient_sync(len(self.tasks))
        except Exception:  # pragma: no cover - the collective itself broke: keep our error
            pass

    def _checked_before_stepping(self, step: Step, status: Tensor | None) -> bool:
        """Fast path of a ``backward_fn`` that steps: the one host sync, before it runs (the
        ranks' status, the losses and their weights)."""
        parts = [step.losses.double(), step.weights.double().to(step.losses.device)]
        if status is not None:
            parts.insert(0, status.to(step.losses.device))
        host = hostsync.to_host(torch.cat(parts))
        if status is not None:
            self._ranks_check(host[: status.numel()])
        if not _all_finite_host(host[-2 * step.losses.numel() : -step.losses.numel()]):
            return False
        self._check_finite_weights(host[-step.losses.numel() :], "loss scaling")
        return True

    def _micro_losses_finite(self, step: Step, status: Tensor | None) -> bool:
        """An accumulation micro-step's one host sync: the ranks' status and its losses."""
        host_values = hostsync.to_host(
            step.losses if status is None else torch.cat([status, step.losses.double()])
        )
        if status is not None:
            self._ranks_check(host_values[: status.numel()])
        return _all_finite_host(host_values)

    def _synchronise(self, step: Step, leaves: Tensor | None = None) -> Tensor | None:
        """The losses' all-reduce (every rank sees the global values; uneven shards weighted
        by their sample counts). Returns the status to check before the next collective, or
        None with one process."""
        if self._ranks is None:
            return None
        reduced = self._ranks.reduce(
            step.losses, batch_size=self._call.batch_size, failed=False, leaves=leaves
        )
        step.losses = reduced.values
        if reduced.factor is not None:
            factor = reduced.factor.to(step.loss_tensors[0].dtype)
            step.loss_tensors = tuple(loss * factor for loss in step.loss_tensors)
            self._call.factor = reduced.factor
        return reduced.status

    def _new_step(
        self,
        values: Tensor,
        weights: Tensor,
        ordered: tuple[Tensor, ...],
        features: Tensor | None,
        sync: bool,
        scale: Tensor | None,
    ) -> Step:
        return Step(
            index=self._index,
            tasks=self.tasks,
            losses=values,
            weights=weights,
            space=self.space,
            generator=self.generator,
            loss_tensors=ordered,
            features=features,
            sync=sync,
            loss_scale=scale,
            communicator=self._engine.comm,
        )

    def _failed(self, error: BaseException, step: Step, values: Tensor) -> StepReport:
        """After a call raised: nothing it wrote stays (plugin state is the caller's). The
        error is raised again (ours, or wrapped in one of ours), unless the losses are not
        finite: then they were the cause (a plugin choked on them), and ``on_nonfinite``
        decides (the skipped step's report is returned)."""
        self._writes.rollback()
        self._engine.discard()
        if not isinstance(error, Exception) or isinstance(error, NonFiniteError):
            raise error
        if _all_finite_host(values):
            raise _translate(error) from error
        return self._nonfinite(step, self._bad_losses(values), time.perf_counter())

    def _direct_call(
        self,
        losses: Mapping[str, Tensor],
        features: Tensor | None,
        sync: bool,
        batch_size: int | None,
    ) -> StepReport:
        """One call of the direct path (:meth:`_direct_path`): exactly what the fast path of
        :meth:`_run` does for such a pipeline (the same checks, writes, rollback and report),
        with as few distinct tensor operations as possible: after a forward pass every
        distinct operation a call runs costs cache misses, several times its cost warm (see
        ``benchmarks/bench_fast_path.py``)."""
        start = time.perf_counter()
        ordered = self._validate(losses, features)
        _checked_batch_size(batch_size)
        first = ordered[0]
        stacked = torch.stack(ordered)  # stack promotes mixed dtypes
        values = stacked.detach()
        dtype = _working_dtype(values.dtype)
        if values.dtype != dtype:
            values = values.to(dtype)
        constant = self._direct
        assert constant is not None
        if constant.weights is None:
            factors = None
            weights = self._ones.like(values)
        else:
            try:
                kept, factors = constant.converted(values, first.dtype)
            except PluginError:
                if _all_finite_host(values):
                    raise
                # Non-finite losses come first, as on the hook path: on_nonfinite decides.
                self._writes = GradWrites()
                step = self._new_step(
                    values, self._ones.like(values), ordered, features, sync, None
                )
                return self._nonfinite(step, self._bad_losses(values), start)
            weights = kept.clone()

        def as_step() -> Step:  # for the failure paths, which share the general path's code
            return self._new_step(values, weights, ordered, features, sync, None)

        self._writes = writes = GradWrites()
        # One process: losses on the host are checked before the backward (bad ones leave
        # nothing to undo); on a device, with the gradients, in the call's one sync.
        on_host = values.device.type == "cpu"
        if on_host and not _all_finite_host(values):
            return self._nonfinite(as_step(), self._bad_losses(values), start)
        checks = self.config.check_gradients
        mark = time.perf_counter()
        try:
            # Under autocast the sum may run in float32 (CUDA's fp32 list): the gradient that
            # reaches each loss is still exactly its weight, so no autocast context is needed.
            total = stacked.sum() if factors is None else (stacked * factors).sum()
            # Unchecked gradients are held aside (added at commit), checked ones copied.
            writes.record(graph_leaves(total, set()), hold=not checks)
            total.backward()
        except BaseException as error:
            return self._failed(error, as_step(), values)
        if not self._written_finite(checks, [] if on_host else [values]):
            return self._after_nonfinite_write(as_step(), start)
        writes.commit()
        end = time.perf_counter()
        return StepReport(
            index=self._index,
            tasks=self.tasks,
            space=Space.NONE,
            losses=values,
            loss_weights=weights,
            weights=weights,
            gramian=None,
            timings=MappingProxyType({"backward": end - mark, "total": end - start}),
        )

    def _run(self, step: Step) -> StepReport:
        start = time.perf_counter()
        timings: dict[str, float] = {}
        engine, hooks, scale = self._engine, self._manager.hook, step.loss_scale
        writes = self._writes
        kind = self._call.kind

        if kind == "fast":
            status = self._synchronise(step)
            if status is not None and not self._steps_in_backward:
                self._ranks_check(hostsync.to_host(status))
            loss_weights = self._scale_losses(step, timings)
            if self._steps_in_backward and not self._checked_before_stepping(step, status):
                return self._nonfinite(step, self._bad_losses(step.losses), start)
            # One process with losses and weights on the host: they are checked before the
            # backward (reading them costs no sync, and bad ones leave nothing to undo). On a
            # device they are checked after it, with the gradients, in the call's one sync;
            # across processes too, so that every rank runs the same backward collectives.
            checked_before = self._steps_in_backward or (
                self._ranks is None
                and self._engine.comm is None
                and _on_host(step.losses, step.weights)
            )
            if checked_before and not self._steps_in_backward:
                if not _all_finite_host(step.losses):
                    return self._nonfinite(step, self._bad_losses(step.losses), start)
                self._check_finite_weights(step.weights, "loss scaling")
            mark = time.perf_counter()
            engine.discard()  # layer records of this forward are not needed
            # Without loss scaling the weights are all one: a plain sum, as cheap as by hand.
            weights = step.weights if self._has_scaling else None
            if self.config.task_specific == "unweighted" and weights is not None:
                # Heads get Σ ∇Lᵢ, the trunk Σ wᵢ∇Lᵢ.
                engine.split_backward(
                    step.loss_tensors,
                    None,
                    weights,
                    torch.ones_like(weights),
                    step.features,
                    scale,
                    step.auxiliary_losses,
                    writes,
                )
            else:
                engine.weighted_backward(
                    step.loss_tensors,
                    weights,
                    scale,
                    auxiliary=step.auxiliary_losses,
                    writes=writes,
                    # Gradients that will not be checked, written by one backward into each
                    # leaf that nothing else sees before the call returns: the existing ones
                    # are held aside and added at commit instead of copied. (Checked ones are
                    # copied: checking a held sum would read both parts, no cheaper.)
                    hold=(
                        not self._checks_gradients(step)
                        and engine.comm is None
                        and not engine.sharded
                        and self._core_only
                        and not step.auxiliary_losses
                    ),
                )
            extra = [] if checked_before else [step.losses, step.weights]
            if not self._written_finite(self._checks_gradients(step), extra):
                return self._after_nonfinite_write(step, start)
            timings["backward"] = time.perf_counter() - mark
            return self._report(
                step,
                start,
                space=Space.NONE,
                loss_weights=loss_weights,
                weights=loss_weights,
                timings=timings,
            )

        mark = time.perf_counter()
        accumulating = self._pending is not None or kind == "micro"
        if engine.sharded:
            # FSDP's backward passes are collectives: the ranks agree before the first one, and
            # each rank's losses are weighted (uneven shards) before FSDP averages them.
            try:
                engine.check_graph(step.loss_tensors)
            except Exception:
                self._fail_together("fast")
                raise
            status = self._synchronise(step)
            if kind == "micro" and not self._micro_losses_finite(step, status):
                return self._nonfinite(step, self._bad_losses(step.losses), start)
            if kind != "micro" and status is not None:
                self._ranks_check(hostsync.to_host(status))
            status = None
            current = engine.compute(
                step.loss_tensors, step.features, scale, accumulating=accumulating, writes=writes
            )
        else:
            try:
                current = engine.compute(
                    step.loss_tensors, step.features, scale, accumulating=accumulating
                )
            except Exception:
                self._fail_together(kind)
                raise
            status = self._synchronise(step, leaves=self._leaves_signature(current))
            if self._call.factor is not None:
                current.scale_(self._call.factor)
            if kind == "micro" and not self._micro_losses_finite(step, status):
                return self._nonfinite(step, self._bad_losses(step.losses), start)
        timings["task_gradients"] = time.perf_counter() - mark

        if kind == "micro":
            # The window so far is never changed in place: a failing call leaves it as it was.
            window_losses = step.losses
            if self._pending is not None:
                current.add(self._pending[0])
                window_losses = self._pending[1] + step.losses
            self._pending = (current, window_losses)
            return self._report(step, start, accumulating=True, timings=timings)

        per_task = current
        if self._pending is not None:
            per_task.add(self._pending[0])
            step.losses = self._pending[1] + step.losses
            self._pending = None
        mark = time.perf_counter()
        gradients = engine.gradients(per_task, scale)
        step.gradients = gradients
        timings["task_gradients"] += time.perf_counter() - mark

        # Loss scaling runs on the device, before the copy to the host, so that one copy carries
        # the losses, their weights and the Gramian (and the ranks' status).
        device_weights = self._scale_losses(step, timings)
        # The one copy to the host: losses, loss weights and the Gramian. Norm balancing and
        # aggregation then run on the host (a solver's loop never waits for the device).
        losses, weights, gramian, status_host = _to_host(
            step.losses, step.weights, gradients.gramian, status
        )
        if status_host is not None:
            self._ranks_check(status_host)
        if not _all_finite_host(gramian) or not _all_finite_host(losses):
            if not _all_finite_host(losses):
                return self._nonfinite(step, self._bad_losses(losses), start)
            if scale is None:
                return self._nonfinite(step, "non-finite task gradients (Gramian)", start)
            # Mixed precision overflow: write the gradients as they are so the GradScaler sees
            # the inf, skips the optimizer step and lowers its scale.
            engine.write_weighted(step.loss_tensors, per_task, device_weights, scale, writes=writes)
            reason = "non-finite task gradients under loss scaling: left for the GradScaler"
            return self._report(step, start, gramian=gramian, skipped=True, reason=reason)
        self._check_finite_weights(weights, "loss scaling")
        step.losses, step.weights = losses, weights
        step.gradients = replace(gradients, gramian=gramian)
        loss_weights = weights.clone()

        mark = time.perf_counter()
        hooks.mtl_balance(step=step)
        step.weights = self._checked_weights(step.weights, "norm balancing")
        timings["balance"] = time.perf_counter() - mark

        mark = time.perf_counter()
        alphas = hooks.mtl_aggregate(step=step)
        combined = None if alphas is not None else hooks.mtl_combine(step=step)
        timings["aggregate"] = time.perf_counter() - mark

        mark = time.perf_counter()
        weights = step.weights.to(gramian.dtype)
        self._check_finite_weights(weights, "norm balancing")
        device = step.loss_tensors[0].device
        coefficients: Tensor | None
        if combined is not None:
            coefficients = None
            heads = (
                torch.ones_like(weights) if self.config.task_specific == "unweighted" else weights
            )
            engine.write_combined(
                step.loss_tensors,
                per_task,
                step.features,
                combined,
                hostsync.to_device(heads, device),
                scale,
                auxiliary=step.auxiliary_losses,
                writes=writes,
            )
            checked = [combined.reshape(-1)]
        else:
            if alphas is None:
                coefficients = weights
            else:
                alphas = self._checked_weights(alphas, "aggregation")
                coefficients = alphas.to(weights.device, weights.dtype) * weights
            self._check_finite_weights(coefficients, "aggregation")
            engine.write_weighted(
                step.loss_tensors,
                per_task,
                hostsync.to_device(coefficients, device),
                scale,
                heads=self._head_coefficients(weights, alphas is not None, device),
                features=step.features,
                auxiliary=step.auxiliary_losses,
                writes=writes,
            )
            checked = []
        if not self._written_finite(self._checks_gradients(step), checked):
            return self._after_nonfinite_write(step, start)
        timings["write"] = time.perf_counter() - mark
        return self._report(
            step,
            start,
            loss_weights=loss_weights,
            weights=None if coefficients is None else coefficients.detach().clone(),
            gramian=gramian,
            block_gramians=MappingProxyType(dict(zip(gradients.names, gradients.block_gramians))),
            notes=tuple(step.notes),
            timings=timings,
        )

    def _head_coefficients(
        self, weights: Tensor, aggregated: bool, device: torch.device
    ) -> Tensor | None:
        """What the task-specific parameters receive (``task_specific``), when it differs from
        the shared parameters' coefficients; ``None`` when it does not."""
        mode = self.config.task_specific
        if mode == "aggregated" or (mode == "weighted" and not aggregated):
            return None
        heads = weights if mode == "weighted" else torch.ones_like(weights)
        return hostsync.to_device(heads, device)

    def _after_nonfinite_write(self, step: Step, start: float) -> StepReport:
        """The written gradients (or the losses or weights checked with them) are not finite:
        find out which (this path may read the device freely) and follow the policy."""
        if not _all_finite_host(step.losses):
            return self._nonfinite(step, self._bad_losses(step.losses), start)
        if not _all_finite_host(step.weights):
            self._writes.rollback()
            raise PluginError(
                f"loss scaling produced non-finite weights {step.weights.tolist()}; nothing "
                "was written"
            )
        return self._nonfinite(step, self._bad_gradients(), start)

    def _snapshot(self) -> _Snapshot:
        states = {
            key: (share_tree if plugin.replaces_state else clone_tree)(plugin.state_dict())
            for key, plugin in self.plugins.items()
        }
        return states, self.generator.get_state(), self._pending

    def _restore(self, snapshot: _Snapshot, *, keep_window: bool = False) -> None:
        states, generator, pending = snapshot
        for key, plugin in self.plugins.items():
            plugin.load_state_dict(states[key])
        self.generator.set_state(generator)
        if not keep_window:
            self._pending = pending


def _ranks_of(communicator: Communicator | None) -> dict[str, int]:
    if communicator is None or communicator.world_size <= 1:
        return {"rank": 0, "world_size": 1}
    return {"rank": int(communicator.rank), "world_size": int(communicator.world_size)}


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # pragma: no cover - torch < 2.4
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return device_type == "cuda" and bool(torch.is_autocast_enabled())


def _no_autocast(device: torch.device) -> AbstractContextManager[Any]:
    """Autocast off for the device types in use (where it is on)."""
    enabled = [kind for kind in dict.fromkeys((device.type, "cpu")) if _autocast_enabled(kind)]
    if not enabled:
        return nullcontext()
    stack = ExitStack()
    for device_type in enabled:
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


_WORKING_DTYPES: dict[torch.dtype, torch.dtype] = {}


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The losses' dtype promoted to at least float32 (memoised: ``promote_types`` is a
    dispatched op, and each distinct op a call runs costs cache misses after a forward)."""
    promoted = _WORKING_DTYPES.get(dtype)
    if promoted is None:
        promoted = _WORKING_DTYPES[dtype] = torch.promote_types(dtype, torch.float32)
    return promoted


class _Direct:
    """The constant loss weights of a pipeline on the direct path (``None``: all one), kept
    converted per dtype and device."""

    def __init__(self, weights: Tensor | None) -> None:
        self.weights = weights
        self._kept: dict[tuple[torch.dtype, torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def converted(self, values: Tensor, loss_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The weights in the dtype of ``values`` (the working dtype) on its device, and those
        in the losses' dtype that multiply them: the same roundings as the hook path (float64
        → working dtype → loss dtype). Non-finite ones (a weight the working dtype cannot
        hold) raise :class:`PluginError` and are not kept."""
        key = (values.dtype, loss_dtype, values.device)
        kept = self._kept.get(key)
        if kept is None:
            assert self.weights is not None
            working = self.weights.to(values.dtype)
            if not _all_finite_host(working):
                raise PluginError(
                    f"loss scaling produced non-finite weights {working.tolist()}; nothing was "
                    "written"
                )
            working = working.to(values.device)
            kept = self._kept[key] = (working, working.to(loss_dtype))
        return kept


class _Ones:
    """Fresh tensors of ones like the losses, cloned from one kept per shape, dtype and
    device: the call's initial weights, made by the same op (``clone``) it runs anyway."""

    def __init__(self) -> None:
        self._kept: dict[tuple[torch.Size, torch.dtype, torch.device], Tensor] = {}

    def like(self, values: Tensor) -> Tensor:
        key = (values.shape, values.dtype, values.device)
        ones = self._kept.get(key)
        if ones is None:
            ones = self._kept[key] = torch.ones_like(values)
        return ones.clone()


def _on_host(*tensors: Tensor) -> bool:
    """Whether every tensor is on the CPU, where reading it costs no device sync."""
    return all(tensor.device.type == "cpu" for tensor in tensors)


def _all_finite_host(tensor: Tensor) -> bool:
    """For host tensors (or a failure path): a plain check. A few values on the CPU (losses,
    weights) are read as Python floats, several times cheaper than three tensor ops."""
    if tensor.device.type == "cpu" and tensor.ndim == 1 and tensor.numel() <= 256:
        return all(map(math.isfinite, tensor.tolist()))
    return bool(torch.isfinite(tensor).all())


def _to_host(
    losses: Tensor, weights: Tensor, gramian: Tensor, status: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One copy to the host of the losses, the loss weights, the Gramian and the ranks' status
    (each keeps its dtype)."""
    dtype = torch.promote_types(torch.promote_types(losses.dtype, weights.dtype), gramian.dtype)
    if status is not None:
        dtype = torch.promote_types(dtype, status.dtype)
    device = gramian.device
    parts = [
        losses.to(device, dtype).reshape(-1),
        weights.to(device, dtype).reshape(-1),
        gramian.to(dtype).reshape(-1),
    ]
    if status is not None:
        parts.append(status.to(device, dtype))
    host = hostsync.to_host(torch.cat(parts))
    count, size = losses.numel(), gramian.numel()
    end = 2 * count + size
    return (
        host[:count].to(losses.dtype),
        host[count : 2 * count].to(weights.dtype),
        host[2 * count : end].reshape(gramian.shape).to(gramian.dtype),
        None if status is None else host[end:],
    )


@dataclass(frozen=True)
class _Sources:
    """What the engine is built from, kept to rebuild it (:meth:`MTL._follow`)."""

    shared: nn.Module | None
    last_shared: nn.Module | None
    model: nn.Module | None
    backward_fn: Callable[[Tensor], None] | None


@dataclass
class _Call:
    """What one backward() call decided before it ran."""

    kind: str
    batch_size: int | None
    factor: Tensor | None = None


def _checked_batch_size(batch_size: object) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1 (or None), got {batch_size!r}")
    return batch_size


_KNOWN_AUTOGRAD_ERRORS = (
    (
        "backward through the graph a second time",
        "the losses' graph was already used and freed: mtl.backward() (or loss.backward()) ran "
        "twice on the same forward pass. Run a new forward pass for every backward() call",
    ),
    (
        "use_reentrant=True, torch.utils.checkpoint is incompatible with .grad()",
        "the losses' graph holds a reentrant activation checkpoint "
        "(torch.utils.checkpoint.checkpoint with use_reentrant=True), which per-task gradients "
        "(torch.autograd.grad) cannot go through. Checkpoint with use_reentrant=False (for "
        "Hugging Face models, gradient_checkpointing_enable(gradient_checkpointing_kwargs="
        "{'use_reentrant': False})), or use space 'features' with z outside the checkpoint",
    ),
    (
        "donated buffer",
        "a torch.compile'd module freed ('donated') buffers its backward needs again: "
        "mtlhooks takes one backward per task with retain_graph=True. Set "
        "torch._functorch.config.donated_buffer = False before compiling",
    ),
    (
        "modified by an inplace operation",
        "a tensor the backward pass needs was changed in place after the forward (e.g. an "
        "optimizer step or an in-place op between the forward and mtl.backward())",
    ),
)


def _translate(error: Exception) -> Exception:
    """The error to raise for one from inside the pipeline: ours as they are; torch's and
    others' wrapped in an :class:`MTLError` that says what to change."""
    if isinstance(error, (MTLError, torch.OutOfMemoryError)):
        return error
    text = str(error)
    for pattern, explanation in _KNOWN_AUTOGRAD_ERRORS:
        if pattern in text:
            return InputError(f"{explanation} (torch: {text.splitlines()[0]})")
    if isinstance(error, RuntimeError):
        return GradientError(
            "mtl.backward() failed inside torch while taking or writing gradients: "
            f"{type(error).__name__}: {text}. Nothing was written"
        )
    return PluginError(
        f"a hook of mtl.backward() raised {type(error).__name__}: {text}. Nothing was written "
        "(see the chained traceback for the plugin)"
    )
