"""tensorpress.linalg.blas: GEMM and triangular solves on the extension's OpenBLAS, against
float64 torch references, with torch's own call wherever ours does not apply."""

from __future__ import annotations

import pytest
import torch

from _util import rel_err
from tensorpress.linalg import blas

TOL = {torch.float32: 1e-5, torch.float64: 1e-13}


def _matrix(rows, cols, dtype, transposed, gen):
    """A (rows x cols) matrix, stored row-major or as the transpose of a row-major one."""
    if transposed:
        return torch.randn(cols, rows, generator=gen, dtype=torch.float64).to(dtype).T
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("m,k,n", [(300, 70, 90), (40, 90, 500), (257, 129, 3)])  # tall, wide, ragged panels
def test_addmm_matches_float64(dtype, ta, tb, m, k, n):
    gen = torch.Generator().manual_seed(m + k + n)
    a, b = _matrix(m, k, dtype, ta, gen), _matrix(k, n, dtype, tb, gen)
    c = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
    before = [t.clone() for t in (a, b, c)]
    out = blas.addmm(c, a, b, beta=0.5, alpha=-2.0)
    ref = 0.5 * c.double() - 2.0 * a.double() @ b.double()
    assert out.dtype == dtype and out.is_contiguous()
    assert rel_err(out, ref) <= TOL[dtype]
    assert rel_err(blas.mm(a, b), a.double() @ b.double()) <= TOL[dtype]
    assert all(torch.equal(t, u) for t, u in zip((a, b, c), before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("transposed_factor", [False, True])
def test_solve_triangular_matches_float64(dtype, left, transposed_factor):
    gen = torch.Generator().manual_seed(3)
    n, rhs = 200, 150
    G = torch.randn(n, n, generator=gen, dtype=torch.float64)
    L = torch.linalg.cholesky(G @ G.T / n + torch.eye(n, dtype=torch.float64)).to(dtype)
    A, upper = (L.mT, True) if transposed_factor else (L, False)
    B = torch.randn(n, rhs, generator=gen, dtype=torch.float64).to(dtype)
    B = B if left else B.T.contiguous()
    before = B.clone()
    X = blas.solve_triangular(A, B, upper=upper, left=left)
    ref = torch.linalg.solve_triangular(A.double(), B.double(), upper=upper, left=left)
    assert rel_err(X, ref) <= 50 * TOL[dtype]
    assert torch.equal(B, before)


def test_thread_count_does_not_change_the_result():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(512, 300, generator=gen), torch.randn(300, 400, generator=gen)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(blas.mm(a, b))
    finally:
        torch.set_num_threads(threads)
    for o in outs[1:]:
        assert rel_err(o, outs[0]) <= 1e-6


def test_falls_back_to_torch_where_ours_does_not_apply(monkeypatch):
    from tensorpress.linalg import blas as mod

    def refuse(*args, **kwargs):
        raise AssertionError("our GEMM was called")

    monkeypatch.setattr(mod._C, "blas_gemm", refuse)
    monkeypatch.setattr(mod._C, "blas_trsm", refuse)
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(200, 100, generator=gen), torch.randn(100, 150, generator=gen)
    # autograd wanted: torch's op, and the gradient flows
    a_g = a.clone().requires_grad_(True)
    blas.mm(a_g, b).sum().backward()
    assert a_g.grad is not None
    # other dtypes, tiny products
    assert blas.mm(a.half(), b.half()).dtype == torch.float16
    assert torch.allclose(blas.mm(a[:4, :4], b[:4, :4]), a[:4, :4] @ b[:4, :4])
    L = torch.eye(100) * 2
    assert torch.allclose(blas.solve_triangular(L.requires_grad_(True), b, upper=False), b / 2)


def test_mismatched_shapes_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="a, b: expected a"):
        blas.mm(torch.randn(300, 200), torch.randn(201, 300))
    with pytest.raises(ValueError, match="out: expected shape"):
        from tensorpress._ext import _C

        _C.blas_gemm(torch.randn(300, 200), torch.randn(200, 100), torch.empty(300, 99), False, False, 1.0, 0.0, 2)
    with pytest.raises(ValueError, match="b: expected dtype float64"):
        from tensorpress._ext import _C

        _C.blas_gemm(
            torch.randn(3, 2, dtype=torch.float64),
            torch.randn(2, 1),
            torch.empty(3, 1, dtype=torch.float64),
            False,
            False,
            1.0,
            0.0,
            1,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_c", [False, True])
def test_baddbmm_matches_float64_with_an_expanded_matrix_and_addend(dtype, with_c):
    """The 1x1-conv shape: one weight expanded over the batch, a bias broadcast as the addend."""
    gen = torch.Generator().manual_seed(6)
    n, out, c, hw = 3, 70, 90, 130
    w = torch.randn(out, c, generator=gen, dtype=torch.float64).to(dtype)
    x = torch.randn(n, c, hw, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(out, generator=gen, dtype=torch.float64).to(dtype)
    addend = bias.view(1, out, 1).expand(n, out, hw) if with_c else None
    y = blas.baddbmm(addend, w.expand(n, out, c), x)
    ref = w.double() @ x.double() + (bias.double().view(1, out, 1) if with_c else 0)
    assert y.shape == (n, out, hw) and rel_err(y, ref) <= TOL[dtype]
    # an empty batch, and autograd, go to torch
    assert blas.baddbmm(None, w.expand(0, out, c), x[:0]).shape == (0, out, hw)
    xg = x.clone().requires_grad_(True)
    blas.baddbmm(addend, w.expand(n, out, c), xg).sum().backward()
    assert xg.grad is not None


def _operands(gen):
    a = torch.randn(200, 100, generator=gen, dtype=torch.float64)
    b = torch.randn(100, 150, generator=gen, dtype=torch.float64)
    return a, b


def test_traced_products_are_recorded_not_computed_once():
    """Under torch.jit.trace without autograd the extension would record nothing: the traced
    graph would return uninitialised memory on the next input."""
    gen = torch.Generator().manual_seed(7)
    a, b = _operands(gen)
    w = torch.randn(3, 70, 90, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 90, 130, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        mm = torch.jit.trace(blas.mm, (a, b), check_trace=False)
        bmm = torch.jit.trace(lambda u, v: blas.baddbmm(None, u, v), (w, x), check_trace=False)
        solve = torch.jit.trace(
            lambda u, v: blas.solve_triangular(u, v, upper=False),
            (torch.eye(200, dtype=torch.float64) * 2, a),
            check_trace=False,
        )
    a2, b2 = _operands(gen)
    assert rel_err(mm(a2, b2), a2 @ b2) < 1e-13
    assert rel_err(bmm(w * 2, x), (w * 2) @ x) < 1e-13
    L = torch.eye(200, dtype=torch.float64) * 4
    assert rel_err(solve(L, a2), a2 / 4) < 1e-13


def test_vmap_and_forward_mode_ad_go_to_torch():
    gen = torch.Generator().manual_seed(8)
    a, b = _operands(gen)
    stack = torch.stack([b, 2 * b])
    with torch.no_grad():
        assert rel_err(torch.func.vmap(lambda v: blas.mm(a, v))(stack), a @ stack) < 1e-13
        w = torch.randn(2, 3, 70, 90, generator=gen, dtype=torch.float64)
        x = torch.randn(2, 3, 90, 130, generator=gen, dtype=torch.float64)
        assert rel_err(torch.func.vmap(lambda u, v: blas.baddbmm(None, u, v))(w, x), w @ x) < 1e-13
    tangent = torch.randn(100, 150, generator=gen, dtype=torch.float64)
    with torch.no_grad(), torch.autograd.forward_ad.dual_level():
        out = blas.mm(a, torch.autograd.forward_ad.make_dual(b, tangent))
        got = torch.autograd.forward_ad.unpack_dual(out).tangent
    assert got is not None and rel_err(got, a @ tangent) < 1e-13


def test_autocast_casts_as_for_torch_mm():
    gen = torch.Generator().manual_seed(9)
    a, b = (t.float() for t in _operands(gen))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = blas.mm(a, b), torch.mm(a, b)
        batched = blas.baddbmm(None, a.expand(2, 200, 100), b.expand(2, 100, 150))
    assert out.dtype == want.dtype == batched.dtype == torch.bfloat16
    assert rel_err(out, a.double() @ b.double()) < 2e-2


def test_addend_of_another_dtype_is_refused_as_by_torch():
    gen = torch.Generator().manual_seed(10)
    a, b = _operands(gen)
    c = torch.zeros(200, 150, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="dtype|scalar type"):
        torch.addmm(c, a, b)
    with pytest.raises(RuntimeError, match="dtype|scalar type"):
        blas.addmm(c, a, b)
