"""Gradient statistics observer: the quantities of both seed papers, logged every N steps."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor

from mtlhooks import stats
from mtlhooks.backends import (
    Backend,
    LoggingConfig,
    Resumable,
    TrackerBackend,
    backends_from,
)
from mtlhooks.errors import ConfigError, InputError
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Setup, Space, hookimpl
from mtlhooks.report import StepReport


class GradStatsConfig(LoggingConfig):
    per_layer: bool = Field(
        default=False,
        description="Also record the statistics of every block of the gradient space (each "
        "shared parameter).",
    )
    groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Also record statistics per named group of blocks: group → list of "
        "parameter-name prefixes, e.g. {trunk: ['0.', '2.'], last: ['6.']}.",
    )

    @field_validator("groups")
    @classmethod
    def _groups_have_prefixes(cls, groups: dict[str, list[str]]) -> dict[str, list[str]]:
        empty = [name for name, prefixes in groups.items() if not prefixes]
        if empty:
            raise ValueError(f"groups {empty} list no parameter-name prefix")
        return groups


def _upper(matrix: Tensor, tasks: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """A symmetric T×T matrix as its strict upper triangle ``{a: {b: value}}``."""
    values = matrix.tolist()
    return {
        a: {b: values[i][j] for j, b in enumerate(tasks) if j > i} for i, a in enumerate(tasks[:-1])
    }


def block_statistics(gramian: Tensor, tasks: tuple[str, ...]) -> dict[str, Any]:
    """Norms, norm imbalance, cosines, magnitude similarity and conflict rate of one Gramian,
    as plain Python values (pairs as upper triangles ``{a: {b: value}}``)."""
    gramian = gramian.double()
    return {
        "grad_norms": dict(zip(tasks, stats.norms(gramian).tolist())),
        "norm_imbalance": stats.norm_imbalance(gramian),
        "cosine": _upper(stats.cosine_matrix(gramian), tasks),
        "magnitude_similarity": _upper(stats.magnitude_similarity(gramian), tasks),
        "conflict_rate": stats.conflict_rate(gramian),
    }


def _takes_step(log: Callable[..., Any]) -> bool:
    """Whether ``log`` accepts a ``step`` keyword."""
    try:
        parameters = inspect.signature(log).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume the tracker protocol
        return True
    return any(p.name == "step" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


class GradStats(Plugin):
    """Logs task-gradient norms and imbalance, cosines, magnitude similarity and conflict rate.

    The statistics of the two seed papers, of the unweighted task gradients gᵢ = ∇Lᵢ in the
    pipeline's gradient space: norms ‖gᵢ‖ and their imbalance (max/min ratio, coefficient of
    variation), pairwise cosine, gradient magnitude similarity 2‖gᵢ‖‖gⱼ‖/(‖gᵢ‖² + ‖gⱼ‖²)
    (Yu et al. 2020), the conflict rate (share of pairs with ⟨gᵢ, gⱼ⟩ < 0), the effective
    weights (the multiplier of each gᵢ in the written update) and the norms of the weighted
    gradients. Elich et al., "Challenging Common Assumptions in Multi-task Learning" (2023):
    magnitude differences, not angles, set MTL apart from single-task learning; Guo et al.,
    "Revisit the Imbalance Optimization in Multi-task Learning" (2025): imbalance tracks the
    task-gradient norms.

    Per-task gradients are taken only at recorded calls (every ``every`` calls): in between, a
    step costs a plain backward unless another plugin needs gradients. ``per_layer`` and
    ``groups`` add the same statistics per shared parameter or per group of parameters (from
    the report's block Gramians). Records go to the console, JSONL, CSV and TensorBoard as
    configured, to any tracker given to :meth:`attach` (``accelerate.Accelerator``), and
    ``last_record`` keeps the latest.

    Single-task baseline: call :meth:`split_batch` with per-sample losses before
    ``mtl.backward``; the next record then holds the same statistics between the two halves of
    each task's batch (``split.stl``) next to those between tasks on equal-sized halves
    (``split.mtl``).

    Under data parallelism every rank computes the same statistics (of the global batch) and
    only rank 0 writes the console and the files (``ranks: all``: each rank to its own paths,
    ``run.rank1.jsonl``); split-batch statistics are of each rank's own batch, labelled
    ``split.rank``.
    """

    name = "gradstats"
    family = Family.OBSERVER
    Config = GradStatsConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN

    def __init__(self, config: GradStatsConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: GradStatsConfig = config
        # Groups first: a bad prefix must fail before any output file is touched.
        self._groups = self._resolve_groups(setup) if config.groups else {}
        self.backends: list[Backend] = backends_from(
            config, prefix=self.name, rank=setup.rank, world_size=setup.world_size
        )
        self.last_record: dict[str, Any] | None = None
        self._next_index = 0
        self._pending_split: dict[str, Any] | None = None

    @classmethod
    def output_paths(cls, config: PluginConfig) -> dict[str, str]:
        assert isinstance(config, GradStatsConfig)
        return config.output_paths()

    def wants_gradients(self, index: int) -> bool:
        return index % self.config.every == 0

    def attach(
        self,
        target: Any,
        *,
        prefix: str | None = None,
        step: Callable[[], int] | None = None,
    ) -> None:
        """Send records to ``target`` as well. Accepted targets:

        - a backend of :mod:`mtlhooks.backends` (``write``/``close``);
        - a Lightning logger (``log_metrics(metrics, step)``), or a list of them
          (``trainer.loggers``);
        - a tracker with ``log(values, step=...)``: an ``accelerate.Accelerator`` reaches every
          tracker it was built with; a ``wandb`` run;
        - an object whose ``log(values)`` takes no step, such as the Hugging Face
          ``transformers.Trainer`` (which adds its own ``global_step`` to every entry).

        Keys are ``"<prefix>/<statistic>/<task>"``, prefix ``"gradstats"`` by default; only the
        finite numbers of a record are sent. ``step`` gives the step to log at (e.g.
        ``lambda: trainer.global_step``); default: the record's ``backward()`` call index.
        """
        if callable(getattr(target, "write", None)) and callable(getattr(target, "close", None)):
            backend: Any = target
            self.backends.append(backend)
            return
        if isinstance(target, (list, tuple)):
            for item in target:
                self.attach(item, prefix=prefix, step=step)
            return

        def at(record_step: int) -> int:
            return record_step if step is None else int(step())

        log_metrics = getattr(target, "log_metrics", None)
        log = getattr(target, "log", None)
        tracker: Any
        if callable(log) and not _takes_step(log):
            # transformers.Trainer.log(logs) takes no step= and adds its own global_step (its
            # log_metrics(split, metrics) is a printer, not a Lightning logger's method).
            tracker = SimpleNamespace(log=lambda values, step: log(values))
        elif callable(log_metrics):
            # Lightning loggers: log_metrics(metrics, step), rank-zero only by Lightning's design.
            tracker = SimpleNamespace(log=lambda values, step: log_metrics(values, step=at(step)))
        elif callable(log) and step is not None:
            tracker = SimpleNamespace(log=lambda values, step: log(values, step=at(step)))
        else:
            tracker = target  # TrackerBackend refuses an object without log()
        self.backends.append(TrackerBackend(tracker, prefix=prefix or self.name))

    def split_batch(
        self, per_sample_losses: Mapping[str, Tensor], inputs: Iterable[Tensor]
    ) -> bool:
        """Measure the single-task baseline for the next ``backward()`` call, if it is recorded.

        Call it after the forward pass and *before* ``mtl.backward``, with each task's per-sample
        losses (shape ``(n,)``, e.g. ``reduction="none"``) and what to take gradients of (the
        shared parameters, usually). See :func:`mtlhooks.stats.split_batch_statistics`. Costs
        2T vector-Jacobian products, only at recorded calls.

        :returns: whether it measured (``False`` when the next call is not recorded).
        """
        unknown = sorted(set(per_sample_losses) - set(self.setup.tasks))
        if unknown:
            raise InputError(
                f"split_batch: unknown task(s) {unknown}; tasks are {self.setup.tasks}"
            )
        if not self.wants_gradients(self._next_index):
            return False
        try:
            self._pending_split = stats.split_batch_statistics(per_sample_losses, list(inputs))
        except RuntimeError as error:  # autograd: a loss without a graph reaching the inputs
            raise InputError(
                "split_batch: the per-sample losses must be computed from `inputs` with a graph "
                f"(not under torch.no_grad(), not detached): {error}"
            ) from None
        return True

    def _resolve_groups(self, setup: Setup) -> dict[str, list[str]]:
        """Group → the names of the space's parameter blocks it holds, checked at construction
        (every group must hold at least one block)."""
        names = setup.parameter_names
        if not names:
            raise ConfigError(
                f"gradstats: groups need the gradient space to have parameter blocks, but this "
                f"MTL works in space {setup.space.value!r}; pass shared= to MTL (spaces params "
                "or last_shared) or leave groups out"
            )
        groups = {
            group: [n for n in names if any(n.startswith(p) for p in prefixes)]
            for group, prefixes in self.config.groups.items()
        }
        empty = {group: self.config.groups[group] for group, found in groups.items() if not found}
        if empty:
            shown = ", ".join(names[:20])
            if len(names) > 20:
                shown += f", … ({len(names)} in all)"
            raise ConfigError(
                f"gradstats: groups {empty} match no parameter of space "
                f"{setup.space.value!r}; its parameters are {shown}"
            )
        return groups

    def record(self, report: StepReport) -> dict[str, Any]:
        """The statistics of one report as plain Python values (what the backends receive)."""
        tasks = report.tasks

        def by_task(values: Tensor | None) -> dict[str, float] | None:
            return None if values is None else dict(zip(tasks, values.tolist()))

        record: dict[str, Any] = {
            "step": report.index,
            "space": report.space.value,
            "skipped": report.skipped,
            "losses": by_task(report.losses),
        }
        if report.reason is not None:
            record["reason"] = report.reason
        if report.loss_weights is not None:
            record["loss_weights"] = by_task(report.loss_weights)
        if report.weights is not None:
            record["weights"] = by_task(report.weights)
        gramian = report.gramian
        if gramian is not None and bool(gramian.isfinite().all()):
            record.update(block_statistics(gramian, tasks))
            if report.weights is not None:
                weights = report.weights.double().abs()
                weighted = stats.norms(gramian.double()) * weights
                record["weighted_grad_norms"] = by_task(weighted)
                scaled = gramian.double() * weights[:, None] * weights[None, :]
                record["weighted_norm_imbalance"] = stats.norm_imbalance(scaled)
            blocks = report.block_gramians
            if self.config.per_layer:
                record["layers"] = {
                    name: block_statistics(block, tasks) for name, block in blocks.items()
                }
            if self._groups:
                record["groups"] = {
                    group: block_statistics(torch.stack([blocks[n] for n in members]).sum(0), tasks)
                    for group, members in self._groups.items()
                }
        if self._pending_split is not None:
            record["split"] = self._pending_split
            if self.setup.world_size > 1:
                # Halves of this rank's own batch (the rest of the record is global).
                record["split"] = {**self._pending_split, "rank": self.setup.rank}
            self._pending_split = None
        return record

    @hookimpl
    def mtl_observe(self, report: StepReport) -> None:
        self._next_index = report.index + 1
        if report.index % self.config.every:
            self._pending_split = None
            return
        record = self.record(report)
        self.last_record = record
        for backend in self.backends:
            backend.write(record)

    @hookimpl
    def mtl_close(self) -> None:
        for backend in self.backends:
            backend.close()

    def state_dict(self) -> dict[str, Any]:
        return {"next_index": self._next_index}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the call counter; file outputs then keep the records of earlier steps and
        drop those at or after it, which this resumed run records again."""
        self._next_index = int(state["next_index"])
        for backend in self.backends:
            if isinstance(backend, Resumable):
                backend.resume(self._next_index)
