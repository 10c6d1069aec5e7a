"""The parametric-bootstrap covariance penalty (tensorpress.rank.resampling) and its use in
select_rank(df_rule="bootstrap"): exact in expectation for least squares, in agreement with the
closed-form Stein df for CP fits, larger than the manifold df above the true rank."""

import math

import pytest
import torch

from tensorpress.rank import CPRegressor, select_rank
from tensorpress.rank.resampling import covariance_penalty_df
from tensorpress.rank.stein import stein_degrees_of_freedom


class OLS:
    """Ordinary least squares on the flattened samples: df = number of features, exactly."""

    def fit(self, X, y):
        Z = X.flatten(1)
        self.coef_ = torch.linalg.lstsq(Z, y.unsqueeze(1)).solution.squeeze(1)
        self.degrees_of_freedom = Z.shape[1]
        return self

    def predict(self, X):
        return X.flatten(1) @ self.coef_


def planted_cp(p, rank, n, snr, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(p, rank, generator=g, dtype=torch.float64)
    b = torch.randn(p, rank, generator=g, dtype=torch.float64)
    B = a @ b.T
    B /= B.norm()
    X = torch.randn(n, p, p, generator=g, dtype=torch.float64)
    y = X.flatten(1) @ B.flatten() + torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(snr)
    return X, y


def test_least_squares_df_is_the_number_of_parameters():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 3, 4, generator=g, dtype=torch.float64)
    y = torch.randn(60, generator=g, dtype=torch.float64)
    r = covariance_penalty_df(OLS, X, y, n_boot=400, random_state=1)
    # per draw eps^T H eps with H a rank-12 projection: mean 12, sd sqrt(24)
    assert 0 < r.se < 0.5
    assert abs(r.df - 12) < 4 * r.se
    assert r.n_boot == 400 and r.sigma2 > 0


def bootstrap_and_stein(X, y, rank, n_boot, draws_seed):
    """(bootstrap result, Stein df, manifold df) of a CP fit of the given rank on (X, y)."""
    make = lambda: CPRegressor(rank, n_iter_max=100, tol=1e-6, random_state=0)  # noqa: E731
    est = make().fit(X, y)
    r = covariance_penalty_df(make, X, y, fitted=est, n_boot=n_boot, random_state=draws_seed)
    return r, stein_degrees_of_freedom(est, X, y), est.degrees_of_freedom


def test_cp_at_the_true_rank_agrees_with_stein_and_the_manifold():
    X, y = planted_cp(8, 2, 140, 5.0, seed=2)
    r, stein, manifold = bootstrap_and_stein(X, y, rank=2, n_boot=60, draws_seed=3)
    assert manifold == 28
    assert abs(r.df - 28) < 4 * r.se + 1.5
    assert abs(r.df - stein) < 4 * r.se + 1.5


@pytest.mark.slow
def test_cp_above_the_true_rank_pays_for_fitting_noise():
    X, y = planted_cp(8, 1, 100, 1.0, seed=0)
    r, stein, manifold = bootstrap_and_stein(X, y, rank=3, n_boot=100, draws_seed=1)
    assert r.df > manifold + 3 * r.se  # the extra components fitted to noise count more than df
    assert stein > manifold  # the closed form sees it too ...
    assert abs(r.df - stein) < 4 * r.se + 0.1 * stein  # ... by about as much


def test_common_random_numbers_and_determinism():
    X, y = planted_cp(6, 1, 80, 5.0, seed=4)
    make = lambda: CPRegressor(1, random_state=0)  # noqa: E731
    a = covariance_penalty_df(make, X, y, n_boot=10, random_state=7)
    b = covariance_penalty_df(make, X, y, n_boot=10, random_state=7)
    assert a == b
    c = covariance_penalty_df(make, X, y, n_boot=10, random_state=8)
    assert c.df != a.df


def test_select_rank_bootstrap_rule():
    X, y = planted_cp(8, 2, 140, 10.0, seed=1)
    kw = dict(n_iter_max=100, tol=1e-6)
    sel = select_rank("cp", X, y, [1, 2, 3], df_rule="bootstrap", n_boot=10, random_state=5, **kw)
    assert sel.rank_ == 2
    # the df column is the covariance penalty of each rank with the draws of seed + 1
    for rank, row, est in zip(sel.candidates, sel.table, sel.estimators_):
        ref = covariance_penalty_df(
            lambda rank=rank: CPRegressor(rank, random_state=5, **kw), X, y, fitted=est, n_boot=10, random_state=6
        )
        assert row["df_eff"] == pytest.approx(min(max(ref.df, 0.0), 140.0))
        assert row["df_time"] > 0
    again = select_rank("cp", X, y, [1, 2, 3], df_rule="bootstrap", n_boot=10, random_state=5, **kw)
    assert again.column("df_eff") == sel.column("df_eff")


def test_bad_input_is_rejected_before_any_work_and_inputs_are_kept():
    X, y = planted_cp(4, 1, 30, 5.0, seed=0)
    X0, y0 = X.clone(), y.clone()
    calls = []

    def make():
        calls.append(1)
        return CPRegressor(1)

    for bad in (1, 0, True, 2.5):
        with pytest.raises(ValueError, match="n_boot"):
            covariance_penalty_df(make, X, y, n_boot=bad)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="sigma2"):
            covariance_penalty_df(make, X, y, sigma2=bad)
    with pytest.raises(TypeError, match="make_estimator"):
        covariance_penalty_df(CPRegressor(1), X, y)
    with pytest.raises(ValueError, match="n_boot"):
        select_rank("cp", X, y, [1], df_rule="bootstrap", n_boot=1)
    assert not calls
    covariance_penalty_df(make, X, y, n_boot=3, random_state=0)
    assert torch.equal(X, X0) and torch.equal(y, y0)
