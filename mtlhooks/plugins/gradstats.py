"""Gradient statistics observer: norms, cosines, magnitude similarity, conflict rate."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import IO, Any

from pydantic import Field

from mtlhooks import stats
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Setup, Space, hookimpl
from mtlhooks.report import StepReport


class GradStatsConfig(PluginConfig):
    every: int = Field(default=1, ge=1, description="Record every N-th backward() call.")
    console: bool = Field(default=False, description="Print one line per record to stderr.")
    jsonl: str | None = Field(
        default=None, description="Append one JSON object per record to this file."
    )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class GradStats(Plugin):
    """Logs task-gradient norms, imbalance, cosines, magnitude similarity and conflict rate.

    Statistics of the unweighted task gradients ∇Lᵢ: norms and their imbalance, pairwise
    cosine, gradient magnitude similarity (Yu et al. 2020) and conflict rate, plus the effective
    weights. The quantities of Elich et al. ("Challenging Common Assumptions
    in Multi-task Learning") and Guo et al. 2025 ("Revisit the Imbalance Optimization in
    Multi-task Learning").

    Needs per-task gradients, but only on recorded steps: other steps take the fast path when no
    other plugin needs gradients. ``mtl.last_record`` is not kept; read ``records`` or the file.
    """

    name = "gradstats"
    family = Family.OBSERVER
    Config = GradStatsConfig
    spaces = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
    needs = Need.GRAMIAN

    def __init__(self, config: GradStatsConfig, setup: Setup) -> None:
        super().__init__(config, setup)
        self.config: GradStatsConfig = config
        self.last_record: dict[str, Any] | None = None
        self._file: IO[str] | None = None

    def wants_gradients(self, index: int) -> bool:
        return index % self.config.every == 0

    def record(self, report: StepReport) -> dict[str, Any]:
        """The statistics of one report as plain Python values."""
        record: dict[str, Any] = {
            "step": report.index,
            "space": report.space.value,
            "skipped": report.skipped,
            "losses": dict(zip(report.tasks, report.losses.tolist())),
        }
        if report.weights is not None:
            record["weights"] = dict(zip(report.tasks, report.weights.tolist()))
        if report.gramian is not None:
            gramian = report.gramian.double()
            record["grad_norms"] = dict(zip(report.tasks, stats.norms(gramian).tolist()))
            record["cosine"] = stats.cosine_matrix(gramian).tolist()
            record["magnitude_similarity"] = stats.magnitude_similarity(gramian).tolist()
            record["conflict_rate"] = stats.conflict_rate(gramian)
            imbalance = stats.norm_imbalance(gramian)
            record["norm_imbalance"] = {k: _finite(v) for k, v in imbalance.items()}
        return record

    @hookimpl
    def mtl_observe(self, report: StepReport) -> None:
        if report.index % self.config.every:
            return
        record = self.record(report)
        self.last_record = record
        if self.config.console:
            print(self._line(record), file=sys.stderr)
        if self.config.jsonl is not None:
            if self._file is None:
                path = Path(self.config.jsonl)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = path.open("a", encoding="utf-8")
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    @staticmethod
    def _line(record: dict[str, Any]) -> str:
        parts = [f"step {record['step']}"]
        if record["skipped"]:
            parts.append("skipped")
        if "grad_norms" in record:
            shown = " ".join(f"{t}={n:.3g}" for t, n in record["grad_norms"].items())
            parts.append(f"|g| {shown}")
            parts.append(f"conflicts {record['conflict_rate']:.2f}")
            ratio = record["norm_imbalance"]["max_min_ratio"]
            parts.append(f"max/min {ratio:.3g}" if ratio is not None else "max/min inf")
        return "  ".join(parts)

    @hookimpl
    def mtl_close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
