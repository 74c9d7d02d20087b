"""CR-MOGM: another method's weights, smoothed by an exponential moving average across steps
(Zhou et al. 2022)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import Field, ValidationError, model_validator
from torch import Tensor

from mtlhooks import registry
from mtlhooks.errors import ConfigError, InputError
from mtlhooks.method import MethodSpec, Property, check_gramian, mean
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Setup, Space, hookimpl
from mtlhooks.plugins.upgrad import upgrad
from mtlhooks.step import Step


def cr_mogm(
    gramian: Tensor,
    previous: Tensor | None,
    *,
    alpha: float = 0.9,
    weighting: Callable[[Tensor], Tensor] = upgrad,
) -> tuple[Tensor, Tensor]:
    """CR-MOGM: ``λₖ = α·λₖ₋₁ + (1 − α)·λ̂ₖ`` with ``λ̂ₖ = weighting(G)`` (default UPGrad).

    Zhou et al., "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and
    Beyond", NeurIPS 2022, Alg. 2 (correlation-reduced MOGM): smoothing the weights of a
    gradient-manipulation method across steps reduces the bias that stochastic gradients give
    them, and makes it converge. ``previous = None`` (the first step) gives ``λ̂₁`` itself, as
    TorchJD 0.18's ``CRMOGMWeighting``. Returns ``(weights, new_state)``, the state being the
    weights (float64). The paper's Corollary 1 lets α grow towards 1 as the learning rate
    decays; here α is fixed per plugin.
    """
    check_gramian(gramian)
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"cr_mogm: alpha must be in [0, 1], got {alpha}")
    current = weighting(gramian).to(torch.float64)
    if previous is None:
        smoothed = current
    else:
        if previous.shape != current.shape:
            raise InputError(
                f"cr_mogm: previous weights of shape {tuple(previous.shape)}, expected "
                f"{tuple(current.shape)}"
            )
        smoothed = alpha * previous.to(current) + (1 - alpha) * current
    return smoothed.to(gramian.dtype), smoothed


def _smoothable(name: str) -> registry.PluginInfo:
    """The aggregator CR-MOGM may wrap: a plugin whose method returns weights."""
    info = registry.get_plugin(name)
    spec = info.cls.method
    if info.family is not Family.AGGREGATOR or spec is None or spec.input != "gramian":
        raise ValueError(
            f"field 'method': {name!r} is not an aggregator that returns task weights; CR-MOGM "
            "smooths weights (e.g. upgrad, mgda, nash_mtl, pcgrad)"
        )
    if name == "cr_mogm":
        raise ValueError("field 'method': cr_mogm cannot smooth itself")
    return info


class CRMOGMConfig(PluginConfig):
    method: str = Field(
        default="upgrad",
        description="The aggregator whose weights are smoothed (any that returns weights).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Options of that aggregator, as in its own entry."
    )
    alpha: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="Weight α of the previous weights: λₖ = α·λₖ₋₁ + (1 − α)·λ̂ₖ (0: no "
        "smoothing; TorchJD's default 0.9).",
    )

    @model_validator(mode="after")
    def _wrapped_method_is_valid(self) -> CRMOGMConfig:
        info = _smoothable(self.method)
        try:
            info.config_model(**self.options)
        except ValidationError as error:
            raise ValueError(f"field 'options' for {self.method!r}: {error}") from error
        return self


class CRMOGM(Plugin):
    """CR-MOGM: the weights of another aggregator, smoothed by an EMA across steps.

    Zhou et al., "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and
    Beyond", NeurIPS 2022 (:func:`cr_mogm`): ``λₖ = α·λₖ₋₁ + (1 − α)·λ̂ₖ`` with λ̂ the weights of
    ``method`` (default UPGrad, configured by ``options``) on this step's Gramian; the first step
    uses λ̂₁. As weights, so the task-specific parameters receive them too. State: the smoothed
    weights and the wrapped method's own state (``state_dict``). The EMA only mixes steps at
    which the wrapped method aggregates.
    """

    name = "cr_mogm"
    family = Family.AGGREGATOR
    Config = CRMOGMConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN
    method = MethodSpec(
        cr_mogm,
        "Zhou et al. 2022",
        frozenset(
            {Property.SCALE_INVARIANT, Property.PERMUTATION_EQUIVARIANT, Property.NONNEGATIVE}
        ),
        stateful=True,
        initial_state=mean,
        notes="UPGrad's weights smoothed with α = 0.9; tested from uniform previous weights; "
        "mixing steps loses UPGrad's non-conflict",
    )

    def __init__(self, config: CRMOGMConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: CRMOGMConfig = config
        info = _smoothable(config.method)
        if setup.space not in info.spaces:
            raise ConfigError(
                f"cr_mogm: {config.method!r} cannot work in space {setup.space.value!r}; its "
                f"spaces are {[s.value for s in info.spaces]}"
            )
        self._inner = info.cls(info.config_model(**config.options), setup)
        if self._inner.needs is not Need.GRAMIAN:
            raise ConfigError(
                f"cr_mogm: {config.method!r} with these options does not return weights"
            )
        self._weights: Tensor | None = None

    @classmethod
    def check_config(cls, config: PluginConfig, tasks: tuple[str, ...]) -> None:
        assert isinstance(config, CRMOGMConfig)
        info = _smoothable(config.method)
        info.cls.check_config(info.config_model(**config.options), tasks)

    def wants_gradients(self, index: int) -> bool:
        return self._inner.wants_gradients(index)

    @hookimpl
    def mtl_aggregate(self, step: Step) -> Tensor:
        current = self._inner.mtl_aggregate(step)  # type: ignore[attr-defined]
        weights, self._weights = cr_mogm(
            step.gramian(),
            self._weights,
            alpha=self.config.alpha,
            weighting=lambda _gramian: current,
        )
        return weights

    def state_dict(self) -> dict[str, Any]:
        weights = None if self._weights is None else self._weights.clone()
        return {"weights": weights, "inner": self._inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        weights = state["weights"]
        self._weights = None if weights is None else weights.to(torch.float64).clone()
        self._inner.load_state_dict(state["inner"])
