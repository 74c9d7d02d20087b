"""PyTorch Lightning: an mtlhooks pipeline inside a ``LightningModule``.

Subclass :class:`MTLModule` instead of ``lightning.LightningModule``, build the pipeline in
:meth:`MTLModule.configure_mtl` (Lightning calls it once the process group exists) and hand
the per-task losses over in ``training_step``::

    import lightning as L
    from mtlhooks import MTL
    from mtlhooks.integrations.lightning import MTLModule

    class Net(MTLModule):
        def configure_mtl(self):
            return MTL("mtl.yaml", shared=self.encoder)

        def training_step(self, batch, batch_idx):          # automatic optimisation
            x, y = batch
            z = self.encoder(x)
            losses = {t: loss_fn(head(z), y[t]) for t, head in self.heads.items()}
            return self.mtl_step(losses, features=z)

        def configure_optimizers(self):
            return torch.optim.Adam([*self.parameters(), *self.mtl.parameters()])

With manual optimisation (``self.automatic_optimization = False``), ``self.mtl_backward(losses,
features=z)`` replaces ``self.manual_backward(loss)``.

What the module does for you:

- builds the pipeline in ``setup()`` (after ``init_process_group``), so it talks to the other
  processes, moves it to the strategy's device, and refuses an MTL that cannot (one assigned in
  ``__init__`` under DDP), DeepSpeed strategies, and FSDP / model-parallel strategies with
  plugins that read per-task gradients;
- runs the one weighted backward through Lightning's own path (``LightningModule.backward``,
  reached through ``strategy.backward``), so that DDP's reducer is prepared in manual
  optimisation, the precision plugin's GradScaler (``16-mixed``) scales it, and the
  ``on_before_backward`` / ``on_after_backward`` hooks fire; the pipeline's own arithmetic
  runs outside autocast (``bf16-mixed``);
- divides the losses by ``accumulate_grad_batches`` in automatic optimisation, as Lightning
  does, and aggregates space ``params`` once per optimizer step (equal to one big batch);
- runs the forward under DDP's ``no_sync`` when the pipeline writes ``.grad`` itself from
  all-reduced per-task gradients (``mtl.needs_no_sync``);
- saves the pipeline's state in every checkpoint (key ``"mtlhooks"``) and restores it on
  resume, bit-for-bit;
- sends ``gradstats`` records to every Lightning logger (``trainer.loggers``) at
  ``trainer.global_step``.

Overriding ``setup``, ``backward``, ``on_train_batch_start``, ``on_train_batch_end``,
``on_save_checkpoint`` or ``on_load_checkpoint``? Call ``super()`` in them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import (
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    ParallelStrategy,
    Strategy,
)
from torch import Tensor

from mtlhooks.core import MTL
from mtlhooks.errors import ConfigError, InputError
from mtlhooks.integrations.ddp import check_static_graph
from mtlhooks.plugin import Family, Need, Space
from mtlhooks.report import StepReport

__all__ = ["CHECKPOINT_KEY", "MTLModule", "check_strategy"]

CHECKPOINT_KEY = "mtlhooks"
"""Where the pipeline's state lives in a Lightning checkpoint."""


def check_strategy(strategy: Strategy, mtl: MTL) -> None:
    """Raise :class:`mtlhooks.ConfigError` for a strategy the pipeline cannot run under."""
    readers = [key for key, plugin in mtl.plugins.items() if plugin.needs is not Need.NOTHING]
    if isinstance(strategy, DeepSpeedStrategy):
        raise ConfigError(
            "DeepSpeed strategies are not supported: DeepSpeed reduces, partitions and applies "
            "the gradients inside its own backward, so there is no point where mtlhooks could "
            "combine per-task gradients or route its weighted backward. Use strategy='ddp'"
        )
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) and mtl.space is not Space.NONE:
        raise ConfigError(
            f"{type(strategy).__name__} is not supported with plugins that read per-task "
            f"gradients ({readers}, space {mtl.space.value!r}) yet: the parameters are sharded, "
            "so their per-task gradients are not available to mtlhooks. Use strategy='ddp', or "
            "only loss-level plugins"
        )


class _Pending:
    """The losses of one call, from ``mtl_step`` / ``mtl_backward`` to ``backward()``."""

    def __init__(
        self, losses: dict[str, Tensor], features: Tensor | None, sync: bool, manual: bool
    ) -> None:
        self.losses = losses
        self.features = features
        self.sync = sync
        self.manual = manual

    def total(self) -> Tensor:
        """What Lightning sees as the loss: the plain sum (its graph is the losses' graph)."""
        return torch.stack(list(self.losses.values())).sum()


class MTLModule(pl.LightningModule):
    """A ``LightningModule`` whose backward runs an mtlhooks pipeline (see the module docs).

    Attributes: :attr:`mtl` (the pipeline, from ``setup()`` on), :attr:`mtl_report` (the
    :class:`mtlhooks.StepReport` of the latest call). :attr:`log_gradstats` (class attribute,
    default ``True``) attaches observers to the trainer's loggers.
    """

    log_gradstats: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mtl_report: StepReport | None = None
        self._mtl_pending: _Pending | None = None
        self._mtl_state: Mapping[str, Any] | None = None
        self._mtl_no_sync = ExitStack()
        self._mtl_attached: int | None = None

    # -- what the user writes -------------------------------------------------------------------

    def configure_mtl(self) -> MTL:
        """Build and return the pipeline, e.g. ``MTL("mtl.yaml", shared=self.encoder)``.

        Lightning calls this from ``setup()``, once the process group of a distributed run
        exists (an MTL built in ``__init__`` would not find it)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement configure_mtl() returning an mtlhooks.MTL"
        )

    def mtl_step(self, losses: Mapping[str, Tensor], *, features: Tensor | None = None) -> Tensor:
        """Automatic optimisation: ``return self.mtl_step(losses, features=z)`` from
        ``training_step``. Returns the plain sum of the losses for Lightning to carry; its
        backward runs the pipeline. Return it unchanged (e.g. not inside a dict with other
        transformations)."""
        if not self.automatic_optimization:
            raise InputError(
                "mtl_step() is for automatic optimisation; with automatic_optimization = False "
                "call self.mtl_backward(losses, features=z) instead of self.manual_backward"
            )
        self._mtl_pending = _Pending(dict(losses), features, sync=True, manual=False)
        return self._mtl_pending.total()

    def mtl_backward(
        self, losses: Mapping[str, Tensor], *, features: Tensor | None = None, sync: bool = True
    ) -> StepReport:
        """Manual optimisation: replaces ``self.manual_backward(loss)``. With gradient
        accumulation, divide the losses by the number of micro-steps and pass ``sync=False``
        on the micro-steps before the one that precedes ``optimizer.step()``."""
        if self.automatic_optimization:
            raise InputError(
                "mtl_backward() is for manual optimisation (automatic_optimization = False); "
                "in automatic optimisation return self.mtl_step(losses, features=z) from "
                "training_step"
            )
        pending = _Pending(dict(losses), features, sync=sync, manual=True)
        self._mtl_pending = pending
        strategy = self.trainer.strategy
        # Space params (sync: exact) writes .grad from all-reduced per-task gradients: DDP's
        # reducer must not be prepared for a backward that never comes.
        context: AbstractContextManager[Any] = nullcontext()
        if self._built().needs_no_sync and isinstance(strategy, ParallelStrategy):
            context = strategy.block_backward_sync()
        with context:
            self.manual_backward(pending.total())
        assert self.mtl_report is not None
        return self.mtl_report

    # -- Lightning hooks ------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        super().setup(stage)
        trainer = self.trainer
        existing = self.__dict__.get("mtl")
        if existing is None:
            mtl = self.configure_mtl()
            if not isinstance(mtl, MTL):
                raise InputError(
                    f"configure_mtl() must return an mtlhooks.MTL, got {type(mtl).__name__}"
                )
        else:
            mtl = existing
        world = trainer.world_size
        communicator = mtl.communicator
        if world > 1 and (communicator is None or communicator.world_size != world):
            found = "none" if communicator is None else f"{communicator.world_size} processes"
            raise InputError(
                f"the trainer runs {world} processes but this MTL's communicator is {found}: "
                "it was built before the process group existed (in __init__?). Build it in "
                "configure_mtl(), which Lightning calls from setup(), or each rank aggregates "
                "its own gradients and the run silently differs from one process"
            )
        check_strategy(trainer.strategy, mtl)
        mtl.to(trainer.strategy.root_device)
        self.mtl = mtl
        if self._mtl_state is not None:
            mtl.load_state_dict(self._mtl_state)
            self._mtl_state = None
        if self.log_gradstats and self._mtl_attached != id(mtl) and trainer.loggers:
            for plugin in mtl.plugins.values():
                attach = getattr(plugin, "attach", None)
                if plugin.family is Family.OBSERVER and callable(attach):
                    attach(list(trainer.loggers), step=lambda: self.trainer.global_step)
            self._mtl_attached = id(mtl)

    def on_train_start(self) -> None:
        super().on_train_start()
        model = self.trainer.strategy.model
        if model is not None:
            check_static_graph(self._built(), model)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        result = super().on_train_batch_start(batch, batch_idx)
        self._mtl_no_sync.close()
        strategy = self.trainer.strategy
        if (
            self.automatic_optimization
            and self._built().needs_no_sync
            and isinstance(strategy, ParallelStrategy)
        ):
            # The forward runs inside training_step, after this hook: under no_sync, DDP does
            # not wait for a backward that the pipeline replaces by all-reduced gradients.
            self._mtl_no_sync.enter_context(strategy.block_backward_sync())
        return result

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self._mtl_no_sync.close()

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        pending, self._mtl_pending = self._mtl_pending, None
        if pending is None:
            # A backward of something else than mtl_step / mtl_backward: leave it alone.
            super().backward(loss, *args, **kwargs)
            return
        mtl = self._built()
        trainer = self.trainer
        losses = pending.losses
        sync = pending.sync
        if not pending.manual:
            steps = trainer.accumulate_grad_batches
            if steps > 1:
                losses = {task: value / steps for task, value in losses.items()}
            sync = not _accumulating(trainer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        _check_carried(loss, losses, scaler)
        # Lightning runs manual training steps inside autocast: the pipeline's Gramian and
        # solvers must not run in bf16/fp16 (the per-task backward passes keep their dtypes).
        with torch.autocast(device_type=loss.device.type, enabled=False):
            self.mtl_report = mtl.backward(
                losses, features=pending.features, sync=sync, loss_scale=scaler
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        mtl = self.__dict__.get("mtl")
        if mtl is not None:
            checkpoint[CHECKPOINT_KEY] = mtl.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            warnings.warn(
                "the checkpoint holds no mtlhooks state: the pipeline starts afresh (plugin "
                "states, step counter and generator are not resumed)",
                stacklevel=2,
            )
            return
        mtl = self.__dict__.get("mtl")
        if mtl is None:
            self._mtl_state = state  # loaded in setup(), once the pipeline exists
        else:
            mtl.load_state_dict(state)

    # -- helpers --------------------------------------------------------------------------------

    def _built(self) -> MTL:
        mtl = self.__dict__.get("mtl")
        if not isinstance(mtl, MTL):
            raise InputError(
                "the pipeline does not exist yet: Lightning builds it in setup() from "
                "configure_mtl(); call mtl_step / mtl_backward from training_step"
            )
        return mtl


def _accumulating(trainer: pl.Trainer) -> bool:
    """Whether this training batch accumulates (no optimizer step after it). Lightning exposes
    this only through its fit loop (``_should_accumulate``, the test Lightning itself uses to
    decide whether to step)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    should_accumulate = getattr(epoch_loop, "_should_accumulate", None)
    if not callable(should_accumulate):  # pragma: no cover - another Lightning version
        raise InputError(
            "this Lightning version does not expose whether a batch accumulates gradients; "
            "use accumulate_grad_batches=1 or manual optimisation with mtl_backward(sync=...)"
        )
    return bool(should_accumulate())


def _check_carried(loss: Tensor, losses: Mapping[str, Tensor], scaler: Any) -> None:
    """``loss`` must be what Lightning made of ``mtl_step``'s sum: divided by the accumulation
    steps (already applied to ``losses``) and scaled by the GradScaler, if any. Anything else
    means training_step changed it, or Lightning changed how it carries the loss."""
    with torch.no_grad():
        expected = torch.stack([value.detach().float() for value in losses.values()]).sum()
        if scaler is not None:
            expected = scaler.scale(expected)
        got = loss.detach().float()
        # The sum may have been formed in half precision under autocast.
        tolerance = 1e-2 if loss.dtype in (torch.float16, torch.bfloat16) else 1e-5
        if not torch.allclose(got, expected, rtol=tolerance, atol=0.0):
            raise InputError(
                f"training_step returned {got.item():.6g}, not the sum of the losses given to "
                f"mtl_step ({expected.item():.6g} after Lightning's accumulation and loss "
                "scaling): return what self.mtl_step(...) returned, unchanged"
            )
