"""GradDrop: keep, per coordinate of the features' gradient, one sign only (Chen et al. 2020)."""

from __future__ import annotations

import torch
from pydantic import Field

from mtlhooks import functional
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.step import Step


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
    ``Σᵢ (ℓ + (1 − ℓ)·Mᵢ)·gᵢ`` (:func:`mtlhooks.functional.graddrop`), with gᵢ the weighted task
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

    @hookimpl
    def mtl_combine(self, step: Step) -> torch.Tensor:
        assert isinstance(self.config, GradDropConfig)
        assert step.gradients is not None
        matrix = step.gradients.matrix()
        weighted = matrix * step.weights.to(matrix.dtype)[:, None]
        combined = functional.graddrop(weighted, generator=step.generator, leak=self.config.leak)
        return combined
