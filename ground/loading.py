"""Building Hugging Face models safely from any thread, quietly.

transformers builds a model by patching process-wide state (empty-weight initialisation on the meta device,
``torch.nn.init`` no-ops): two loads racing in two threads corrupt each other ("Cannot copy out of meta
tensor") and can leave the process unable to load anything. Every model construction in cbtm (experts, seeds,
the sentence embedder) therefore holds `LOAD_LOCK`. transformers' own "Loading weights" / "Writing model
shards" bars stay off while cbtm loads or saves (cbtm shows its own progress where work is slow).
"""
from __future__ import annotations

import contextlib
import threading

LOAD_LOCK = threading.RLock()  # one model construction at a time, process-wide
_QUIET_LOCK = threading.Lock()
_quiet = {"depth": 0, "was_enabled": False}


@contextlib.contextmanager
def quiet_transformers():
    """transformers' progress bars off while any thread is inside; the first one in saves the setting, the
    last one out restores it."""
    from transformers.utils import logging as hf_logging

    with _QUIET_LOCK:
        if _quiet["depth"] == 0:
            _quiet["was_enabled"] = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
        _quiet["depth"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet["depth"] -= 1
            if _quiet["depth"] == 0 and _quiet["was_enabled"]:
                hf_logging.enable_progress_bar()


@contextlib.contextmanager
def model_loading():
    """Hold `LOAD_LOCK`, quietly (`quiet_transformers`)."""
    with LOAD_LOCK, quiet_transformers():
        yield
