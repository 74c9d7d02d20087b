"""Exceptions raised by mtlhooks.

Every error says what is wrong and how to fix it. They all derive from :class:`MTLError`, so a
caller can catch the library's errors without catching unrelated ones.
"""

from __future__ import annotations


class MTLError(Exception):
    """Base class of every error raised by mtlhooks."""


class ConfigError(MTLError, ValueError):
    """The configuration is invalid: unknown plugin, bad field, impossible combination."""


class InputError(MTLError, ValueError):
    """A call received bad input: unknown or missing task, non-scalar loss, loss without graph."""


class NonFiniteError(MTLError, FloatingPointError):
    """A loss, gradient or Gramian was NaN or infinite and the policy is ``on_nonfinite: raise``."""


class SolverError(MTLError, RuntimeError):
    """A numerical solver did not converge; the result is never silently replaced."""


class GradientError(MTLError, RuntimeError):
    """torch failed while mtlhooks took or wrote gradients (the message quotes torch's error);
    nothing was written."""


class DistributedError(MTLError, RuntimeError):
    """Another process of a data-parallel run failed in the same ``backward()`` call (its own
    error says why); this process stops too rather than wait for it."""


class MTLWarning(UserWarning):
    """Something mtlhooks does differently from what the call seems to ask (e.g. ``features=``
    passed in a space that does not use it)."""


class PluginError(MTLError, RuntimeError):
    """A plugin could not be found, loaded or registered, or it broke the hook contract."""


class OutputError(MTLError, OSError):
    """A file or directory mtlhooks writes could not be written: an observer's log (JSONL, CSV,
    TensorBoard) or the image of ``mtlhooks plot``. The message names the path and the reason
    the operating system gave; change the path, its permissions, or free disk space."""
