"""Splitting a layer dimension into d factors for a tensorized layer."""

from __future__ import annotations

import functools
import math


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


@functools.lru_cache(maxsize=1024)
def balanced_factors(n: int, d: int, name: str = "n") -> tuple[int, ...]:
    """n as d factors > 1, as equal as possible (smallest largest factor, then smallest spread),
    larger factors in the middle: 1024, 4 -> (4, 8, 8, 4); 4096, 4 -> (8, 8, 8, 8).

    Raises ValueError naming `name` when n has fewer than d prime factors.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{name}: expected a positive int, got {n!r}")
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"number of factors: expected an int >= 1, got {d!r}")
    if d == 1:
        return (n,)
    if len(_prime_factors(n)) < d:
        raise ValueError(
            f"{name}={n} cannot be split into {d} factors > 1 (its prime factors are "
            f"{_prime_factors(n)}); pass explicit factors or fewer of them"
        )
    best: tuple[tuple[int, int], tuple[int, ...]] | None = None
    for combo in _factorizations(n, d, 2):
        key = (max(combo), max(combo) - min(combo))
        if best is None or key < best[0]:
            best = (key, combo)
    assert best is not None  # n >= 1 has at least one factorization
    ordered = sorted(best[1])
    # place ascending factors alternately at the two ends, the largest land in the middle
    left: list[int] = []
    right: list[int] = []
    for i, f in enumerate(ordered):
        (left if i % 2 == 0 else right).append(f)
    return tuple(left + right[::-1])


def _factorizations(n: int, d: int, smallest: int):
    """Non-decreasing tuples of d factors >= smallest whose product is n."""
    if d == 1:
        if n >= smallest:
            yield (n,)
        return
    f = smallest
    while f**d <= n:
        if n % f == 0:
            for rest in _factorizations(n // f, d - 1, f):
                yield (f,) + rest
        f += 1


def default_num_factors(*dims: int) -> int:
    """Up to 4 factors, fewer when a dimension has fewer prime factors (at least 2)."""
    return max(2, min(4, *(len(_prime_factors(n)) for n in dims)))


def max_bond_ranks(out_factors, in_factors) -> list[int]:
    """The largest useful rank of each bond: min of the sizes on its two sides."""
    sizes = [m * n for m, n in zip(out_factors, in_factors)]
    return [min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)]
