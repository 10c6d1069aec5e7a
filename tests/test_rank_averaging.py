"""Model averaging over ranks (tensorpress.rank.averaging): exponential weights on the estimated
test error, stacking, and the sklearn-style AveragedRegressor."""

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.base import clone

from _util import import_benchmark, planted_matrix
from tensorpress.rank import AveragedRegressor, select_rank
from tensorpress.rank.averaging import (
    exponential_weights,
    optimism_weights,
    out_of_fold_predictions,
    simplex_least_squares,
)

ALS = {"n_iter_max": 50, "tol": 1e-8}


@pytest.fixture(scope="module")
def data():
    X, y = planted_matrix(8, 2, 240, 4.0, 0)
    g = torch.Generator().manual_seed(99)
    Xte = torch.randn(100, 8, 8, generator=g, dtype=torch.float64)
    return X, y, Xte


@pytest.fixture(scope="module")
def fitted(data):
    X, y, _ = data
    return AveragedRegressor("lowrank", candidates=[1, 2, 3, 4], random_state=0, **ALS).fit(X, y)


# ----------------------------------------------------------------------------- the weights
def test_exponential_weights_against_float64_reference():
    scores, n, s2, T = [1.30, 1.00, 1.02, math.inf, None], 50, 0.9, 2.0
    w = exponential_weights(scores, n, s2, T)
    ref = [math.exp(-n * (s - 1.00) / (T * s2)) if s is not None and math.isfinite(s) else 0.0 for s in scores]
    ref = np.array(ref) / sum(ref)
    np.testing.assert_allclose(w, ref, rtol=1e-14, atol=0)
    assert w.sum() == pytest.approx(1.0, abs=1e-15) and w[3] == 0 and w[4] == 0
    # a common shift of every score changes nothing; a higher temperature flattens the weights
    np.testing.assert_allclose(exponential_weights([s + 7 for s in [1.3, 1.0, 1.02]], n, s2, T), w[:3], rtol=1e-12)
    w_hot = exponential_weights([1.3, 1.0, 1.02], n, s2, 20.0)
    assert w_hot.max() < w[:3].max() and w_hot.argmax() == 1


def test_a_dominant_score_takes_all_the_weight():
    w = exponential_weights([2.0, 1.0, 3.0], 1000, 0.5)
    assert w[1] == pytest.approx(1.0, abs=1e-12) and w[0] < 1e-12
    # an exact fit (sigma2 = 0): equal weight on the minimizers only
    np.testing.assert_array_equal(exponential_weights([1.0, 0.5, 0.5], 10, 0.0), [0.0, 0.5, 0.5])


def test_optimism_weights_from_a_selection(data):
    X, y, _ = data
    sel = select_rank("lowrank", X, y, [1, 2, 3, 4], criterion="test_error", random_state=0, **ALS)
    w = optimism_weights(sel, "test_error", 2.0)
    est = sel.column("est_test_error")
    best = int(np.argmin(est))
    s2 = sel.table[best]["sigma2"]
    ref = np.array([math.exp(-sel.n_samples * (e - est[best]) / (2.0 * s2)) for e in est])
    np.testing.assert_allclose(w, ref / ref.sum(), rtol=1e-12)
    assert sel.candidates[int(np.argmax(w))] == sel.rank_
    # analytic_cv uses the predicted CV column
    wa = optimism_weights(sel, "analytic_cv", 2.0)
    assert int(np.argmax(wa)) == int(np.argmin(sel.column("est_cv_error")))


# ----------------------------------------------------------------------------- stacking
def _brute_force_simplex_ls(P, y):
    """min ||y - P w||^2 on the simplex: the best feasible equality-constrained solution over all supports."""
    K, best = P.shape[1], (math.inf, None)
    for r in range(1, K + 1):
        for S in itertools.combinations(range(K), r):
            S = list(S)
            A = np.zeros((r + 1, r + 1))
            A[:r, :r] = P[:, S].T @ P[:, S]
            A[:r, r] = A[r, :r] = 1.0
            sol = np.linalg.lstsq(A, np.append(P[:, S].T @ y, 1.0), rcond=None)[0][:r]
            if (sol >= -1e-13).all():
                f = float(((y - P[:, S] @ sol) ** 2).sum())
                if f < best[0]:
                    best = (f, S)
    return best[0]


@pytest.mark.parametrize("seed", range(6))
def test_simplex_least_squares_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    K = 2 + seed % 5
    P = rng.normal(size=(40, K))
    if seed % 2:
        P[:, 1] = P[:, 0]  # two identical models: the minimizer is not unique, the minimum is
    y = P @ rng.dirichlet(np.ones(K)) + rng.normal(size=40) * (0.2 + seed)
    w = simplex_least_squares(P, y)
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-12)
    f = float(((y - P @ w) ** 2).sum())
    assert f == pytest.approx(_brute_force_simplex_ls(P, y), rel=1e-10)


def test_out_of_fold_predictions_use_select_ranks_folds(data):
    X, y, _ = data
    P, errs = out_of_fold_predictions("lowrank", X, y, [1, 2, 3], cv=4, random_state=3, **ALS)
    sel = select_rank("lowrank", X, y, [1, 2, 3], criterion="cv", cv=4, random_state=3, **ALS)
    np.testing.assert_allclose(errs.mean(1), sel.column("cv_error"), rtol=1e-10)
    assert P.shape == (X.shape[0], 3)


# ----------------------------------------------------------------------------- the regressor
def test_prediction_is_the_weighted_average_of_the_members(fitted, data):
    _, _, Xte = data
    w = fitted.weights_
    assert w.shape == (4,) and (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-14)
    # at n = 240, SNR 4 the planted rank's estimate dominates without forcing (0.999 here)
    assert w[1] > 0.9 and fitted.selected_rank_ == 2
    # float64 reference: sum_k w_k <B_k, X_i> from the members' coefficient matrices
    ref = sum(float(wk) * (Xte.flatten(1) @ e.coef_.flatten()) for wk, e in zip(w, fitted.estimators_))
    pred = fitted.predict(Xte)
    assert isinstance(pred, torch.Tensor) and pred.dtype == torch.float64
    torch.testing.assert_close(pred, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred, Xte.flatten(1) @ fitted.coef_.flatten(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fitted.predict(Xte.numpy()), ref.numpy(), rtol=1e-12, atol=1e-12)


def test_reduces_to_the_selected_rank_when_one_estimate_dominates(data):
    X, y, Xte = data
    avg = AveragedRegressor("lowrank", candidates=[1, 2, 3, 4], temperature=1e-6, random_state=0, **ALS).fit(X, y)
    i = avg.candidates_.index(avg.selected_rank_)
    assert avg.weights_[i] == pytest.approx(1.0, abs=1e-12)
    sel = select_rank("lowrank", X, y, [1, 2, 3, 4], random_state=0, **ALS)  # the same (default) criterion
    assert avg.selected_rank_ == sel.rank_ == 2  # the planted rank, at this SNR and n
    torch.testing.assert_close(avg.predict(Xte), sel.estimator_.predict(Xte), rtol=1e-10, atol=1e-10)


def test_stacking_weights_minimize_the_out_of_fold_error(data):
    X, y, _ = data
    avg = AveragedRegressor("lowrank", candidates=[1, 2, 3], weighting="stacking", cv=3, random_state=1, **ALS)
    avg.fit(X, y)
    P = avg.oof_predictions_
    f = float(((y.numpy() - P @ avg.weights_) ** 2).sum())
    assert f == pytest.approx(_brute_force_simplex_ls(P, y.numpy()), rel=1e-10)
    assert avg.weights_.sum() == pytest.approx(1.0, abs=1e-12)


def test_clone_round_trip(fitted, data):
    X, y, Xte = data
    c = clone(fitted)
    assert c.get_params() == fitted.get_params() and not hasattr(c, "weights_")
    c.fit(X, y)
    np.testing.assert_array_equal(c.weights_, fitted.weights_)
    torch.testing.assert_close(c.predict(Xte), fitted.predict(Xte))
    c.set_params(temperature=4.0, candidates=[1, 2])
    assert c.temperature == 4.0 and fitted.temperature == 2.0
    with pytest.raises(ValueError, match="not a parameter"):
        c.set_params(rank=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weighting": "median"}, "weighting"),
        ({"criterion": "aic"}, "criterion"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"cv": 1}, "cv"),
        ({"cv": 1000}, "cv"),
        ({"family": "tt"}, "family"),
        ({"candidates": []}, "candidates"),
        ({"candidates": [0, 1]}, "candidates"),
        ({"candidates": [1, 20]}, "candidates"),
        ({"df_rule": "exact"}, "df_rule"),
        ({"random_state": 1.5}, "random_state"),
        ({"ridge": -1.0}, "ridge"),
    ],
)
def test_bad_arguments_raise_before_any_fit(kwargs, match, data):
    X, y, _ = data
    X0, y0 = X.clone(), y.clone()
    avg = AveragedRegressor(**{"family": "lowrank", "candidates": [1, 2], **kwargs})
    with pytest.raises((ValueError, TypeError), match=match):
        avg.fit(X, y)
    assert not hasattr(avg, "estimators_") and torch.equal(X, X0) and torch.equal(y, y0)


def test_argument_checks_of_the_functions(fitted, data):
    _, _, Xte = data
    with pytest.raises(ValueError, match="scores"):
        exponential_weights([], 10, 1.0)
    with pytest.raises(ValueError, match="scores"):
        exponential_weights([math.inf, None], 10, 1.0)
    with pytest.raises(ValueError, match="sigma2"):
        exponential_weights([1.0], 10, -1.0)
    with pytest.raises(ValueError, match="n:"):
        exponential_weights([1.0], 0, 1.0)
    with pytest.raises(TypeError, match="selection"):
        optimism_weights({"table": []})
    with pytest.raises(ValueError, match="y:"):
        simplex_least_squares(np.ones((5, 2)), np.ones(4))
    with pytest.raises(ValueError, match="finite"):
        simplex_least_squares(np.full((5, 2), np.nan), np.ones(5))
    with pytest.raises(RuntimeError, match="fit"):
        AveragedRegressor().predict(Xte)
    with pytest.raises(ValueError, match="shape"):
        fitted.predict(Xte[:, :4])


def test_benchmark_summary_counts_paired_wins_and_ratios():
    bench = import_benchmark("rank_averaging")
    rules = bench.RULES

    def row(errs, **kw):
        return {"part": "image", "image": "x", "test_error": dict(zip(rules, errs)), "fit_s": 1.0, "cv_s": 4.0} | kw

    # rules: analytic_cv, test_error, cv5, exp, exp_T4, exp_te, stacking, oracle_single, oracle_convex
    trials = [
        row([2.0, 2.0, 2.0, 2.0, 1.0, 3.0, 1.5, 1.0, 0.5]),
        row([1.0, 1.0, 4.0, 1.0, 2.0, 1.0, 0.5, 1.0, 0.5]),
    ]
    assert bench.paired(trials, "stacking", "analytic_cv") == (2, 0, 0)
    assert bench.paired(trials, "exp", "analytic_cv") == (0, 2, 0)
    assert bench.paired(trials, "exp_T4", "cv5") == (2, 0, 0)
    s = bench.summarize(trials)["image"]
    assert s["trials"] == 2 and s["mean_ratio"]["cv5"] == pytest.approx((2.0 + 4.0) / 2)
    assert s["max_ratio"]["stacking"] == pytest.approx(1.5) and s["paired"]["exp_te vs test_error"] == (0, 1, 1)
