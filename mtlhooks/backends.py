"""Where observers send their records: console, JSONL, CSV, TensorBoard, experiment trackers.

A record is a nested mapping of plain values (the output of an observer for one step, with an
integer ``"step"``). Every backend has the same two methods::

    backend.write(record)   # one step
    backend.close()         # flush and release files

and the file backends a third, ``backend.resume(index)``, called when a run is resumed from a
checkpoint taken before backward call ``index``: the next write keeps the records of earlier
steps already in the file, drops those of later steps (they will be recorded again) and appends.
Without it, the first write of a run replaces the file.

Files are never left half-written: the JSONL and CSV backends create or rewrite a file by
writing a temporary file next to it and renaming it over the old one (an atomic replace), and
otherwise only append whole lines, flushed one by one. A line cut by a crash (the last one) is
dropped when the run resumes, and ``mtlhooks plot`` skips it with a warning.

:func:`flatten` turns a record into ``{"a/b/c": value}`` scalars, the form CSV columns,
TensorBoard tags and tracker keys take (a ``/`` or ``%`` inside a name is escaped, so keys
cannot collide). :class:`LoggingConfig` holds the options every observer shares, and
:func:`backends_from` builds the backends they ask for.
"""

from __future__ import annotations

import csv
import errno
import importlib.util
import io
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal, Protocol, TextIO, runtime_checkable

from pydantic import Field, field_validator, model_validator

from mtlhooks.errors import ConfigError, InputError, OutputError
from mtlhooks.plugin import PluginConfig
from mtlhooks.progress import terminal_width

Scalar = float | int | bool | str | None


class Backend(Protocol):
    """What an observer writes to."""

    def write(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Resumable(Protocol):
    """A backend that can continue the records of a resumed run (see the module docstring)."""

    def resume(self, index: int) -> None: ...


class Tracker(Protocol):
    """Anything with ``log(values, step=...)``: ``accelerate.Accelerator`` (which forwards to
    W&B, MLflow, TensorBoard, … as configured with ``log_with=``), or a ``wandb`` run."""

    def log(self, values: dict[str, Any], step: int | None = ...) -> Any: ...


def escape_key(name: object, separator: str = "/") -> str:
    """One level of a flattened key: ``%`` and ``separator`` inside a name are written as
    ``%25`` and ``%2F`` (percent-encoding), so that distinct records give distinct keys.

    >>> escape_key("depth/left")
    'depth%2Fleft'
    """
    text = str(name).replace("%", "%25")
    for character in dict.fromkeys(separator):
        text = text.replace(character, f"%{ord(character):02X}")
    return text


def flatten(record: Mapping[str, Any], *, separator: str = "/") -> dict[str, Scalar]:
    """Nested mappings to one level, keys joined by ``separator`` (each part escaped with
    :func:`escape_key`); lists are left out (every statistic an observer writes has a scalar
    form in its mapping).

    >>> flatten({"step": 3, "grad_norms": {"a": 1.0}, "cosine": {"a": {"b/c": 0.5}}})
    {'step': 3, 'grad_norms/a': 1.0, 'cosine/a/b%2Fc': 0.5}
    """
    flat: dict[str, Scalar] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                part = escape_key(key, separator)
                visit(f"{prefix}{separator}{part}" if prefix else part, item)
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


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _ratio(imbalance: Mapping[str, Any]) -> str:
    ratio = imbalance.get("max_min_ratio")
    return "inf" if ratio is None else f"{ratio:.3g}"


class ConsoleBackend:
    """A compact table per record, sized to the terminal: one row per task (loss, weight,
    gradient norm, weighted norm and the cosine with every other task), the conflict rate and
    norm imbalance in the title line, one line per layer or group. Prints records whose step is
    a multiple of ``every``.

    The table never exceeds the width (the terminal's, ``$COLUMNS``, or 100 columns off a
    terminal): when the cosine matrix does not fit, each row shows its smallest and mean cosine
    and its number of conflicting tasks instead; beyond ``max_rows`` tasks (or blocks) only the
    largest and smallest gradient norms are shown. Every value is in the JSONL/CSV outputs.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        every: int = 1,
        width: int | None = None,
        max_rows: int = 16,
    ) -> None:
        self.stream = stream
        self.every = every
        self.width = width
        self.max_rows = max_rows

    def write(self, record: Mapping[str, Any]) -> None:
        if record["step"] % self.every:
            return
        stream = self.stream if self.stream is not None else sys.stderr
        width = self.width if self.width is not None else terminal_width(stream)
        print(self.format(record, width=width, max_rows=self.max_rows), file=stream, flush=True)

    @staticmethod
    def format(record: Mapping[str, Any], *, width: int = 100, max_rows: int = 16) -> str:
        """The text printed for ``record``, no line longer than ``width``."""
        width = max(width, 40)
        title = [f"step {record['step']}", str(record.get("space", ""))]
        if record.get("skipped"):
            title.append(f"skipped: {record.get('reason')}")
        if "conflict_rate" in record:
            imbalance = record["norm_imbalance"]
            title.append(f"conflicts {record['conflict_rate']:.2f}")
            title.append(
                f"|g| max/min {_ratio(imbalance)} cv {imbalance['coefficient_of_variation']:.2f}"
            )
        lines = [" · ".join(title)]
        if len(lines[0]) > width:  # one part per line rather than a cut
            lines = [title[0], *(f"  {part}" for part in title[1:])]
        lines += _task_table(record, width - 2, max_rows)
        for kind in ("layers", "groups"):
            blocks = list(record.get(kind, {}).items())
            for name, block in blocks[:max_rows]:
                lines.append(
                    f"  {kind[:-1]} {name}: conflicts {block['conflict_rate']:.2f}, "
                    f"|g| max/min {_ratio(block['norm_imbalance'])}"
                )
            if len(blocks) > max_rows:
                lines.append(f"  … {len(blocks) - max_rows} more {kind} (in the JSONL/CSV outputs)")
        split = record.get("split")
        if split:
            stl = " ".join(f"{t}={v['cosine']:+.2f}" for t, v in split["stl"].items())
            lines.append(f"  half-batch cos (STL) {stl}")
        return "\n".join(_clip(line, width) for line in lines)

    def close(self) -> None:
        pass


_NUMBER = 9
"""Width of a numeric cell of the console table."""

_Column = tuple[str, int, bool, Callable[[str], str]]
"""A column of the console table: heading, width, left-aligned, the cell of a task."""


def _task_table(record: Mapping[str, Any], width: int, max_rows: int) -> list[str]:
    """The lines of the console table, each indented by two spaces, at most ``width + 2``
    characters: the widest layout that fits (cosine matrix, per-task cosine summary, a short
    summary, no cosine) with the rows of at most ``max_rows`` tasks."""
    losses = record["losses"] or {}
    tasks = list(losses)
    if not tasks:
        return []
    norms = record.get("grad_norms") or {}
    weights = record.get("weights") or {}
    weighted = record.get("weighted_grad_norms") or {}
    cosine = record.get("cosine") or {}
    shown = tasks
    if len(tasks) > max_rows:
        if norms:  # the extremes of the gradient norms: where the imbalance is
            ordered = sorted(tasks, key=lambda t: -(norms.get(t) or 0.0))
            half = max_rows // 2
            keep = set(ordered[:half] + ordered[len(ordered) - (max_rows - half) :])
            shown = [t for t in tasks if t in keep]
        else:
            shown = tasks[:max_rows]

    def others(task: str) -> dict[str, float]:
        values = {o: pair(cosine, task, o) for o in tasks if o != task}
        return {o: v for o, v in values.items() if v is not None}

    def worst(task: str) -> str:
        known = others(task)
        return min(known, key=known.__getitem__) if known else ""

    def mean(task: str) -> str:
        known = others(task)
        return _signed(sum(known.values()) / len(known)) if known else "-"

    def value_of(source: Mapping[str, Any]) -> Callable[[str], str]:
        return lambda task: _fmt(source.get(task))

    def cosine_with(other: str) -> Callable[[str], str]:
        return lambda task: "" if other == task else _signed(pair(cosine, task, other))

    base: list[_Column] = [
        (heading, _NUMBER, False, value_of(source))
        for heading, source in (
            ("loss", losses),
            ("weight", weights),
            ("|g|", norms),
            ("w·|g|", weighted),
        )
    ]
    # A matrix column is headed "cos <task>" when that fits a cell, else "cos #<i>", and the
    # rows then carry the numbers.
    numbered = any(len(f"cos {t}") > _NUMBER for t in tasks)
    matrix: list[_Column] = [
        (f"cos #{i}" if numbered else f"cos {o}", _NUMBER, False, cosine_with(o))
        for i, o in enumerate(tasks)
    ]
    with_width = min(max(len("with"), *(len(t) for t in tasks)), 16)
    minimum: _Column = ("min cos", _NUMBER, False, lambda t: _signed(others(t).get(worst(t))))
    conflicts: _Column = (
        "conflicts",
        _NUMBER,
        False,
        lambda t: str(sum(v < 0 for v in others(t).values())),
    )
    summary: list[_Column] = [
        minimum,
        ("with", with_width, True, lambda t: _clip(worst(t), with_width)),
        ("mean cos", _NUMBER, False, mean),
        conflicts,
    ]
    layouts = [matrix, summary, [minimum, conflicts]] if cosine else []
    layouts.append([])
    for extra in layouts:
        numbers = {t: f"#{i} " if extra is matrix and numbered else "" for i, t in enumerate(tasks)}
        label_width = max(len("task"), *(len(numbers[t]) + len(t) for t in shown))
        columns = base + extra
        room = width - sum(column_width + 1 for _, column_width, _, _ in columns)
        if label_width <= room:
            break
    label_width = max(min(label_width, room), len("task"))

    def line(first: str, cells: list[str]) -> str:
        parts = [_clip(first, label_width).ljust(label_width)]
        for (_, column_width, left, _), cell in zip(columns, cells):
            parts.append(cell.ljust(column_width) if left else cell.rjust(column_width))
        return "  " + " ".join(parts).rstrip()

    lines = [line("task", [heading for heading, _, _, _ in columns])]
    lines += [line(numbers[t] + t, [cell(t) for _, _, _, cell in columns]) for t in shown]
    if len(shown) < len(tasks):
        lines.append(
            f"  … {len(tasks) - len(shown)} of {len(tasks)} tasks not shown: the rows are "
            "those of largest and smallest |g|"
        )
    return lines


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _write_error(path: Path, error: OSError, doing: str = "write") -> OutputError:
    return OutputError(f"cannot {doing} {path}: {error.strerror or error}")


def check_writable(path: Path) -> None:
    """Prove that ``path`` can be created or replaced atomically (by creating and removing a
    file next to it), creating missing parent directories; :class:`OutputError` if not."""
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = _temporary_path(path)
        probe.open("w").close()
        probe.unlink()
    except OSError as error:
        raise _write_error(path, error) from None


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _replace(path: Path, write: Any) -> None:
    """Write a new version of ``path`` through ``write(file)`` into a temporary file next to
    it, then rename it over ``path``: a reader (or a crash) sees the old file or the new one,
    never a part."""
    temporary = _temporary_path(path)
    try:
        with temporary.open("w", encoding="utf-8", newline="") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise _write_error(path, error) from None


def _complete_lines(path: Path) -> list[str]:
    """The lines of ``path`` that end with a newline (a last line cut by a crash is left
    out); none when the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as error:
        raise OutputError(f"cannot read {path} to resume its records: {error}") from None
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    return lines


def _earlier_step(step: object, index: int) -> bool:
    """Whether a record of ``step`` (as read back from a file) precedes ``index``; records
    without a readable step are kept."""
    try:
        return int(str(step)) < index
    except ValueError:
        return True


class JSONLBackend:
    """One JSON object per record, one per line, flushed after every line. The first write of
    a run replaces the file atomically (after :meth:`resume`, keeping the records of earlier
    steps); later writes append. Non-finite floats are written as ``null``. The path is checked
    at construction (:class:`OutputError` if it cannot be written)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        check_writable(self.path)
        self._file: IO[str] | None = None
        # None: the first write replaces the file; a step: records before it are kept.
        self._keep_before: int | None = None

    def resume(self, index: int) -> None:
        """Keep the records of steps before ``index`` already in the file (see the module
        docstring); takes effect at the next write."""
        self.close()
        self._keep_before = index

    def _kept_lines(self) -> list[str]:
        if self._keep_before is None:
            return []
        kept = []
        for line in _complete_lines(self.path):
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                step = None
            if step is None or _earlier_step(step, self._keep_before):
                kept.append(line)
        return kept

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(_finite_or_none(record), allow_nan=False) + "\n"
        try:
            if self._file is None:
                kept = self._kept_lines()
                _replace(self.path, lambda handle: handle.writelines([*kept, line]))
                self._keep_before = sys.maxsize  # reopened after close(): keep every record
                self._file = self.path.open("a", encoding="utf-8")
                return
            self._file.write(line)
            self._file.flush()
        except OSError as error:
            raise _write_error(self.path, error) from None

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
    that was skipped, say) the file is rewritten with the wider header, earlier rows left blank
    in the new columns. Every rewrite (the first write of a run included) goes through a
    temporary file renamed over the old one, and rows are otherwise appended and flushed one by
    one, so a crash at any moment leaves a complete CSV file (at worst its last row cut, which
    :meth:`resume` drops). Empty cells are missing or non-finite values."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        check_writable(self.path)
        self._file: IO[str] | None = None
        self._writer: csv.DictWriter[str] | None = None
        self._columns: list[str] = []
        # None: the first write replaces the file; a step: rows before it are kept.
        self._keep_before: int | None = None

    def resume(self, index: int) -> None:
        """Keep the rows of steps before ``index`` already in the file (see the module
        docstring); takes effect at the next write."""
        self.close()
        self._keep_before = index

    def _read_back(self) -> tuple[list[str], list[dict[str, Any]]]:
        """The header and the complete rows of the file."""
        reader = csv.DictReader(io.StringIO("".join(_complete_lines(self.path))))
        columns = list(reader.fieldnames or [])
        rows = [{k: v for k, v in row.items() if k is not None} for row in reader]
        return columns, rows

    def _rewrite(self, columns: list[str], rows: Sequence[Mapping[str, Any]]) -> None:
        self.close()

        def write(handle: IO[str]) -> None:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)

        _replace(self.path, write)
        self._columns = columns
        self._file = self.path.open("a", encoding="utf-8", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=columns, restval="")

    def write(self, record: Mapping[str, Any]) -> None:
        flat = {
            k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
            for k, v in flatten(record).items()
        }
        try:
            if self._writer is None:
                columns: list[str] = []
                rows: list[dict[str, Any]] = []
                if self._keep_before is not None:
                    columns, rows = self._read_back()
                    index = self._keep_before
                    rows = [r for r in rows if _earlier_step(r.get("step"), index)]
                self._rewrite(columns + [k for k in flat if k not in columns], [*rows, flat])
                self._keep_before = sys.maxsize  # reopened after close(): keep every row
                return
            if any(key not in self._columns for key in flat):
                columns, rows = self._read_back()
                columns += [k for k in flat if k not in columns]
                self._rewrite(columns, [*rows, flat])
                return
            assert self._file is not None
            self._writer.writerow(flat)
            self._file.flush()
        except OSError as error:
            raise _write_error(self.path, error) from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._writer = None


TENSORBOARD_MISSING = (
    'the TensorBoard output needs the tensorboard package: pip install "mtlhooks[tensorboard]"'
)


def tensorboard_installed() -> bool:
    """Whether the ``tensorboard`` package can be imported (looked up, not imported)."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardBackend:
    """Scalars through ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard``
    package: ``pip install "mtlhooks[tensorboard]"``); tags are ``prefix/<flattened key>``.
    After :meth:`resume`, TensorBoard discards the events of steps at or after the index
    (``purge_step``), so resumed steps are not drawn twice."""

    def __init__(self, log_dir: str | Path, *, prefix: str = "mtl") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(TENSORBOARD_MISSING) from None
        self.prefix = prefix
        self.log_dir = Path(log_dir)
        self._writer_class = SummaryWriter
        self._writer: Any = self._open(None)

    def _open(self, purge_step: int | None) -> Any:
        try:
            return self._writer_class(log_dir=str(self.log_dir), purge_step=purge_step)
        except OSError as error:
            raise _write_error(self.log_dir, error, "write TensorBoard events to") from None

    def resume(self, index: int) -> None:
        self.close()
        self._writer = self._open(index)

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        try:
            for key, value in numeric(flatten(record)).items():
                self._writer.add_scalar(f"{self.prefix}/{key}", value, global_step=step)
            self._writer.flush()
        except OSError as error:
            raise _write_error(self.log_dir, error, "write TensorBoard events to") from None

    def close(self) -> None:
        self._writer.close()


class TrackerBackend:
    """Calls ``tracker.log({"prefix/<key>": value, ...}, step=step)`` with the finite numbers of
    each record: an ``accelerate.Accelerator`` logs to every tracker it was built with (and only
    on the main process)."""

    def __init__(self, tracker: Tracker, *, prefix: str = "mtl") -> None:
        if not callable(getattr(tracker, "log", None)):
            raise InputError(
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


def check_output_path(value: str, option: str, *, directory: bool = False) -> str:
    """The checks of an output path that need no writing: not empty, not an existing
    directory (for a file) or file (for a directory), under a directory (not a file), and a
    name the file system accepts. Raises ``ValueError`` naming ``option`` and the fix."""
    if not value.strip():
        raise ValueError(f"{option}: an empty path; give a file name or leave {option} out")
    path = Path(value)
    try:
        if directory and path.is_file():
            raise ValueError(f"{option}: {value!r} is a file; give a directory")
        if not directory and path.is_dir():
            raise ValueError(f"{option}: {value!r} is a directory; give a file name")
        for parent in path.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ValueError(
                        f"{option}: {str(parent)!r} is a file, so {value!r} cannot be created "
                        "under it"
                    )
                break
    except OSError as error:
        reason = "a name too long" if error.errno == errno.ENAMETOOLONG else error.strerror
        raise ValueError(f"{option}: cannot use {value[:80]!r}: {reason or error}") from None
    return value


class LoggingConfig(PluginConfig):
    """Options shared by observers: where their records go.

    Output paths are checked when the config is validated (not empty, not a directory for a
    file, TensorBoard installed when asked for) and again when the observer is built, by
    creating a file next to each (so that an unwritable path fails before any ``.grad`` is
    written); two outputs on one path are refused."""

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
    ranks: Literal["main", "all"] = Field(
        default="main",
        description="Which processes of a data-parallel run write the console and the files: "
        "'main' (rank 0 only; every rank computes the same global statistics) or 'all' (each "
        "rank to its own files, its rank added before the extension: run.rank1.jsonl).",
    )

    @field_validator("jsonl", "csv")
    @classmethod
    def _file_path(cls, value: str | None, info: Any) -> str | None:
        return None if value is None else check_output_path(value, info.field_name)

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard_directory(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not tensorboard_installed():
            raise ValueError(f"tensorboard: {TENSORBOARD_MISSING}, or leave tensorboard out")
        return check_output_path(value, "tensorboard", directory=True)

    @model_validator(mode="after")
    def _console_every_is_a_multiple(self) -> LoggingConfig:
        if self.console_every is not None and self.console_every % self.every:
            raise ValueError(
                f"console_every ({self.console_every}) must be a multiple of every ({self.every})"
            )
        return self

    def output_paths(self) -> dict[str, str]:
        """Option → path of every file output configured (for :meth:`Plugin.output_paths`)."""
        paths = {"jsonl": self.jsonl, "csv": self.csv, "tensorboard": self.tensorboard}
        return {option: path for option, path in paths.items() if path is not None}


def rank_path(path: str, rank: int) -> str:
    """``run.jsonl`` → ``run.rank1.jsonl`` (a directory: ``tb`` → ``tb.rank1``)."""
    base = Path(path)
    return str(base.with_name(f"{base.stem}.rank{rank}{base.suffix}"))


def backends_from(
    config: LoggingConfig, *, prefix: str, rank: int = 0, world_size: int = 1
) -> list[Backend]:
    """The backends a :class:`LoggingConfig` asks for on this process (under data parallelism:
    rank 0 only, or every rank to its own paths, ``config.ranks``); each file output is proven
    writable here, at construction (:class:`OutputError` if not)."""
    backends: list[Backend] = []
    if world_size > 1 and config.ranks == "main" and rank != 0:
        return backends

    def where(path: str) -> str:
        return rank_path(path, rank) if world_size > 1 and config.ranks == "all" else path

    if config.console:
        backends.append(ConsoleBackend(every=config.console_every or config.every))
    if config.jsonl is not None:
        backends.append(JSONLBackend(where(config.jsonl)))
    if config.csv is not None:
        backends.append(CSVBackend(where(config.csv)))
    if config.tensorboard is not None:
        backends.append(TensorBoardBackend(where(config.tensorboard), prefix=prefix))
    return backends
