"""Building Hugging Face models safely from any thread, quietly.

transformers builds a model by patching process-wide state (empty-weight initialisation on the meta device,
``torch.nn.init`` no-ops): two loads racing in two threads corrupt each other ("Cannot copy out of meta
tensor") and can leave the process unable to load anything. Every model construction in cbtm (experts, seeds,
the sentence embedder) therefore holds `LOAD_LOCK`, and transformers' own "Loading weights" bars stay off:
cbtm shows its own progress where loading is slow.
"""
from __future__ import annotations

import contextlib
import threading

LOAD_LOCK = threading.RLock()  # one model construction at a time, process-wide


@contextlib.contextmanager
def model_loading():
    """Hold `LOAD_LOCK` with transformers' per-load progress bars off (restored afterwards)."""
    with LOAD_LOCK:
        from transformers.utils import logging as hf_logging

        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
