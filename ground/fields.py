"""Type checks for the stage config dataclasses: every field has the type its annotation names.

A config arrives from TOML, from ``--set key=value`` (parsed as a TOML literal, else kept as a string) or from
Python. `check_fields` refuses a value of the wrong type (``train.steps=abc``, ``train.steps=1.5``) and a float
that is not finite (NaN, inf) with one line naming the setting, before any stage runs; ints are accepted for
float fields (and stored as floats). Supported annotations: bool, int, float, str, list[int], list[float],
list[str] and any of these ``| None``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing

from ground.errors import UserInputError

_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _describe(kind) -> str:
    args = typing.get_args(kind)
    if typing.get_origin(kind) is list:
        return f"a list of {_describe(args[0]).replace('a ', '', 1)}s"
    if _is_optional(kind):
        inner = [a for a in args if a is not type(None)][0]
        return f"{_describe(inner)} or none"
    return _NAMES.get(kind, getattr(kind, "__name__", str(kind)))


def _is_optional(kind) -> bool:
    return (typing.get_origin(kind) in (typing.Union, types.UnionType)) and type(None) in typing.get_args(kind)


def _scalar_ok(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    return True  # an annotation this module does not check


def _ok(value, kind) -> bool:
    if _is_optional(kind):
        return value is None or any(_ok(value, a) for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is list:
        (inner,) = typing.get_args(kind)
        return isinstance(value, (list, tuple)) and all(_scalar_ok(v, inner) for v in value)
    return _scalar_ok(value, kind)


def _non_finite(value) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(isinstance(v, float) and not math.isfinite(v) for v in values)


def check_fields(obj, section: str) -> None:
    """Raise UserInputError naming ``section.field`` for the first field of dataclass ``obj`` whose value does
    not match its annotation or is a non-finite float; ints in float fields become floats."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), hints[f.name]
        if not _ok(value, kind):
            raise UserInputError(f"{section}.{f.name} must be {_describe(kind)}, got {value!r}")
        if _non_finite(value):
            raise UserInputError(f"{section}.{f.name} must be a finite number, got {value!r}")
        if kind is float or (_is_optional(kind) and float in typing.get_args(kind)):
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(obj, f.name, float(value))
        if typing.get_origin(kind) is list and isinstance(value, tuple):
            object.__setattr__(obj, f.name, list(value))


def finite_positive(value, what: str) -> float:
    """``value`` as a float if it is a finite number > 0, else UserInputError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserInputError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def whole_number(value, what: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) within [low, high], else UserInputError naming ``what``."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        bounds = (f" between {low} and {high}" if high is not None else f" >= {low}") if low is not None else ""
        raise UserInputError(f"{what} must be a whole number{bounds}, got {value!r}")
    return int(value)
