"""TorchJD's aggregators and weightings as an mtlhooks aggregator, by name.

TorchJD (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024) aggregates
the T×P Jacobian J of the task losses into one update. Plugin ``torchjd`` runs any of its 0.18
classes inside the mtlhooks pipeline, after loss scaling and norm balancing, on the weighted
task gradients wᵢ∇Lᵢ of the configured gradient space::

    plugins:
      - name: torchjd
        aggregator: UPGrad              # any class of torchjd.aggregation, by name
        options: {pref_vector: [1, 2]}  # its constructor's keyword arguments

How each kind of class is used:

- a Gramian-based aggregator (``UPGrad``, ``MGDA``, ``DualProj``, ``CAGrad``, ``PCGrad``, ...)
  or a Gramian weighting (``UPGradWeighting``, ...): its weighting is applied to the Gramian
  the pipeline already has, so every gradient space works and, in space ``params``, the
  layerwise Gramian avoids forming J;
- a matrix weighting or weighted aggregator (``Mean``, ``Random``, ``ExcessMTLWeighting``, ...):
  its weighting is applied to J (materialised);
- any other aggregator (``ConFIG``, ``GradDrop``, ``TrimmedMean``, ...) returns a combined
  vector, which is coordinate-wise: spaces ``features`` and ``params`` (``sync: exact``) only.

In every case the update written to the shared parameters is TorchJD's own ``aggregator(J)``
for J the weighted task gradients; the task-specific parameters receive what the pipeline gives
them (``Σ αᵢwᵢ∇Lᵢ`` for a weighting, ``Σ wᵢ∇Lᵢ`` for a combined vector). TorchJD's random
methods draw from the global torch generator: here they draw under a generator seeded from the
pipeline's (so a run is reproducible from ``seed`` and resumes bit-for-bit), and the state of
stateful methods (GradVac's EMA, ExcessMTL's sums, ...) is part of ``mtl.state_dict()``.

Option values: a list becomes a tensor; a mapping with a ``name`` key is built as a TorchJD
class itself (``CRMOGMWeighting``'s ``weighting``); ``n_tasks`` is filled in from the config.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from mtlhooks.errors import ConfigError
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Setup, Space, hookimpl
from mtlhooks.step import Step

__all__ = ["TorchJD", "TorchJDConfig", "build"]

_INSTALL = "pip install 'mtlhooks[torchjd]' (TorchJD 0.18)"


def _aggregation_module() -> Any:
    try:
        return importlib.import_module("torchjd.aggregation")
    except ImportError as error:
        raise ValueError(f"TorchJD is not installed ({error}): {_INSTALL}") from None


def _public_classes(module: Any) -> dict[str, type]:
    names = getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")])
    return {
        name: getattr(module, name)
        for name in names
        if isinstance(getattr(module, name, None), type)
        and issubclass(getattr(module, name), nn.Module)
    }


def _concrete(classes: dict[str, type]) -> list[str]:
    return sorted(name for name, cls in classes.items() if not inspect.isabstract(cls))


def _resolve(name: str) -> type:
    """The TorchJD class called ``name``; ``ValueError`` lists the available ones."""
    classes = _public_classes(_aggregation_module())
    cls = classes.get(name)
    if cls is None or inspect.isabstract(cls):
        import difflib

        close = difflib.get_close_matches(name, list(classes), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"torchjd.aggregation has no class {name!r}; {hint}available: "
            f"{', '.join(_concrete(classes))}"
        )
    return cls


def build(name: str, options: Mapping[str, Any], num_tasks: int) -> nn.Module:
    """Construct TorchJD class ``name`` with ``options`` (lists → tensors, a mapping with a
    ``name`` key → a TorchJD object, ``n_tasks`` filled in). ``ValueError`` says what is wrong."""
    cls = _resolve(name)
    parameters = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if key not in parameters:
            raise ValueError(
                f"{name} takes no option {key!r}; its options: {', '.join(parameters) or 'none'}"
            )
        kwargs[key] = _option(value, num_tasks)
    if "n_tasks" in parameters and "n_tasks" not in kwargs:
        kwargs["n_tasks"] = num_tasks
    try:
        built = cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}({_show(kwargs)}) failed: {error}") from None
    assert isinstance(built, nn.Module)
    return built


def _option(value: Any, num_tasks: int) -> Any:
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        inner = {k: v for k, v in value.items() if k != "name"}
        return build(value["name"], inner, num_tasks)
    if isinstance(value, (list, tuple)):
        return torch.tensor(value, dtype=torch.get_default_dtype())
    return value


def _show(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _input_kind(weighting: nn.Module) -> str:
    """``"gramian"`` or ``"matrix"``: what a TorchJD ``Weighting`` takes."""
    try:
        bases = importlib.import_module("torchjd.aggregation._weighting_bases")
        gramian_base, matrix_base = bases._GramianWeighting, bases._MatrixWeighting
    except (ImportError, AttributeError):  # pragma: no cover - another TorchJD layout
        raise ValueError(
            "this TorchJD version does not expose which weightings take a Gramian; "
            f"mtlhooks supports TorchJD 0.18 ({_INSTALL})"
        ) from None
    if isinstance(weighting, gramian_base):
        return "gramian"
    if isinstance(weighting, matrix_base):
        return "matrix"
    inner = getattr(weighting, "weighting", None)  # wrappers such as CRMOGMWeighting
    if isinstance(inner, nn.Module):
        return _input_kind(inner)
    raise ValueError(
        f"cannot tell whether {type(weighting).__name__} takes a Gramian or a matrix; use one "
        "of TorchJD's own weightings"
    )


def _strategy(method: nn.Module) -> tuple[str, nn.Module]:
    """How the pipeline uses ``method``: ``("gramian", weighting)``, ``("matrix", weighting)``
    or ``("combine", aggregator)``."""
    module = _aggregation_module()
    if isinstance(method, module.GramianWeightedAggregator):
        return "gramian", method.gramian_weighting
    if isinstance(method, module.WeightedAggregator):
        return _input_kind(method.weighting), method.weighting
    if isinstance(method, module.Weighting):
        return _input_kind(method), method
    if isinstance(method, module.Aggregator):
        return "combine", method
    raise ValueError(f"{type(method).__name__} is neither a TorchJD Aggregator nor a Weighting")


@contextmanager
def _seeded(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """A context in which TorchJD's draws from the global generator are seeded from the
    pipeline's ``generator``; the caller's global random state is left as it was."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield


class TorchJDConfig(PluginConfig):
    aggregator: str = Field(
        default="UPGrad",
        description="A class of torchjd.aggregation, by name: an aggregator (UPGrad, MGDA, "
        "ConFIG, ...) or a weighting (UPGradWeighting, ...).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of its constructor (lists become tensors; n_tasks is "
        "filled in).",
    )

    @field_validator("aggregator")
    @classmethod
    def _exists(cls, name: str) -> str:
        _resolve(name)
        return name


class TorchJD(Plugin):
    """TorchJD: any aggregator or weighting of ``torchjd.aggregation`` (0.18), by name.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization" (2024), and the methods
    TorchJD implements (each cites its paper). The update written to the shared parameters is
    TorchJD's ``aggregator(J)`` on the weighted task gradients; Gramian-based methods run on the
    pipeline's Gramian, so every space works; matrix-based and coordinate-wise ones read J.
    Random methods draw under a generator seeded from the pipeline's; stateful ones save and
    restore their state. Needs ``pip install 'mtlhooks[torchjd]'``.
    """

    name = "torchjd"
    family = Family.AGGREGATOR
    Config = TorchJDConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN

    @classmethod
    def check_config(cls, config: PluginConfig, tasks: tuple[str, ...]) -> None:
        assert isinstance(config, TorchJDConfig)
        _strategy(build(config.aggregator, config.options, len(tasks)))

    def __init__(self, config: TorchJDConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: TorchJDConfig = config
        try:
            self.aggregator = build(config.aggregator, config.options, setup.num_tasks)
            self.kind, self._callable = _strategy(self.aggregator)
        except ValueError as error:
            raise ConfigError(f"plugin torchjd: {error}") from None
        if self.kind == "combine" and setup.space is Space.LAST_SHARED:
            raise ConfigError(
                f"plugin torchjd: {config.aggregator} combines the task gradients coordinate by "
                "coordinate, which is defined in spaces 'features' and 'params' only, not "
                "'last_shared'"
            )
        if self.kind != "gramian":
            # Reads J itself: the pipeline must materialise it (no layerwise Gramian).
            vars(self)["needs"] = Need.JACOBIAN

    # -- the hooks ----------------------------------------------------------------------------

    def _weighted_matrix(self, step: Step) -> Tensor:
        """The weighted task gradients wᵢ∇Lᵢ (T×P), unscaled by the loss scale."""
        assert step.gradients is not None
        matrix = step.gradients.matrix()
        dtype = torch.promote_types(matrix.dtype, torch.float32)
        matrix = matrix.to(dtype) * step.weights.to(matrix.device, dtype)[:, None]
        if step.loss_scale is not None:
            matrix = matrix / step.loss_scale.to(dtype)
        return matrix

    @hookimpl
    def mtl_aggregate(self, step: Step) -> Tensor | None:
        if self.kind == "combine":
            return None
        stat = step.gramian() if self.kind == "gramian" else self._weighted_matrix(step)
        with _seeded(step.generator, stat.device), torch.no_grad():
            weights = self._callable(stat)
        return weights.detach().to(stat.dtype).reshape(-1)

    @hookimpl
    def mtl_combine(self, step: Step) -> Tensor | None:
        if self.kind != "combine":  # pragma: no cover - mtl_aggregate answered already
            return None
        matrix = self._weighted_matrix(step)
        with _seeded(step.generator, matrix.device), torch.no_grad():
            combined = self._callable(matrix)
        if step.loss_scale is not None:
            combined = combined * step.loss_scale.to(combined.dtype)
        return combined.detach().reshape(-1)

    # -- state ----------------------------------------------------------------------------------

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TorchJD:
        self.aggregator.to(device=device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {name: _module_state(module) for name, module in self.aggregator.named_modules()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        modules = dict(self.aggregator.named_modules())
        if set(state) != set(modules):
            raise ValueError(
                f"torchjd state is for modules {sorted(state)}, this {self.config.aggregator} "
                f"has {sorted(modules)}"
            )
        for name, module in modules.items():
            _load_module_state(module, state[name])


# What a TorchJD module keeps between calls: its buffers (registered as None until first use)
# and plain attributes such as step counters and the key of the shape it was initialised for.
_PLAIN = (bool, int, float, str, tuple, type(None), torch.Size)


def _module_state(module: nn.Module) -> dict[str, Any]:
    buffers = {k: None if v is None else v.detach().clone() for k, v in module._buffers.items()}
    attributes = {
        key: value.detach().clone() if isinstance(value, Tensor) else value
        for key, value in vars(module).items()
        if not key.startswith("__")
        and key not in ("_buffers", "_parameters", "_modules", "training")
        and (isinstance(value, (*_PLAIN, Tensor)))
    }
    return {"buffers": buffers, "attributes": attributes}


def _load_module_state(module: nn.Module, state: Mapping[str, Any]) -> None:
    for key, value in state["buffers"].items():
        module._buffers[key] = None if value is None else value.detach().clone()
    for key, value in state["attributes"].items():
        object.__setattr__(
            module, key, value.detach().clone() if isinstance(value, Tensor) else value
        )
