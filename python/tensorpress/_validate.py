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


def check_int(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """value as an int when it is an integer (not a bool) in [low, high] (high None: no upper
    bound); ValueError naming `name` otherwise."""
    if not is_int(value, low) or (high is not None and value > high):
        want = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    return int(value)
