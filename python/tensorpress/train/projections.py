"""The constraint projections of tenBCD: TT-SVD with capped bond ranks, and magnitude pruning."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from tensorpress.linalg import truncated_svd
from tensorpress.linalg.svd import cholesky_qr2
from tensorpress.tt_format import cores_to_dense, matrix_to_tt_tensor


def prune_projection(W: Tensor, sparsity: float) -> Tensor:
    """P_s(W): keep the round((1 - s) * W.numel()) entries of largest magnitude, zero the rest.

    The Euclidean projection onto matrices with at most that many non-zeros (ties broken by
    torch.topk). sparsity in [0, 1).
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity: expected a float in [0, 1), got {sparsity!r}")
    keep = max(1, round((1.0 - sparsity) * W.numel()))
    if keep >= W.numel():
        return W.clone()
    flat = W.reshape(-1)
    idx = torch.topk(flat.abs(), keep, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(W.shape)


def tt_reconstruct(cores: Sequence[Tensor], out_factors: Sequence[int], in_factors: Sequence[int]) -> Tensor:
    """The dense (b, M, N) matrices of a batch of TT-matrix cores (b, r_{k-1}, m_k, n_k, r_k)."""
    if [tuple(g.shape[2:4]) for g in cores] != list(zip(out_factors, in_factors)):
        raise ValueError(
            f"cores: expected (m_k, n_k) = {list(zip(out_factors, in_factors))}, got {[tuple(g.shape) for g in cores]}"
        )
    return cores_to_dense(cores)


RANDOMIZED_MIN_SIZE = 512  # auto: a randomized SVD only for unfoldings at least this large in both
RANDOMIZED_MAX_FRACTION = 0.25  # dimensions and ranks at most this fraction of the smaller one


def _svd_method(shape, rank: int, method: str) -> str:
    """auto: LAPACK, except a randomized SVD for a low rank of a large unfolding (on small
    unfoldings the randomized method's power iterations cost more than a full SVD).

    Deliberately not tensorpress.linalg.svd_method's "auto", which never returns an unchecked
    randomized SVD: inside tenBCD a projection slightly off in one iteration is corrected by the
    next, so the residual check (and its LAPACK fallback) would cost time for nothing."""
    if method != "auto":
        return method
    k = min(shape[-2:])
    return "randomized" if k >= RANDOMIZED_MIN_SIZE and rank <= RANDOMIZED_MAX_FRACTION * k else "lapack"


SINGLE_THREAD_MAX_K = 256  # CPU SVDs with a smaller min(m, n) run on one thread (see _svd)


def _svd(mat: Tensor, r: int, method: str, generator) -> tuple[Tensor, Tensor, Tensor]:
    """truncated_svd of a batch, wide matrices through their transpose (LAPACK is faster on tall
    ones). Small CPU problems run single-threaded: they gain nothing from threads, and on this
    2-core machine a multi-threaded LAPACK SVD of a 128 x 256 matrix was measured 100x slower
    than a single-threaded one whenever other processes kept the cores busy."""
    wide = mat.shape[-2] < mat.shape[-1]
    work = mat.mT.contiguous() if wide else mat
    threads = torch.get_num_threads()
    single = mat.device.type == "cpu" and min(mat.shape[-2:]) < SINGLE_THREAD_MAX_K and threads > 1
    if single:
        torch.set_num_threads(1)
    try:
        u, s, vh = truncated_svd(work, rank=r, method=method, generator=generator)
    finally:
        if single:
            torch.set_num_threads(threads)
    return (vh.mT, s, u.mT) if wide else (u, s, vh)


# warm-started subspace SVD (tt_project with a state): power iterations from a random start on
# the first call, from the previous call's right singular subspace afterwards
COLD_POWER_ITERATIONS = 4
WARM_POWER_ITERATIONS = 1
OVERSAMPLE = 10


def _subspace_svd(mat: Tensor, r: int, start: Tensor, power_iterations: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rank-r truncated SVD of mat (b, m, n) by subspace iteration from ``start`` (b, n, l),
    l >= r; also returns the l right singular vectors found (the next call's start). From the
    right subspace of a nearby matrix (the same layer one tenBCD iteration earlier), one power
    iteration gives what several from a random start give."""
    y = mat @ start
    for _ in range(power_iterations):
        q, _ = cholesky_qr2(y)
        z, _ = cholesky_qr2(mat.mT @ q)
        y = mat @ z
    q, _ = cholesky_qr2(y)  # (b, m, l): the range of mat
    ub, s, vh = torch.linalg.svd(q.mT @ mat, full_matrices=False)  # the small (b, l, n) problem
    return q @ ub[..., :r], s[..., :r], vh[..., :r, :], vh.mT.contiguous()


def _warm_svd(mat: Tensor, r: int, key, state: dict, generator) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD of an unfolding through ``state[key]`` (see _subspace_svd)."""
    b, m, n = mat.shape
    width = min(r + OVERSAMPLE, m, n)
    start = state.get(key)
    iters = WARM_POWER_ITERATIONS
    if start is None or start.shape != (b, n, width):
        where = generator.device if generator is not None else mat.device
        start = torch.randn(b, n, width, generator=generator, dtype=mat.dtype, device=where).to(mat.device)
        iters = COLD_POWER_ITERATIONS
    u, s, vh, state[key] = _subspace_svd(mat, r, start, iters)
    return u, s, vh


def _split_bond(mat: Tensor, r: int, method: str, key, state: dict | None, generator) -> tuple[Tensor, Tensor]:
    """One step of the TT-SVD: mat (b, rows, cols) ~= u @ rest with u (b, rows, r) orthonormal.

    A bond whose cap does not truncate (r = rows or r = cols) needs no SVD: the identity or a
    thin QR factorizes the unfolding exactly with an orthonormal u, and the later bonds see the
    same matrix up to a rotation of its rows, so the TT-SVD result is unchanged (in tenBCD the
    first bond, 16 x 65536 at the 1024 x 1024 layers, is such a bond: a third of the projection's time).
    """
    b, rows, cols = mat.shape
    if r == rows:
        return torch.eye(rows, dtype=mat.dtype, device=mat.device).expand(b, rows, rows), mat
    if r == cols:
        return torch.linalg.qr(mat)
    how = _svd_method(mat.shape, r, method)
    if state is not None and how == "randomized":
        u, s, vh = _warm_svd(mat, r, key, state, generator)
    else:
        u, s, vh = _svd(mat, r, how, generator)
    return u, s.unsqueeze(-1) * vh


def tt_project(
    W: Tensor,
    out_factors: Sequence[int],
    in_factors: Sequence[int],
    ranks: Sequence[int],
    method: str = "auto",
    generator: torch.Generator | None = None,
    state: dict | None = None,
) -> tuple[list[Tensor], Tensor]:
    """TT-SVD of W (M x N) or of a batch W (b, M, N), every bond rank capped at ranks[k].

    Sequential truncated SVDs of the unfoldings (Oseledets 2011), in W's dtype and on its
    device; a batch of same-shape layers runs as one batched SVD per bond. `method` is passed
    to tensorpress.linalg.truncated_svd ("lapack" for exact SVDs; "auto" takes a randomized SVD
    for low ranks of unfoldings >= 512 x 512, whose result is near-optimal rather than exact).
    state: a dict kept by the caller between calls on slowly changing W (the iterations of
    tenBCD): the unfoldings that "auto" gives a randomized SVD are then solved by subspace
    iteration started from the previous call's singular subspace (one power iteration instead
    of four from a random start); the dict holds those subspaces.
    Returns (cores, W_tt): cores (r_{k-1}, m_k, n_k, r_k) (with the batch dim first when W had
    one) and the reconstruction, shaped like W.
    """
    batched = W.dim() == 3
    Wb = W if batched else W.unsqueeze(0)
    b = Wb.shape[0]
    t = matrix_to_tt_tensor(Wb, out_factors, in_factors)
    sizes = [m * n for m, n in zip(out_factors, in_factors)]
    cores, r_prev = [], 1
    rest = t.reshape(b, 1, -1)
    for k in range(len(sizes) - 1):
        mat = rest.reshape(b, r_prev * sizes[k], -1)
        u, rest = _split_bond(mat, min(ranks[k], *mat.shape[1:]), method, k, state, generator)
        r = u.shape[-1]
        cores.append(u.reshape(b, r_prev, out_factors[k], in_factors[k], r))
        r_prev = r
    cores.append(rest.reshape(b, r_prev, out_factors[-1], in_factors[-1], 1))
    dense = tt_reconstruct(cores, out_factors, in_factors)
    if not batched:
        return [c[0] for c in cores], dense[0]
    return cores, dense


def tt_reconstruct_reshaped(cores: Sequence[Tensor], out_features: int, in_features: int) -> Tensor:
    """The dense (b, out, in) matrices of a batch of TT cores (b, r_{k-1}, n_k, r_k) of the weights'
    row-major reshapes (the inverse of :func:`tt_project_reshaped`'s reshape)."""
    b = cores[0].shape[0]
    full = cores[0].reshape(b, -1, cores[0].shape[-1])  # (b, n_1, r_1)
    for g in cores[1:]:
        full = (full @ g.reshape(b, g.shape[1], -1)).reshape(b, -1, g.shape[-1])
    return full.reshape(b, out_features, in_features)


def tt_project_reshaped(
    W: Tensor,
    shape: Sequence[int],
    ranks: Sequence[int],
    method: str = "auto",
    generator: torch.Generator | None = None,
    state: dict | None = None,
) -> tuple[list[Tensor], Tensor]:
    """TT-SVD of the row-major reshape of W (M x N, or a batch (b, M, N)) into ``shape``, every
    bond rank capped at ranks[k]: the projection of the tenBCD authors' CNN notebook (TensorLy's
    tensor_train of W.reshape(shape) at one rank for all bonds).

    Sequential truncated SVDs of the unfoldings (Oseledets 2011), left to right, through
    tensorpress.linalg.truncated_svd; ``method`` and ``state`` as in :func:`tt_project` (a bond
    whose cap does not truncate is factorized without an SVD; "lapack" gives exact SVDs, "auto"
    a warm-started subspace iteration for low ranks of unfoldings >= 512 x 512 when a state is
    kept). Returns (cores, W_tt): cores (r_{k-1}, shape[k], r_k) (batch dim first when W had one)
    and the reconstruction, shaped like W.
    """
    batched = W.dim() == 3
    Wb = W if batched else W.unsqueeze(0)
    b, M, N = Wb.shape
    if math.prod(shape) != M * N or len(ranks) != len(shape) - 1:
        raise ValueError(
            f"shape, ranks: expected a shape with product {M * N} and {len(shape) - 1} ranks, got "
            f"{tuple(shape)} and {tuple(ranks)}"
        )
    cores, r_prev = [], 1
    rest = Wb.reshape(b, 1, -1)
    for k in range(len(shape) - 1):
        mat = rest.reshape(b, r_prev * shape[k], -1)
        u, rest = _split_bond(mat, min(ranks[k], *mat.shape[1:]), method, k, state, generator)
        r = u.shape[-1]
        cores.append(u.reshape(b, r_prev, shape[k], r))
        r_prev = r
    cores.append(rest.reshape(b, r_prev, shape[-1], 1))
    dense = tt_reconstruct_reshaped(cores, M, N)
    if not batched:
        return [c[0] for c in cores], dense[0]
    return cores, dense
