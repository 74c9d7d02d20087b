"""GradDrop: keep, per coordinate of the features' gradient, one sign only (Chen et al. 2020)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.method import MethodSpec, uniform_draws
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.step import Step


def graddrop(grads: Tensor, *, generator: torch.Generator | None, leak: float = 0.0) -> Tensor:
    """GradDrop: keep, per coordinate, only the gradients of one sign, chosen by sign purity.

    Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020, Alg. 1: ``P = ½(1 + Σgᵢ / Σ|gᵢ|)`` per coordinate, ``U ~ Unif(0, 1)``; task i
    keeps its positive entries where ``P > U`` and its negative entries where ``P < U``; the
    result is ``Σᵢ (ℓ + (1 − ℓ)·Mᵢ) gᵢ`` with leak ℓ. Coordinate-wise: takes the (T, ...)
    gradients (meant for a shared representation, as in the paper) and returns the combined
    gradient. ``P = ½`` where every gradient is zero.
    """
    if grads.dim() < 1 or grads.shape[0] == 0:
        raise InputError("graddrop: expected gradients of shape (T, ...) with T ≥ 1")
    if not 0.0 <= leak <= 1.0:
        raise InputError(f"graddrop: leak must be in [0, 1], got {leak}")
    total = grads.sum(0)
    magnitude = grads.abs().sum(0)
    purity = torch.where(
        magnitude > 0, 0.5 * (1 + total / torch.where(magnitude > 0, magnitude, 1)), 0.5
    )
    uniform = uniform_draws(tuple(purity.shape), generator, grads.device).to(purity.dtype)
    keep = ((purity > uniform) & (grads > 0)) | ((purity < uniform) & (grads < 0))
    return ((leak + (1 - leak) * keep.to(grads.dtype)) * grads).sum(0)


class GradDropConfig(PluginConfig):
    leak: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Fraction ℓ of every dropped gradient that is kept anyway (0: the paper's "
        "plain GradDrop; 1: the plain sum).",
    )


class GradDrop(Plugin):
    """GradDrop: per coordinate of the features' gradient, keep the task gradients of one sign only.

    Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020, Algorithm 1: purity ``P = ½(1 + Σgᵢ/Σ|gᵢ|)`` per coordinate, ``U ~ Unif(0, 1)``
    drawn from the pipeline's seeded generator; task i keeps its positive entries where
    ``P > U`` and its negative entries where ``P < U``; the combined gradient is
    ``Σᵢ (ℓ + (1 − ℓ)·Mᵢ)·gᵢ`` (:func:`graddrop`), with gᵢ the weighted task
    gradients. Coordinate-wise, so not a weighting: it is written to the features and flows back
    into the trunk, while the task-specific parameters receive ``Σ wᵢ∇Lᵢ``. As in the paper it
    acts on the gradient of the shared representation, so it works in space ``features`` only
    (pass ``features=z`` to ``backward``).
    """

    name = "graddrop"
    family = Family.AGGREGATOR
    Config = GradDropConfig
    spaces = (Space.FEATURES,)
    needs = Need.JACOBIAN
    method = MethodSpec(
        graddrop,
        "Chen et al. 2020",
        frozenset(),
        random=True,
        input="gradients",
        notes="coordinate-wise: returns the combined gradient, not weights",
    )

    @hookimpl
    def mtl_combine(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, GradDropConfig)
        assert step.gradients is not None
        matrix = step.gradients.matrix()
        weighted = matrix * step.weights.to(matrix.dtype)[:, None]
        combined = graddrop(weighted, generator=step.generator, leak=self.config.leak)
        return combined
