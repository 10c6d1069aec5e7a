"""Matrix products and triangular solves on the extension's OpenBLAS (`csrc/core/blas_threaded.h`).

For plain CPU float32 / float64 matrices without autograd: torch's BLAS (MKL) keeps to AVX2 on
AMD processors, where OpenBLAS runs its AVX-512 kernels at about twice the rate (an EPYC Zen 5:
one core 100-107 against 197-228 GFLOP/s). Anything else (autograd, other devices or dtypes,
batched or tiny operands, tracing, torch.compile/export, torch.func transforms, forward-mode AD,
autocast) goes to the torch call of the same meaning. Each function returns a new tensor and
leaves its inputs untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tensorpress._eager import plain_eager
from tensorpress._ext import _C

_DTYPES = (torch.float32, torch.float64)
# below this many multiply-adds torch's dispatch is as quick as the DLPack round trip
MIN_WORK = 1 << 16


def _untracked(*ts: Tensor | None) -> bool:
    """Whether the extension may compute on these tensors without anything losing track of it:
    plain CPU tensors that nothing records or transforms (jit.trace, compile, torch.func,
    forward-mode AD; see tensorpress._eager), no autograd wanted and CPU autocast off (torch's
    op would run in autocast's dtype)."""
    return (
        plain_eager(*ts)
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts))
    )


def _eligible(*ts: Tensor) -> bool:
    """Untracked float32 / float64 matrices of one dtype (an addend's too, as torch requires)."""
    first = ts[0]
    return first.dtype in _DTYPES and all(t.dim() == 2 and t.dtype == first.dtype for t in ts) and _untracked(*ts)


def _stored(t: Tensor) -> tuple[Tensor, bool]:
    """The row-major matrix behind t, and whether t is its transpose."""
    if t.is_contiguous():
        return t.detach(), False
    if t.mT.is_contiguous():
        return t.mT.detach(), True
    return t.detach().contiguous(), False


def addmm(c: Tensor | None, a: Tensor, b: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """beta * c + alpha * a @ b (c None: alpha * a @ b); as torch.addmm."""
    if not (
        _eligible(a, b, *([] if c is None else [c]))
        and a.shape[0] * a.shape[1] * b.shape[1] >= MIN_WORK
        and (c is None or tuple(c.shape) == (a.shape[0], b.shape[1]))
    ):
        if c is None:
            return torch.mm(a, b).mul_(alpha) if alpha != 1.0 else torch.mm(a, b)
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a, b: expected a (m, k) and b (k, n), got {tuple(a.shape)} and {tuple(b.shape)}")
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
    if c is not None and beta != 0.0:
        out.copy_(c)
    else:
        beta = 0.0
    (sa, ta), (sb, tb) = _stored(a), _stored(b)
    _C.blas_gemm(sa, sb, out, ta, tb, float(alpha), float(beta), torch.get_num_threads())
    return out


def mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b; as torch.mm."""
    return addmm(None, a, b)


def solve_triangular(A: Tensor, B: Tensor, upper: bool, left: bool = True) -> Tensor:
    """X with A X = B (left) or X A = B, A triangular; as torch.linalg.solve_triangular."""
    if not (
        _eligible(A, B)
        and B.numel() * A.shape[0] >= MIN_WORK
        and A.shape[0] == A.shape[1]
        and A.shape[0] == (B.shape[0] if left else B.shape[1])
    ):
        return torch.linalg.solve_triangular(A, B, upper=upper, left=left)
    stored, transposed = _stored(A)
    X = B.detach().clone(memory_format=torch.contiguous_format)  # solved in place
    # cblas names the triangle of the stored matrix: a transposed lower factor is upper
    _C.blas_trsm(stored, X, left, upper != transposed, transposed, torch.get_num_threads())
    return X


def baddbmm(c: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """c + a @ b batched over the first dim (c None: a @ b); as torch.baddbmm / torch.bmm. c may
    be broadcast (e.g. a bias expanded over the batch), a may be one matrix expanded."""
    n = a.shape[0] if a.dim() == 3 else 0
    # the whole operands are checked first: under vmap or tracing a[0] is itself recorded
    ok = (
        _untracked(a, b, c)
        and a.dim() == 3
        and b.dim() == 3
        and n > 0
        and b.shape[0] == n
        and a.shape[2] == b.shape[1]
        and _eligible(a[0], b[0], *([] if c is None else [c[0]]))
        and a.shape[1] * a.shape[2] * b.shape[2] >= MIN_WORK
    )
    if not ok:
        return torch.bmm(a, b) if c is None else torch.baddbmm(c, a, b)
    out = torch.empty(n, a.shape[1], b.shape[2], dtype=a.dtype)
    beta = 0.0
    if c is not None:
        out.copy_(c)
        beta = 1.0
    threads = torch.get_num_threads()
    for i in range(n):
        (sa, ta), (sb, tb) = _stored(a[i]), _stored(b[i])
        _C.blas_gemm(sa, sb, out[i], ta, tb, 1.0, beta, threads)
    return out
