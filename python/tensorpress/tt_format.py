"""The TT-matrix format: one home for what layers, decompositions, compression, rank selection
and training need of it.

A weight W (M x N) with M = m_1 ... m_d and N = n_1 ... n_d is held as cores G_k of shape
(r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1, with row index (i_1..i_d) and column index (j_1..j_d)
both row-major:  W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] ... G_d[:, i_d, j_d, :].

Here: splitting a side into factors, bond-rank caps and parameter counts, the reshape of W
into the d-way tensor that TT-SVD factorizes, the cores -> W rebuild, and the scale of random
cores. Every function accepts leading batch dimensions where its docstring says so (tenBCD
projects a batch of layers at once).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from torch import Tensor

from tensorpress._validate import is_int

__all__ = [
    "prime_factors",
    "balanced_factors",
    "default_num_factors",
    "resolve_factors",
    "max_bond_ranks",
    "capped_ranks",
    "tt_params",
    "matrix_to_tt_tensor",
    "merge_pair",
    "cores_to_dense",
    "core_stds",
]


# ------------------------------------------------------------------------------- factors
def prime_factors(n: int) -> list[int]:
    """n's prime factors with multiplicity, ascending (n >= 1)."""
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
    if not is_int(n, 1):
        raise ValueError(f"{name}: expected a positive int, got {n!r}")
    if not is_int(d, 1):
        raise ValueError(f"number of factors: expected an int >= 1, got {d!r}")
    if d == 1:
        return (n,)
    if len(prime_factors(n)) < d:
        raise ValueError(
            f"{name}={n} cannot be split into {d} factors > 1 (its prime factors are "
            f"{prime_factors(n)}); pass explicit factors or fewer of them"
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
    return max(2, min(4, *(len(prime_factors(n)) for n in dims)))


def resolve_factors(
    in_features: int,
    out_features: int,
    in_factors: Sequence[int] | None,
    out_factors: Sequence[int] | None,
    where: str = "",
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(in_factors, out_factors): the given ones checked (d positive ints whose product is the
    side), the missing ones balanced with the other's d (default_num_factors when both are
    missing). Errors name the argument, prefixed by `where` ("layer fc1: ") when given."""
    given_d = in_factors if in_factors is not None else out_factors
    d = default_num_factors(in_features, out_features) if given_d is None else len(given_d)
    result = []
    for name, n, given in (("in_factors", in_features, in_factors), ("out_factors", out_features, out_factors)):
        if given is None:
            result.append(balanced_factors(n, d, f"{where}{name.replace('factors', 'features')}"))
            continue
        if not isinstance(given, (list, tuple)) or len(given) != d or not all(is_int(f, 1) for f in given):
            raise ValueError(f"{where}{name}: expected {d} positive ints, got {given!r}")
        if math.prod(given) != n:
            raise ValueError(
                f"{where}{name}: expected factors whose product is {n}, got {tuple(given)} (product {math.prod(given)})"
            )
        result.append(tuple(int(f) for f in given))
    return result[0], result[1]


# --------------------------------------------------------------------------- bond ranks
def max_bond_ranks(out_factors: Sequence[int], in_factors: Sequence[int]) -> list[int]:
    """The largest useful rank of each bond: min of the sizes on its two sides."""
    sizes = [m * n for m, n in zip(out_factors, in_factors)]
    return [min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)]


def capped_ranks(rank: int, out_factors: Sequence[int], in_factors: Sequence[int]) -> tuple[int, ...]:
    """An int bond rank for every bond, each capped at that bond's largest useful rank."""
    return tuple(min(rank, c) for c in max_bond_ranks(out_factors, in_factors))


def tt_params(out_factors: Sequence[int], in_factors: Sequence[int], ranks: Sequence[int]) -> int:
    """The number of core entries: sum_k r_{k-1} m_k n_k r_k."""
    full = (1, *ranks, 1)
    return sum(full[k] * m * n * full[k + 1] for k, (m, n) in enumerate(zip(out_factors, in_factors)))


# ------------------------------------------------------------------------- W <-> cores
def matrix_to_tt_tensor(weight: Tensor, out_factors: Sequence[int], in_factors: Sequence[int]) -> Tensor:
    """(..., M, N) -> (..., m_1 n_1, ..., m_d n_d): the d-way tensor whose TT-SVD gives the
    TT-matrix cores (each mode pairs a row factor with its column factor)."""
    d = len(out_factors)
    lead = weight.shape[:-2]
    b = len(lead)
    t = weight.reshape(*lead, *out_factors, *in_factors)
    t = t.permute(*range(b), *[b + i for k in range(d) for i in (k, d + k)])
    return t.reshape(*lead, *[m * n for m, n in zip(out_factors, in_factors)])


def merge_pair(a: Tensor, b: Tensor) -> Tensor:
    """(..., r0, m1, n1, r1) x (..., r1, m2, n2, r2) -> (..., r0, m1 m2, n1 n2, r2)."""
    *lead, r0, m1, n1, r1 = a.shape
    r2 = b.shape[-1]
    m2, n2 = b.shape[-3], b.shape[-2]
    product = a.reshape(*lead, r0 * m1 * n1, r1) @ b.reshape(*lead, r1, m2 * n2 * r2)
    product = product.view(*lead, r0, m1, n1, m2, n2, r2)
    k = len(lead)
    return product.permute(*range(k), k, k + 1, k + 3, k + 2, k + 4, k + 5).reshape(*lead, r0, m1 * m2, n1 * n2, r2)


def _merge_balanced(cores: Sequence[Tensor]) -> Tensor:
    # the two halves meet in one contraction: the full-size intermediate is built (and
    # differentiated through) once, not d - 2 times as in a left-to-right chain
    if len(cores) == 1:
        return cores[0]
    half = len(cores) // 2
    return merge_pair(_merge_balanced(cores[:half]), _merge_balanced(cores[half:]))


def cores_to_dense(cores: Sequence[Tensor]) -> Tensor:
    """W (..., M, N) from TT-matrix cores (..., r_{k-1}, m_k, n_k, r_k); differentiable.
    Shapes are not checked here (ops.tt_to_dense checks them for user-facing calls)."""
    full = _merge_balanced(list(cores))
    return full.reshape(*full.shape[:-4], full.shape[-3], full.shape[-2])


def core_stds(ranks: Sequence[int], variance: float) -> list[float]:
    """Per-core standard deviations of i.i.d. Gaussian cores giving W entries of `variance`:
    Var(W_ij) = prod_k s_k^2 * prod_k r_k, so s_k^2 = variance^(1/d) / sqrt(r_{k-1} r_k)
    gives `variance` for any d and ranks (each bond rank appears in two neighbouring cores)."""
    full = (1, *ranks, 1)
    d = len(full) - 1
    return [math.sqrt(variance ** (1 / d) / math.sqrt(full[k] * full[k + 1])) for k in range(d)]
