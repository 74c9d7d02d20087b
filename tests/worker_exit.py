"""How the suite's multi-process workers end."""

from __future__ import annotations

import os
import sys

import torch


def exit_worker() -> None:
    """Leave together, then end the process without the interpreter's teardown: a gloo group
    torn down at exit aborts now and then (SIGABRT, "terminate called without an active
    exception", pytorch#179291) or hangs (seen here after ``destroy_process_group()`` had
    returned: the main thread in interpreter finalisation, a gloo thread still alive). The
    worker's results are saved before this is called."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
