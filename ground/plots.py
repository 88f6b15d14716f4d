"""Figures without pyplot: `matplotlib.figure.Figure` objects hold no global state, so threads (experts
training at once, a server) can draw at the same time. Saved as PNG with the Agg canvas."""
from __future__ import annotations

from pathlib import Path


def figure(**kwargs):
    """A new `matplotlib.figure.Figure` (``kwargs`` as for Figure, e.g. ``figsize=(6, 4)``)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def colormap(name: str):
    """A registered matplotlib colormap by name (e.g. "tab10")."""
    import matplotlib

    return matplotlib.colormaps[name]


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Lay out and save ``fig`` as PNG (the folder is created); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
