r"""Rank-r fits of a linear layer: weights only (svd), input-whitened, and activation-aware.

The objective of the data-aware fits, for a layer y = x W^T + b with calibration inputs X of
the original model and X~ of the model compressed so far (rows are samples):

    min over rank(W^) <= r and free b^ of  || X W^T + 1 b^T - X~ W^^T - 1 b^^T ||_F .

A free bias is the same as appending a ones column to X~ whose weight is not rank-limited; it
makes the rank part see centered data, and then b^ = b + W mu - W^ mu~.  With the centered
Grams G = X~^T X~ (+ ridge) = L L^T and C = X~^T X (Zhang & Saab's closed form
W^^T = X~^+ [P_X~ X W^T]_r, written with Grams):

    M = L^{-1} C W^T   (= L^T times the least-squares weight),  M = U S V^T,
    W^ = V_r S_r U_r^T L^{-1},   error^2 = ||X W^T||^2 - ||M||^2 + sum_{i > r} S_i^2 .

With X~ = X this is the whitened SVD (SVD of W L, multiplied back by L^{-1}), so `whitened`
is the one-shot version of `activation` and the two differ exactly by the sequential X~.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tensorpress._validate import is_int
from tensorpress.compress.quadratic import ridged_cholesky
from tensorpress.compress.stats import GramStats, OffsetStats

# Ridge added to G, relative to its mean diagonal: keeps the Cholesky factor well defined when
# some input directions carry (almost) no energy, at a negligible bias elsewhere.
DEFAULT_RIDGE = 1e-6
# On CPU the fits' LAPACK calls run single-threaded when min(out, in) is below this: on a
# 2-core machine shared with other processes a 2-thread float64 SVD of 1536x384 took 10.8 s
# against 0.14 s on one thread (OpenMP threads spinning against the other processes).
SINGLE_THREAD_MAX_K = 1024


@contextlib.contextmanager
def small_problem_threads(device: torch.device, k: int, limit: int = SINGLE_THREAD_MAX_K):
    """Run the block single-threaded on CPU when k < limit; restores the thread count after."""
    threads = torch.get_num_threads()
    single = device.type == "cpu" and k < limit and threads > 1
    if single:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if single:
            torch.set_num_threads(threads)


@dataclass
class LowRankFit:
    """W^ = second @ first with first (r, in), second (out, r), singular values split evenly;
    bias (out,) or None; info: diagnostics (method, error curve, ...)."""

    first: Tensor
    second: Tensor
    bias: Tensor | None
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.first.shape[0])

    def weight(self) -> Tensor:
        """The dense (out, in) weight W^ = second @ first."""
        return self.second @ self.first


def _check_weight_rank(weight: Tensor, rank: int) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor (out, in), got {getattr(weight, 'shape', weight)!r}")
    if not is_int(rank) or not 1 <= rank <= min(weight.shape):
        raise ValueError(
            f"rank: expected an int in [1, {min(weight.shape)}] for a {tuple(weight.shape)} weight, got {rank!r}"
        )


def _split(u_r: Tensor, s_r: Tensor, v_r: Tensor) -> tuple[Tensor, Tensor]:
    """(first, second) = (sqrt(S) V^T-side, U sqrt(S)) for W^ = U S V^T."""
    root = s_r.clamp_min(0).sqrt()
    return root[:, None] * v_r.T, u_r * root


def fit_svd(weight: Tensor, bias: Tensor | None, rank: int) -> LowRankFit:
    """The best rank-r approximation of W in Frobenius norm (no data)."""
    _check_weight_rank(weight, rank)
    w = weight.detach().to(torch.float64)
    with small_problem_threads(w.device, min(w.shape)):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    first, second = _split(u[:, :rank], s[:rank], vh[:rank].T)
    b = None if bias is None else bias.detach().to(torch.float64).clone()
    return LowRankFit(first, second, b, {"method": "svd", "singular_values": s})


def whitening_factor(cov: Tensor, ridge: float = DEFAULT_RIDGE) -> Tensor:
    """Lower Cholesky factor L of cov + ridge * mean(diag(cov)) I (float64; the ridge raised
    where rounding left cov indefinite, see ridged_cholesky)."""
    return ridged_cholesky(cov, ridge)[0]


def fit_activation(
    weight: Tensor,
    bias: Tensor | None,
    stats: GramStats,
    rank: int,
    ridge: float = DEFAULT_RIDGE,
    offset: OffsetStats | None = None,
) -> LowRankFit:
    """Activation-aware rank-r fit (the closed form in the module docstring). With one-shot
    statistics (stats.paired False) it is the whitened SVD.

    offset: statistics of an extra target D (rows, out) paired with X~: the fit then aims at
    X W^T + b + D (C W^T becomes C W^T + X~c^T Dc in M, and the bias gets mean(D)). Used for
    residual feedback: D is the error of the residual stream the layer's output is added to."""
    if offset is not None and (offset.in_features != weight.shape[1] or offset.out_features != weight.shape[0]):
        raise ValueError(
            f"offset: expected statistics of {weight.shape[1]} inputs and {weight.shape[0]} outputs, got "
            f"{offset.in_features} and {offset.out_features}"
        )
    _check_weight_rank(weight, rank)
    if stats.in_features != weight.shape[1]:
        raise ValueError(f"stats: expected statistics of {weight.shape[1]} input features, got {stats.in_features}")
    with small_problem_threads(weight.device, min(weight.shape)):
        return _fit_activation(weight, bias, stats, rank, ridge, offset)


def _fit_activation(weight, bias, stats, rank, ridge, offset=None) -> LowRankFit:
    w = weight.detach().to(torch.float64)
    L = whitening_factor(stats.cov_in, ridge)
    # M = L^{-1} C W^T, C = centered X~^T X (plus X~c^T Dc with an offset target)
    rhs = stats.cov_cross_times(w)
    if offset is not None:
        rhs = rhs + offset.cov_cross.to(w.device)
    M = torch.linalg.solve_triangular(L, rhs, upper=False)
    u, s, vh = torch.linalg.svd(M, full_matrices=False)  # M (in, out) = u s vh
    # W^ = V_r S_r U_r^T L^{-1}: first = sqrt(S) U_r^T L^{-1}, second = V_r sqrt(S)
    root = s[:rank].sqrt()
    first = torch.linalg.solve_triangular(L.T, u[:, :rank], upper=True).T * root[:, None]
    second = vh[:rank].T * root
    out_energy = torch.tensor(stats.ref_energy(w), dtype=torch.float64)
    info = {
        "method": "activation" if stats.paired else "whitened",
        "singular_values": s,
        "residual_floor": (out_energy - (s * s).sum()).clamp_min(0).item(),
        "output_energy": out_energy.item(),
    }
    # the free bias b^ = b + W mu - W^ mu~ (given even to a layer that had none: the rank
    # part was fitted to centered data)
    b = w @ stats.mean_ref - second @ (first @ stats.mean_in)
    if offset is not None:
        b = b + offset.mean_d.to(w.device)
        info["residual_feedback"] = True
    if bias is not None:
        b = b + bias.detach().to(torch.float64)
    return LowRankFit(first, second, b, info)


def truncate_fit(
    fit: LowRankFit, rank: int, weight: Tensor, bias: Tensor | None, stats: GramStats | None = None
) -> LowRankFit:
    """The rank-``rank`` fit from a higher-rank fit_svd / fit_activation result (their factors
    are ordered by singular value, so truncation is slicing; the free bias is recomputed from
    ``stats`` when given, else the layer's bias is kept). Saves the decomposition when the
    same layer is fitted at several ranks (a sweep over budgets)."""
    _check_weight_rank(weight, rank)
    if rank > fit.rank:
        raise ValueError(f"rank: expected at most the fit's rank {fit.rank}, got {rank}")
    first, second = fit.first[:rank], fit.second[:, :rank]
    if stats is None:
        b = None if bias is None else bias.detach().to(torch.float64).clone()
    else:
        w = weight.detach().to(torch.float64)
        b = w @ stats.mean_ref - second @ (first @ stats.mean_in)
        if bias is not None:
            b = b + bias.detach().to(torch.float64)
    return LowRankFit(first, second, b, dict(fit.info))


def error_curve(fit_info: dict) -> Tensor:
    """Squared centered output error of the activation/whitened fit at every rank 0..k
    (from one SVD: residual floor + tail energy)."""
    s2 = fit_info["singular_values"] ** 2
    tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
    return fit_info["residual_floor"] + tail
