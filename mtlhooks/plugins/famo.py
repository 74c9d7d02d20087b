"""FAMO: fast adaptive multitask optimisation, balancing the rates of loss decrease
(Liu et al. 2023)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from mtlhooks.errors import InputError
from mtlhooks.plugin import Family, Plugin, PluginConfig, Setup, hookimpl
from mtlhooks.report import StepReport
from mtlhooks.step import Step
from mtlhooks.weighting_utils import check_lower_bound, effective_losses


class FAMOConfig(PluginConfig):
    lr: float = Field(
        default=0.025, gt=0.0, description="Learning rate of the Adam step on the logits ξ (w_lr)."
    )
    weight_decay: float = Field(
        default=1e-3,
        ge=0.0,
        description="γ: Adam's (L2) weight decay on ξ. 1e-3 is what the reference's run scripts "
        "use on CelebA, NYUv2 and QM9 (1e-2 on Cityscapes, 0 on the toy) and LibMTL's default; "
        "the reference's famo.py and argument parser default to 1e-2, its "
        "methods/weight_methods.py class to 1e-5.",
    )
    min_losses: dict[str, float] = Field(
        default_factory=dict,
        description="Lower bound L*ᵢ of each task's loss (tasks not listed: 0). Losses must "
        "stay ≥ L*ᵢ.",
    )
    eps: float = Field(
        default=1e-8, gt=0.0, description="ε in log(ℓᵢ − ℓ*ᵢ + ε): a loss at its bound is finite."
    )
    update: Literal["after_step", "next_call"] = Field(
        default="after_step",
        description="Where the post-step losses come from: 'after_step' (the paper): the user "
        "calls mtl.after_step(losses) after optimizer.step() with the same batch's losses "
        "recomputed; backward() twice without it is an error. 'next_call': the next "
        "backward()'s losses (another batch) are used instead, with no extra forward pass; "
        "mtl.after_step is then ignored by FAMO. Use 'next_call' with gradient accumulation.",
    )


@dataclass
class _Pending:
    """What the next update of ξ needs from the ``backward()`` call that used ξ."""

    log_gaps: torch.Tensor  # log(ℓ − ℓ* + ε) at that call
    weights: torch.Tensor  # the weights before FAMO at that call (to weight the new losses)
    bounds: torch.Tensor  # ℓ* = weights · L*


class FAMO(Plugin):
    """FAMO: weights wᵢ = (zᵢ/Dᵢ) / Σⱼ(zⱼ/Dⱼ), z = softmax(ξ), Dᵢ = ℓᵢ − ℓ*ᵢ + ε; after each
    optimizer step, ξ takes an Adam step on J_softmax(ξ)ᵀ δ, δᵢ = log Dᵢ − log D′ᵢ.

    Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023. The
    model's objective is Σ zᵢ log Dᵢ / c with c = sg(Σ zᵢ/Dᵢ), whose gradient is Σ wᵢ ∇ℓᵢ with
    the weights above: they sum to 1 (times the weights of earlier plugins). **c divides**: one
    public version multiplies by c, which makes the weights depend on the
    scale of the losses; the test suite checks Σ w = 1.

    The post-step update: δᵢ = log Dᵢ − log D′ᵢ is how much task i's log-loss fell over the
    step, D′ from losses L′ after ``optimizer.step()``. ∂z/∂ξ = diag(z) − zzᵀ, so the gradient is
    z ⊙ (δ − ⟨z, δ⟩); ξ takes one Adam step (lr ``lr``, L2 weight decay ``weight_decay``). FAMO
    owns that optimizer: ξ is not in ``mtl.parameters()``.

    Where L′ comes from (``update``):

    - ``after_step`` (default, as in the paper): after ``optimizer.step()``, recompute the same
      batch's losses (``torch.no_grad()`` is fine) and call ``mtl.after_step(losses)``. Calling
      ``backward()`` again before that raises :class:`~mtlhooks.errors.InputError` (the update
      would silently never happen), and so does ``after_step`` with no ``backward()`` before
      it. A step skipped by ``on_nonfinite: skip`` teaches nothing: its record is dropped and
      an ``after_step`` right after it does nothing.
    - ``next_call``: no extra forward pass; at each ``backward()`` ξ is first updated with the
      previous call's losses as L and this call's (a different batch) as L′. Same timing of the
      update, noisier δ. ``mtl.after_step`` is ignored.

    ℓᵢ = weights[i]·Lᵢ are the losses as weighted by earlier plugins and ℓ*ᵢ = weights[i]·L*ᵢ
    (L* from ``min_losses``); the new losses of the update are weighted by the same weights.
    A loss below its bound L*ᵢ raises :class:`~mtlhooks.errors.InputError` (log of a negative);
    a loss equal to its bound is finite thanks to ε. The reference code also clips the model's
    gradient norm to 1: not done here (use ``torch.nn.utils.clip_grad_norm_`` if wanted).

    ξ (float32, CPU by default; ``plugin.to(device)`` moves it and its optimizer state) and the
    Adam state are in ``state_dict``, with the pending record of the last call.
    """

    name = "famo"
    family = Family.LOSS_SCALING
    Config = FAMOConfig

    def __init__(self, config: FAMOConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: FAMOConfig = config
        self._logits = torch.zeros(setup.num_tasks, dtype=torch.float32, requires_grad=True)
        self._optimizer = torch.optim.Adam(
            [self._logits], lr=config.lr, weight_decay=config.weight_decay
        )
        self._min_losses = torch.tensor(
            [config.min_losses.get(task, 0.0) for task in setup.tasks], dtype=torch.float64
        )
        self._pending: _Pending | None = None
        self._last_skipped = False

    @classmethod
    def check_config(cls, config: PluginConfig, tasks: tuple[str, ...]) -> None:
        assert isinstance(config, FAMOConfig)
        unknown = sorted(set(config.min_losses) - set(tasks))
        if unknown:
            raise ValueError(
                f"field 'min_losses': unknown task(s) {unknown}; tasks are {list(tasks)}"
            )

    # -- public ---------------------------------------------------------------------------------

    def task_weights(self) -> torch.Tensor:
        """z = softmax(ξ), the current task preferences (detached)."""
        return torch.softmax(self._logits.detach(), dim=-1)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> FAMO:
        """Move ξ and its Adam state (kept in place: same tensor object); returns self."""
        with torch.no_grad():
            self._logits.data = self._logits.data.to(device=device, dtype=dtype)
        for state in self._optimizer.state.values():
            for key, value in state.items():
                if key != "step" and isinstance(value, torch.Tensor):
                    state[key] = value.to(device=device, dtype=dtype)
        return self

    # -- hooks ----------------------------------------------------------------------------------

    def _check(self, losses: torch.Tensor, bounds: torch.Tensor, tasks: tuple[str, ...]) -> None:
        check_lower_bound(
            losses,
            bounds,
            tasks,
            method=self.name,
            strict=False,
            why="takes log(loss − min_loss), defined only for losses ≥ their min_losses bound",
            fix="Set min_losses (default 0) to a lower bound of that loss.",
        )

    def _update(self, new_losses: torch.Tensor, tasks: tuple[str, ...]) -> None:
        pending = self._pending
        assert pending is not None
        new = pending.weights * new_losses.to(pending.weights)
        self._check(new, pending.bounds, tasks)
        new_log_gaps = (new - pending.bounds + self.config.eps).log()
        delta = (pending.log_gaps - new_log_gaps).to(self._logits.device, self._logits.dtype)
        z = self.task_weights()
        self._optimizer.zero_grad(set_to_none=True)
        self._logits.grad = z * (delta - (z * delta).sum())
        self._optimizer.step()
        self._pending = None

    @hookimpl
    def mtl_scale_losses(self, step: Step) -> None:
        losses = effective_losses(step)
        bounds = step.weights * self._min_losses.to(losses.device, losses.dtype)
        self._check(losses, bounds, step.tasks)
        if self._pending is not None:
            if self.config.update == "after_step":
                raise InputError(
                    "famo: backward() was called twice without mtl.after_step(losses) in "
                    "between. FAMO (update: after_step) learns from the losses after "
                    "optimizer.step(): call mtl.after_step(losses) with the same batch's losses "
                    "recomputed after each optimizer.step(), or set update: next_call to use "
                    "the next backward()'s losses instead (also for gradient accumulation)."
                )
            self._update(step.losses, step.tasks)
        log_gaps = (losses - bounds + self.config.eps).log()
        z = self.task_weights().to(losses.device, losses.dtype)
        inverse = z / (losses - bounds + self.config.eps)
        self._pending = _Pending(log_gaps, step.weights.clone(), bounds)
        step.weights = step.weights * inverse / inverse.sum()

    @hookimpl
    def mtl_after_step(self, index: int, losses: torch.Tensor) -> None:
        if self.config.update == "next_call":
            return
        if self._pending is None:
            if self._last_skipped:
                return
            raise InputError(
                "famo: mtl.after_step() was called with no backward() since the last update: "
                "call it once after each optimizer.step() that followed a backward() (not "
                "after a step skipped by on_nonfinite: skip)."
            )
        self._update(losses, self.setup.tasks)
        self._last_skipped = False

    @hookimpl
    def mtl_observe(self, report: StepReport) -> None:
        self._last_skipped = report.skipped
        if report.skipped:
            self._pending = None

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        pending = None
        if self._pending is not None:
            pending = {
                "log_gaps": self._pending.log_gaps,
                "weights": self._pending.weights,
                "bounds": self._pending.bounds,
            }
        return {
            "logits": self._logits.detach().clone(),
            "optimizer": copy.deepcopy(self._optimizer.state_dict()),
            "pending": pending,
            "last_skipped": self._last_skipped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            self._logits.copy_(state["logits"])
        self._optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        pending = state["pending"]
        self._pending = None if pending is None else _Pending(**pending)
        self._last_skipped = bool(state["last_skipped"])
