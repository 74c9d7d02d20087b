"""A dependency-free progress bar for the command line (stderr, redrawn in place)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``with ProgressBar(total, "label") as bar: bar.advance()``; silent when ``enabled`` is
    false. On a terminal it redraws in place at most ten times a second; elsewhere it writes
    only the final line."""

    def __init__(
        self, total: int, label: str, *, stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        # Off a terminal (CI logs, pipes) redrawing in place makes a mess: draw the end only.
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
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

    def _draw(self, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and (not self.live or now - self._drawn < 0.1):
            return
        self._drawn = now
        width = 28
        filled = int(width * self.done / self.total)
        elapsed = now - self._start
        self.stream.write(
            f"\r{self.label:<24} [{'#' * filled}{'.' * (width - filled)}] "
            f"{self.done}/{self.total} {elapsed:5.1f}s"
        )
        self.stream.flush()
