"""The pipeline: :class:`MTL` turns per-task losses into ``.grad`` on every parameter.

See :mod:`mtlhooks.hookspecs` for the hooks it fires and their order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from mtlhooks import registry
from mtlhooks.config import MTLConfig, load_config
from mtlhooks.errors import ConfigError, InputError, NonFiniteError, PluginError
from mtlhooks.plugin import Family, Need, Plugin, Setup, Space, hookimpl
from mtlhooks.report import StepReport
from mtlhooks.step import Step, TaskGradients

ParameterSource = nn.Module | Iterable[Tensor]

# Order of preference of `space: auto` when the plugins' own first choices differ: most exact first.
_EXACTNESS = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
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
    if isinstance(source, nn.Module):
        named = [(n, p) for n, p in source.named_parameters() if p.requires_grad]
    elif isinstance(source, Tensor):
        raise InputError(f"{label}= takes a module or an iterable of parameters, not one tensor")
    else:
        named = [(f"{label}[{i}]", p) for i, p in enumerate(source) if p.requires_grad]
    if not named:
        raise InputError(f"{label}= holds no parameter that requires grad")
    return named


def _last_layer(module: nn.Module) -> nn.Module:
    """The last sub-module (in registration order) owning parameters that require grad."""
    last: nn.Module | None = None
    for sub in module.modules():
        if any(p.requires_grad for p in sub.parameters(recurse=False)):
            last = sub
    if last is None:  # pragma: no cover - _named_parameters already refused an empty module
        raise InputError("shared module has no parameter")
    return last


def _graph_leaves(root: Tensor, exclude: set[int]) -> list[Tensor]:
    """Leaf tensors that ``root.backward()`` would accumulate into, except those in ``exclude``."""
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
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def _accumulate(parameter: Tensor, gradient: Tensor) -> None:
    """Add ``gradient`` into ``parameter.grad`` as ``Tensor.backward`` would."""
    if parameter.grad is None:
        parameter.grad = (
            gradient.detach()
            .reshape(parameter.shape)
            .to(parameter.dtype)
            .clone(memory_format=torch.contiguous_format)
        )
    else:
        parameter.grad.add_(gradient.reshape(parameter.shape).to(parameter.grad.dtype))


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
    ) -> None:
        self.config = load_config(config)
        self.tasks: tuple[str, ...] = self.config.tasks
        self._shared = _named_parameters(shared, "shared")
        if last_shared is None and isinstance(shared, nn.Module):
            last_shared = _last_layer(shared)
        self._last_shared = _named_parameters(last_shared, "last_shared")
        self.space = self._resolve_space()
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self._index = 0
        self.last_report: StepReport | None = None
        # Task-specific leaves met in space 'params', by id, until their gradient is written.
        self._leaves_seen: dict[int, Tensor] = {}

        setup = Setup(tasks=self.tasks, space=self.space, seed=self.config.seed)
        self.plugins: dict[str, Plugin] = {}
        for position, entry in enumerate(self.config.plugins):
            key = entry.name if entry.name not in self.plugins else f"{entry.name}#{position}"
            self.plugins[key] = entry.info.cls(entry.options, setup)
        self._gradient_plugins = [
            plugin for plugin in self.plugins.values() if plugin.needs is not Need.NOTHING
        ]
        self._manager = registry.new_plugin_manager()
        self._manager.register(_Core(self), name="mtlhooks.core")
        # pluggy calls implementations last-registered-first: register in reverse of the order
        # we want (config order, observers last) and check the result below.
        wanted = self._call_order()
        for key in reversed(wanted):
            self._manager.register(self.plugins[key], name=key)
        self._check_call_order(wanted)

    @classmethod
    def from_config(
        cls,
        config: MTLConfig | Mapping[str, Any] | str | Path,
        *,
        shared: ParameterSource | None = None,
        last_shared: ParameterSource | None = None,
    ) -> MTL:
        """Build from a config object, mapping or file; same arguments as the constructor."""
        return cls(config, shared=shared, last_shared=last_shared)

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

    def _available(self, space: Space) -> bool:
        if space is Space.PARAMS:
            return bool(self._shared)
        if space is Space.LAST_SHARED:
            return bool(self._last_shared)
        return True

    def _resolve_space(self) -> Space:
        users = self.config.gradient_plugins()
        if self.config.space != "auto":
            space = Space(self.config.space)
        elif not users:
            space = Space.NONE
        else:
            common = [s for s in self.config.common_spaces() if self._available(s)]
            firsts = {entry.info.spaces[0] for entry in users}
            if not common:
                names = [entry.name for entry in users]
                raise ConfigError(
                    f"plugins {names} need per-task gradients in one of "
                    f"{[s.value for s in self.config.common_spaces()]}: pass shared= (and "
                    "last_shared=) to MTL, or features= to backward() with space 'features'"
                )
            if len(firsts) == 1 and next(iter(firsts)) in common:
                space = next(iter(firsts))
            else:
                space = next(s for s in _EXACTNESS if s in common)
        if not self._available(space):
            needed = "shared=" if space is Space.PARAMS else "last_shared= (or a shared= module)"
            raise ConfigError(f"space {space.value!r} needs {needed} when building MTL")
        return space

    # -- public API -----------------------------------------------------------------------------

    def backward(
        self, losses: Mapping[str, Tensor], *, features: Tensor | None = None
    ) -> StepReport:
        """Fill ``.grad`` from per-task losses, through the configured plugins.

        :param losses: task name → scalar loss tensor with a graph, one per configured task.
        :param features: the shared representation z, needed in space ``features``.
        :returns: the :class:`StepReport` of this call (also ``mtl.last_report``).
        """
        ordered = self._validate(losses, features)
        dtype = torch.promote_types(ordered[0].dtype, torch.float32)
        values = torch.stack([loss.detach().to(dtype) for loss in ordered])
        step = Step(
            index=self._index,
            tasks=self.tasks,
            losses=values,
            weights=torch.ones_like(values),
            space=self.space,
            generator=self.generator,
            features=features,
            loss_tensors=ordered,
        )
        report: StepReport = self._manager.hook.mtl_backward(step=step)
        self._index += 1
        self.last_report = report
        self._manager.hook.mtl_observe(report=report)
        return report

    def after_step(self, losses: Mapping[str, Tensor]) -> None:
        """Tell plugins the losses after ``optimizer.step()`` (fires ``mtl_after_step``).

        Methods such as FAMO learn from the change of each loss over one step; call this after
        ``optimizer.step()`` with the losses of the same batch recomputed (under
        ``torch.no_grad()`` is fine: only the values are used).
        """
        self._check_tasks(losses)
        dtype = torch.promote_types(next(iter(losses.values())).dtype, torch.float32)
        values = torch.stack([torch.as_tensor(losses[t]).detach().to(dtype) for t in self.tasks])
        self._manager.hook.mtl_after_step(index=self._index, losses=values)

    def parameters(self) -> Iterator[nn.Parameter]:
        """Learnable parameters of the plugins (UW's log-variances, ...): give them to an
        optimizer, e.g. ``torch.optim.Adam([*model.parameters(), *mtl.parameters()])``."""
        for plugin in self.plugins.values():
            yield from plugin.parameters()

    def state_dict(self) -> dict[str, Any]:
        """Plugin states, the step counter and the generator: a resumed run continues
        bit-for-bit after :meth:`load_state_dict`."""
        return {
            "version": 1,
            "tasks": list(self.tasks),
            "index": self._index,
            "generator": self.generator.get_state(),
            "plugins": {key: plugin.state_dict() for key, plugin in self.plugins.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the config must have the same tasks and plugins."""
        if state.get("version") != 1:
            raise InputError(f"unknown mtlhooks state version {state.get('version')!r}")
        if tuple(state["tasks"]) != self.tasks:
            raise InputError(
                f"state is for tasks {state['tasks']}, this MTL has {list(self.tasks)}"
            )
        saved = state["plugins"]
        if set(saved) != set(self.plugins):
            raise InputError(
                f"state has plugins {sorted(saved)}, this MTL has {sorted(self.plugins)}"
            )
        for key, plugin in self.plugins.items():
            plugin.load_state_dict(saved[key])
        self._index = int(state["index"])
        self.generator.set_state(state["generator"])

    def close(self) -> None:
        """Let plugins flush and close their outputs (fires ``mtl_close``)."""
        self._manager.hook.mtl_close()

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
        if not isinstance(losses, Mapping):
            raise InputError(
                f"backward() takes a mapping task name → loss, got {type(losses).__name__}"
            )
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
            if not loss.requires_grad:
                raise InputError(
                    f"loss of task {name!r} has no graph (requires_grad=False): compute it from "
                    "the model's output without torch.no_grad() or .detach()"
                )
            if not loss.is_floating_point():
                raise InputError(f"loss of task {name!r} has non-float dtype {loss.dtype}")
            ordered.append(loss)
        if self.space is Space.FEATURES:
            if features is None:
                raise InputError(
                    "gradient space 'features' needs the shared representation: call "
                    "mtl.backward(losses, features=z) with z the trunk's output"
                )
            if not (isinstance(features, Tensor) and features.requires_grad):
                raise InputError("features= must be a tensor in the graph (requires_grad=True)")
        return tuple(ordered)

    def _nonfinite(self, step: Step, what: str, start: float) -> StepReport:
        if self.config.on_nonfinite == "raise":
            raise NonFiniteError(
                f"{what} at step {step.index}; nothing was written. Set on_nonfinite: skip to "
                "skip such steps instead"
            )
        return StepReport(
            index=step.index,
            tasks=self.tasks,
            space=self.space,
            losses=step.losses.clone(),
            loss_weights=None,
            weights=None,
            gramian=None if step.gradients is None else step.gradients.gramian.detach().clone(),
            skipped=True,
            reason=what,
            timings=MappingProxyType({"total": time.perf_counter() - start}),
        )

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

    def _run(self, step: Step) -> StepReport:
        start = time.perf_counter()
        timings: dict[str, float] = {}
        if not bool(torch.isfinite(step.losses).all()):
            bad = [
                t
                for t, v in zip(self.tasks, step.losses.tolist())
                if not torch.isfinite(torch.tensor(v))
            ]
            return self._nonfinite(step, f"non-finite loss for task(s) {bad}", start)

        hooks = self._manager.hook
        mark = time.perf_counter()
        hooks.mtl_scale_losses(step=step)
        step.weights = self._checked_weights(step.weights, "loss scaling")
        loss_weights = step.weights.clone()
        timings["scale_losses"] = time.perf_counter() - mark

        if self.space is Space.NONE or not any(
            plugin.wants_gradients(step.index) for plugin in self._gradient_plugins
        ):
            mark = time.perf_counter()
            self._check_finite_weights(step.weights, "loss scaling")
            self._weighted_backward(
                step.loss_tensors, step.weights, has_weights=self._has_scaling()
            )
            self._backward_auxiliary(step)
            timings["backward"] = time.perf_counter() - mark
            timings["total"] = time.perf_counter() - start
            return StepReport(
                index=step.index,
                tasks=self.tasks,
                space=Space.NONE,
                losses=step.losses,
                loss_weights=loss_weights,
                weights=loss_weights,
                gramian=None,
                timings=MappingProxyType(timings),
            )

        mark = time.perf_counter()
        gradients, extra = self._task_gradients(step)
        timings["task_gradients"] = time.perf_counter() - mark
        step.gradients = gradients
        if not bool(torch.isfinite(gradients.gramian).all()):
            return self._nonfinite(step, "non-finite task gradients (Gramian)", start)

        mark = time.perf_counter()
        hooks.mtl_balance(step=step)
        step.weights = self._checked_weights(step.weights, "norm balancing")
        timings["balance"] = time.perf_counter() - mark

        mark = time.perf_counter()
        alphas = hooks.mtl_aggregate(step=step)
        combined = None if alphas is not None else hooks.mtl_combine(step=step)
        timings["aggregate"] = time.perf_counter() - mark

        mark = time.perf_counter()
        weights = step.weights.to(gradients.gramian.dtype)
        if combined is not None:
            coefficients = None
            self._check_finite_weights(torch.cat([weights, combined.reshape(-1)]), "aggregation")
            self._write_combined(step, combined, weights, extra)
        else:
            if alphas is None:
                coefficients = weights
            else:
                alphas = self._checked_weights(alphas, "aggregation")
                coefficients = alphas.to(weights.dtype) * weights
            self._check_finite_weights(coefficients, "aggregation")
            self._write_weighted(step, coefficients, extra)
        self._backward_auxiliary(step)
        timings["write"] = time.perf_counter() - mark
        timings["total"] = time.perf_counter() - start
        return StepReport(
            index=step.index,
            tasks=self.tasks,
            space=self.space,
            losses=step.losses,
            loss_weights=loss_weights,
            weights=None if coefficients is None else coefficients.detach().clone(),
            gramian=gradients.gramian.detach(),
            block_gramians=MappingProxyType(
                dict(zip(gradients.names, gradients.block_gramians))
            ),
            timings=MappingProxyType(timings),
        )

    def _has_scaling(self) -> bool:
        return any(p.family is Family.LOSS_SCALING for p in self.plugins.values())

    @staticmethod
    def _check_finite_weights(weights: Tensor, stage: str) -> None:
        if not bool(torch.isfinite(weights).all()):
            raise PluginError(
                f"{stage} produced non-finite weights {weights.tolist()}; nothing was written"
            )

    @staticmethod
    def _weighted_backward(
        losses: tuple[Tensor, ...], weights: Tensor, *, has_weights: bool
    ) -> None:
        if has_weights:
            total = (torch.stack(losses) * weights.to(losses[0].dtype)).sum()
        else:
            total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        total.backward()

    @staticmethod
    def _backward_auxiliary(step: Step) -> None:
        if step.auxiliary_losses:
            torch.stack(step.auxiliary_losses).sum().backward()

    # -- gradient spaces ----------------------------------------------------------------------

    def _task_gradients(self, step: Step) -> tuple[TaskGradients, list[dict[int, Tensor]]]:
        """Per-task gradients of the unweighted losses in the chosen space.

        Returns the gradients and, in space ``params``, each task's gradients of its
        task-specific leaves (keyed by ``id``), so that no second backward is needed.
        """
        losses = step.loss_tensors
        if self.space is Space.FEATURES:
            assert step.features is not None
            z = step.features
            found = [
                torch.autograd.grad(loss, z, retain_graph=True, allow_unused=True)[0]
                for loss in losses
            ]
            if all(grad is None for grad in found):
                raise InputError("features= is not in the graph of any loss: pass the trunk output")
            rows = [torch.zeros_like(z) if grad is None else grad for grad in found]
            block = torch.stack(rows).reshape(len(losses), -1)
            return TaskGradients.from_blocks(self.space, ["features"], [block]), []

        named = self._shared if self.space is Space.PARAMS else self._last_shared
        params = [p for _, p in named]
        shared_ids = {id(p) for p in params}
        last = len(losses) - 1
        per_task: list[tuple[Tensor | None, ...]] = []
        extras: list[dict[int, Tensor]] = []
        for i, loss in enumerate(losses):
            leaves = _graph_leaves(loss, shared_ids) if self.space is Space.PARAMS else []
            grads = torch.autograd.grad(
                loss,
                params + leaves,
                retain_graph=self.space is not Space.PARAMS or i < last,
                allow_unused=True,
            )
            per_task.append(grads[: len(params)])
            extras.append(
                {id(leaf): g for leaf, g in zip(leaves, grads[len(params) :]) if g is not None}
            )
            self._leaves_seen.update((id(leaf), leaf) for leaf in leaves)
        blocks = []
        for j, (name, p) in enumerate(named):
            column = [grads[j] for grads in per_task]
            if all(g is None for g in column):
                raise InputError(
                    f"shared parameter {name!r} receives no gradient from any task: remove it "
                    "from shared= (or set requires_grad=False), or check the forward pass"
                )
            blocks.append(
                torch.stack([torch.zeros_like(p) if g is None else g for g in column]).reshape(
                    len(losses), -1
                )
            )
        names = [name for name, _ in named]
        return TaskGradients.from_blocks(self.space, names, blocks), extras

    def _write_weighted(
        self, step: Step, coefficients: Tensor, extras: list[dict[int, Tensor]]
    ) -> None:
        if self.space is not Space.PARAMS:
            # The gradient of Σ c_i L_i is Σ c_i ∇L_i everywhere (chain rule): one backward
            # writes shared and task-specific parameters alike.
            self._weighted_backward(step.loss_tensors, coefficients, has_weights=True)
            return
        assert step.gradients is not None
        for (_, p), block in zip(self._shared, step.gradients.blocks):
            _accumulate(p, coefficients.to(block.dtype) @ block)
        self._write_task_specific(coefficients, extras)

    def _write_task_specific(self, coefficients: Tensor, extras: list[dict[int, Tensor]]) -> None:
        totals: dict[int, Tensor] = {}
        for c, grads in zip(coefficients, extras):
            for key, grad in grads.items():
                term = grad * c.to(grad.dtype)
                totals[key] = term if key not in totals else totals[key] + term
        for key, total in totals.items():
            _accumulate(self._leaves_seen[key], total)
        self._leaves_seen.clear()

    def _write_combined(
        self, step: Step, combined: Tensor, weights: Tensor, extras: list[dict[int, Tensor]]
    ) -> None:
        gradients = step.gradients
        assert gradients is not None
        width = sum(block.shape[1] for block in gradients.blocks)
        if combined.shape != (width,):
            raise PluginError(
                f"combined gradient has shape {tuple(combined.shape)}, expected ({width},)"
            )
        if self.space is Space.FEATURES:
            assert step.features is not None
            replacement = combined.reshape(step.features.shape).to(step.features.dtype)
            handle = step.features.register_hook(lambda _grad: replacement)
            try:
                self._weighted_backward(step.loss_tensors, weights, has_weights=True)
            finally:
                handle.remove()
            return
        if self.space is Space.PARAMS:
            offset = 0
            for (_, p), block in zip(self._shared, gradients.blocks):
                size = block.shape[1]
                _accumulate(p, combined[offset : offset + size])
                offset += size
            self._write_task_specific(weights, extras)
            return
        raise PluginError(
            f"coordinate-wise aggregation is defined in spaces 'features' and 'params', "
            f"not {self.space.value!r}"
        )
