"""Where observers send their records: console, JSONL, CSV, TensorBoard, experiment trackers.

A record is a nested mapping of plain values (the output of an observer for one step, with an
integer ``"step"``). Every backend has the same two methods::

    backend.write(record)   # one step
    backend.close()         # flush and release files

:func:`flatten` turns a record into ``{"a/b/c": value}`` scalars, the form CSV columns,
TensorBoard tags and tracker keys take. :class:`LoggingConfig` holds the options every observer
shares, and :func:`backends_from` builds the backends they ask for.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Protocol, TextIO

from pydantic import Field, model_validator

from mtlhooks.plugin import PluginConfig

Scalar = float | int | bool | str | None


class Backend(Protocol):
    """What an observer writes to."""

    def write(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class Tracker(Protocol):
    """Anything with ``log(values, step=...)``: ``accelerate.Accelerator`` (which forwards to
    W&B, MLflow, TensorBoard, … as configured with ``log_with=``), or a ``wandb`` run."""

    def log(self, values: dict[str, Any], step: int | None = ...) -> Any: ...


def flatten(record: Mapping[str, Any], *, separator: str = "/") -> dict[str, Scalar]:
    """Nested mappings to one level, keys joined by ``separator``; lists are left out (every
    statistic an observer writes has a scalar form in its mapping).

    >>> flatten({"step": 3, "grad_norms": {"a": 1.0}, "cosine": {"a": {"b": 0.5}}})
    {'step': 3, 'grad_norms/a': 1.0, 'cosine/a/b': 0.5}
    """
    flat: dict[str, Scalar] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                visit(f"{prefix}{separator}{key}" if prefix else str(key), item)
        elif value is None or isinstance(value, float | int | bool | str):
            flat[prefix] = value
        # lists and other containers: no scalar form, skipped on purpose

    visit("", record)
    return flat


def numeric(flat: Mapping[str, Scalar]) -> dict[str, float]:
    """The finite numbers of a flattened record (booleans as 0/1), without ``step``."""
    values = {}
    for key, value in flat.items():
        if key == "step" or value is None or isinstance(value, str):
            continue
        number = float(value)
        if math.isfinite(number):
            values[key] = number
    return values


def pair(matrix: Mapping[str, Mapping[str, Any]], first: str, second: str) -> Any:
    """The entry of a pairwise statistic stored as an upper triangle ``{a: {b: value}}``,
    whichever order the two tasks are given in; ``None`` when absent."""
    if second in matrix.get(first, {}):
        return matrix[first][second]
    return matrix.get(second, {}).get(first)


def _fmt(value: object, width: int = 9) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
        return text.rjust(width)
    return str(value).rjust(width)


class ConsoleBackend:
    """A compact table per record: one row per task (loss, weight, gradient norm, cosine with
    every other task), the conflict rate and norm imbalance in the title line, one line per
    layer or group. Prints records whose step is a multiple of ``every``."""

    def __init__(self, stream: TextIO | None = None, *, every: int = 1) -> None:
        self.stream = stream
        self.every = every

    def write(self, record: Mapping[str, Any]) -> None:
        if record["step"] % self.every:
            return
        stream = self.stream if self.stream is not None else sys.stderr
        print(self.format(record), file=stream, flush=True)

    @staticmethod
    def format(record: Mapping[str, Any]) -> str:
        title = [f"step {record['step']}", str(record.get("space", ""))]
        if record.get("skipped"):
            title.append(f"skipped: {record.get('reason')}")
        if "conflict_rate" in record:
            imbalance = record["norm_imbalance"]
            ratio = imbalance["max_min_ratio"]
            title.append(f"conflicts {record['conflict_rate']:.2f}")
            title.append(
                f"|g| max/min {'inf' if ratio is None else f'{ratio:.3g}'}"
                f" cv {imbalance['coefficient_of_variation']:.2f}"
            )
        lines = [" · ".join(title)]
        tasks = list(record["losses"])
        cosine = record.get("cosine", {})
        header = ["task", "loss", "weight", "|g|", "w·|g|", *(f"cos {t}" for t in tasks)]
        width = max(9, *(len(t) + 1 for t in tasks))
        rows = [header]
        for task in tasks:
            row = [task, _fmt(record["losses"][task]), _fmt(record.get("weights", {}).get(task))]
            row.append(_fmt(record.get("grad_norms", {}).get(task)))
            row.append(_fmt(record.get("weighted_grad_norms", {}).get(task)))
            for other in tasks:
                value = pair(cosine, task, other) if other != task else None
                row.append(
                    "" if other == task else _fmt(value, 0) if value is None else f"{value:+.2f}"
                )
            rows.append(row)
        for row in rows:
            cells = [cell.rjust(width) if i else cell.ljust(width) for i, cell in enumerate(row)]
            lines.append("  " + "".join(cells))
        for kind in ("layers", "groups"):
            for name, block in record.get(kind, {}).items():
                ratio = block["norm_imbalance"]["max_min_ratio"]
                lines.append(
                    f"  {kind[:-1]} {name}: conflicts {block['conflict_rate']:.2f}, "
                    f"|g| max/min {'inf' if ratio is None else f'{ratio:.3g}'}"
                )
        split = record.get("split")
        if split:
            stl = " ".join(f"{t}={v['cosine']:+.2f}" for t, v in split["stl"].items())
            lines.append(f"  half-batch cos (STL) {stl}")
        return "\n".join(lines)

    def close(self) -> None:
        pass


class JSONLBackend:
    """One JSON object per record, one per line; the file is created (or truncated) at the
    first record and flushed after every line. Non-finite floats are written as ``null``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None
        self._started = False

    def write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a" if self._started else "w", encoding="utf-8")
            self._started = True
        self._file.write(json.dumps(_finite_or_none(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


class CSVBackend:
    """One row per record, one column per flattened key (``grad_norms/a``, ``cosine/a/b``, …).

    The header is that of the first record; when a later record brings new keys (a first step
    that was skipped, say) the file is rewritten once with the wider header, earlier rows left
    blank in the new columns. Empty cells are missing or non-finite values."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None
        self._writer: csv.DictWriter[str] | None = None
        self._columns: list[str] = []

    def _open(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8", newline="")
        self._columns = columns
        self._writer = csv.DictWriter(self._file, fieldnames=columns, restval="")
        self._writer.writeheader()
        self._writer.writerows(rows)

    def write(self, record: Mapping[str, Any]) -> None:
        flat = {
            k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
            for k, v in flatten(record).items()
        }
        if self._writer is None:
            self._open(list(flat), [])
        elif any(key not in self._columns for key in flat):
            assert self._file is not None
            self._file.close()
            with self.path.open(encoding="utf-8", newline="") as existing:
                rows = list(csv.DictReader(existing))
            self._open(self._columns + [k for k in flat if k not in self._columns], rows)
        assert self._writer is not None and self._file is not None
        self._writer.writerow(flat)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._writer = None


class TensorBoardBackend:
    """Scalars through ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard``
    package: ``pip install "mtlhooks[tensorboard]"``); tags are ``prefix/<flattened key>``."""

    def __init__(self, log_dir: str | Path, *, prefix: str = "mtl") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "the TensorBoard backend needs the tensorboard package: "
                'pip install "mtlhooks[tensorboard]"'
            ) from error
        self.prefix = prefix
        self._writer: Any = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for key, value in numeric(flatten(record)).items():
            self._writer.add_scalar(f"{self.prefix}/{key}", value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class TrackerBackend:
    """Calls ``tracker.log({"prefix/<key>": value, ...}, step=step)`` with the finite numbers of
    each record: an ``accelerate.Accelerator`` logs to every tracker it was built with (and only
    on the main process)."""

    def __init__(self, tracker: Tracker, *, prefix: str = "mtl") -> None:
        if not callable(getattr(tracker, "log", None)):
            raise TypeError(
                f"{type(tracker).__name__} has no log(values, step=...) method: pass an "
                "accelerate.Accelerator or another tracker"
            )
        self.tracker = tracker
        self.prefix = prefix

    def write(self, record: Mapping[str, Any]) -> None:
        values = {f"{self.prefix}/{k}": v for k, v in numeric(flatten(record)).items()}
        self.tracker.log(values, step=int(record["step"]))

    def close(self) -> None:
        pass


class MemoryBackend:
    """Keeps every record in :attr:`records` (tests, notebooks, the studies)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: Mapping[str, Any]) -> None:
        self.records.append(dict(record))

    def close(self) -> None:
        pass


class LoggingConfig(PluginConfig):
    """Options shared by observers: where their records go."""

    every: int = Field(default=1, ge=1, description="Record every N-th backward() call.")
    console: bool = Field(default=False, description="Print a compact table to stderr.")
    console_every: int | None = Field(
        default=None,
        ge=1,
        description="Print only every N-th call (a multiple of `every`; default: `every`).",
    )
    jsonl: str | None = Field(default=None, description="Write one JSON object per record here.")
    csv: str | None = Field(default=None, description="Write one CSV row per record here.")
    tensorboard: str | None = Field(
        default=None, description="TensorBoard log directory (needs the tensorboard package)."
    )

    @model_validator(mode="after")
    def _console_every_is_a_multiple(self) -> LoggingConfig:
        if self.console_every is not None and self.console_every % self.every:
            raise ValueError(
                f"console_every ({self.console_every}) must be a multiple of every ({self.every})"
            )
        return self


def backends_from(config: LoggingConfig, *, prefix: str) -> list[Backend]:
    """The backends a :class:`LoggingConfig` asks for (TensorBoard fails here, at construction,
    when the package is missing)."""
    backends: list[Backend] = []
    if config.console:
        backends.append(ConsoleBackend(every=config.console_every or config.every))
    if config.jsonl is not None:
        backends.append(JSONLBackend(config.jsonl))
    if config.csv is not None:
        backends.append(CSVBackend(config.csv))
    if config.tensorboard is not None:
        backends.append(TensorBoardBackend(config.tensorboard, prefix=prefix))
    return backends
