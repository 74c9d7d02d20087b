"""LibMTL: an mtlhooks pipeline as a LibMTL weighting strategy.

LibMTL (Lin & Zhang, "LibMTL: A Python Library for Multi-Task Learning", JMLR 2023) combines
an architecture class and a weighting class into one model, ``class MTLmodel(architecture,
weighting)``, and calls ``w = model.backward(losses, **weight_args)`` once per step, between
``optimizer.zero_grad()`` and ``optimizer.step()``. :func:`weighting` returns such a weighting
class running an mtlhooks config, so a LibMTL user switches with one argument::

    from mtlhooks.integrations import libmtl

    Trainer(task_dict=task_dict, weighting=libmtl.weighting("mtl.yaml"), architecture=HPS,
            encoder_class=Encoder, decoders=decoders, rep_grad=False, multi_input=False, ...)

LibMTL versions whose Trainer takes the weighting by name (the repository's current one) find
it after ``libmtl.register("mtl.yaml")``, which returns the name to pass (``"MTLHooks"``).

What the class does inside LibMTL's model:

- the config's tasks must be LibMTL's ``task_name``; losses arrive as LibMTL's stacked tensor
  and are handed over by name;
- the shared parameters are the architecture's ``get_share_params()`` (its ``encoder`` module
  when they are the same, so that space ``last_shared`` and the layerwise Gramian work);
- space ``features`` takes the encoder's output through a forward hook (``rep_grad=False``;
  with ``rep_grad=True`` LibMTL hands each task a detached copy of the representation, so no
  gradient of another task can reach it, and it is refused);
- learnable plugin parameters (uncertainty weighting's log-variances, ...) are registered on
  the model, so LibMTL's optimizer trains them, and the pipeline's state is part of
  ``model.state_dict()`` (LibMTL's ``best.pt``), so a reload resumes it;
- ``backward`` returns the effective weights (``report.weights``, in LibMTL's task order) for
  LibMTL's ``batch_weight`` record, or ``None`` for coordinate-wise aggregators.

This module does not import LibMTL: the class follows LibMTL's documented ``AbsWeighting``
interface (``init_param``, ``backward(losses, **kwargs)``, the architecture's ``task_name``,
``rep_grad``, ``multi_input``, ``device``, ``encoder`` and ``get_share_params``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtlhooks.config import MTLConfig, load_config
from mtlhooks.core import MTL, ParameterSource
from mtlhooks.errors import ConfigError, InputError
from mtlhooks.plugin import Space

__all__ = ["MTLHooksWeighting", "register", "weighting"]

Config = MTLConfig | Mapping[str, Any] | str | Path


class MTLHooksWeighting(nn.Module):
    """Base of the classes :func:`weighting` returns (a LibMTL ``AbsWeighting``). Mixed into
    LibMTL's model after the architecture, which provides ``task_name``, ``rep_grad``,
    ``multi_input``, ``device``, ``encoder`` and ``get_share_params``."""

    mtl_config: ClassVar[MTLConfig | None] = None

    # Provided by the LibMTL architecture the class is mixed with.
    task_name: list[str]
    rep_grad: bool
    multi_input: bool
    encoder: nn.Module

    def __init__(self) -> None:
        super().__init__()

    def get_share_params(self) -> Any:  # pragma: no cover - the architecture's wins in the MRO
        raise NotImplementedError("mix this class into a LibMTL architecture")

    def init_param(self) -> None:
        """Build the pipeline (LibMTL calls this once, after the architecture exists)."""
        config = type(self).mtl_config
        if config is None:
            raise ConfigError("use mtlhooks.integrations.libmtl.weighting(config) to get a class")
        if sorted(config.tasks) != sorted(self.task_name):
            raise ConfigError(
                f"the mtlhooks config has tasks {list(config.tasks)} but LibMTL's task_dict has "
                f"{list(self.task_name)}: use the same names"
            )
        shared = self._shared_source()
        mtl = MTL(config, shared=shared)
        self._features: Tensor | None = None
        if mtl.space is Space.FEATURES:
            if self.rep_grad:
                raise ConfigError(
                    "space 'features' with rep_grad=True: LibMTL then gives each task a detached "
                    "copy of the representation, which no other task's gradient reaches. Set "
                    "rep_grad=False; mtlhooks takes the encoder's output itself"
                )
            if self.multi_input:
                raise ConfigError(
                    "space 'features' needs one shared representation per step; with "
                    "multi_input=True each task runs the encoder on its own inputs. Use space "
                    "'params' or 'last_shared'"
                )
            self.encoder.register_forward_hook(self._capture)
        # Registered on the model so that LibMTL's optimizer (model.parameters()) trains them.
        self.mtlhooks_parameters = nn.ParameterList(list(mtl.parameters()))
        self.mtl = mtl
        self._on: torch.device | None = None

    def _shared_source(self) -> ParameterSource:
        shared = [p for p in self.get_share_params() if p.requires_grad]
        encoder = getattr(self, "encoder", None)
        if isinstance(encoder, nn.Module):
            own = [p for p in encoder.parameters() if p.requires_grad]
            if [id(p) for p in own] == [id(p) for p in shared]:
                return encoder
        return shared

    def _capture(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._features = output if isinstance(output, Tensor) else None

    def backward(self, losses: Any, **kwargs: Any) -> Any:
        """LibMTL's call: ``losses`` in ``task_name`` order (a stacked tensor or a list);
        returns the effective weights in that order (a NumPy array) or ``None``."""
        if kwargs:
            raise InputError(
                f"the mtlhooks weighting takes its options from its config, not from LibMTL's "
                f"weight_args {sorted(kwargs)}: leave weight_args empty"
            )
        if len(losses) != len(self.task_name):
            raise InputError(f"expected {len(self.task_name)} losses, got {len(losses)}")
        by_name = {task: losses[i] for i, task in enumerate(self.task_name)}
        device = by_name[self.task_name[0]].device
        if self._on != device:
            self.mtl.to(device)
            self._on = device
        features = None
        if self.mtl.space is Space.FEATURES:
            features = self._features
            if features is None:
                raise InputError(
                    "space 'features': the encoder's output of this step is not a single tensor "
                    "(architectures such as MMoE give each task its own); use space 'params'"
                )
        self._features = None
        report = self.mtl.backward(by_name, features=features)
        if report.weights is None:
            return None
        order = [self.mtl.tasks.index(task) for task in self.task_name]
        return report.weights[order].detach().cpu().double().numpy()

    # nn.Module's hook for non-tensor state: it makes the pipeline part of model.state_dict().
    def get_extra_state(self) -> Any:
        return {"mtlhooks": self.mtl.state_dict()}

    def set_extra_state(self, state: Any) -> None:
        self.mtl.load_state_dict(state["mtlhooks"])


def weighting(config: Config, *, name: str = "MTLHooks") -> type[MTLHooksWeighting]:
    """A LibMTL weighting class running ``config`` (validated now); pass it as the Trainer's
    ``weighting=``."""
    validated = load_config(config)
    return type(name, (MTLHooksWeighting,), {"mtl_config": validated, "__module__": __name__})


def register(config: Config, *, name: str = "MTLHooks") -> str:
    """Make :func:`weighting` ``(config)`` findable by ``name`` in ``LibMTL.weighting``, for
    LibMTL Trainers that take the weighting's name; returns ``name``."""
    try:
        module = importlib.import_module("LibMTL.weighting")
    except Exception as error:  # LibMTL imports torchvision, which can fail in many ways
        raise InputError(
            f"cannot import LibMTL.weighting ({type(error).__name__}: {error}); with a Trainer "
            "that takes a class, pass weighting=libmtl.weighting(config) instead"
        ) from error
    setattr(module, name, weighting(config, name=name))
    return name
