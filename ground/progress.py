"""Progress bars that stay readable in a terminal and in a log file."""
from __future__ import annotations

import sys


def progress(iterable=None, **kwargs):
    """A tqdm bar: live in a terminal, one line every 30 s when stderr is a file or a CI log."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if interactive else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
