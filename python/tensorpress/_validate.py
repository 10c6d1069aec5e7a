"""Argument checks shared across tensorpress: one wording for "expected ..., got ..." errors.

Python's bool is an int subclass, so `ranks=True` would pass a plain isinstance check and mean
rank 1: every integer argument goes through `is_int`, which refuses bools.
"""

from __future__ import annotations

import numbers
from typing import Any, TypeGuard


def is_int(value: Any, low: int | None = None) -> TypeGuard[int]:
    """True for an integer (a Python int or a NumPy integer) that is not a bool, and is >= low
    when low is given."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and (low is None or int(value) >= low)


def check_int(name: str, value: Any, low: int = 1) -> int:
    """value when it is an int >= low (not a bool); ValueError naming `name` otherwise."""
    if not is_int(value, low):
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return int(value)


def check_int_tuple(name: str, values: Any, length: int | None = None, low: int = 1) -> tuple[int, ...]:
    """values as a tuple when it is a list/tuple of ints >= low (of `length` when given)."""
    if (
        not isinstance(values, (list, tuple))
        or (length is not None and len(values) != length)
        or not all(is_int(v, low) for v in values)
    ):
        count = f"{length} " if length is not None else ""
        raise ValueError(f"{name}: expected a list of {count}ints >= {low}, got {values!r}")
    return tuple(int(v) for v in values)
