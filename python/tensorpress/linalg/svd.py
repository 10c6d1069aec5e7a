"""Batched truncated SVD: our one-sided Jacobi (csrc/svd/) for small matrices, a randomized
range finder (Halko, Martinsson & Tropp 2011) for low ranks of large ones, LAPACK otherwise.

Accuracy of each method (s_i the returned values, sigma_i the exact ones, u the unit roundoff):
* "jacobi", "lapack": backward stable; |s_i - sigma_i| <= c u sigma_1 (Jacobi, float64
  rotations: also high relative accuracy on well-conditioned columns).
* "randomized": no check; the error depends on the spectrum, roughly
  (sigma_{l+1} / sigma_i)^(2 n_iter + 1) per triplet with l = rank + oversample: exact on
  fast-decaying spectra, a few percent off on flat ones (Gaussian matrices).
* "randomized_checked" (what "auto" picks for low ranks): the randomized result is checked a
  posteriori and redone by LAPACK where the check fails; the guarantee is in
  `truncated_svd`'s docstring and `CHECK_TOLERANCE`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from tensorpress import _cuda_kernels as cuda_kernels
from tensorpress._ext import _C
from tensorpress._validate import is_int

METHODS = ("auto", "jacobi", "randomized", "randomized_checked", "lapack")
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


class CheckTolerance(NamedTuple):
    """What "randomized_checked" (and so "auto") accepts, per kept triplet i (s_1 the largest):
    residual r_i = ||A v_i - s_i u_i|| <= value * s_i + floor * s_1 (A^T u_i = s_i v_i holds
    exactly, so s_i is within r_i / sqrt(2) of a singular value of A), and the rank-k
    Frobenius error these residuals allow is at most (1 + frobenius) times the optimal one
    (plus what the floor allows). floor: the rounding level of the dtype's arithmetic."""

    value: float
    floor: float
    frobenius: float


CHECK_TOLERANCE = {
    torch.float32: CheckTolerance(value=1e-4, floor=1e-5, frobenius=1e-4),
    torch.float64: CheckTolerance(value=1e-6, floor=1e-12, frobenius=1e-6),
}
# the checked method's block: twice the rank (at least rank + DEFAULT_OVERSAMPLE); a wide
# block makes the power iterations converge at (sigma_{l+1} / sigma_k)^2 each, which on the
# slowly decaying spectra of the tests is what lets the check pass at all
CHECKED_FIRST_ITERATIONS = 3  # power iterations before the first check
CHECKED_MAX_CHECKS = 3
CHECKED_STEP_MARGIN = 1.25  # on the predicted iterations (see _predicted_steps)
# Cost model of the checked method's budget: a full LAPACK SVD of an m x n matrix (p = min,
# q = max) takes as long as LAPACK_COST_IN_STEPS * (4 q p^2 + 8 p^3) / (4 m n l + 8 (m + n) l^2)
# power iterations (their GEMMs and CholeskyQR2s); fitted single-threaded on the 2-core EPYC
# (OpenBLAS) at 1024^2, 4096x1024 and 2048^2, l = 64..256, within 25%. Unmeasured on CUDA,
# where the SVD is the slower side, so there the model errs towards LAPACK.
LAPACK_COST_IN_STEPS = {torch.float32: 1.4, torch.float64: 0.65}
# the randomized attempt may spend this fraction of a full SVD's time (a Ritz extraction and
# check count as one iteration), so a matrix it gives up on costs at most 1.5 full SVDs ...
CHECKED_TIME_FRACTION = 0.5
# ... and "auto" only tries it where that allows this many iterations: fewer rarely pass
CHECKED_MIN_BUDGET = 8
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


def svd_method(
    shape, rank: int | None = None, method: str = "auto", device="cpu", dtype: torch.dtype = torch.float32
) -> str:
    """The method `truncated_svd` uses for matrices of this shape, rank and dtype (the choice
    made visible): jacobi when min(m, n) <= 64 for float32, <= 32 for float64 (on CUDA: up to
    64 where our kernel takes the shape), randomized_checked (randomized, checked, LAPACK where
    the check fails) when a rank <= 25% of min(m, n) is asked for and the cost model gives the
    randomized attempt room (`checked_step_budget` >= CHECKED_MIN_BUDGET), LAPACK otherwise."""
    if method != "auto":
        return method
    m, n = shape[-2], shape[-1]
    k = min(m, n)
    if k <= JACOBI_MAX_COLUMNS.get(dtype, JACOBI_MAX_COLUMNS[torch.float64]):
        return "jacobi"
    if k <= JACOBI_MAX_COLUMNS_CUDA and jacobi_on_cuda(shape, device):
        return "jacobi"
    if (
        rank is not None
        and rank <= RANDOMIZED_MAX_RANK_FRACTION * k
        and checked_step_budget(m, n, rank, dtype) >= CHECKED_MIN_BUDGET
    ):
        return "randomized_checked"
    return "lapack"


def _validate(A, rank, rtol, method, n_iter, oversample):
    if not isinstance(A, Tensor):
        raise TypeError(f"A: expected a tensor, got {type(A).__name__}")
    if A.dim() < 2:
        raise ValueError(f"A: expected shape (..., m, n), got {tuple(A.shape)}")
    # a matrix without rows or columns has no singular triplet to keep: an empty result
    # would hand rank-0 factors to callers that asked for rank >= 1
    if A.shape[-2] == 0 or A.shape[-1] == 0:
        raise ValueError(f"A: expected matrices with m >= 1 rows and n >= 1 columns, got shape {tuple(A.shape)}")
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"A: expected dtype float32 or float64, got {A.dtype}")
    if rank is None and rtol is None:
        raise ValueError("rank, rtol: expected at least one of them, got neither")
    if rank is not None and (not is_int(rank) or rank < 1):
        raise ValueError(f"rank: expected an int >= 1, got {rank!r}")
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < 1):
        raise ValueError(f"rtol: expected a float in [0, 1), got {rtol!r}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method in ("randomized", "randomized_checked") and rank is None:
        raise ValueError(f"rank: the {method} method needs a rank, got None")
    for name, v in (("n_iter", n_iter), ("oversample", oversample)):
        if v is not None and (not is_int(v) or v < 0):
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    if A.numel() and not torch.isfinite(A).all():
        raise ValueError("A: expected finite values, found NaN or Inf")


def truncated_svd(
    A: Tensor,
    rank: int | None = None,
    rtol: float | None = None,
    method: str = "auto",
    n_iter: int | None = None,
    oversample: int | None = None,
    generator: torch.Generator | None = None,
) -> SVDResult:
    """Truncated SVD of a batch of matrices.

    Args:
        A: (..., m, n) with m, n >= 1 (an empty batch gives empty results), float32 or float64,
           CPU or CUDA (on CUDA, jacobi runs our kernel where a matrix fits in one block's
           shared memory, see `jacobi_on_cuda`).
        rank: keep at most this many singular triplets.
        rtol: drop singular values below rtol * S_max (per matrix: in a batch the kept count is
           the largest over the batch, and values below the threshold are set to zero).
        method: "auto" (see `svd_method`), "jacobi", "randomized", "randomized_checked" or
           "lapack". Accuracy, with s_i the returned values, sigma_i the exact ones:
           * "jacobi", "lapack": exact up to rounding, |s_i - sigma_i| <= c u sigma_1 (u the
             unit roundoff of A's dtype).
           * "randomized": unchecked; each triplet converges like
             (sigma_{l+1} / sigma_i)^(2 n_iter + 1), l = rank + oversample: exact on fast
             decaying spectra, but on flat ones (Gaussian matrices) the top values come out a
             few percent low and the rank-k error up to about 1% above the optimum.
           * "randomized_checked", which "auto" picks for a rank <= 25% of min(m, n) where
             its cost model expects a gain (`svd_method`): power iterations on a block of
             2 * rank vectors until every kept triplet passes `CHECK_TOLERANCE` (checked after
             3 iterations, continued while the measured convergence predicts a pass within
             half a full SVD's time, `checked_step_budget`); the matrices that do not pass are
             redone by LAPACK. With (value, floor, frobenius) =
             (1e-6, 1e-12, 1e-6) for float64 and (1e-4, 1e-5, 1e-4) for float32, every
             returned s_i is within (value s_i + floor s_1) / sqrt(2) of a singular value of A
             (s_i <= sigma_i also holds), and ||A - U S Vh||_F^2 <= (1 + frobenius)^2
             optimal^2 + sqrt(2) floor s_1 sum_i s_i, the optimal (Eckart-Young) error being
             ||sigma_{k+1:}||. The check sees the triplets the random start found: a direction
             the start missed entirely is not seen (probability negligible for Gaussian starts,
             Halko et al. 2011, sec. 10).
        n_iter, oversample: power iterations (default 4) and oversampling (default 10) of the
           randomized method (the checked one sets its own).
        generator: random source for the randomized methods.
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
        U, S, Vh = _randomized(
            a,
            k,
            DEFAULT_POWER_ITERATIONS if n_iter is None else n_iter,
            DEFAULT_OVERSAMPLE if oversample is None else oversample,
            generator,
        )
    elif chosen == "randomized_checked":
        U, S, Vh = _randomized_checked(a, k, generator)
    else:
        U, S, Vh = _normalize_signs(*lapack_svd(a))
    U, S, Vh = U[..., :k], S[..., :k], Vh[..., :k, :]
    if rtol is not None and S.numel():
        keep = S >= rtol * S[..., :1]
        count = max(int(keep.sum(-1).max()), 1)
        U, S, Vh = U[..., :count], (S * keep)[..., :count], Vh[..., :count, :]
    k = S.shape[-1]
    return SVDResult(U.reshape(*batch_shape, m, k), S.reshape(*batch_shape, k), Vh.reshape(*batch_shape, k, n))


def lapack_svd(a: Tensor):
    """torch.linalg.svd(a, full_matrices=False). On the CPU a wide matrix (m < n) goes in as its
    tall transpose: MKL's gesdd took 1.8-4.2x longer on the wide one on this EPYC (768 x 3072:
    297 against 166 ms in float32, 541 against 297 ms in float64; 1024 x 4096 float32: 2016
    against 482 ms) for the same factorization."""
    if a.device.type == "cpu" and a.shape[-2] < a.shape[-1]:
        U, S, Vh = torch.linalg.svd(a.mT, full_matrices=False)
        return Vh.mT, S, U.mT
    return torch.linalg.svd(a, full_matrices=False)


def _normalize_signs(U: Tensor, S: Tensor, Vh: Tensor):
    """Flip each triplet so the largest-magnitude entry of its left vector is positive."""
    idx = U.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(U, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, S, Vh * sign.transpose(-1, -2)


def jacobi_on_cuda(shape, device) -> bool:
    """Whether the CUDA Jacobi kernel runs matrices of this shape on `device`: the build has
    it and one matrix (in double, with its rotations) fits in a block's shared memory.
    Elsewhere CUDA tensors go to torch's solver (cuSOLVER)."""
    kernels = cuda_kernels.active()
    if not kernels.jacobi or torch.device(device).type != kernels.device_type:
        return False
    from tensorpress.ops.tt_plan import cuda_limits

    return _C.svd_jacobi_cuda_smem_bytes(shape[-2], shape[-1]) <= cuda_limits(device).smem_per_block


def _jacobi(a: Tensor):
    kernels = cuda_kernels.active()
    if a.device.type != "cpu" or kernels.emulated:
        if not jacobi_on_cuda(a.shape, a.device):
            return _normalize_signs(*torch.linalg.svd(a, full_matrices=False))
        a = a.contiguous()
        b, m, n = a.shape
        k = min(m, n)
        U, S, Vh = a.new_empty(b, m, k), a.new_empty(b, k), a.new_empty(b, k, n)
        kernels.module.svd_jacobi_cuda(a, U, S, Vh, JACOBI_TOL[a.dtype], JACOBI_MAX_SWEEPS, kernels.stream(a.device))
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


def _sketch(a: Tensor, ell: int, generator) -> Tensor:
    """A @ omega for a Gaussian omega (n, ell) drawn on the CPU (the generator's device)."""
    b, m, n = a.shape
    omega = torch.randn(b, n, ell, generator=generator, dtype=a.dtype, device="cpu").to(a.device)
    return a @ omega


def _power(a: Tensor, q: Tensor, steps: int) -> Tensor:
    """`steps` subspace iterations q <- orth(A orth(A^T q)) from the orthonormal basis q."""
    for _ in range(steps):
        z, _ = cholesky_qr2(a.mT @ q)
        q, _ = cholesky_qr2(a @ z)
    return q


def _small_svd(x: Tensor):
    """SVD of the small (l, l) Rayleigh-Ritz matrices, by what "auto" picks for them: our
    Jacobi up to JACOBI_MAX_COLUMNS, LAPACK on wider blocks (where it is the faster one)."""
    if svd_method(x.shape, None, "auto", x.device, x.dtype) == "jacobi":
        return _jacobi(x)
    return lapack_svd(x)


def _rayleigh_ritz(a: Tensor, q: Tensor):
    """All l Ritz triplets of A on the orthonormal basis q: q^T A = r^T q2^T with q2
    orthonormal, r^T = ur diag(s) vr^T, U = q ur, V = q2 vr; A^T U = V diag(s) exactly."""
    q2, r = cholesky_qr2(a.mT @ q)
    ur, s, vrh = _small_svd(r.mT.contiguous())
    return q @ ur, s, vrh @ q2.mT


def _randomized(a: Tensor, k: int, n_iter: int, oversample: int, generator):
    """Range finder with power iterations, then the small SVD (unchecked)."""
    b, m, n = a.shape
    ell = min(k + oversample, min(m, n))
    q, _ = cholesky_qr2(_sketch(a, ell, generator))
    U, S, Vh = _rayleigh_ritz(a, _power(a, q, n_iter))
    return _normalize_signs(U[..., :k], S[..., :k], Vh[..., :k, :])


def _residuals(AV: Tensor, U: Tensor, S: Tensor, k: int) -> Tensor:
    """r_i = ||A v_i - s_i u_i|| for the k leading triplets, (b, k), in float64."""
    res = AV[..., :k] - U[..., :k] * S[..., None, :k]
    return torch.linalg.vector_norm(res.to(torch.float64), dim=-2)


def _excess_bound(s: Tensor, r: Tensor) -> Tensor:
    """Bound on sum_i (sigma_i^2 - s_i^2), the rank-k error's excess over the optimum, from
    s_i <= sigma_i <= s_i + r_i / sqrt(2). s, r: (b, k) float64."""
    d = r / math.sqrt(2.0)
    return (2 * s * d + d * d).sum(-1)


def _check_failure(norm2: Tensor, s: Tensor, r: Tensor, tol: CheckTolerance) -> Tensor:
    """Per matrix, how far the triplets are from passing `tol`: the largest ratio of what was
    measured to what is allowed (<= 1: passes). norm2: ||A||_F^2; s, r: (b, k) float64."""
    s1 = s[..., :1]
    value = (r / (tol.value * s + tol.floor * s1).clamp_min(torch.finfo(torch.float64).tiny)).amax(-1)
    excess = _excess_bound(s, r)
    # the optimum is at least what remains of ||A||_F^2 after the kept values and the excess
    optimal2 = (norm2 - (s * s).sum(-1) - excess).clamp_min(0)
    allowed = ((1 + tol.frobenius) ** 2 - 1) * optimal2 + math.sqrt(2.0) * tol.floor * s1[..., 0] * s.sum(-1)
    frob = excess / allowed.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.maximum(value, frob)


def _predicted_steps(failure: Tensor, s_all: Tensor, k: int) -> Tensor:
    """Power iterations still needed per matrix, if each shrinks the slowest kept residual by
    (sigma_{l+1} / sigma_k)^2, estimated by the Ritz values (s_l / s_k)^2; inf where no
    convergence is in sight. The estimate is optimistic before convergence (s_l is then well
    below sigma_l), hence the margin."""
    ratio = (s_all[..., -1] / s_all[..., k - 1].clamp_min(torch.finfo(s_all.dtype).tiny)).to(torch.float64)
    rate = -2 * torch.log(ratio.clamp(max=1.0))  # log reduction per iteration, >= 0
    need = CHECKED_STEP_MARGIN * torch.log(failure.clamp_min(1.0)) / rate
    return torch.ceil(torch.nan_to_num(need, nan=0.0, posinf=math.inf))


def _checked_block(m: int, n: int, k: int) -> int:
    return min(max(2 * k, k + DEFAULT_OVERSAMPLE), min(m, n))


def checked_step_budget(m: int, n: int, k: int, dtype: torch.dtype) -> float:
    """The power iterations (a Ritz extraction and check counting as one) the checked method
    may spend on an m x n matrix at rank k: CHECKED_TIME_FRACTION of a full SVD's time by the
    cost model of LAPACK_COST_IN_STEPS."""
    ell, p, q = _checked_block(m, n, k), min(m, n), max(m, n)
    lapack = 4 * q * p * p + 8 * p**3
    step = 4 * m * n * ell + 8 * (m + n) * ell * ell
    return CHECKED_TIME_FRACTION * LAPACK_COST_IN_STEPS.get(dtype, LAPACK_COST_IN_STEPS[torch.float64]) * lapack / step


def _lapack_truncated(a: Tensor, k: int):
    U, S, Vh = lapack_svd(a)
    return U[..., :k], S[..., :k], Vh[..., :k, :]


def _randomized_checked(a: Tensor, k: int, generator):
    """The randomized SVD with the a-posteriori check of `CHECK_TOLERANCE`: power iterations
    continue while the check predicts a pass within `checked_step_budget`; the matrices that do
    not pass are redone by LAPACK."""
    b, m, n = a.shape
    tol = CHECK_TOLERANCE[a.dtype]
    budget = checked_step_budget(m, n, k, a.dtype)
    norm2 = torch.linalg.vector_norm(a, dim=(-2, -1), dtype=torch.float64) ** 2
    U, S, Vh = a.new_empty(b, m, k), a.new_empty(b, k), a.new_empty(b, k, n)
    work, idx = a, torch.arange(b, device=a.device)  # the matrices still iterating
    exact = []  # indices of those LAPACK redoes
    q, _ = cholesky_qr2(_sketch(a, _checked_block(m, n, k), generator))
    spent, steps = 0, CHECKED_FIRST_ITERATIONS
    for check in range(CHECKED_MAX_CHECKS):
        q = _power(work, q, steps)
        Ur, Sr, Vhr = _rayleigh_ritz(work, q)
        AV = work @ Vhr.mT
        spent += steps + 1
        failure = _check_failure(norm2[idx], Sr[:, :k].to(torch.float64), _residuals(AV, Ur, Sr, k), tol)
        passed = failure <= 1
        U[idx[passed]], S[idx[passed]], Vh[idx[passed]] = Ur[passed, :, :k], Sr[passed, :k], Vhr[passed, :k, :]
        # A V is one power iteration ahead of q: a round of `need` iterations and a check
        # costs need - 1 more iterations and the check
        need = _predicted_steps(failure, Sr, k)
        going = ~passed & (spent + need <= budget) & (check + 1 < CHECKED_MAX_CHECKS)
        exact.append(idx[~passed & ~going])
        if not going.any():
            break
        if not going.all():
            idx, work = idx[going], work[going]
        q, _ = cholesky_qr2(AV[going])
        steps = int(need[going].max().item()) - 1
    rest = torch.cat(exact)
    if rest.numel():
        U[rest], S[rest], Vh[rest] = _lapack_truncated(a[rest], k)
    return _normalize_signs(U, S, Vh)
