"""The contract: every hook of one ``mtl.backward(losses)`` call, in the order they fire.

One call of :meth:`mtlhooks.MTL.backward` runs this pipeline (per micro-step, i.e. once per call)::

    mtl.backward({"seg": l_seg, "depth": l_depth}, features=z)
    │
    ├─ validate: task names, scalar floating-point losses computed from the model
    └─ mtl_backward(step)                      wrapper hooks around the whole call
       ├─ per-task gradients of the unweighted losses in the space chosen once at construction
       │  (features / last_shared / params) → step.gradients, synchronised across processes
       │  (the losses' all-reduce carries every rank's status: a rank that failed stops all)
       ├─ mtl_scale_losses(step)               loss scaling, config order, chained via step.weights
       ├─ one copy to the host of the losses, their weights and the Gramian; a non-finite
       │  value follows ``on_nonfinite`` (raise or skip) before any later plugin sees the step
       ├─ mtl_balance(step)                    norm balancing, config order, on host tensors
       ├─ mtl_aggregate(step) -> weights       the one aggregator (default: plain sum, α = 1)
       │  or mtl_combine(step) -> gradient     for coordinate-wise aggregators
       └─ write .grad (accumulating, like Tensor.backward) and back-propagate auxiliary losses;
          then one check that everything written is finite (else put back: ``on_nonfinite``)
    mtl_observe(report)                        observers, after everything, read-only

    optimizer.step(); mtl.after_step(new_losses)   optional, for FAMO-like methods
    └─ mtl_after_step(index, losses)

All or nothing: a call that raises (in any hook, observers included) or is skipped leaves every
``.grad``, every plugin's ``state_dict()``, the generator and the step counter as they were
before it (:mod:`mtlhooks.transaction`); only a skipped call's report reaches the observers.
So a plugin keeps everything that changes across calls in its ``state_dict()``, and
``load_state_dict()`` restores it exactly.

Ordering: implementations of one hook run in the order their plugins appear in the config, and
observers after every other family, whatever the registration order; ``tryfirst``/``trylast``
are refused for that reason. Hook implementations take no default argument values.

Per-task gradients are taken only at calls where some plugin wants them
(:meth:`mtlhooks.Plugin.wants_gradients`); at other calls, and always in space ``none``, the
gradient stage is one backward of ``Σ weights[i] · L_i`` and ``mtl_balance``, ``mtl_aggregate``
and ``mtl_combine`` do not fire.

Weights: ``step.weights`` holds one detached multiplier per task. The task gradient that every
later stage sees is ``weights[i] * ∇L_i``. An aggregator returns α and the written gradient of
every parameter is ``Σ α_i · weights[i] · ∇L_i`` (shared and task-specific parameters alike).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

from mtlhooks.plugin import PROJECT

if TYPE_CHECKING:
    from torch import Tensor

    from mtlhooks.report import StepReport
    from mtlhooks.step import Step

hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec(firstresult=True)
def mtl_backward(step: Step) -> StepReport | None:
    """Runs the whole pipeline of one ``backward()`` call (per micro-step).

    The core implements it; plugins implement it only as a wrapper
    (``@hookimpl(wrapper=True)``) for around-concerns: timing, ``no_sync``, autocast. A wrapper
    must ``yield`` exactly once and return what the yield gave (the :class:`StepReport`).

    :param step: the state of this call; see :class:`mtlhooks.step.Step`.

    Stops at first non-None result.
    """


@hookspec
def mtl_scale_losses(step: Step) -> None:
    """Loss scaling: set new per-task weights from loss values. Fires once per ``backward()``
    (once per optimizer step under accumulation in space ``params``), for every loss-scaling
    plugin in config order, before the finiteness checks and before the gradients are balanced
    and combined; a call that is then skipped or fails gets its effect on the plugin's state
    undone (see the all-or-nothing rule above).

    Read ``step.losses`` (detached values, shape ``(T,)``) and the weights set so far
    ``step.weights``; assign the new weights to ``step.weights`` (shape ``(T,)``, detached,
    finite, on ``step.losses.device``). A plugin with learnable parameters adds its own objective
    with ``step.add_auxiliary_loss(...)``; it is back-propagated into those parameters only.

    :param step: the state of this call.
    """


@hookspec
def mtl_balance(step: Step) -> None:
    """Norm balancing: set per-task weights from the task gradients. Fires once per
    ``backward()``, after per-task gradients exist (``step.gradients`` is set), for every
    norm-balancing plugin in config order.

    ``step.gramian()`` and ``step.grad_norms()`` give the Gramian and norms of the *weighted*
    task gradients ``weights[i] * ∇L_i``; assign new weights to ``step.weights``. From this
    stage on ``step.losses``, ``step.weights`` and the Gramian are host (CPU) tensors: a solver
    never waits for the device (``step.gradients.blocks`` stay where they were computed).

    :param step: the state of this call.
    """


@hookspec(firstresult=True)
def mtl_aggregate(step: Step) -> Tensor | None:
    """Gradient surgery: return per-task weights α (shape ``(T,)``) for the weighted task
    gradients, so the update is ``Σ α_i · weights[i] · ∇L_i``. Fires once per ``backward()``,
    after norm balancing. At most one aggregator is configured; without one, α = 1 (plain sum).

    Gramian-based methods read ``step.gramian()``; random ones draw from ``step.generator``.

    :param step: the state of this call.

    Stops at first non-None result.
    """


@hookspec(firstresult=True)
def mtl_combine(step: Step) -> Tensor | None:
    """Coordinate-wise gradient surgery (GradDrop-like): return the combined gradient in the
    gradient space, flattened to shape ``(P,)`` (the column layout of ``step.gradients.matrix()``)
    and in its units: under mixed precision the per-task gradients are those of the scaled
    losses (``step.loss_scale``), and the combined gradient is written as returned.
    Fires instead of :func:`mtl_aggregate` for plugins whose result is not a weighting.
    Task-specific parameters then receive ``Σ weights[i] · ∇L_i``.

    :param step: the state of this call.

    Stops at first non-None result.
    """


@hookspec
def mtl_observe(report: StepReport) -> None:
    """Observers: read the finished step. Fires once per ``backward()`` after ``.grad`` has been
    written (or the step was skipped: ``report.skipped``), observers after every other plugin,
    each group in config order. Must not change anything it is given.

    :param report: the read-only :class:`mtlhooks.report.StepReport` of this call.
    """


@hookspec
def mtl_after_step(index: int, losses: Tensor) -> None:
    """Fires from :meth:`mtlhooks.MTL.after_step`, which the user calls after
    ``optimizer.step()`` with fresh losses (for methods that learn from how the losses changed,
    such as FAMO). Called in config order. Not fired unless the user calls ``after_step``.

    :param index: the number of ``backward()`` calls so far.
    :param losses: detached loss values, shape ``(T,)``, in task order.
    """


@hookspec
def mtl_close() -> None:
    """Fires once from :meth:`mtlhooks.MTL.close` (or the end of a ``with`` block): flush and
    close files, trackers and other resources."""
