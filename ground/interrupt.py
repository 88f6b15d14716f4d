"""A process-wide stop request for work running outside the main thread.

Ctrl-C raises KeyboardInterrupt in the main thread only. Under the default thread runner, experts and embedding
shards run in worker threads, and the interrupted command then waited for the running one to finish (an expert
of 424 steps ran its last 44 s after Ctrl-C on the demo; a real expert can take hours). The CLI's SIGINT handler
calls `request`; long loops call `check` between steps, which raises KeyboardInterrupt in their thread. Library
use never requests a stop, so `check` is then one flag read.
"""
from __future__ import annotations

import threading

_REQUESTED = threading.Event()


def request() -> None:
    """Ask every loop that calls `check` to stop at its next step."""
    _REQUESTED.set()


def clear() -> None:
    """Forget an earlier request (a new command in the same process)."""
    _REQUESTED.clear()


def check() -> None:
    """Raise KeyboardInterrupt in the calling thread when a stop was requested."""
    if _REQUESTED.is_set():
        raise KeyboardInterrupt("stop requested (Ctrl-C)")
