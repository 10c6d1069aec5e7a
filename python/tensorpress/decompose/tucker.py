"""Tucker decomposition: HOSVD (De Lathauwer et al. 2000), refined by HOOI."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tensorpress._validate import is_int
from tensorpress.linalg import truncated_svd


@dataclass
class TuckerResult:
    """T ~ core x_1 factors[0] x_2 factors[1] ...; factors[n] is (p_n, r_n) with orthonormal
    columns, core is (r_1, ..., r_d). rel_error = ||T - T_hat|| / ||T||; history holds it
    per HOOI iteration (the HOSVD start first)."""

    core: Tensor
    factors: list[Tensor]
    rel_error: float
    n_iter: int
    history: list[float] = field(default_factory=list)

    def to_tensor(self) -> Tensor:
        return multi_mode_product(self.core, self.factors)


def multi_mode_product(core: Tensor, matrices: Sequence[Tensor | None], transpose: bool = False) -> Tensor:
    """core x_n matrices[n] for every n (None skips a mode); with transpose, x_n matrices[n]^T."""
    out = core
    for mode, mat in enumerate(matrices):
        if mat is None:
            continue
        m = mat.T if transpose else mat
        out = torch.movedim(torch.tensordot(out, m, dims=([mode], [1])), -1, mode)
    return out


def _leading_left_vectors(t: Tensor, mode: int, rank: int) -> Tensor:
    unfolding = torch.movedim(t, mode, 0).reshape(t.shape[mode], -1)
    u, _, _ = truncated_svd(unfolding, rank=rank)
    return u


def feasible_ranks(ranks: Sequence[int], shape: Sequence[int]) -> list[int]:
    """The multilinear ranks a Tucker decomposition of a ``shape`` tensor can hold at most
    ``ranks``: each R_n <= p_n and R_n <= prod_{m != n} R_m (the core's mode-n unfolding has
    no higher rank), lowered together until all hold. HOOI's factors come out with these
    ranks (a mode asked for more gets fewer columns); e.g. a 1x1 conv's (r_out, r_in, 1, 1)
    Tucker-2 kernel needs r_out = r_in."""
    out = [min(int(r), int(p)) for r, p in zip(ranks, shape)]
    changed = True
    while changed:  # each pass only lowers ranks (all >= 1): it ends
        changed = False
        for n in range(len(out)):
            cap = math.prod(out[:n] + out[n + 1 :])
            if out[n] > cap:
                out[n], changed = cap, True
    return out


def _check(tensor, ranks) -> list[int]:
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        raise TypeError(f"tensor: expected a floating-point tensor, got {getattr(tensor, 'dtype', type(tensor))}")
    d = tensor.dim()
    if is_int(ranks):
        ranks = [ranks] * d
    ranks = list(ranks) if isinstance(ranks, (list, tuple)) else ranks
    if not isinstance(ranks, list) or len(ranks) != d or any(not is_int(r) or r < 1 for r in ranks):
        raise ValueError(f"ranks: expected {d} ints >= 1 (one per mode of a {d}-way tensor), got {ranks!r}")
    if not torch.isfinite(tensor).all():
        raise ValueError("tensor: expected finite values, found NaN or Inf")
    return [min(r, p) for r, p in zip(ranks, tensor.shape)]


def hosvd(tensor: Tensor, ranks: int | Sequence[int]) -> TuckerResult:
    """Truncated higher-order SVD: each factor from the leading left singular vectors of the
    tensor's mode-n unfolding; quasi-optimal (error <= sqrt(d) x the best Tucker error)."""
    ranks = _check(tensor, ranks)
    t = tensor.detach().to(torch.float64)
    factors = [_leading_left_vectors(t, n, r) for n, r in enumerate(ranks)]
    core = multi_mode_product(t, factors, transpose=True)
    err = _rel_error(t, core)
    return TuckerResult(core.to(tensor.dtype), [f.to(tensor.dtype) for f in factors], err, 0, [err])


def tucker(
    tensor: Tensor, ranks: int | Sequence[int], n_iter_max: int = 50, tol: float = 1e-10, init: str = "hosvd"
) -> TuckerResult:
    """Tucker decomposition by higher-order orthogonal iteration (HOOI), started from HOSVD.

    Each sweep replaces every factor by the leading left singular vectors of the tensor
    projected on all other factors; the fit never decreases. Stops when the relative error
    changes by less than `tol` or after `n_iter_max` sweeps.
    """
    if init != "hosvd":
        raise ValueError(f"init: expected 'hosvd', got {init!r}")
    if not is_int(n_iter_max) or n_iter_max < 0:
        raise ValueError(f"n_iter_max: expected an int >= 0, got {n_iter_max!r}")
    start = hosvd(tensor, ranks)
    t = tensor.detach().to(torch.float64)
    factors = [f.to(torch.float64) for f in start.factors]
    ranks = [f.shape[1] for f in factors]
    history = [start.rel_error]
    it = 0
    for it in range(1, n_iter_max + 1):  # noqa: B007 (read after the loop: iterations run)
        for n in range(t.dim()):
            others = [None if m == n else f for m, f in enumerate(factors)]
            projected = multi_mode_product(t, others, transpose=True)
            factors[n] = _leading_left_vectors(projected, n, ranks[n])
        core = multi_mode_product(t, factors, transpose=True)
        history.append(_rel_error(t, core))
        if abs(history[-2] - history[-1]) < tol:
            break
    core = multi_mode_product(t, factors, transpose=True)
    return TuckerResult(core.to(tensor.dtype), [f.to(tensor.dtype) for f in factors], history[-1], it, history)


def _rel_error(t: Tensor, core: Tensor) -> float:
    # orthonormal factors: ||T - T_hat||^2 = ||T||^2 - ||core||^2
    total = torch.linalg.vector_norm(t).item()
    if total == 0:
        return 0.0
    kept = torch.linalg.vector_norm(core).item()
    return max(total**2 - kept**2, 0.0) ** 0.5 / total
