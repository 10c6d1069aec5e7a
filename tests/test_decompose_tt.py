"""TT-SVD and TT-matrix SVD."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _util import rel_err
from tensorpress.decompose import TTResult, tt_matrix_svd, tt_svd
from tensorpress.ops import tt_to_dense


def tt_full(cores):
    """The full tensor (p_1, ..., p_d) from cores (r_{k-1}, p_k, r_k)."""
    out = cores[0]
    for c in cores[1:]:
        out = torch.tensordot(out, c, dims=([out.dim() - 1], [0]))
    return out.squeeze(0).squeeze(-1)


def decaying_tensor(shape, decay, seed):
    """A tensor whose unfoldings have decaying spectra: a sum of rank-1 terms with weights decay^k."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.zeros(shape, dtype=torch.float64)
    for k in range(40):
        term = torch.ones(())
        for p in shape:
            term = (
                torch.tensordot(term.unsqueeze(-1), torch.randn(1, p, generator=gen, dtype=torch.float64), dims=1)
                if term.dim()
                else torch.randn(p, generator=gen, dtype=torch.float64)
            )
        t += decay**k * term
    return t + 1e-3 * torch.randn(shape, generator=gen, dtype=torch.float64)


def test_exact_at_full_rank():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64)
    res = tt_svd(t, max_rank=10_000)
    assert isinstance(res, TTResult)
    assert len(res.cores) == 4
    full = tt_full(res.cores)
    assert full.shape == t.shape
    assert rel_err(full, t) < 1e-12
    assert res.rel_error < 1e-12
    # full TT ranks of a generic 3x4x5x6 tensor
    assert res.ranks == (3, 12, 6)
    for k, c in enumerate(res.cores):
        assert c.shape == ((1, *res.ranks)[k], t.shape[k], (*res.ranks, 1)[k])
        assert c.dtype == torch.float64
    # rel_error=0 keeps everything too
    res0 = tt_svd(t, rel_error=0.0)
    assert rel_err(tt_full(res0.cores), t) < 1e-12


def test_left_cores_orthonormal():
    t = torch.randn(4, 5, 6, dtype=torch.float64)
    res = tt_svd(t, rel_error=0.1)
    for c in res.cores[:-1]:
        u = c.reshape(-1, c.shape[-1])
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("eps", [0.5, 0.3, 0.1, 0.03, 0.01, 1e-3, 1e-5])
@pytest.mark.parametrize("shape", [(6, 7, 8), (4, 5, 4, 5), (3, 3, 3, 3, 3)])
def test_rel_error_bound_and_reported_error(eps, shape):
    t = decaying_tensor(shape, 0.7, seed=sum(shape))
    res = tt_svd(t, rel_error=eps)
    actual = rel_err(tt_full(res.cores), t)
    assert actual <= eps * (1 + 1e-10), (actual, eps, res.ranks)
    assert res.rel_error == pytest.approx(actual, rel=1e-6, abs=1e-13)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    eps=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**16),
    use_cap=st.booleans(),
    cap=st.integers(1, 8),
)
def test_random_tensors(shape, eps, seed, use_cap, cap):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    res = tt_svd(t, rel_error=eps, max_rank=cap if use_cap else None)
    full = tt_full(res.cores)
    actual = rel_err(full, t)
    assert full.shape == t.shape
    assert len(res.ranks) == len(shape) - 1
    if use_cap:
        assert all(r <= cap for r in res.ranks)
    else:
        assert actual <= eps * (1 + 1e-10) + 1e-12
    assert res.rel_error == pytest.approx(actual, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("max_rank", [1, 2, 3, (1, 5, 2), [4, 4, 1]])
def test_max_rank_respected(max_rank):
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(4, 5, 6, 3, generator=gen, dtype=torch.float64)
    res = tt_svd(t, max_rank=max_rank)
    caps = (max_rank,) * 3 if isinstance(max_rank, int) else tuple(max_rank)
    assert all(r <= c for r, c in zip(res.ranks, caps))
    for k, c in enumerate(res.cores):
        assert c.shape == ((1, *res.ranks)[k], t.shape[k], (*res.ranks, 1)[k])
    actual = rel_err(tt_full(res.cores), t)
    assert res.rel_error == pytest.approx(actual, rel=1e-6)
    # with a tolerance as well, the cap still binds
    res2 = tt_svd(t, max_rank=max_rank, rel_error=1e-8)
    assert all(r <= c for r, c in zip(res2.ranks, caps))


def test_rank_one_tensor_recovered_with_rank_one():
    a, b, c = (
        torch.randn(4, dtype=torch.float64),
        torch.randn(5, dtype=torch.float64),
        torch.randn(6, dtype=torch.float64),
    )
    t = torch.einsum("i,j,k->ijk", a, b, c)
    res = tt_svd(t, rel_error=1e-10)
    assert res.ranks == (1, 1)
    assert rel_err(tt_full(res.cores), t) < 1e-12


def test_float32_input_keeps_dtype_and_input_unmodified():
    t = torch.randn(4, 5, 6)
    before = t.clone()
    res = tt_svd(t, rel_error=0.05)
    assert all(c.dtype == torch.float32 for c in res.cores)
    assert torch.equal(t, before)
    assert rel_err(tt_full(res.cores), t) <= 0.05 + 1e-6


def test_zero_tensor():
    res = tt_svd(torch.zeros(3, 4, 5, dtype=torch.float64), rel_error=0.1)
    assert res.rel_error == 0.0
    assert torch.count_nonzero(tt_full(res.cores)) == 0


def test_one_dimensional_tensor():
    t = torch.randn(7, dtype=torch.float64)
    res = tt_svd(t, max_rank=3)
    assert res.ranks == ()
    assert rel_err(tt_full(res.cores), t) < 1e-15


# ----------------------------------------------------------------------------- TT-matrix
def test_tt_matrix_svd_exact_and_truncated():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(24, 60, generator=gen, dtype=torch.float64)
    res = tt_matrix_svd(w, (2, 3, 4), (3, 4, 5), max_rank=10_000)
    assert [tuple(c.shape) for c in res.cores] == [(1, 2, 3, 6), (6, 3, 4, 20), (20, 4, 5, 1)]
    assert rel_err(tt_to_dense(res.cores), w) < 1e-12
    for eps in (0.5, 0.2, 0.05):
        res = tt_matrix_svd(w, (2, 3, 4), (3, 4, 5), rel_error=eps)
        actual = rel_err(tt_to_dense(res.cores), w)
        assert actual <= eps * (1 + 1e-10)
        assert res.rel_error == pytest.approx(actual, rel=1e-6)
    res = tt_matrix_svd(w, (2, 3, 4), (3, 4, 5), max_rank=2)
    assert all(r <= 2 for r in res.ranks)


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "kw,exc,pattern",
    [
        ({}, ValueError, r"max_rank.*rel_error"),
        ({"max_rank": 0}, ValueError, r"^max_rank: "),
        ({"max_rank": -2}, ValueError, r"^max_rank: "),
        ({"max_rank": [2, 2]}, ValueError, r"^max_rank: "),  # 3 bonds
        ({"max_rank": [2, 2, 0]}, ValueError, r"^max_rank: "),
        ({"max_rank": [2, 2.5, 2]}, ValueError, r"^max_rank: "),
        ({"max_rank": 2.0}, (TypeError, ValueError), r"^max_rank: "),
        ({"max_rank": None, "rel_error": -0.1}, ValueError, r"^rel_error: "),
        ({"rel_error": 1.0}, ValueError, r"^rel_error: "),
        ({"rel_error": float("nan")}, ValueError, r"^rel_error: "),
        ({"rel_error": 3}, ValueError, r"^rel_error: "),
        ({"rel_error": "0.1"}, (TypeError, ValueError), r"^rel_error: "),
    ],
)
def test_bad_args(kw, exc, pattern):
    t = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    before = t.clone()
    with pytest.raises(exc, match=pattern):
        tt_svd(t, **kw)
    assert torch.equal(t, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor(bad):
    t = torch.randn(3, 4, 5, dtype=torch.float64)
    t[1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"^tensor: .*finite"):
        tt_svd(t, max_rank=2)


@pytest.mark.parametrize(
    "t", [torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 4, dtype=torch.bool), [[1.0, 2.0]], torch.tensor(3.0)]
)
def test_bad_tensor(t):
    with pytest.raises((TypeError, ValueError), match=r"^tensor: "):
        tt_svd(t, max_rank=2)
