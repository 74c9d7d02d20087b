"""What a plugin is: a pydantic config model plus a class with hook implementations.

A plugin is one small file::

    class MyWeightsConfig(PluginConfig):
        power: float = Field(1.0, gt=0)

    class MyWeights(Plugin):
        name = "my_weights"
        family = Family.LOSS_SCALING
        Config = MyWeightsConfig

        @hookimpl
        def mtl_scale_losses(self, step: Step) -> None:
            step.weights = step.weights * step.losses ** -self.config.power

The pipeline builds one instance per configured plugin with ``Plugin(config, setup)`` and registers
it with pluggy; the hooks it may implement are documented in :mod:`mtlhooks.hookspecs`. An
aggregator's file also holds its function Gramian → weights and declares it with
``method = MethodSpec(...)`` (the layout of such a file: :mod:`mtlhooks.plugins`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pluggy
import torch
from pydantic import BaseModel, ConfigDict

from mtlhooks.method import MethodSpec

PROJECT = "mtlhooks"

hookimpl = pluggy.HookimplMarker(PROJECT)
"""Marker for hook implementations: ``@hookimpl`` (or ``@hookimpl(wrapper=True)``)."""


class Family(str, enum.Enum):
    """The four plugin families, in the order their hooks fire within one ``backward()``."""

    LOSS_SCALING = "loss_scaling"
    NORM_BALANCING = "norm_balancing"
    AGGREGATOR = "aggregator"
    OBSERVER = "observer"


class Space(str, enum.Enum):
    """Where per-task gradients are taken.

    - ``none``: no per-task gradient; one backward of the weighted sum (fast path).
    - ``features``: gradients w.r.t. the shared representation z of ``backward(..., features=z)``.
    - ``last_shared``: gradients of the last shared layer's parameters.
    - ``params``: gradients of every shared parameter (exact, most expensive).
    """

    NONE = "none"
    FEATURES = "features"
    LAST_SHARED = "last_shared"
    PARAMS = "params"


class Need(str, enum.Enum):
    """What a plugin reads of the per-task gradients."""

    NOTHING = "nothing"
    GRAMIAN = "gramian"
    """The T×T Gramian G = J Jᵀ (and so the norms and cosines)."""
    JACOBIAN = "jacobian"
    """The T×P matrix J itself (coordinate-wise methods such as GradDrop)."""


class PluginConfig(BaseModel):
    """Base of every plugin's config model: unknown keys are errors, values are validated
    strictly (a value must have its field's type: ``"5"`` or ``true`` is not an integer, ``5``
    is a valid float) and floats must be finite (``.inf`` and ``.nan`` are refused)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False
    )


class NoOptions(PluginConfig):
    """Config of a plugin that takes no option."""


@dataclass(frozen=True)
class Setup:
    """What a plugin knows when it is built: the task names, the resolved gradient space and
    the names of the space's parameter blocks (``report.block_gramians`` uses the same names;
    empty in spaces ``none`` and ``features``), so options that name parameters are checked
    at construction."""

    tasks: tuple[str, ...]
    space: Space
    seed: int
    parameter_names: tuple[str, ...] = ()
    rank: int = 0
    """This process's rank in a data-parallel run (0 with one process)."""
    world_size: int = 1
    """The number of processes of a data-parallel run (1 with one process)."""

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)


class Plugin:
    """Base class of plugins. Subclasses set the class attributes and implement hooks.

    Class attributes:

    - ``name``: the name users write in the config.
    - ``family``: a :class:`Family`.
    - ``Config``: the pydantic model of its options (a :class:`PluginConfig` subclass).
    - ``spaces``: gradient spaces the plugin can work in, most preferred first; empty when it
      needs no per-task gradient.
    - ``needs``: what it reads of the per-task gradients (:class:`Need`). An instance may
      raise it from ``GRAMIAN`` to ``JACOBIAN`` in ``__init__`` when an option needs the T×P
      gradients themselves (GradVac's per-layer groups); the class attribute is what the
      configuration sees.
    - ``method``: for an aggregator, the declaration of its functional form (the function
      Gramian → weights and the properties it claims, :class:`~mtlhooks.method.MethodSpec`);
      the property tests and ``docs/aggregator-properties.md`` are generated from it.
    - ``replaces_state``: True when the plugin never writes into the tensors of its
      ``state_dict()`` in place, only replaces them with new ones. The core's all-or-nothing
      snapshot then keeps references to them instead of copies (MoCo's tracked gradients are
      T copies of the shared parameters: a copy per call would be a T×P memory pass). The
      suite checks the claim for every plugin that makes it.
    """

    name: ClassVar[str]
    family: ClassVar[Family]
    Config: ClassVar[type[PluginConfig]] = NoOptions
    spaces: ClassVar[tuple[Space, ...]] = ()
    needs: Need = Need.NOTHING
    method: ClassVar[MethodSpec | None] = None
    replaces_state: ClassVar[bool] = False

    def __init__(self, config: PluginConfig, setup: Setup) -> None:
        self.config = config
        self.setup = setup

    @classmethod
    def check_config(cls, config: PluginConfig, tasks: tuple[str, ...]) -> None:
        """Validate options that depend on the task names; raise ``ValueError`` with a message."""

    @classmethod
    def output_paths(cls, config: PluginConfig) -> dict[str, str]:
        """The files and directories this plugin writes, option name → path (none by default).
        The config refuses two outputs on one path, across all plugins."""
        return {}

    def wants_gradients(self, index: int) -> bool:
        """Whether this plugin reads per-task gradients at ``backward()`` call ``index``.

        When no plugin wants them at a call, that call takes the fast path (one weighted
        backward) and the gradient hooks do not fire: an observer recording every N steps
        costs nothing in between.
        """
        return self.needs is not Need.NOTHING

    def constant_weights(self) -> torch.Tensor | None:
        """For a loss-scaling plugin whose only effect is to multiply the loss weights by values
        that never change: those values (float64, one per task, finite and >= 0); ``None``
        otherwise (the default). A pipeline in space ``none`` whose plugins all declare them
        runs its calls without dispatching any hook (``MTL``'s direct path)."""
        return None

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """Learnable parameters the user must hand to an optimizer (none by default)."""
        return iter(())

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Plugin:
        """Move the learnable parameters in place (the same ``Parameter`` objects, so an
        optimizer built before keeps them); plugins with other tensors override this."""
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.data = parameter.data.to(device=device, dtype=dtype)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit (empty for stateless plugins)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(
                f"plugin {self.name!r} is stateless but got state keys {sorted(state)}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
