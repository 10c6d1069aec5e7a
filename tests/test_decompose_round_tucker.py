"""TT rounding and Tucker (HOSVD, HOOI) against their guarantees."""

import math

import pytest
import torch

from tensorpress.decompose import hosvd, tt_round, tt_svd, tucker
from tensorpress.ops import tt_to_dense


def full_from_tt(cores):
    out = cores[0]
    for c in cores[1:]:
        out = torch.tensordot(out, c, dims=([-1], [0]))
    return out.squeeze(0).squeeze(-1)


def random_tt(shape, ranks, gen):
    full = (1, *ranks, 1)
    return [torch.randn(full[k], p, full[k + 1], generator=gen, dtype=torch.float64) for k, p in enumerate(shape)]


def test_tt_round_is_exact_when_ranks_are_redundant():
    gen = torch.Generator().manual_seed(0)
    cores = random_tt((4, 5, 6, 3), (3, 4, 3), gen)
    # pad the bonds with redundant directions: same tensor, larger ranks
    padded = [torch.cat([c, c[..., :1] * 0], dim=-1) if k < 3 else c for k, c in enumerate(cores)]
    padded = [torch.cat([c, c[:1] * 0], dim=0) if k > 0 else c for k, c in enumerate(padded)]
    res = tt_round(padded, rel_error=1e-12)
    assert res.ranks == (3, 4, 3)
    assert torch.allclose(full_from_tt(res.cores), full_from_tt(cores), atol=1e-10)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.5])
def test_tt_round_error_bound_and_reported_error(eps):
    gen = torch.Generator().manual_seed(1)
    cores = random_tt((5, 6, 7, 4), (5, 9, 4), gen)
    full = full_from_tt(cores)
    res = tt_round(cores, rel_error=eps)
    err = ((full_from_tt(res.cores) - full).norm() / full.norm()).item()
    assert err <= eps + 1e-12
    assert math.isclose(err, res.rel_error, rel_tol=1e-6, abs_tol=1e-12)
    # rounding a TT-SVD result at the same tolerance finds ranks no larger
    direct = tt_svd(full, rel_error=eps)
    assert all(a <= b + 1 for a, b in zip(res.ranks, direct.ranks))


def test_tt_round_max_rank_and_tt_matrix_cores():
    gen = torch.Generator().manual_seed(2)
    cores = [
        torch.randn(1, 4, 4, 6, generator=gen, dtype=torch.float64),
        torch.randn(6, 4, 4, 6, generator=gen, dtype=torch.float64),
        torch.randn(6, 4, 4, 1, generator=gen, dtype=torch.float64),
    ]
    res = tt_round(cores, max_rank=2)
    assert res.ranks == (2, 2)
    assert [tuple(c.shape) for c in res.cores] == [(1, 4, 4, 2), (2, 4, 4, 2), (2, 4, 4, 1)]
    W, W2 = tt_to_dense(cores), tt_to_dense(res.cores)
    assert math.isclose(((W2 - W).norm() / W.norm()).item(), res.rel_error, rel_tol=1e-6)


def test_tt_round_bad_input():
    with pytest.raises(ValueError, match="cores\\[1\\]: expected r_left"):
        tt_round([torch.randn(1, 3, 2), torch.randn(3, 3, 1)], max_rank=1)
    with pytest.raises(ValueError, match="max_rank, rel_error"):
        tt_round([torch.randn(1, 3, 2), torch.randn(2, 3, 1)])
    with pytest.raises(ValueError, match="finite"):
        tt_round([torch.full((1, 3, 2), float("nan")), torch.randn(2, 3, 1)], max_rank=1)


def low_tucker(shape, ranks, gen, noise=0.0):
    core = torch.randn(*ranks, generator=gen, dtype=torch.float64)
    factors = [torch.linalg.qr(torch.randn(p, r, generator=gen, dtype=torch.float64))[0] for p, r in zip(shape, ranks)]
    t = core
    for mode, f in enumerate(factors):
        t = torch.movedim(torch.tensordot(t, f, dims=([mode], [1])), -1, mode)
    return t + noise * torch.randn(*shape, generator=gen, dtype=torch.float64)


def test_hosvd_exact_for_exact_tucker_rank():
    gen = torch.Generator().manual_seed(3)
    t = low_tucker((8, 9, 10), (2, 3, 4), gen)
    res = hosvd(t, (2, 3, 4))
    assert res.rel_error < 1e-12
    assert torch.allclose(res.to_tensor(), t, atol=1e-10)
    for f in res.factors:
        assert torch.allclose(f.T @ f, torch.eye(f.shape[1], dtype=f.dtype), atol=1e-12)


def test_hooi_improves_on_hosvd_and_reports_true_error():
    gen = torch.Generator().manual_seed(4)
    t = low_tucker((12, 10, 8), (3, 3, 3), gen, noise=0.3)
    start = hosvd(t, 3)
    res = tucker(t, 3, n_iter_max=30, tol=1e-12)
    true_err = ((res.to_tensor() - t).norm() / t.norm()).item()
    assert math.isclose(true_err, res.rel_error, rel_tol=1e-8)
    assert res.rel_error <= start.rel_error + 1e-12
    assert all(b <= a + 1e-12 for a, b in zip(res.history, res.history[1:]))  # monotone fit


def test_tucker_bad_input():
    with pytest.raises(ValueError, match="ranks: expected 3 ints"):
        tucker(torch.randn(3, 4, 5), (2, 2))
    with pytest.raises(ValueError, match="finite"):
        hosvd(torch.full((3, 4), float("inf")), 2)
    with pytest.raises(TypeError, match="tensor: expected a floating-point"):
        hosvd(torch.ones(3, 4, dtype=torch.int64), 2)
