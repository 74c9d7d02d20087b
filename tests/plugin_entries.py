"""A config entry for each built-in plugin that any problem of the suite can have."""

from __future__ import annotations

from typing import Any


def entry(name: str, **options: Any) -> Any:
    """``name`` with its defaults, or with the options it needs on 3 tasks: Krum needs
    ``n_byzantine + 3`` tasks (its default ``n_byzantine: 1`` needs 4)."""
    if name == "krum":
        options = {"n_byzantine": 0, **options}
    return {"name": name, **options} if options else name
