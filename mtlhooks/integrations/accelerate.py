"""Hugging Face Accelerate: per-task losses through mtlhooks in an Accelerate loop.

The loop keeps its shape; ``accelerator.accumulate(model)`` becomes ``mtl.accumulate(model)``
and ``accelerator.backward(loss)`` becomes ``mtl.backward(losses)``::

    from accelerate import Accelerator
    from mtlhooks.integrations.accelerate import AcceleratedMTL

    accelerator = Accelerator(gradient_accumulation_steps=4, mixed_precision="fp16")
    model = Net()
    mtl = AcceleratedMTL(accelerator, "mtl.yaml", shared=model.encoder)
    optimizer = torch.optim.AdamW([*model.parameters(), *mtl.parameters()])
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    for x, y in loader:
        with mtl.accumulate(model):      # accelerator.accumulate(model) + no_sync if needed
            z, outputs = model(x)
            mtl.backward({t: loss_fn(outputs[t], y[t]) for t in tasks}, features=z)
            optimizer.step()
            optimizer.zero_grad()

What :meth:`AcceleratedMTL.backward` does for you, as ``Accelerator.backward`` would:

- divides every loss by ``accelerator.gradient_accumulation_steps``;
- passes ``sync=accelerator.sync_gradients``: in space ``params`` (``sync: exact``) the per-task
  gradients of the micro-steps are summed and aggregated once, at the step that syncs (the same
  as one batch holding every micro-batch); in the other spaces every micro-step is aggregated on
  its own and ``.grad`` accumulates (``docs/distributed.md``);
- passes ``accelerator.scaler`` (fp16) as the loss scale: gradients are written scaled for the
  scaler, Gramians are unscaled before any plugin reads them, and an overflow leaves the
  infinite gradients for the scaler, which skips the step and lowers its scale;
- :meth:`AcceleratedMTL.accumulate` / :meth:`AcceleratedMTL.no_sync` run the forward under
  DDP's ``no_sync`` when the pipeline writes ``.grad`` itself from all-reduced per-task gradients
  (``mtl.needs_no_sync``), on the step that syncs too (``accelerator.accumulate`` alone only
  does it on the others).

The pipeline's state (plugin states, step counter, seeded generator) is registered with
``accelerator.register_for_checkpointing`` so ``save_state`` / ``load_state`` resume it;
observers that can log to a tracker (``gradstats``) are attached to the accelerator, so their
records reach every tracker given to ``Accelerator(log_with=...)``. ``mtl.accelerator`` is the
accelerator for plugins and callbacks that want to call ``accelerator.log`` themselves.

FSDP2 (``FullyShardedDataParallelPlugin(fsdp_version=2)``) works in every space: pass
``model=model`` (the module given to ``prepare``); the pipeline, built before or after
``prepare``, follows the sharded parameters ``prepare`` puts in place (:mod:`mtlhooks.fsdp`).
DeepSpeed runs the optimizer step inside its own backward: the weighted backward goes through
``accelerator.backward`` (checked before it, since nothing can be undone after it), ZeRO 1-2
with loss-level plugins and spaces ``features``/``last_shared`` (``model=`` needed there),
ZeRO-3 with loss-level plugins only; what is refused and why is declared in
:mod:`mtlhooks.support`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

from mtlhooks import support
from mtlhooks.config import MTLConfig
from mtlhooks.core import MTL, ParameterSource
from mtlhooks.errors import ConfigError, InputError
from mtlhooks.integrations.ddp import check_static_graph
from mtlhooks.plugin import Family, Need, Space
from mtlhooks.report import StepReport

__all__ = ["AcceleratedMTL", "backward", "check_supported"]


def check_supported(accelerator: Accelerator, mtl: MTL) -> None:
    """Raise :class:`mtlhooks.ConfigError` when ``mtl`` cannot run under ``accelerator``'s
    distributed setup, and :class:`mtlhooks.InputError` when ``mtl`` would not talk to the
    other processes."""
    kind = accelerator.distributed_type
    gradient_plugins = [
        key for key, plugin in mtl.plugins.items() if plugin.needs is not Need.NOTHING
    ]
    space = support.space_key(mtl.space.value, mtl.config.sync)
    if kind == DistributedType.DEEPSPEED:
        stage = _zero_stage(accelerator)
        engine = support.Engine.ZERO3 if stage >= 3 else support.Engine.ZERO12
        support.check(engine, space, gradient_plugins)
        if not mtl._steps_in_backward:
            raise ConfigError(
                "under DeepSpeed the weighted backward must go through the DeepSpeed engine, "
                "which also steps: give AcceleratedMTL a config (not an MTL), so that it routes "
                "the backward through accelerator.backward"
            )
    if kind == DistributedType.MEGATRON_LM:
        raise ConfigError("Megatron-LM is not supported by mtlhooks")
    if kind == DistributedType.FSDP:
        plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
        if getattr(plugin, "fsdp_version", 1) != 2:
            support.check(support.Engine.FSDP1, space, gradient_plugins)
        elif mtl._sources.model is None:
            raise ConfigError(
                "under FSDP2 pass the model to AcceleratedMTL (model=model, the module you "
                "give accelerator.prepare): every gradient FSDP writes lands on its sharded "
                "parameters, which the pipeline must know to write or undo them"
            )
        else:
            support.check(support.Engine.FSDP2, space, gradient_plugins)
    processes = accelerator.num_processes
    if processes > 1:
        communicator = mtl.communicator
        if communicator is None or communicator.world_size != processes:
            found = "none" if communicator is None else f"{communicator.world_size} processes"
            raise InputError(
                f"the accelerator runs {processes} processes but this MTL's communicator is "
                f"{found}: build the MTL after Accelerator() (AcceleratedMTL does it for you "
                "when given a config), or the ranks aggregate different gradients and drift apart"
            )


def _zero_stage(accelerator: Accelerator) -> int:
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", 0) or 0)


class _DeepSpeedOutputs:
    """The DeepSpeed engine's backward, and the hooks it puts on what its forward returns.

    DeepSpeed (0.18 and later) hooks every tensor its engine's forward returns: the first
    backward pass through them runs ZeRO's backward prologue and, at its end, the epilogue
    that reduces the gradients. The per-task gradients (``torch.autograd.grad`` through the
    heads) must not be that pass: the hooks are lifted while they are taken and put back for
    the engine's own backward of the weighted losses. A forward hook on ``model`` (the module
    the engine runs) sees those outputs."""

    def __init__(self, accelerator: Accelerator, model: nn.Module | None) -> None:
        self.accelerator = accelerator
        self.outputs: Any = None
        self.lifted: list[Any] = []
        self.handle = None if model is None else model.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.outputs = output

    def lift(self) -> None:
        managers: list[Any] = []
        for tensor in _tensors(self.outputs):
            managers.extend(getattr(tensor, "_backward_hook_managers", ()))
        for manager in managers:
            manager.remove_hooks()
        self.lifted = managers

    def restore(self) -> None:
        for manager in self.lifted:
            manager.register_hooks_on_outputs(self.outputs)
        self.lifted = []

    def backward(self, total: Tensor) -> None:
        """The one weighted backward through the engine (which steps at the end of an
        accumulation window). The losses were already divided by the accumulation steps, as
        ``Accelerator.backward`` does elsewhere: the engine must not divide them again."""
        self.restore()
        self.outputs = None
        self.accelerator.backward(total, scale_wrt_gas=False)


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)


def backward(
    accelerator: Accelerator,
    mtl: MTL,
    losses: Mapping[str, Tensor],
    *,
    features: Tensor | None = None,
) -> StepReport:
    """``mtl.backward(losses)`` the way ``accelerator.backward(loss)`` would: losses divided by
    ``gradient_accumulation_steps``, ``sync=accelerator.sync_gradients`` and
    ``loss_scale=accelerator.scaler``. :class:`AcceleratedMTL` calls this."""
    steps = accelerator.gradient_accumulation_steps
    if steps > 1:
        losses = {task: loss / steps for task, loss in losses.items()}
    try:
        return mtl.backward(
            losses,
            features=features,
            sync=accelerator.sync_gradients,
            loss_scale=accelerator.scaler,
        )
    except InputError as error:
        if _is_converted_copy(accelerator, features):
            raise InputError(
                "features= is a float32 copy that Accelerate made of the model's fp16/bf16 "
                "output after the forward (mixed precision converts every half-precision "
                "output): the heads consumed the original, so no loss depends on this copy. "
                "Return z in float32 from the model's forward instead, e.g. "
                "`z = self.encoder(x).float()` before the heads; Accelerate then returns that "
                "very tensor"
            ) from error
        raise


def _is_converted_copy(accelerator: Accelerator, features: Tensor | None) -> bool:
    node = None if features is None else features.grad_fn
    return bool(accelerator.native_amp) and node is not None and node.name() == "ToCopyBackward0"


class AcceleratedMTL:
    """An :class:`mtlhooks.MTL` bound to an ``accelerate.Accelerator``.

    :param accelerator: the accelerator of the run (build it first: it starts the processes'
        group, which the pipeline needs to synchronise).
    :param config: an :class:`MTLConfig`, a mapping, a path to a config file, or an
        :class:`mtlhooks.MTL` built after the accelerator (then ``shared`` and ``last_shared``
        must be left out).
    :param shared: the shared trunk (the module of the unwrapped model, e.g. ``model.encoder``,
        before or after ``accelerator.prepare``: preparing keeps the parameter objects).
    :param last_shared: the last shared layer (space ``last_shared``).
    :param checkpoint: register the pipeline with ``accelerator.register_for_checkpointing``.
        Accelerate restores registered objects by position: register the same objects in the
        same order when resuming.
    :param log: attach the accelerator to every observer that can log to a tracker
        (:meth:`mtlhooks.plugins.gradstats.GradStats.attach`).

    Attributes: :attr:`accelerator`, :attr:`mtl` (the pipeline: ``mtl.mtl.last_report``,
    ``mtl.mtl.describe()``, ...).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        config: MTL | MTLConfig | Mapping[str, Any] | str | Path,
        *,
        shared: ParameterSource | None = None,
        last_shared: ParameterSource | None = None,
        model: nn.Module | None = None,
        checkpoint: bool = True,
        log: bool = True,
    ) -> None:
        self.accelerator = accelerator
        self._deepspeed: _DeepSpeedOutputs | None = None
        if isinstance(config, MTL):
            if shared is not None or last_shared is not None or model is not None:
                raise InputError(
                    "AcceleratedMTL got an MTL and shared=/last_shared=/model=: give the "
                    "parameters to the MTL, or give AcceleratedMTL a config"
                )
            self.mtl = config
        else:
            deepspeed = None
            if accelerator.distributed_type == DistributedType.DEEPSPEED:
                deepspeed = self._deepspeed = _DeepSpeedOutputs(accelerator, model)
            self.mtl = MTL(
                config,
                shared=shared,
                last_shared=last_shared,
                # DeepSpeed writes the gradients itself (it is no sharded model of ours).
                model=None if deepspeed else model,
                backward_fn=None if deepspeed is None else deepspeed.backward,
                steps_in_backward=deepspeed is not None,
            )
        check_supported(accelerator, self.mtl)
        if self._deepspeed is not None and model is None and self.mtl.space is not Space.NONE:
            raise ConfigError(
                f"under DeepSpeed, space {self.mtl.space.value!r} needs the model: pass "
                "AcceleratedMTL(..., model=model) (the module given to accelerator.prepare), so "
                "that the per-task gradients are taken apart from DeepSpeed's own backward"
            )
        self.mtl.to(accelerator.device)
        if checkpoint:
            accelerator.register_for_checkpointing(self.mtl)
            # save_state writes the model, optimizer and RNG files before it asks registered
            # objects for their state: refuse a save in the middle of an accumulation window
            # before anything is written.
            accelerator.register_save_state_pre_hook(self._refuse_mid_window)
        if log:
            for plugin in self.mtl.plugins.values():
                attach = getattr(plugin, "attach", None)
                if plugin.family is Family.OBSERVER and callable(attach):
                    attach(accelerator)

    def _refuse_mid_window(self, models: Any, weights: Any, output_dir: str) -> None:
        self.mtl.check_can_save()

    # -- the loop ---------------------------------------------------------------------------------

    def backward(
        self, losses: Mapping[str, Tensor], *, features: Tensor | None = None
    ) -> StepReport:
        """Replace ``accelerator.backward(loss)``: see :func:`backward`."""
        if self._deepspeed is None:
            return backward(self.accelerator, self.mtl, losses, features=features)
        if self.mtl.space is not Space.NONE:
            self._deepspeed.lift()
        try:
            return backward(self.accelerator, self.mtl, losses, features=features)
        finally:
            self._deepspeed.restore()

    @contextmanager
    def no_sync(self, *models: nn.Module) -> Iterator[None]:
        """Context for the forward pass: ``accelerator.no_sync(model)`` for each model when the
        pipeline writes ``.grad`` from all-reduced per-task gradients (``needs_no_sync``),
        nothing otherwise. Use it inside ``accelerator.accumulate(model)``, or use
        :meth:`accumulate`, which does both."""
        check_static_graph(self.mtl, *models)
        with ExitStack() as stack:
            if self.mtl.needs_no_sync:
                for model in models:
                    stack.enter_context(self.accelerator.no_sync(model))
            yield

    @contextmanager
    def accumulate(self, *models: nn.Module) -> Iterator[None]:
        """Replace ``accelerator.accumulate(model)``: the same, plus :meth:`no_sync` (which
        ``accelerator.accumulate`` leaves out on the micro-step that synchronises)."""
        with self.accelerator.accumulate(*models), self.no_sync(*models):
            yield

    # -- delegated to the pipeline ------------------------------------------------------------

    @property
    def needs_no_sync(self) -> bool:
        """See :attr:`mtlhooks.MTL.needs_no_sync`."""
        return self.mtl.needs_no_sync

    @property
    def takes_features(self) -> bool:
        """See :attr:`mtlhooks.MTL.takes_features`."""
        return self.mtl.takes_features

    @property
    def space(self) -> Space:
        """The gradient space of the pipeline."""
        return self.mtl.space

    @property
    def last_report(self) -> StepReport | None:
        """The :class:`mtlhooks.StepReport` of the latest :meth:`backward`."""
        return self.mtl.last_report

    def after_step(self, losses: Mapping[str, Tensor]) -> None:
        """See :meth:`mtlhooks.MTL.after_step` (losses as computed, not divided)."""
        self.mtl.after_step(losses)

    def parameters(self) -> Iterator[nn.Parameter]:
        """Learnable plugin parameters, already on ``accelerator.device``: add them to the
        optimizer before ``accelerator.prepare``."""
        return self.mtl.parameters()

    def state_dict(self) -> dict[str, Any]:
        """See :meth:`mtlhooks.MTL.state_dict` (``save_state`` calls it when registered)."""
        return self.mtl.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """See :meth:`mtlhooks.MTL.load_state_dict`."""
        self.mtl.load_state_dict(state)

    def close(self) -> None:
        """See :meth:`mtlhooks.MTL.close` (and removes the forward hook DeepSpeed needs)."""
        self.mtl.close()
        if self._deepspeed is not None and self._deepspeed.handle is not None:
            self._deepspeed.handle.remove()

    def describe(self) -> str:
        """See :meth:`mtlhooks.MTL.describe`."""
        return self.mtl.describe()

    def __repr__(self) -> str:
        state = self.accelerator.state
        return (
            f"AcceleratedMTL(tasks={list(self.mtl.tasks)}, space={self.mtl.space.value!r}, "
            f"distributed_type={state.distributed_type.value!r}, "
            f"processes={state.num_processes}, mixed_precision={state.mixed_precision!r})"
        )
