"""Named fault-injection points: a real SIGKILL of this process at a chosen moment.

The kill tests start a real `cbtm` subprocess with ``CBTM_FAULT=<point>[@<n>]``; when the process reaches
that point for the n-th time (default: the first), it sends itself SIGKILL, exactly as `kill -9` from outside
would, but at a moment a test can name instead of guess. Points are named where work becomes durable, for
example ``stage:embed`` (the embed stage is recorded), ``expert:2`` (expert 2 is recorded) or
``step:expert 1@5`` (expert 1 finished its 5th optimizer step). Unset, a point costs one dict lookup.
``CBTM_FAULT_SIGNAL=SIGINT`` sends SIGINT to the process's whole group instead, as Ctrl-C in a terminal does.
"""
from __future__ import annotations

import os
import signal
import time
from collections import Counter

_SEEN: Counter = Counter()


def point(name: str) -> None:
    """Kill this process with SIGKILL if ``CBTM_FAULT`` names ``name`` (and this is its n-th visit)."""
    spec = os.environ.get("CBTM_FAULT")
    if not spec:
        return
    target, _, nth = spec.rpartition("@") if "@" in spec else (spec, "", "1")
    if target != name:
        return
    _SEEN[name] += 1
    if _SEEN[name] == int(nth or 1):
        if os.environ.get("CBTM_FAULT_SIGNAL") == "SIGINT":
            os.killpg(os.getpgrp(), signal.SIGINT)
            time.sleep(60)  # a long step: a process that ignores SIGINT is still at work when it is stopped
        else:
            os.kill(os.getpid(), signal.SIGKILL)
