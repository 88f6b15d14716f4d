"""Reading ``.npy`` files from any thread.

`numpy.load` parses every ``.npy`` header with `ast.literal_eval`. CPython 3.11 keeps the AST constructor's
recursion depth in state shared by all threads, so two threads parsing at once can fail with
``SystemError: AST constructor recursion depth mismatch`` (python/cpython#106905). CI hit it in
``Ensemble.reload()`` called from 16 threads (tests/trust/test_threads.py). Every ``.npy`` read of the library
goes through `load_npy`, which holds one process-wide lock for the whole load: the header parse cannot be
separated from `numpy.load`, and the arrays read while serving (centroids, router weights) are small.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

_HEADER_LOCK = threading.Lock()


def load_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """The array stored at ``path`` (never a pickle); ``mmap_mode="r"`` maps it read-only instead of reading it.

    A file that is not a whole ``.npy`` array raises ValueError naming it (numpy's own message for a file without
    the ``.npy`` header suggests loading it as a pickle; an empty one raises EOFError); a missing one, OSError.
    """
    with _HEADER_LOCK:
        try:
            return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
        except (ValueError, EOFError) as exc:
            raise ValueError(f"{path} is damaged: not a complete .npy array") from exc
