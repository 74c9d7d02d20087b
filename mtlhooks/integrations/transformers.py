"""Hugging Face ``transformers.Trainer``: an mtlhooks pipeline for a model with per-task losses.

The model contract: ``model(**inputs)`` returns a mapping (a ``dict`` or a ``ModelOutput``) or
an object with ``losses``, a mapping task name → scalar loss (each the mean over the
micro-batch), and, for space ``features``, ``features``: the shared representation z the heads
consumed (not needed when ``mtl_shared`` is the trunk module returning z: its output is
taken with a forward hook, which also survives DDP's and mixed precision's copies of the
model's outputs). :class:`MTLTrainer` replaces ``Trainer``::

    from mtlhooks.integrations.transformers import MTLTrainer

    trainer = MTLTrainer(
        model=model,                      # forward returns {"losses": {task: loss}}
        args=TrainingArguments(output_dir="run", gradient_accumulation_steps=4, bf16=True),
        train_dataset=dataset,
        mtl="mtl.yaml",
        mtl_shared=model.encoder,
    )
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

What it does that a hand-written ``compute_loss`` cannot:

- divides the losses by the Trainer's own ``current_gradient_accumulation_steps`` and passes
  ``sync=accelerator.sync_gradients``, so space ``params`` aggregates once per optimizer step:
  equal to one batch holding every micro-batch (``accelerator.gradient_accumulation_steps`` is 1
  inside the Trainer, so :class:`mtlhooks.integrations.accelerate.AcceleratedMTL` would not);
- runs the one weighted backward itself with the Accelerator's GradScaler (fp16) as loss scale,
  outside autocast; bf16 needs nothing more;
- under the Trainer's DDP (its Accelerator), builds the pipeline once the process group exists
  and runs the forward under ``no_sync`` when the pipeline writes ``.grad`` itself
  (``mtl.needs_no_sync``); DeepSpeed and FSDP with gradient-reading plugins are refused;
- saves the pipeline's state (``mtlhooks_state.pt``) in every checkpoint folder and restores it
  with ``train(resume_from_checkpoint=...)``, bit-for-bit;
- logs ``gradstats`` records through ``Trainer.log`` (so to every ``report_to`` integration);
- refuses reentrant activation checkpointing in spaces ``params`` and ``last_shared``.

The training loss the Trainer logs is the plain sum of the task losses.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from mtlhooks.config import MTLConfig
from mtlhooks.core import MTL, ParameterSource
from mtlhooks.errors import ConfigError, InputError
from mtlhooks.integrations.accelerate import backward as accelerated_backward
from mtlhooks.integrations.accelerate import check_supported
from mtlhooks.plugin import Family, Space
from mtlhooks.report import StepReport

__all__ = ["STATE_FILE", "MTLTrainer", "task_losses"]

STATE_FILE = "mtlhooks_state.pt"
"""The pipeline's state in a checkpoint folder."""


def task_losses(outputs: Any) -> tuple[dict[str, Tensor], Tensor | None]:
    """The per-task losses and the features of a model's output (see the module docs)."""
    if isinstance(outputs, Mapping):
        losses, features = outputs.get("losses"), outputs.get("features")
    else:
        losses, features = getattr(outputs, "losses", None), getattr(outputs, "features", None)
    if not isinstance(losses, Mapping):
        raise InputError(
            "MTLTrainer needs the model's forward to return per-task losses: a dict (or "
            "ModelOutput) with 'losses': {task: scalar loss} (and 'features': z for space "
            f"'features'); got {type(outputs).__name__} without a 'losses' mapping"
        )
    return dict(losses), features


def _reentrant_checkpointing(args: Any) -> bool:
    """Whether ``args`` turns on activation checkpointing with the reentrant implementation."""
    enabled = getattr(args, "activation_checkpointing", None)
    if enabled is None:
        enabled = getattr(args, "gradient_checkpointing", False)
    if not enabled:
        return False
    kwargs = getattr(args, "activation_checkpointing_kwargs", None)
    if kwargs is None:
        kwargs = getattr(args, "gradient_checkpointing_kwargs", None)
    if kwargs is None:
        # transformers 5 passes use_reentrant=False; 4.x left torch's default (reentrant).
        return int(transformers.__version__.split(".")[0]) < 5
    # A dict without the key leaves torch's default, which is still reentrant in torch 2.x.
    return bool(kwargs.get("use_reentrant", True))


class _StateCallback(TrainerCallback):
    """Writes the pipeline's state into each checkpoint folder the Trainer has just saved."""

    def __init__(self, mtl: MTL) -> None:
        self.mtl = mtl

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            raise InputError(
                f"the Trainer saved a checkpoint but {folder} does not exist; the pipeline's "
                "state could not be saved beside it"
            )
        torch.save(self.mtl.state_dict(), folder / STATE_FILE)


class MTLTrainer(Trainer):
    """``transformers.Trainer`` for models that return per-task losses (see the module docs).

    :param mtl: the pipeline's config (an :class:`mtlhooks.MTLConfig`, a mapping or a file).
        It is built once the Trainer's Accelerator (and so the process group) exists.
    :param mtl_shared: the shared trunk (``shared=`` of :class:`mtlhooks.MTL`).
    :param mtl_last_shared: the last shared layer (``last_shared=``).
    :param log_gradstats: send observer records through :meth:`Trainer.log`.

    Every other argument is ``Trainer``'s. Attributes: :attr:`mtl` (the pipeline) and
    :attr:`mtl_report` (the latest :class:`mtlhooks.StepReport`). Plugins with learnable
    parameters (``uncertainty``, ...) have them added to the optimizer the Trainer creates;
    with ``optimizers=(optimizer, scheduler)`` add ``trainer.mtl.parameters()`` yourself.
    """

    def __init__(
        self,
        *args: Any,
        mtl: MTLConfig | Mapping[str, Any] | str | Path,
        mtl_shared: ParameterSource | None = None,
        mtl_last_shared: ParameterSource | None = None,
        log_gradstats: bool = True,
        **kwargs: Any,
    ) -> None:
        if isinstance(mtl, MTL):
            raise InputError(
                "MTLTrainer takes the pipeline's config, not an MTL: it builds the MTL once the "
                "Trainer's Accelerator and process group exist (an MTL built before has no "
                "communicator under DDP). Pass mtl=<config>, mtl_shared=model.encoder"
            )
        super().__init__(*args, **kwargs)
        self.mtl = MTL(mtl, shared=mtl_shared, last_shared=mtl_last_shared)
        self.mtl_report: StepReport | None = None
        check_supported(self.accelerator, self.mtl)
        if self.mtl.space in (Space.PARAMS, Space.LAST_SHARED) and _reentrant_checkpointing(
            self.args
        ):
            raise ConfigError(
                f"reentrant activation checkpointing breaks gradient space "
                f"{self.mtl.space.value!r}: its checkpointed segments do not support "
                "torch.autograd.grad with respect to their parameters, which that space takes "
                "once per task. Set activation_checkpointing_kwargs={'use_reentrant': False} "
                "(the default of transformers 5), or use space 'features'"
            )
        self.mtl.to(self.args.device)
        self._captured: Tensor | None = None
        if self.mtl.space is Space.FEATURES and isinstance(mtl_shared, nn.Module):
            # z as the trunk returned it: DDP (find_unused_parameters) and mixed precision hand
            # back copies of the model's outputs, which are not upstream of the losses.
            mtl_shared.register_forward_hook(self._capture)
        self.add_callback(_StateCallback(self.mtl))
        if log_gradstats:
            for plugin in self.mtl.plugins.values():
                attach = getattr(plugin, "attach", None)
                if plugin.family is Family.OBSERVER and callable(attach):
                    attach(self)

    # -- training ---------------------------------------------------------------------------

    def _capture(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._captured = output if isinstance(output, Tensor) else None

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The plain sum of the task losses (what evaluation reports as its loss)."""
        outputs = model(**inputs)
        losses, _ = task_losses(outputs)
        total = torch.stack(list(losses.values())).sum()
        return (total, outputs) if return_outputs else total

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """One micro-step: forward, then ``mtl.backward`` of the per-task losses."""
        model.train()
        train_mode = getattr(self.optimizer, "train", None)  # schedule-free optimizers
        if callable(train_mode):
            train_mode()
        inputs = self._prepare_inputs(inputs)
        context: AbstractContextManager[Any] = nullcontext()
        if self.mtl.needs_no_sync:
            # .grad is written from all-reduced per-task gradients: DDP must not wait for a
            # backward of its own (the Trainer leaves the synchronising micro-step synced).
            context = self.accelerator.no_sync(model)
        self._captured = None
        with context, self.compute_loss_context_manager():
            _, outputs = self.compute_loss(model, inputs, return_outputs=True)
        losses, features = task_losses(outputs)
        if self._captured is not None:
            features, self._captured = self._captured, None
        del inputs, outputs
        # The Trainer divides its loss by its own counter (the last window of an epoch may be
        # shorter); its Accelerator's gradient_accumulation_steps stays 1.
        steps = self.current_gradient_accumulation_steps
        if self.accelerator.gradient_accumulation_steps != 1:  # pragma: no cover - guard
            raise InputError(
                "the Trainer's Accelerator accumulates gradients itself "
                f"(gradient_accumulation_steps={self.accelerator.gradient_accumulation_steps}); "
                "MTLTrainer expects the Trainer's own accumulation"
            )
        if steps > 1:
            losses = {task: value / steps for task, value in losses.items()}
        device = next(iter(losses.values())).device
        with torch.autocast(device_type=device.type, enabled=False):
            # sync=accelerator.sync_gradients, loss_scale=accelerator.scaler, and a clear error
            # for features that mixed precision copied.
            self.mtl_report = accelerated_backward(
                self.accelerator, self.mtl, losses, features=features
            )
        return torch.stack([value.detach() for value in losses.values()]).sum()

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus the plugins' learnable parameters (no weight decay)."""
        created = self.optimizer is None
        optimizer = super().create_optimizer(model)
        learnable = list(self.mtl.parameters())
        if created and learnable:
            optimizer.add_param_group({"params": learnable, "weight_decay": 0.0})
        return optimizer

    # -- resuming ---------------------------------------------------------------------------

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``Trainer.train``; with ``resume_from_checkpoint`` the pipeline's state is restored
        from the checkpoint folder too."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise InputError(f"no checkpoint found in {self.args.output_dir} to resume from")
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            state_file = Path(resume_from_checkpoint) / STATE_FILE
            if state_file.is_file():
                self.mtl.load_state_dict(torch.load(state_file, weights_only=False))
            else:
                warnings.warn(
                    f"{resume_from_checkpoint} holds no {STATE_FILE}: the pipeline starts afresh "
                    "(plugin states, step counter and generator are not resumed)",
                    stacklevel=2,
                )
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )
