"""Argument checks of the `Ensemble` API: one ValueError (one line, saying what is allowed) per bad value."""
from __future__ import annotations

import numbers

import numpy as np


def texts(value, what: str = "prompt") -> tuple[list[str], bool]:
    """(list of texts, whether a single string was given); each must be a string with a non-space character."""
    if isinstance(value, str):
        batch, single = [value], True
    elif isinstance(value, (list, tuple)):
        batch, single = list(value), False
    else:
        raise ValueError(f"{what} must be a string or a list of strings, got {type(value).__name__}")
    if not batch:
        raise ValueError(f"no {what} given: pass a non-empty string or a non-empty list of strings")
    for i, text in enumerate(batch):
        where = what if single else f"{what} {i}"
        if not isinstance(text, str):
            raise ValueError(f"{where} is {type(text).__name__}, not a string")
        if not text.strip():
            raise ValueError(f"{where} is empty: every {what} must contain at least one non-space character")
    return batch, single


def whole(value, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an int if it is a whole number (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
            high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be a whole number {bound}, got {value!r}")
    return int(value)


def columns(active: np.ndarray, removed: list[int], n_clusters: int, experts=None, exclude=None) -> tuple[int, ...]:
    """The cluster ids that may serve a call: ``experts`` (only these) minus ``exclude`` (never these), among
    the active experts; unknown, removed or skipped ids and an empty result are errors."""
    active_set = {int(c) for c in active}

    def ids(value, name):
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ValueError(f"{name} must be a list of cluster ids, got {value!r}")
        out = []
        for c in value:
            whole(c, f"every id in {name}", 0)
            if not 0 <= int(c) < n_clusters:
                raise ValueError(f"{name}: cluster {c} does not exist (this run has clusters 0..{n_clusters - 1})")
            if int(c) not in active_set:
                why = "was removed (cbtm restore brings it back)" if int(c) in removed else "has no trained expert"
                raise ValueError(f"{name}: cluster {c} {why}")
            out.append(int(c))
        return set(out)

    only, never = ids(experts, "experts"), ids(exclude, "exclude_experts")
    chosen = [c for c in sorted(active_set) if (only is None or c in only) and (never is None or c not in never)]
    if not chosen:
        raise ValueError("experts/exclude_experts leave no expert to serve this call: allow at least one")
    return tuple(chosen)
