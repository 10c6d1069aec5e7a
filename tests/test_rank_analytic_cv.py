"""The k-fold CV error predicted in closed form (criterion "analytic_cv", select_rank's default)."""

import math

import numpy as np
import pytest
import torch

from _util import planted_matrix
from tensorpress.rank import estimated_cv_error, estimated_test_error, layer_optimism, select_layer_rank, select_rank
from tensorpress.rank.layer import layer_cv_error
from tensorpress.rank.regressors import matrix_degrees_of_freedom


def kfold_cv_error(X, Y, k, gen):
    """The k-fold CV mean squared error of least squares (no intercept), per response entry."""
    n = X.shape[0]
    folds = torch.tensor_split(torch.randperm(n, generator=gen), k)
    total = 0.0
    for j, test in enumerate(folds):
        train = torch.cat([f for i, f in enumerate(folds) if i != j])
        beta = torch.linalg.lstsq(X[train], Y[train]).solution
        total += float(((Y[test] - X[test] @ beta) ** 2).sum())
    return total / Y.numel()


@pytest.mark.parametrize("k", [2, pytest.param(5, marks=pytest.mark.slow)])
def test_exact_in_expectation_for_least_squares(k):
    # Gaussian random design, p free parameters: E[CV_k] = sigma^2 (m - 1)/(m - p - 1), m = n (k-1)/k,
    # and RSS/(n - p) is unbiased for sigma^2, so the estimate's mean is E[CV_k]
    n, p, sigma2, reps = 60, 10, 2.0, 600
    g = torch.Generator().manual_seed(k)
    est, cv, err = [], [], []
    for _ in range(reps):
        X = torch.randn(n, p, generator=g, dtype=torch.float64)
        y = X @ torch.ones(p, dtype=torch.float64) + math.sqrt(sigma2) * torch.randn(
            n, generator=g, dtype=torch.float64
        )
        beta = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
        rss = float(((y - X @ beta) ** 2).sum())
        est.append(estimated_cv_error(rss, n, p, k))
        err.append(estimated_test_error(rss, n, p))
        cv.append(kfold_cv_error(X, y[:, None], k, g))
    m = n * (k - 1) / k
    truth = sigma2 * (m - 1) / (m - p - 1)
    se = np.std(est) / math.sqrt(reps)
    assert abs(np.mean(est) - truth) < 4 * se
    assert abs(np.mean(cv) - truth) < 4 * np.std(cv) / math.sqrt(reps)
    # the test error of the fit on all n samples is a different (smaller) quantity
    assert np.mean(err) < truth - 4 * se


def test_limits_and_infinities():
    rss, n, df = 50.0, 100, 20
    # more folds -> fits on nearly all the data -> the estimated test error of the full fit
    assert estimated_cv_error(rss, n, df, 10_000) == pytest.approx(estimated_test_error(rss, n, df), rel=1e-3)
    assert estimated_cv_error(rss, n, df, 2) > estimated_cv_error(rss, n, df, 5) > estimated_cv_error(rss, n, df, 10)
    assert estimated_cv_error(rss, n, 79, 5) == math.inf  # m = 80, df >= m - 1
    assert math.isfinite(estimated_cv_error(rss, n, 78, 5))
    assert estimated_cv_error(rss, n, 33.5, 5) > 0  # a float (Stein) df


@pytest.mark.parametrize("bad", [1, 0, 2.0, True, None])
def test_bad_folds_rejected(bad):
    with pytest.raises(ValueError, match="k: expected an int >= 2"):
        estimated_cv_error(1.0, 10, 2, bad)
    with pytest.raises(ValueError, match="k: expected an int >= 2"):
        layer_cv_error(1.0, 10, 3, 2, 6, bad)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_rule_column_and_choice(seed):
    R, p = 3, 10
    X, y = planted_matrix(p, R, 6 * matrix_degrees_of_freedom(R, p, p), 5.0, seed)
    sel = select_rank("lowrank", X, y, range(1, 6), random_state=seed, with_cv=True)
    assert sel.criterion == "analytic_cv"
    n = X.shape[0]
    for row in sel.table:
        assert row["est_cv_error"] == pytest.approx(estimated_cv_error(row["train_error"] * n, n, row["df_eff"], 5))
        # predicted and measured 5-fold CV errors agree where the rank is supported
        if row["rank"] >= R:
            assert row["est_cv_error"] == pytest.approx(row["cv_error"], rel=0.15)
    assert sel.scores_ == sel.column("est_cv_error")
    assert sel.rank_ == R
    assert sel.rank_ == sel.candidates[int(np.argmin(sel.column("cv_error")))]  # the same pick as 5-fold CV


def test_folds_argument_is_the_k():
    X, y = planted_matrix(8, 2, 300, 2.0, 0)
    s5 = select_rank("lowrank", X, y, [1, 2, 3], random_state=0)
    s2 = select_rank("lowrank", X, y, [1, 2, 3], cv=2, random_state=0)
    assert all(a < b for a, b in zip(s5.column("est_cv_error"), s2.column("est_cv_error")))
    assert s5.cv is None  # no CV was run
    assert "est_cv_error" in str(s5)


def test_smaller_model_at_few_samples():
    # n = 1.6 df of the true rank: a fold's fit has 1.28 df samples; the predicted CV error
    # penalizes rank 3 more than the full-sample test error does (as 5-fold CV does)
    R, p = 3, 10
    X, y = planted_matrix(p, R, int(1.6 * matrix_degrees_of_freedom(R, p, p)), 1.0, 3)
    sel = select_rank("lowrank", X, y, range(1, 5), random_state=3)
    te, cv = sel.column("est_test_error"), sel.column("est_cv_error")
    assert all(c > t for c, t in zip(cv, te))
    assert cv[2] / cv[0] > te[2] / te[0]


def test_layer_cv_error_matches_full_fit_in_the_limit():
    rss, n, q, p, df = 40.0, 200, 6, 12, 72
    full = rss / (n * q) + layer_optimism(rss, n, q, p, df)
    assert layer_cv_error(rss, n, q, p, df, 100_000) == pytest.approx(full, rel=1e-3)
    low = rss / (n * q) + layer_optimism(rss, n, q, p, 30, rank=2, df_eff=33.0)
    assert layer_cv_error(rss, n, q, p, 30, 100_000, rank=2, df_eff=33.0) == pytest.approx(low, rel=1e-3)
    assert layer_cv_error(rss, n, q, p, df, 5) > full
    assert layer_cv_error(rss, 14, q, p, df, 2) == math.inf  # m = 7 <= p + 1


@pytest.mark.slow
def test_layer_least_squares_exact_in_expectation():
    # unstructured multi-response least squares (rank None, df = p q): E[CV_k] per entry
    # = sigma^2 (m - 1)/(m - p - 1)
    n, p, q, reps, k = 50, 8, 3, 400, 5
    g = torch.Generator().manual_seed(7)
    est, cv = [], []
    for _ in range(reps):
        X = torch.randn(n, p, generator=g, dtype=torch.float64)
        Y = X @ torch.randn(p, q, generator=g, dtype=torch.float64) + torch.randn(
            n, q, generator=g, dtype=torch.float64
        )
        rss = float(((Y - X @ torch.linalg.lstsq(X, Y).solution) ** 2).sum())
        est.append(layer_cv_error(rss, n, q, p, p * q, k))
        cv.append(kfold_cv_error(X, Y, k, g))
    m = n * (k - 1) / k
    assert abs(np.mean(est) - (m - 1) / (m - p - 1)) < 4 * np.std(est) / math.sqrt(reps)
    assert abs(np.mean(est) - np.mean(cv)) < 4 * math.hypot(np.std(est), np.std(cv)) / math.sqrt(reps)


def test_layer_criterion():
    g = torch.Generator().manual_seed(0)
    p, q, n, r = 20, 16, 400, 3
    W = torch.randn(q, r, generator=g, dtype=torch.float64) @ torch.randn(r, p, generator=g, dtype=torch.float64)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    Y = X @ W.T + 0.3 * torch.randn(n, q, generator=g, dtype=torch.float64)
    X0, Y0 = X.clone(), Y.clone()
    sel = select_layer_rank(W, X, outputs=Y, candidates=[1, 2, 3, 5, 8], criterion="analytic_cv", random_state=0)
    assert sel.criterion == "analytic_cv" and sel.rank_ == r
    assert sel.scores_ == sel.column("est_cv_error")
    assert all(c > t for c, t in zip(sel.column("est_cv_error"), sel.column("est_test_error")))
    assert torch.equal(X, X0) and torch.equal(Y, Y0)
