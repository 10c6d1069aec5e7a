"""CP-ALS and over-parameterized CP: planted recovery, fit history, results, bad input."""

import math

import pytest
import torch

from _util import rel_err
from tensorpress.decompose import CPResult, cp_als, cp_overparam, cp_to_tensor


def planted(shape, rank, seed, orthogonal=False):
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(p, rank, generator=gen, dtype=torch.float64) for p in shape]
    if orthogonal:
        factors = [torch.linalg.qr(f)[0] for f in factors]
    return cp_to_tensor(None, factors), factors


def test_cp_to_tensor_matches_outer_products():
    gen = torch.Generator().manual_seed(0)
    f = [torch.randn(p, 2, generator=gen, dtype=torch.float64) for p in (3, 4, 5)]
    w = torch.tensor([2.0, -1.5], dtype=torch.float64)
    ref = sum(w[r] * torch.einsum("i,j,k->ijk", f[0][:, r], f[1][:, r], f[2][:, r]) for r in range(2))
    assert rel_err(cp_to_tensor(w, f), ref) < 1e-14


@pytest.mark.parametrize("shape,rank", [((6, 7, 8), 3), ((5, 6, 4, 5), 3), ((9, 8), 2)])
@pytest.mark.parametrize("init", ["svd", "random"])
def test_cp_als_recovers_planted_tensor(shape, rank, init):
    t, _ = planted(shape, rank, seed=1)
    res = cp_als(t, rank, n_iter_max=500, tol=1e-12, init=init, random_state=0)
    assert isinstance(res, CPResult)
    assert res.rel_error < 1e-6
    assert rel_err(res.to_tensor(), t) == pytest.approx(res.rel_error, abs=1e-9)
    # unit-norm factors, weights non-negative and sorted
    for f in res.factors:
        assert torch.allclose(torch.linalg.vector_norm(f, dim=0), torch.ones(rank, dtype=f.dtype))
    assert (res.weights >= 0).all() and (res.weights[:-1] >= res.weights[1:]).all()
    assert res.history[-1] == res.rel_error and res.n_iter == len(res.history) - 1
    assert res.converged


def test_cp_als_history_is_nonincreasing_and_respects_n_iter_max():
    t, _ = planted((8, 9, 10), 4, seed=2)
    noisy = t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(3), dtype=t.dtype)
    res = cp_als(noisy, 4, n_iter_max=7, tol=0.0, init="random", random_state=1)
    assert res.n_iter == 7 and len(res.history) == 8 and not res.converged
    h = torch.tensor(res.history)
    assert (h[1:] <= h[:-1] + 1e-9).all()  # ALS never increases the error (tiny ridge aside)


def test_cp_als_keeps_dtype_and_accepts_generator_and_warm_start():
    t, factors = planted((5, 6, 7), 2, seed=4)
    res = cp_als(t.float(), 2, random_state=torch.Generator().manual_seed(0))
    assert res.weights.dtype == torch.float32 and res.factors[0].dtype == torch.float32
    warm = cp_als(t, 2, init=factors, n_iter_max=3)
    assert warm.rel_error < 1e-10
    again = cp_als(t, 2, init=warm, n_iter_max=2)
    assert again.rel_error < 1e-10


def test_cp_als_rank_above_dimension_and_zero_tensor():
    t, _ = planted((3, 4, 5), 2, seed=5)
    res = cp_als(t, 6, init="svd", random_state=0, n_iter_max=200)  # rank > p_0: padded start
    assert res.rel_error < 1e-4 and res.rank == 6
    zero = cp_als(torch.zeros(3, 4, 5), 2)
    assert zero.rel_error == 0.0 and torch.all(zero.weights == 0)


def test_cp_als_degenerate_problem_stays_finite():
    # the classic rank-2 approximation of a rank-3 "W-type" tensor has no minimizer: ALS
    # components diverge and cancel; the ridge keeps everything finite
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    outer = lambda x, y, z: torch.einsum("i,j,k->ijk", x, y, z)  # noqa: E731
    t = outer(a, a, b) + outer(a, b, a) + outer(b, a, a)
    res = cp_als(t, 2, n_iter_max=300, init="random", random_state=0)
    assert math.isfinite(res.rel_error) and all(torch.isfinite(f).all() for f in res.factors)
    assert torch.isfinite(res.weights).all()
    assert res.rel_error < 0.5


@pytest.mark.parametrize(
    "shape,rank,orthogonal", [((8, 8, 8), 3, False), ((10, 10, 10), 2, True), ((6, 6, 6, 6), 2, False)]
)
def test_cp_overparam_recovers_planted_tensor(shape, rank, orthogonal):
    t, _ = planted(shape, rank, seed=6, orthogonal=orthogonal)
    res = cp_overparam(t, rank, random_state=0)
    assert res.rel_error < 1e-6 and res.rank == rank
    assert res.n_steps > 0
    assert rel_err(res.to_tensor(), t) == pytest.approx(res.rel_error, abs=1e-9)


def test_cp_overparam_lazy_and_unpolished():
    t, _ = planted((7, 8, 9), 2, seed=7)
    lazy = cp_overparam(t, 2, lazy=True, random_state=0, n_steps=400)
    assert lazy.n_reinit == 0 and math.isfinite(lazy.rel_error)
    raw = cp_overparam(t, 2, polish=False, random_state=0, n_steps=300)
    assert raw.n_iter == 0 and raw.history[-1] == raw.rel_error
    # the fit of the over-parameterized model falls during gradient descent
    assert raw.history[-2] < raw.history[0]


@pytest.mark.slow
def test_cp_overparam_rerandomizes_components_that_do_not_grow():
    t, _ = planted((10, 10, 10), 2, seed=8)
    res = cp_overparam(t, 2, width=12, random_state=0, reinit_every=50, n_steps=400, switch_tol=0.0)
    assert res.n_reinit > 0
    assert res.rel_error < 1e-6


@pytest.mark.parametrize("fn", [cp_als, cp_overparam])
def test_bad_input(fn):
    t = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match="rank"):
        fn(t, 0)
    with pytest.raises(ValueError, match="rank"):
        fn(t, 1.5)
    with pytest.raises(ValueError, match="at least 2 modes"):
        fn(torch.randn(5), 1)
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.ones(3, 4, dtype=torch.int64), 1)
    with pytest.raises(TypeError, match="tensor"):
        fn([[1.0, 2.0]], 1)
    bad = t.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        fn(bad, 1)
    with pytest.raises(ValueError, match="n_iter_max"):
        fn(t, 2, n_iter_max=-1)
    with pytest.raises(TypeError, match="random_state"):
        fn(t, 2, random_state="seed")


def test_bad_input_specific():
    t = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match="init"):
        cp_als(t, 2, init="hosvd")
    with pytest.raises(ValueError, match="init"):
        cp_als(t, 2, init=[torch.randn(3, 2), torch.randn(4, 2)])
    with pytest.raises(ValueError, match="tol"):
        cp_als(t, 2, tol=-1.0)
    with pytest.raises(ValueError, match="width"):
        cp_overparam(t, 3, width=2)
    with pytest.raises(ValueError, match="lr"):
        cp_overparam(t, 2, lr=0.0)


@pytest.mark.parametrize("shape", [(5, 6, 7), (4, 3, 5, 2), (16, 12, 3, 3)])
def test_mttkrp_matches_the_khatri_rao_product(shape):
    """The contraction-ordered MTTKRP equals the textbook Unfold(T) @ KhatriRao(others)."""
    from tensorpress.decompose.cp import _khatri_rao, _mttkrp, _unfold

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    factors = [torch.randn(p, 5, generator=gen, dtype=torch.float64) for p in shape]
    for mode in range(len(shape)):
        reference = _unfold(t, mode) @ _khatri_rao([f for m, f in enumerate(factors) if m != mode])
        torch.testing.assert_close(_mttkrp(t, factors, mode), reference, rtol=1e-12, atol=1e-12)
