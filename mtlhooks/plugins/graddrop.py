"""GradDrop: keep, per feature of the representation, one sign only (Chen et al. 2020)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field
from torch import Tensor

from mtlhooks.errors import InputError
from mtlhooks.method import MethodSpec, uniform_draws
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Space, hookimpl
from mtlhooks.step import Step


def graddrop(
    grads: Tensor,
    *,
    generator: torch.Generator | None,
    leak: float = 0.0,
    activations: Tensor | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """GradDrop: per feature, keep only the task gradients of one sign, chosen by sign purity.

    Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020, Alg. 1, for a batched representation as the paper and LibMTL define it:

    - ``grads`` (T, B, ...) are the task gradients w.r.t. a representation z of shape (B, ...)
      whose first dimension is the batch; ``activations`` is z itself (default: all positive);
    - per feature (every non-batch coordinate of z), ``Sᵢ = Σ_b sign(z_b)·gᵢ,b`` (the batch
      sum, then ``reduce(S)`` — e.g. the sum over data-parallel ranks — when given);
    - purity ``P = ½(1 + Σᵢ Sᵢ / Σᵢ |Sᵢ|)`` and one draw ``U ~ Unif(0, 1)`` per feature;
    - task i keeps its gradient on the features where ``P > U`` and ``Sᵢ > 0`` or ``P < U``
      and ``Sᵢ < 0``, on every sample; the result is ``Σᵢ (ℓ + (1 − ℓ)·Mᵢ) gᵢ``, (B, ...).

    ``P = ½`` where every ``Sᵢ`` is zero. The uniforms are float32 draws from ``generator`` on
    its own device, so every rank of a data-parallel run that shares its seed draws the same
    and, with ``reduce`` summing S over the ranks, the result on each rank's samples is what one
    process computes on the whole batch. The mask does not depend on a common scale of the
    gradients (the per-rank losses being means over fewer samples changes nothing).
    """
    if grads.dim() < 2 or grads.shape[0] == 0:
        raise InputError(
            "graddrop: expected gradients of shape (T, B, ...) with T ≥ 1 tasks and the batch "
            f"first, got {tuple(grads.shape)}"
        )
    if not 0.0 <= leak <= 1.0:
        raise InputError(f"graddrop: leak must be in [0, 1], got {leak}")
    if activations is not None and activations.shape != grads.shape[1:]:
        raise InputError(
            f"graddrop: activations of shape {tuple(activations.shape)} do not match the "
            f"gradients' {tuple(grads.shape[1:])}"
        )
    signed = grads if activations is None else grads * activations.sign().to(grads.dtype)
    sums = signed.sum(1)  # (T, ...): one value per task and feature
    if reduce is not None:
        sums = reduce(sums)
    total = sums.sum(0)
    magnitude = sums.abs().sum(0)
    positive = magnitude > 0
    purity = torch.where(positive, 0.5 * (1 + total / torch.where(positive, magnitude, 1)), 0.5)
    uniform = uniform_draws(tuple(purity.shape), generator, grads.device).to(purity.dtype)
    keep = ((purity > uniform) & (sums > 0)) | ((purity < uniform) & (sums < 0))
    factors = leak + (1 - leak) * keep.to(grads.dtype)  # (T, ...), the same for every sample
    return (factors.unsqueeze(1) * grads).sum(0)


class GradDropConfig(PluginConfig):
    leak: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Fraction ℓ of every dropped gradient that is kept anyway (0: the paper's "
        "plain GradDrop; 1: the plain sum).",
    )


class GradDrop(Plugin):
    """GradDrop: per feature of the shared representation, keep the task gradients of one sign.

    Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020, Algorithm 1, with the purity of the paper and LibMTL: per feature (non-batch
    coordinate of ``features=z``, whose first dimension is the batch),
    ``Sᵢ = Σ_b sign(z_b)·gᵢ,b``, ``P = ½(1 + ΣSᵢ/Σ|Sᵢ|)``, one ``U ~ Unif(0, 1)`` drawn from the
    pipeline's seeded generator; task i keeps its gradient on the features where ``P > U`` and
    ``Sᵢ > 0`` or ``P < U`` and ``Sᵢ < 0``; the combined gradient is ``Σᵢ (ℓ + (1 − ℓ)·Mᵢ)·gᵢ``
    (:func:`graddrop`), with gᵢ the weighted task gradients. Under data parallelism the batch
    sums S are summed over the ranks (``step.all_reduce``) and every rank draws the same U, so
    the result is exact: R ranks × B/R samples give what one process gives on B.
    Coordinate-wise, so not a weighting: it is written to the features and flows back
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
        assert step.features is not None
        features = step.features.detach()
        matrix = step.gradients.matrix()
        grads = matrix.reshape(matrix.shape[0], *features.shape)
        weighted = grads * step.weights.to(matrix.device, matrix.dtype).reshape(
            -1, *[1] * features.dim()
        )
        combined = graddrop(
            weighted,
            generator=step.generator,
            leak=self.config.leak,
            activations=features,
            reduce=step.all_reduce,
        )
        return combined.reshape(-1)
