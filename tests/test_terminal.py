"""What the command line prints: the progress bar and the terminal width it follows."""

from __future__ import annotations

import io

import pytest

from mtlhooks.progress import ProgressBar, terminal_width


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def drawn_lines(text: str) -> list[str]:
    """The successive states of a line redrawn with carriage returns."""
    return [part.removesuffix("\x1b[K") for part in text.replace("\n", "\r").split("\r") if part]


@pytest.mark.parametrize("columns", [20, 40, 60, 80, 200])
@pytest.mark.parametrize("label", ["mgda", "static 1/σ² (oracle) with a much longer label"])
def test_the_bar_never_wraps_at_any_width(monkeypatch, columns, label):
    monkeypatch.setenv("COLUMNS", str(columns))
    stream = FakeTerminal()
    with ProgressBar(1500, label, stream=stream) as bar:
        for _ in range(1500):
            bar.advance()
        bar._draw(force=True)
    lines = drawn_lines(stream.getvalue())
    assert len(lines) >= 2
    assert all(len(line) <= columns - 1 for line in lines)
    assert "1500/1500" in lines[-1]
    if columns >= 60:
        assert "[" in lines[-1] and "#" in lines[-1]


def test_the_bar_follows_a_resized_terminal(monkeypatch):
    stream = FakeTerminal()
    monkeypatch.setenv("COLUMNS", "120")
    bar = ProgressBar(10, "run", stream=stream)
    bar.advance(5)
    bar._draw(force=True)
    monkeypatch.setenv("COLUMNS", "50")
    bar._draw(force=True)
    text = stream.getvalue()
    wide, narrow = drawn_lines(text)[-2:]
    assert len(wide) == 119 and len(narrow) == 49
    assert "eta" in narrow
    # Every redraw erases to the end of the line: nothing of a wider line is left over.
    assert all(part.endswith("\x1b[K") for part in text.split("\r")[1:])


def test_off_a_terminal_only_the_final_line_is_written():
    stream = io.StringIO()
    with ProgressBar(100, "pipe", stream=stream) as bar:
        for _ in range(100):
            bar.advance()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.count("\n") == 1 and "100/100" in text


def test_a_notebook_gets_the_live_bar_without_terminal_codes():
    class OutStream(io.StringIO):  # what ipykernel gives as sys.stderr
        pass

    OutStream.__module__ = "ipykernel.iostream"
    stream = OutStream()
    with ProgressBar(10, "nb", stream=stream) as bar:
        bar.advance(10)
    text = stream.getvalue()
    assert text.startswith("\r") and "\x1b" not in text and "10/10" in text


def test_disabled_bar_writes_nothing():
    stream = FakeTerminal()
    with ProgressBar(10, "quiet", stream=stream, enabled=False) as bar:
        bar.advance(10)
    assert stream.getvalue() == ""


def test_terminal_width_reads_columns_then_the_terminal_then_falls_back(monkeypatch):
    monkeypatch.setenv("COLUMNS", "73")
    assert terminal_width(io.StringIO()) == 73
    monkeypatch.delenv("COLUMNS")
    assert terminal_width(io.StringIO()) == 100  # no file descriptor: the fallback
    assert terminal_width(io.StringIO(), fallback=64) == 64
