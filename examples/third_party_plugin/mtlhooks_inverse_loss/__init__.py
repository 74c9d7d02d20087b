"""An example third-party plugin, found by mtlhooks through its entry point.

Install it (``pip install examples/third_party_plugin``) and write ``- inverse_loss`` in a
config: mtlhooks finds it by name, validates its options and runs it in config order.
"""

from __future__ import annotations

from pydantic import Field

from mtlhooks import Family, Plugin, PluginConfig, Step, hookimpl


class InverseLossConfig(PluginConfig):
    eps: float = Field(default=1e-8, gt=0, description="Added to each loss before inverting.")


class InverseLoss(Plugin):
    """Inverse-loss weighting: wᵢ ← wᵢ / (Lᵢ + eps), so every scaled loss is about 1."""

    name = "inverse_loss"
    family = Family.LOSS_SCALING
    Config = InverseLossConfig

    @hookimpl
    def mtl_scale_losses(self, step: Step) -> None:
        assert isinstance(self.config, InverseLossConfig)
        step.weights = step.weights / (step.losses.abs() + self.config.eps)


__all__ = ["InverseLoss"]
