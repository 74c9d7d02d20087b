"""How the suite's multi-process workers end."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from mtlhooks.integrations.ddp import exit_together


def run_worker(worker: Callable[..., Any], *args: Any) -> None:
    """Run a worker of a multi-process test and end its process: on an error, print the
    traceback and exit 1 at once (the other ranks fail in their next collective); otherwise
    leave together and exit 0 without the interpreter's teardown of gloo
    (:func:`mtlhooks.integrations.ddp.exit_together`). The worker saves its results first."""
    try:
        worker(*args)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    exit_together()
