"""Terminal output of the command line: a progress bar that follows the terminal's width, and
that width itself (also used by the console table of the observers).

The bar is written here rather than taken from ``tqdm`` or ``rich``: it needs one line redrawn
in place, the terminal width and a notebook check, while the commands that show it
(``mtlhooks demo`` first) must run on the core dependencies alone, so an optional library would
leave the plain code path to write and test anyway.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

DEFAULT_WIDTH = 100
"""Width assumed where none can be measured (a pipe, a log file, a notebook)."""


def terminal_width(stream: TextIO | None = None, *, fallback: int = DEFAULT_WIDTH) -> int:
    """Columns of the terminal ``stream`` (default: stderr) writes to: ``$COLUMNS`` when set,
    else the terminal's size, else ``fallback``. Measured anew at each call, so a resized
    terminal is followed."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        measured = os.get_terminal_size((stream or sys.stderr).fileno()).columns
    except (AttributeError, ValueError, OSError):
        return fallback
    return measured if measured > 0 else fallback


def in_notebook(stream: TextIO) -> bool:
    """Whether ``stream`` is the output of a Jupyter kernel, whose front-ends redraw a line on
    a carriage return although the stream is not a terminal."""
    return type(stream).__module__.split(".")[0] == "ipykernel"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


class ProgressBar:
    """``with ProgressBar(total, "label") as bar: bar.advance()``; silent when ``enabled`` is
    false. On a terminal (or in a notebook) it redraws one line in place, at most ten times a
    second, never wider than the terminal (measured at each redraw); elsewhere (CI logs, pipes)
    it writes only the final line."""

    def __init__(
        self, total: int, label: str, *, stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.live = tty or in_notebook(self.stream)
        # ANSI "erase to the end of the line", for a terminal that shrank since the last draw.
        self._erase = "\x1b[K" if tty else ""
        self.done = 0
        self._start = time.perf_counter()
        self._drawn = 0.0

    def __enter__(self) -> ProgressBar:
        if self.live:
            self._draw(force=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._draw(force=True)
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def advance(self, steps: int = 1) -> None:
        self.done = min(self.done + steps, self.total)
        self._draw()

    def line(self, width: int) -> str:
        """The bar as one line of at most ``width - 1`` characters (the last column is left
        free: writing into it makes some terminals wrap)."""
        room = max(width - 1, 1)
        elapsed = time.perf_counter() - self._start
        counts = f"{self.done}/{self.total} {elapsed:.1f}s"
        if 0 < self.done < self.total:
            counts += f" eta {elapsed / self.done * (self.total - self.done):.0f}s"
        # Labels padded to one width, so that the bars of successive runs line up.
        label_room = max(10, room // 3)
        label = _clip(self.label, label_room).ljust(min(label_room, 24))
        bar_width = room - len(label) - len(counts) - 4  # two spaces and the brackets
        if bar_width < 5:  # too narrow for a bar: the counts first, then what fits of the label
            label_room = room - len(counts) - 1
            if label_room < 4:
                return _clip(counts, room)
            return f"{_clip(self.label, label_room)} {counts}"
        filled = bar_width * self.done // self.total
        return f"{label} [{'#' * filled}{'.' * (bar_width - filled)}] {counts}"

    def _draw(self, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and (not self.live or now - self._drawn < 0.1):
            return
        self._drawn = now
        start = "\r" if self.live else ""
        self.stream.write(f"{start}{self.line(terminal_width(self.stream))}{self._erase}")
        self.stream.flush()
