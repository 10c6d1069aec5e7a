"""TT-SVD (Oseledets 2011): sequential truncated SVDs with a per-bond error budget.

With delta = rel_error * ||T|| / sqrt(d - 1) dropped at each of the d - 1 bonds, the result
satisfies ||T - T_hat|| <= rel_error * ||T||.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tensorpress._validate import is_int
from tensorpress.linalg import truncated_svd
from tensorpress.tt_format import matrix_to_tt_tensor


@dataclass
class TTResult:
    """cores: list of (r_{k-1}, p_k, r_k) for tt_svd, (r_{k-1}, m_k, n_k, r_k) for tt_matrix_svd.
    ranks: the bond ranks (r_1 .. r_{d-1}); rel_error: ||T - T_hat|| / ||T|| achieved."""

    cores: list[Tensor]
    ranks: tuple[int, ...]
    rel_error: float


def _check_rank_args(d: int, max_rank, rel_error):
    if max_rank is None and rel_error is None:
        raise ValueError("max_rank, rel_error: expected at least one of them, got neither")

    def is_rank(r):
        return is_int(r) and r >= 1

    if max_rank is None:
        ranks = [None] * (d - 1)
    elif is_rank(max_rank):
        ranks = [max_rank] * (d - 1)
    elif isinstance(max_rank, (list, tuple)) and len(max_rank) == d - 1 and all(map(is_rank, max_rank)):
        ranks = list(max_rank)
    else:
        raise ValueError(f"max_rank: expected an int >= 1 or {d - 1} ints >= 1, got {max_rank!r}")
    if rel_error is not None and (
        isinstance(rel_error, bool) or not isinstance(rel_error, (int, float)) or not 0 <= rel_error < 1
    ):
        raise ValueError(f"rel_error: expected a float in [0, 1), got {rel_error!r}")
    return ranks


def _bond_rank(s: Tensor, delta: float | None, cap: int | None) -> int:
    """The smallest rank whose dropped tail of singular values has norm <= delta, then capped."""
    keep = len(s)
    if delta is not None:
        tail = torch.cumsum(s.flip(0) ** 2, 0).flip(0)  # tail[i] = sum_{j >= i} s_j^2
        keep = int((tail > delta**2).sum().item())
    keep = max(1, keep)
    return keep if cap is None else min(keep, cap)


def tt_svd(tensor: Tensor, max_rank: int | Sequence[int] | None = None, rel_error: float | None = None) -> TTResult:
    """Tensor-train decomposition of a d-way tensor by sequential truncated SVDs.

    Args:
        tensor: (p_1, ..., p_d), finite, floating point.
        max_rank: cap on every bond rank (an int) or on each (d - 1 ints).
        rel_error: target relative Frobenius error; the bound ||T - T_hat|| <= rel_error ||T||
            holds when no max_rank cap binds.
    Returns:
        TTResult with cores (r_{k-1}, p_k, r_k), in the input's dtype. Computed in float64.
    """
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        raise TypeError(f"tensor: expected a floating-point tensor, got {getattr(tensor, 'dtype', type(tensor))}")
    d = tensor.dim()
    if d < 1:
        raise ValueError("tensor: expected at least 1 dimension, got a scalar")
    # a 0-sized mode has no tensor train (every core would be empty, its norm 0)
    if 0 in tensor.shape:
        raise ValueError(f"tensor: expected every dimension >= 1, got shape {tuple(tensor.shape)}")
    caps = _check_rank_args(d, max_rank, rel_error) if d > 1 else []
    if not torch.isfinite(tensor).all():
        raise ValueError("tensor: expected finite values, found NaN or Inf")

    work = tensor.detach().to(torch.float64)
    norm = torch.linalg.vector_norm(work).item()
    delta = (rel_error or 0.0) * norm / math.sqrt(max(d - 1, 1))
    shape = tensor.shape
    cores, ranks, r_prev = [], [], 1
    dropped_sq = 0.0
    rest = work.reshape(1, -1)
    for k in range(d - 1):
        mat = rest.reshape(r_prev * shape[k], -1)
        u, s, vh = truncated_svd(mat, rank=min(mat.shape))
        keep = _bond_rank(s, delta if rel_error is not None else None, caps[k])
        dropped_sq += float((s[keep:] ** 2).sum())
        cores.append(u[:, :keep].reshape(r_prev, shape[k], keep))
        rest = s[:keep, None] * vh[:keep]
        ranks.append(keep)
        r_prev = keep
    cores.append(rest.reshape(r_prev, shape[-1], 1))
    achieved = math.sqrt(dropped_sq) / norm if norm > 0 else 0.0
    return TTResult([c.to(tensor.dtype) for c in cores], tuple(ranks), achieved)


def _check_factors(name: str, factors) -> list[int]:
    """A non-empty sequence of ints >= 1 (a factor of 0 would empty the tensor, a negative
    pair could still multiply to the right size)."""
    ok = (
        isinstance(factors, Sequence)
        and not isinstance(factors, str)
        and len(factors) > 0
        and all(isinstance(f, numbers.Integral) and not isinstance(f, bool) and int(f) >= 1 for f in factors)
    )
    if not ok:
        raise ValueError(f"{name}: expected a non-empty sequence of ints >= 1, got {factors!r}")
    return [int(f) for f in factors]


def tt_matrix_svd(
    weight: Tensor,
    out_factors: Sequence[int],
    in_factors: Sequence[int],
    max_rank: int | Sequence[int] | None = None,
    rel_error: float | None = None,
) -> TTResult:
    """TT-matrix cores (r_{k-1}, m_k, n_k, r_k) of W (M x N), M = prod m_k, N = prod n_k."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-d tensor, got {getattr(weight, 'shape', type(weight))}")
    if 0 in weight.shape:
        raise ValueError(f"weight: expected both sides >= 1, got shape {tuple(weight.shape)}")
    out_factors = _check_factors("out_factors", out_factors)
    in_factors = _check_factors("in_factors", in_factors)
    if len(out_factors) != len(in_factors):
        raise ValueError(f"out_factors, in_factors: expected the same length, got {out_factors} and {in_factors}")
    if math.prod(out_factors) != weight.shape[0] or math.prod(in_factors) != weight.shape[1]:
        raise ValueError(
            f"out_factors, in_factors: expected products {tuple(weight.shape)}, got "
            f"{math.prod(out_factors)} and {math.prod(in_factors)}"
        )
    res = tt_svd(matrix_to_tt_tensor(weight, out_factors, in_factors), max_rank=max_rank, rel_error=rel_error)
    cores = [c.reshape(c.shape[0], m, n, c.shape[2]) for c, m, n in zip(res.cores, out_factors, in_factors)]
    return TTResult(cores, res.ranks, res.rel_error)


def tt_round(
    cores: Sequence[Tensor], max_rank: int | Sequence[int] | None = None, rel_error: float | None = None
) -> TTResult:
    """Truncate the bond ranks of an existing tensor train (Oseledets' TT rounding).

    A right-to-left QR sweep makes every core but the first orthonormal, so the first core
    carries the norm; a left-to-right sweep of truncated SVDs then drops, at each bond, a
    tail of norm <= rel_error ||T|| / sqrt(d - 1) (and caps at max_rank), which keeps
    ||T - T_rounded|| <= rel_error ||T|| when no cap binds. Works on TT cores
    (r, p, r') and on TT-matrix cores (r, m, n, r'); computed in float64.
    """
    if not isinstance(cores, (list, tuple)) or not cores or not all(isinstance(c, Tensor) for c in cores):
        raise TypeError("cores: expected a non-empty list of tensors")
    if any(c.dim() not in (3, 4) or c.dim() != cores[0].dim() for c in cores):
        raise ValueError("cores: expected all 3-d (r, p, r') or all 4-d (r, m, n, r') cores")
    for k, c in enumerate(cores):
        if 0 in c.shape:
            raise ValueError(f"cores[{k}]: expected every size >= 1, got shape {tuple(c.shape)}")
    for k in range(1, len(cores)):
        if cores[k].shape[0] != cores[k - 1].shape[-1]:
            raise ValueError(f"cores[{k}]: expected r_left = {cores[k - 1].shape[-1]}, got {cores[k].shape[0]}")
    if cores[0].shape[0] != 1 or cores[-1].shape[-1] != 1:
        raise ValueError("cores: expected boundary ranks r_0 = r_d = 1")
    d = len(cores)
    caps = _check_rank_args(d, max_rank, rel_error) if d > 1 else []
    if not all(torch.isfinite(c).all() for c in cores):
        raise ValueError("cores: expected finite values, found NaN or Inf")
    mode_shapes = [tuple(c.shape[1:-1]) for c in cores]
    work = [c.detach().to(torch.float64).reshape(c.shape[0], -1, c.shape[-1]) for c in cores]

    for k in range(d - 1, 0, -1):  # right-to-left: cores 1..d-1 become row-orthonormal
        r, p, r2 = work[k].shape
        q, rr = torch.linalg.qr(work[k].reshape(r, p * r2).T)
        work[k] = q.T.reshape(-1, p, r2)
        work[k - 1] = torch.einsum("apr,sr->aps", work[k - 1], rr)
    norm = torch.linalg.vector_norm(work[0]).item()
    delta = (rel_error or 0.0) * norm / math.sqrt(max(d - 1, 1))

    ranks, dropped_sq = [], 0.0
    for k in range(d - 1):  # left-to-right truncation
        r, p, r2 = work[k].shape
        u, s, vh = truncated_svd(work[k].reshape(r * p, r2), rank=min(r * p, r2))
        keep = _bond_rank(s, delta if rel_error is not None else None, caps[k])
        dropped_sq += float((s[keep:] ** 2).sum())
        work[k] = u[:, :keep].reshape(r, p, keep)
        work[k + 1] = torch.einsum("s,sr,rpq->spq", s[:keep], vh[:keep], work[k + 1])
        ranks.append(keep)
    out = [w.reshape(w.shape[0], *shape, w.shape[-1]).to(cores[0].dtype) for w, shape in zip(work, mode_shapes)]
    achieved = math.sqrt(dropped_sq) / norm if norm > 0 else 0.0
    return TTResult(out, tuple(ranks), achieved)
