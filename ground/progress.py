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


class ProgressCallback:
    """``on_progress(done, total)`` drawing a bar that appears at the first call (when the total is known)."""

    def __init__(self, desc: str, unit: str = "it"):
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress(total=total, desc=self.desc, unit=self.unit)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
