"""Checks of option values shared by the typed configs (and so by the CLI): each raises a one-line `ConfigError`
that starts with the option's name and carries it as `.field`, so the CLI can name the flag instead."""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Iterable, Optional

from .errors import ConfigError


def _fail(field: str, problem: str, value) -> None:
    raise ConfigError(f"{field} {problem}, got {value!r}", field=field)


def integer(value, field: str, *, lo: Optional[int] = None, hi: Optional[int] = None, optional: bool = False):
    """`value` as an int (bools, floats and strings refused) within [lo, hi]; None passes when `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        _fail(field, "must be a whole number" + (f" >= {lo}" if lo is not None else ""), value)
    if lo is not None and value < lo:
        _fail(field, f"must be >= {lo}" if hi is None else f"must be between {lo} and {hi}", value)
    if hi is not None and value > hi:
        _fail(field, f"must be <= {hi}" if lo is None else f"must be between {lo} and {hi}", value)
    return int(value)


def number(value, field: str, *, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
           hi_open: bool = False, optional: bool = False):
    """`value` as a finite float within the interval (open at an end when asked); None passes when `optional`."""
    if value is None and optional:
        return None
    lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
    where = (f" in {lb}{lo:g}, {hi:g}{rb}" if lo is not None and hi is not None else
             f" {'>' if lo_open else '>='} {lo:g}" if lo is not None else
             f" {'<' if hi_open else '<='} {hi:g}" if hi is not None else "")
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        _fail(field, f"must be a number{where}", value)
    v = float(value)
    if lo is not None and (v < lo or (lo_open and v == lo)) or hi is not None and (v > hi or (hi_open and v == hi)):
        _fail(field, f"must be{where}", value)
    return value


def choice(value, field: str, choices: Iterable, *, optional: bool = False):
    """`value` is one of `choices` (None passes when `optional`)."""
    choices = list(choices)
    if value is None and optional:
        return None
    if isinstance(value, bool) or value not in choices:
        names = [repr(c) for c in choices]
        _fail(field, f"must be {', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else f"must be {names[0]}",
              value)
    return value


def flag(value, field: str, *, optional: bool = False):
    """`value` is a bool (None passes when `optional`)."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        _fail(field, "must be true or false", value)
    return value
