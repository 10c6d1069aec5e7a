"""tensorpress.rank: df formulas, low-rank regressors, the optimism rule, CV, result type."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tensorpress.rank import (
    CPRegressor,
    LowRankRegressor,
    RankSelection,
    TuckerRegressor,
    energy_rank,
    estimated_test_error,
    optimism,
    select_rank,
)
from tensorpress.rank.optimism import aic, bic
from tensorpress.rank.regressors import cp_degrees_of_freedom, matrix_degrees_of_freedom, tucker_degrees_of_freedom


@pytest.fixture(autouse=True)
def one_thread(restore_threads):
    # the ALS problems here are tiny: one thread avoids OpenMP start-up and contention
    torch.set_num_threads(1)


def planted_cp(dims, R, n, snr, seed):
    """y = <B, X> + eps, B rank-R CP with ||B||_F = 1, X ~ N(0, 1), Var(eps) = 1/snr."""
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(p, R, generator=g, dtype=torch.float64) for p in dims]
    B = torch.einsum(
        ",".join(f"{chr(97 + d)}r" for d in range(len(dims))) + "->" + "".join(chr(97 + d) for d in range(len(dims))),
        *A,
    )
    B = B / B.norm()
    X = torch.randn(n, *dims, generator=g, dtype=torch.float64)
    y = X.flatten(1) @ B.flatten()
    if snr is not None:
        y = y + torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(snr)
    return X, y, B


def planted_tucker(dims, ranks, n, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(ranks, generator=g, dtype=torch.float64)
    for k, (p, r) in enumerate(zip(dims, ranks)):
        U = torch.linalg.qr(torch.randn(p, r, generator=g, dtype=torch.float64))[0]
        B = torch.movedim(torch.tensordot(B, U, dims=([k], [1])), -1, k)
    B = B / B.norm()
    X = torch.randn(n, *dims, generator=g, dtype=torch.float64)
    return X, X.flatten(1) @ B.flatten(), B


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- df
def test_df_formulas():
    assert cp_degrees_of_freedom(3, (10, 10, 10)) == 3 * (30 - 3 + 1)
    assert cp_degrees_of_freedom(2, (4, 5, 6, 7)) == 2 * (22 - 4 + 1)
    assert cp_degrees_of_freedom(100, (3, 3, 3)) == 27  # capped at the full space
    assert cp_degrees_of_freedom(3, (16, 12)) == 3 * (16 + 12 - 3)  # D = 2: the matrix manifold
    assert matrix_degrees_of_freedom(2, 5, 7) == 2 * (5 + 7 - 2)
    assert matrix_degrees_of_freedom(5, 5, 7) == 35
    assert tucker_degrees_of_freedom((2, 3, 4), (5, 6, 7)) == 24 + 2 * 3 + 3 * 3 + 4 * 3
    assert tucker_degrees_of_freedom(2, (4, 4)) == matrix_degrees_of_freedom(2, 4, 4)
    assert tucker_degrees_of_freedom((5, 6, 7), (5, 6, 7)) == 210
    assert CPRegressor(2, fit_intercept=True).degrees_of_freedom_for((4, 5, 6)) == 2 * 13 + 1


def test_optimism_formulas():
    rss, n, df = 50.0, 100, 10
    s2 = rss / (n - df)
    assert optimism(rss, n, df) == pytest.approx(s2 * (df / n + df / (n - df - 1)))
    assert estimated_test_error(rss, n, df) == pytest.approx(s2 * (n - 1) / (n - df - 1))
    assert aic(rss, n, df) == pytest.approx(n * math.log(rss / n) + 2 * df)
    assert bic(rss, n, df) == pytest.approx(n * math.log(rss / n) + df * math.log(n))
    assert optimism(rss, n, n - 1) == math.inf


def test_optimism_matches_ols_simulation():
    # exact for least squares under Gaussian random design: E[test - train] = s^2 (p/n + p/(n-p-1))
    g = torch.Generator().manual_seed(0)
    n, p, reps, gaps, ests = 60, 12, 300, [], []
    for _ in range(reps):
        X = torch.randn(n + 2000, p, generator=g, dtype=torch.float64)
        y = X @ torch.ones(p, dtype=torch.float64) + torch.randn(n + 2000, generator=g, dtype=torch.float64)
        beta = torch.linalg.lstsq(X[:n], y[:n, None]).solution[:, 0]
        train = float(((y[:n] - X[:n] @ beta) ** 2).mean())
        test = float(((y[n:] - X[n:] @ beta) ** 2).mean())
        gaps.append(test - train)
        ests.append(optimism(train * n, n, p))
    truth = p / n + p / (n - p - 1)
    assert np.mean(gaps) == pytest.approx(truth, rel=0.1)
    assert np.mean(ests) == pytest.approx(truth, rel=0.1)


# ----------------------------------------------------------------------------- regressors
@pytest.mark.parametrize(
    "cls,dims,R", [(CPRegressor, (6, 5, 4), 2), (CPRegressor, (8, 7), 3), (LowRankRegressor, (8, 7), 3)]
)
def test_recovers_planted_cp_noise_free(cls, dims, R):
    X, y, B = planted_cp(dims, R, 200, None, seed=1)
    m = cls(R, tol=1e-12, n_iter_max=500, random_state=0).fit(X, y)
    assert rel(m.coef_, B) < 1e-6
    assert m.score(X, y) > 1 - 1e-10
    assert m.degrees_of_freedom == cp_degrees_of_freedom(R, dims)


def test_recovers_planted_cp_noisy_and_numpy_io():
    X, y, B = planted_cp((10, 8), 2, 400, 20.0, seed=2)
    m = CPRegressor(2, random_state=0).fit(X.numpy(), y.numpy())
    assert rel(m.coef_, B) < 0.15
    pred = m.predict(X.numpy())
    assert isinstance(pred, np.ndarray) and pred.shape == (400,)
    assert isinstance(m.predict(X), torch.Tensor)
    assert m.score(X, y) > 0.9


def test_tucker_recovers_planted_and_intercept():
    X, y, B = planted_tucker((6, 5, 4), (2, 3, 2), 200, seed=3)
    m = TuckerRegressor((2, 3, 2), tol=1e-12, n_iter_max=500).fit(X, y)
    assert rel(m.coef_, B) < 1e-6
    m = TuckerRegressor((2, 3, 2), fit_intercept=True, tol=1e-12, n_iter_max=500).fit(X, y + 3.0)
    assert m.intercept_ == pytest.approx(3.0, abs=1e-6)
    assert rel(m.coef_, B) < 1e-6


def test_ridge_shrinks_and_rss_monotone():
    X, y, _ = planted_cp((6, 6), 2, 80, 2.0, seed=4)
    plain = CPRegressor(2, random_state=0).fit(X, y)
    h = plain.rss_history_
    assert all(b <= a * (1 + 1e-9) for a, b in zip(h, h[1:]))
    shrunk = CPRegressor(2, ridge=50.0, random_state=0).fit(X, y)
    assert shrunk.coef_.norm() < plain.coef_.norm()


# ----------------------------------------------------------------------------- selection
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_test_error_rule_picks_true_matrix_rank(seed):
    R, dims = 3, (10, 10)
    n = 8 * matrix_degrees_of_freedom(R, *dims)
    X, y, _ = planted_cp(dims, R, n, 10.0, seed)
    sel = select_rank("lowrank", X, y, range(1, 6), random_state=seed)
    assert sel.criterion == "analytic_cv"
    assert sel.rank_ == R


@pytest.mark.parametrize("seed", [0, 1])
def test_optimism_rule_picks_true_cp_rank(seed):
    R, dims = 2, (6, 6, 6)
    n = 6 * cp_degrees_of_freedom(R, dims)
    X, y, _ = planted_cp(dims, R, n, 10.0, seed)
    sel = select_rank("cp", X, y, range(1, 5), criterion="optimism", random_state=seed, tol=1e-6)
    assert sel.rank_ == R


def test_cv_path_table_and_plot(tmp_path):
    R, dims = 2, (8, 8)
    X, y, _ = planted_cp(dims, R, 300, 10.0, seed=5)
    sel = select_rank("lowrank", X, y, [1, 2, 3, 4], criterion="cv", cv=4, random_state=0)
    assert isinstance(sel, RankSelection)
    assert sel.rank_ == R and sel.cv == 4
    assert len(sel.table) == 4
    for row, r in zip(sel.table, [1, 2, 3, 4]):
        assert row["rank"] == r
        assert row["df"] == matrix_degrees_of_freedom(r, 8, 8)
        assert row["cv_error"] > 0 and row["cv_std"] >= 0 and row["cv_time"] > 0 and row["fit_time"] > 0
        assert row["est_test_error"] == pytest.approx(row["train_error"] + row["optimism"])
    assert sel.scores_ == sel.column("cv_error")
    assert "cv_error" in str(sel)
    # one full-data fit per candidate, the chosen one among them
    assert [e.rank for e in sel.estimators_] == [1, 2, 3, 4] and sel.estimators_[sel.best_index_] is sel.estimator_
    assert [e.rss_ / 300 for e in sel.estimators_] == pytest.approx(sel.column("train_error"))
    out = sel.plot(tmp_path / "ranks.png")
    data = (tmp_path / "ranks.png").read_bytes()
    assert out.endswith("ranks.png") and len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    # without CV the CV columns are empty, and the plot still works
    sel2 = select_rank("lowrank", X, y, [1, 2, 3], random_state=0)
    assert sel2.table[0]["cv_error"] is None and sel2.cv is None
    sel2.plot(tmp_path / "nocv.png")
    assert (tmp_path / "nocv.png").stat().st_size > 1000


def test_tucker_family_and_callable_family():
    X, y, _ = planted_tucker((5, 5, 4), (2, 2, 2), 150, seed=6)
    y = y + 0.1 * torch.randn(150, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sel = select_rank("tucker", X, y, [1, (2, 2, 2), (3, 3, 3)], criterion="bic", random_state=0)
    assert sel.rank_ == (2, 2, 2)
    sel = select_rank(lambda r, **kw: TuckerRegressor(r, **kw), X, y, [1, 2], criterion="test_error", random_state=0)
    assert sel.rank_ == 2


def test_energy_rank():
    assert energy_rank([3.0, 2.0, 1.0], 0.9) == 2  # 13/14 >= 0.9 > 9/14
    assert energy_rank(torch.tensor([1.0, 3.0, 2.0]), 0.5) == 1
    assert energy_rank([1.0, 1.0, 1.0, 1.0], 1.0) == 4
    assert energy_rank(np.zeros(3), 0.9) == 1


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
    X, y, _ = planted_cp((4, 4), 1, 30, 10.0, seed=0)
    with pytest.raises(ValueError, match="^rank:"):
        CPRegressor(0).fit(X, y)
    with pytest.raises(ValueError, match="^ridge:"):
        CPRegressor(1, ridge=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="^y:"):
        CPRegressor(1).fit(X, y[:-1])
    with pytest.raises(TypeError, match="^X:"):
        CPRegressor(1).fit("abc", y)
    with pytest.raises(ValueError, match="^X:"):
        CPRegressor(1).fit(X.flatten(1)[:, 0], y)
    with pytest.raises(ValueError, match="^ranks:"):
        TuckerRegressor((5, 1)).fit(X, y)
    with pytest.raises(ValueError, match="^X:"):
        LowRankRegressor(1).fit(X[:, :, :, None], y)
    with pytest.raises(RuntimeError, match="fit"):
        CPRegressor(1).predict(X)
    with pytest.raises(ValueError, match="^X:"):
        CPRegressor(1).fit(X, y).predict(X[:, :3])
    with pytest.raises(ValueError, match="^model_family:"):
        select_rank("svd", X, y, [1])
    with pytest.raises(ValueError, match="^criterion:"):
        select_rank("cp", X, y, [1], criterion="gcv")
    with pytest.raises(ValueError, match="^cv:"):
        select_rank("cp", X, y, [1], criterion="cv", cv=1)
    with pytest.raises(ValueError, match="^candidates:"):
        select_rank("cp", X, y, [])
    with pytest.raises(ValueError, match="^candidates:"):
        select_rank("cp", X, y, [0, 1])
    with pytest.raises(ValueError, match="^candidates:"):
        select_rank("tucker", X, y, [(5, 5)])
    with pytest.raises(ValueError, match="^energy:"):
        energy_rank([1.0], 1.5)
    with pytest.raises(ValueError, match="^singular_values:"):
        energy_rank([[1.0]], 0.5)
    with pytest.raises(ValueError, match="^n:"):
        optimism(1.0, 0, 1)
    with pytest.raises(ValueError, match="^df_rule:"):
        select_rank("cp", X, y, [1], df_rule="exact")
    from tensorpress.rank.stein import stein_degrees_of_freedom

    with pytest.raises(TypeError, match="^estimator:"):
        stein_degrees_of_freedom(object(), X, y)
    with pytest.raises(ValueError, match="^X:"):
        stein_degrees_of_freedom(CPRegressor(1).fit(X, y), X[:, :3], y)


# ----------------------------------------------------------------------------- Stein df (the over-selection fix)
def _refit_warm(est, X, y, sweeps=2000):
    """Continue the estimator's ALS from its current factors on new targets (for finite
    differences; a fixed number of sweeps: the RSS stalls before the factors stop moving)."""
    import copy

    m = copy.deepcopy(est)
    for _ in range(sweeps):
        m._sweep(X, y)
    return X.flatten(1) @ m._coef().flatten()


@pytest.mark.parametrize("cls,kind", [(CPRegressor, "cp"), (TuckerRegressor, "tucker")])
def test_stein_sensitivity_matches_finite_differences(cls, kind):
    # an over-ranked fit (rank 3, true rank 2): the closed-form d y_hat / d y (whose trace is
    # df_eff) must match refits on perturbed targets, and df_eff must exceed the manifold df
    from tensorpress.rank.stein import fit_sensitivity, stein_degrees_of_freedom

    dims = (6, 6, 6)
    if kind == "cp":
        X, y, _ = planted_cp(dims, 2, 200, 4.0, seed=7)
    else:
        X, y0, _ = planted_tucker(dims, (2, 2, 2), 200, seed=7)
        y = y0 + 0.5 * torch.randn(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    est = cls(3, n_iter_max=20000, tol=0.0, random_state=0).fit(X, y)
    sweeps = 3 * est.n_iter_  # ample: ALS from the fit converged in n_iter_ sweeps
    yhat = _refit_warm(est, X, y, sweeps)
    z = torch.randn(200, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fd = (_refit_warm(est, X, y + 1e-6 * z, sweeps) - yhat) / 1e-6
    assert rel(fit_sensitivity(est, X, y, z), fd) < 1e-4
    assert stein_degrees_of_freedom(est, X, y) > est.degrees_of_freedom + 4  # 53 vs 48 (CP), 71 vs 54 (Tucker)


def test_stein_df_equals_manifold_df_at_a_well_determined_fit():
    from tensorpress.rank.stein import stein_degrees_of_freedom

    dims = (8, 8, 8)
    X, y, _ = planted_cp(dims, 2, 600, 100.0, seed=8)
    est = CPRegressor(2, tol=1e-12, n_iter_max=500, random_state=0).fit(X, y)
    assert stein_degrees_of_freedom(est, X, y) == pytest.approx(cp_degrees_of_freedom(2, dims), rel=0.02)
    # ALS reports the RSS of its last block update: it must be the RSS of the final model
    assert est.rss_history_[-1] == pytest.approx(est.rss_, rel=1e-9)


@pytest.mark.parametrize("kind", ["cp", "tucker"])
def test_planted_rank_stein_fixes_over_selection(kind):
    # 3-way CP / Tucker of true rank 2, n = 4 df, SNR 10, candidates 1..4 (the benchmark's setting):
    # with the manifold df, train error + optimism over-selected (rank 3 or 4); with the Stein df
    # it must pick the true rank in every seed, as 5-fold CV does
    R, dims = 2, (10, 10, 10)
    picks, manifold_picks = [], []
    for seed in range(4):
        if kind == "cp":
            X, y, _ = planted_cp(dims, R, 4 * cp_degrees_of_freedom(R, dims), 10.0, seed)
        else:
            X, y0, _ = planted_tucker(dims, (R,) * 3, 4 * tucker_degrees_of_freedom(R, dims), seed)
            y = y0 + torch.randn(
                len(y0), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
            ) / math.sqrt(10.0)
        # the plain minimum: the default's one-standard-error choice would hide the manifold df's bias
        kw = dict(random_state=seed, n_iter_max=100, tol=1e-6, criterion="test_error")
        sel = select_rank(kind, X, y, range(1, 5), **kw)
        picks.append(sel.rank_)
        manifold_picks.append(select_rank(kind, X, y, range(1, 5), df_rule="manifold", **kw).rank_)
        assert all(row["df_eff"] >= 0.95 * row["df"] for row in sel.table)
    assert picks == [R] * 4, picks
    assert sum(p > R for p in manifold_picks) >= 2, manifold_picks  # the bug this fixes
