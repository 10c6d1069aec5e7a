"""Batched truncated SVD: our one-sided Jacobi (csrc/svd/) for small matrices, a randomized
range finder (Halko, Martinsson & Tropp 2011) for low ranks of large ones, LAPACK otherwise."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tensorpress._ext import _C

METHODS = ("auto", "jacobi", "randomized", "lapack")
# auto uses our Jacobi up to this many columns, per dtype: measured on the 2-core EPYC against
# torch.linalg.svd (MKL), float32 (the batch-interleaved kernel of csrc/svd/jacobi_lanes.h)
# wins on batches of 16x16, 32x32 and 64x64 (benchmarks/results/svd_cpu.md); float64 (the
# per-matrix double kernel) wins on 32x32 (1.4x), not on 64x64 (0.8x)
JACOBI_MAX_COLUMNS = {torch.float32: 64, torch.float64: 32}
# on CUDA, our Jacobi (one matrix per thread block) against cuSOLVER's batched solvers: up to
# 64 columns, where the matrix fits in shared memory (to be re-measured by bench_svd --device cuda)
JACOBI_MAX_COLUMNS_CUDA = 64
RANDOMIZED_MAX_RANK_FRACTION = 0.25
DEFAULT_OVERSAMPLE = 10
DEFAULT_POWER_ITERATIONS = 4
# Rotate a pair while the |cos| of the angle between its vectors exceeds this: the singular
# values then carry a relative error of about tol * (a modest factor), far below the
# rounding of the output for float32; float64 outputs ask for full double accuracy.
JACOBI_TOL = {torch.float32: 1e-8, torch.float64: 1e-14}
JACOBI_MAX_SWEEPS = 40


class SVDResult(NamedTuple):
    """A = U diag(S) Vh (truncated): U (..., m, k), S (..., k) descending, Vh (..., k, n)."""

    U: Tensor
    S: Tensor
    Vh: Tensor


def svd_method(shape, rank: int | None = None, method: str = "auto", device="cpu",
               dtype: torch.dtype = torch.float32) -> str:
    """The method `truncated_svd` uses for matrices of this shape, rank and dtype (the choice
    made visible): jacobi when min(m, n) <= 64 for float32, <= 32 for float64 (on CUDA: up to
    64 where our kernel takes the shape), randomized when a rank well below min(m, n) is asked
    for, LAPACK otherwise."""
    if method != "auto":
        return method
    m, n = shape[-2], shape[-1]
    k = min(m, n)
    if k <= JACOBI_MAX_COLUMNS.get(dtype, JACOBI_MAX_COLUMNS[torch.float64]):
        return "jacobi"
    if k <= JACOBI_MAX_COLUMNS_CUDA and jacobi_on_cuda(shape, device):
        return "jacobi"
    if rank is not None and rank <= RANDOMIZED_MAX_RANK_FRACTION * k:
        return "randomized"
    return "lapack"


def _validate(A, rank, rtol, method, n_iter, oversample):
    if not isinstance(A, Tensor):
        raise TypeError(f"A: expected a tensor, got {type(A).__name__}")
    if A.dim() < 2:
        raise ValueError(f"A: expected shape (..., m, n), got {tuple(A.shape)}")
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"A: expected dtype float32 or float64, got {A.dtype}")
    if rank is None and rtol is None:
        raise ValueError("rank, rtol: expected at least one of them, got neither")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank: expected an int >= 1, got {rank!r}")
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < 1):
        raise ValueError(f"rtol: expected a float in [0, 1), got {rtol!r}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method == "randomized" and rank is None:
        raise ValueError("rank: the randomized method needs a rank, got None")
    for name, v in (("n_iter", n_iter), ("oversample", oversample)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    if A.numel() and not torch.isfinite(A).all():
        raise ValueError("A: expected finite values, found NaN or Inf")


def truncated_svd(A: Tensor, rank: int | None = None, rtol: float | None = None, method: str = "auto",
                  n_iter: int | None = None, oversample: int | None = None,
                  generator: torch.Generator | None = None) -> SVDResult:
    """Truncated SVD of a batch of matrices.

    Args:
        A: (..., m, n), float32 or float64, CPU or CUDA (on CUDA, jacobi runs our kernel where
           a matrix fits in one block's shared memory, see `jacobi_on_cuda`).
        rank: keep at most this many singular triplets.
        rtol: drop singular values below rtol * S_max (per matrix: in a batch the kept count is
           the largest over the batch, and values below the threshold are set to zero).
        method: "auto" (see `svd_method`), "jacobi", "randomized" or "lapack".
        n_iter, oversample: power iterations (default 4) and oversampling (default 10) of the
           randomized method.
        generator: random source for the randomized method.
    Returns:
        SVDResult(U, S, Vh) with k = min(rank, m, n) (or fewer by rtol) columns; the
        largest-magnitude entry of every left singular vector is positive.
    """
    _validate(A, rank, rtol, method, n_iter, oversample)
    chosen = svd_method(A.shape, rank, method, A.device, A.dtype)
    batch_shape, (m, n) = A.shape[:-2], A.shape[-2:]
    a = A.detach().reshape(-1, m, n)
    full = min(m, n)
    k = full if rank is None else min(rank, full)
    if chosen == "jacobi":
        U, S, Vh = _jacobi(a)
    elif chosen == "randomized":
        U, S, Vh = _randomized(a, k, DEFAULT_POWER_ITERATIONS if n_iter is None else n_iter,
                               DEFAULT_OVERSAMPLE if oversample is None else oversample, generator)
    else:
        U, S, Vh = _normalize_signs(*torch.linalg.svd(a, full_matrices=False))
    U, S, Vh = U[..., :k], S[..., :k], Vh[..., :k, :]
    if rtol is not None and S.numel():
        keep = S >= rtol * S[..., :1]
        count = max(int(keep.sum(-1).max()), 1)
        U, S, Vh = U[..., :count], (S * keep)[..., :count], Vh[..., :count, :]
    k = S.shape[-1]
    return SVDResult(U.reshape(*batch_shape, m, k), S.reshape(*batch_shape, k), Vh.reshape(*batch_shape, k, n))


def _normalize_signs(U: Tensor, S: Tensor, Vh: Tensor):
    """Flip each triplet so the largest-magnitude entry of its left vector is positive."""
    idx = U.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(U, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, S, Vh * sign.transpose(-1, -2)


# the CUDA Jacobi kernel is in this build
CUDA_JACOBI = hasattr(_C, "svd_jacobi_cuda")


def jacobi_on_cuda(shape, device) -> bool:
    """Whether the CUDA Jacobi kernel runs matrices of this shape on `device`: the build has
    it and one matrix (in double, with its rotations) fits in a block's shared memory.
    Elsewhere CUDA tensors go to torch's solver (cuSOLVER)."""
    if not CUDA_JACOBI or torch.device(device).type != "cuda":
        return False
    from tensorpress.ops.tt_plan import cuda_limits

    return _C.svd_jacobi_cuda_smem_bytes(shape[-2], shape[-1]) <= cuda_limits(device).smem_per_block


def _jacobi(a: Tensor):
    if a.device.type != "cpu":
        if not jacobi_on_cuda(a.shape, a.device):
            return _normalize_signs(*torch.linalg.svd(a, full_matrices=False))
        a = a.contiguous()
        b, m, n = a.shape
        k = min(m, n)
        U, S, Vh = a.new_empty(b, m, k), a.new_empty(b, k), a.new_empty(b, k, n)
        _C.svd_jacobi_cuda(a, U, S, Vh, JACOBI_TOL[a.dtype], JACOBI_MAX_SWEEPS,
                           torch.cuda.current_stream(a.device).cuda_stream)
        return U, S, Vh
    a = a.contiguous()
    b, m, n = a.shape
    k = min(m, n)
    U = a.new_empty(b, m, k)
    S = a.new_empty(b, k)
    Vh = a.new_empty(b, k, n)
    threads = torch.get_num_threads()
    ws = torch.empty(_C.svd_jacobi_workspace_size(m, n, threads), dtype=torch.float64)
    _C.svd_jacobi(a, U, S, Vh, ws, JACOBI_TOL[a.dtype], JACOBI_MAX_SWEEPS, threads)
    return U, S, Vh


def cholesky_qr2(Y: Tensor) -> tuple[Tensor, Tensor]:
    """Y (..., m, l) = Q R with orthonormal Q, by two rounds of Cholesky QR (two batched
    GEMMs and a small Cholesky each), computed in float64. Falls back to Householder QR for
    the matrices where Y is too ill-conditioned for the Cholesky factor to exist."""
    y = Y.to(torch.float64)
    q, r1, ok1 = _cholesky_qr(y)
    q, r2, ok2 = _cholesky_qr(q)
    r = r2 @ r1
    bad = ~(ok1 & ok2)
    if bad.any():
        qh, rh = torch.linalg.qr(y[bad])
        q, r = q.clone(), r.clone()
        q[bad], r[bad] = qh, rh
    return q.to(Y.dtype), r.to(Y.dtype)


def _cholesky_qr(y: Tensor):
    gram = y.transpose(-1, -2) @ y
    chol, info = torch.linalg.cholesky_ex(gram, upper=True)
    ok = info == 0
    # where the factorization failed, any invertible stand-in keeps the batch going
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol = torch.where(ok[..., None, None], chol, eye)
    # a factor with a vanishing pivot would blow Q up: count it as failed too
    diag = torch.diagonal(chol, dim1=-2, dim2=-1)
    ok = ok & (diag > diag.amax(-1, keepdim=True) * 1e-12).all(-1)
    q = torch.linalg.solve_triangular(chol, y, upper=True, left=False)
    return q, chol, ok


def _randomized(a: Tensor, k: int, n_iter: int, oversample: int, generator):
    """Range finder with power iterations, then the small SVD by our Jacobi."""
    b, m, n = a.shape
    l = min(k + oversample, min(m, n))
    omega = torch.randn(b, n, l, generator=generator, dtype=a.dtype, device="cpu").to(a.device)
    at = a.transpose(-1, -2)
    y = a @ omega
    for _ in range(n_iter):
        q, _ = cholesky_qr2(y)
        z, _ = cholesky_qr2(at @ q)
        y = a @ z
    q, _ = cholesky_qr2(y)                       # (b, m, l): the range of A
    small = q.transpose(-1, -2) @ a              # (b, l, n)
    q2, r = cholesky_qr2(small.transpose(-1, -2))  # small^T = q2 r, so small = r^T q2^T
    ur, s, vrh = _jacobi(r.transpose(-1, -2).contiguous())
    U = q @ ur
    Vh = vrh @ q2.transpose(-1, -2)
    return _normalize_signs(U[..., :k], s[..., :k], Vh[..., :k, :])
