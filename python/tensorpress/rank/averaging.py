"""Model averaging over ranks: the predictions of low-rank regressors fitted at several ranks,
combined with weights from their estimated test errors, instead of one selected rank.

What Shi, Chi & Luo ("Asymptotic Optimism for Tensor Regression Models with Applications to
Neural Network Compression", arXiv:2603.26048) state: their optimism-based rank-selection rule
"extends naturally to tensor-model averaging". Their averaging formula was not at hand (only the
abstract and summaries were; the same holds for their optimism formulas, see
`tensorpress.rank.optimism`), so the weights below are ours, built on standard rules:

* weighting="exp" (default): exponential weights on the optimism-corrected error of each rank,

      w_R  proportional to  exp(-n (Err_hat(R) - min_R' Err_hat(R')) / (T sigma_hat^2)),

  Err_hat(R) = the predicted k-fold CV error (criterion="analytic_cv", the default, as in
  select_rank) or train error + estimated optimism (criterion="test_error",
  `tensorpress.rank.optimism.estimated_test_error`), with the effective (Stein) df of each fit,
  and sigma_hat^2 = RSS/(n - df_eff) of the best-scoring rank.
  n Err_hat / sigma^2 is, up to a constant, Mallows' C_p, which to first order equals AIC, so
  temperature T = 2 gives Akaike weights exp(-Delta AIC / 2) (Buckland, Burnham & Augustin 1997);
  T = 4 is the temperature of the exponential-weighting aggregate's oracle inequality for
  projection estimators under Gaussian noise with a fixed design (Leung & Barron 2006; Dalalyan
  & Tsybakov 2007). Departures: our fits are non-linear (ALS on a manifold) and the design is
  random, so neither guarantee applies; sigma^2 is estimated, not known; the df is Stein's
  divergence of the fit (`tensorpress.rank.stein`). As T -> 0 the weights concentrate on the
  selected rank (select_rank with the same criterion; the default criterion is select_rank's
  default, so the limit is the project's default selection). "test_error" is the estimate for the
  very fit that is averaged, but the Stein df undercounts over-ranked non-convex fits
  (`tensorpress.rank.optimism`), and its weights inherit that: on
  benchmarks/results/rank_averaging.md they predict worse than analytic_cv's (column exp_te; a
  first run of that benchmark is why the default is analytic_cv, not test_error).
* weighting="stacking": Breiman's stacked regression (Breiman 1996, "Stacked regressions"):
  weights w >= 0 with sum(w) = 1 minimizing ||y - P w||^2, P the k-fold out-of-fold predictions
  of each rank (the same folds select_rank's CV uses), then applied to the fits on all the data.
  Costs the k fits per rank of CV selection. Breiman constrains w >= 0 only; we also require
  sum(w) = 1 (a convex combination, as the exponential weights are).

Measured (benchmarks/results/rank_averaging.md: exact test errors over the best single rank's, on
105 synthetic trials of the grid of benchmarks/rank_selection.py and 6 of its image task): the
exponential weights are nearly one-hot (n Delta Err_hat / sigma^2 is large between ranks), so "exp"
predicts about as well as the rank select_rank picks (synthetic 1.026 vs 1.026; images 0.997 vs
1.002), not better; stacking predicts better than selecting by analytic_cv or by 5-fold CV in
78 / 80 of 105 synthetic trials (worse in 26 / 24) and in 6 of 6 image trials, on average better
than the best single rank (0.985; images 0.966), at the cost of the k fits per rank of CV.

The averaged coefficient tensor sum_R w_R B_R generally has rank up to sum_R R (not low rank):
for compression, averaging keeps every member's parameters. Prediction is the weighted average
of the members' predictions (the members are kept, `estimators_`).

    avg = AveragedRegressor("cp", candidates=range(1, 6)).fit(X, y)
    avg.weights_, avg.predict(X_new), avg.selection_.table
    w = optimism_weights(select_rank("cp", X, y, range(1, 6)))       # weights from a selection
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from tensorpress._validate import is_int
from tensorpress.rank.estimator import EstimatorParams
from tensorpress.rank.regressors import as_generator, check_fit_settings, check_Xy
from tensorpress.rank.select import (
    DF_RULES,
    FAMILIES,
    RankSelection,
    check_candidates,
    kfold_indices,
    make_estimator,
    select_rank,
)

__all__ = [
    "AveragedRegressor",
    "WEIGHTINGS",
    "AVERAGING_CRITERIA",
    "exponential_weights",
    "optimism_weights",
    "simplex_least_squares",
    "out_of_fold_predictions",
]

WEIGHTINGS = ("exp", "stacking")
# the estimated error each rank's exponential weight is computed from, and its table column
AVERAGING_CRITERIA = {"test_error": "est_test_error", "analytic_cv": "est_cv_error"}


def _check_temperature(temperature):
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    return float(temperature)


def exponential_weights(scores: Sequence, n: int, sigma2: float, temperature: float = 2.0) -> np.ndarray:
    """w_k = exp(-n (s_k - s_min) / (temperature sigma2)) / sum_j (same), for estimated errors s_k.

    Non-finite or None scores (a rank with df >= n - 1) get weight 0; sigma2 = 0 (an exact fit)
    puts equal weight on the minimizers. Computed relative to s_min, so no overflow.
    """
    if isinstance(scores, (str, bytes)) or not isinstance(scores, (Sequence, np.ndarray)) or len(scores) == 0:
        raise ValueError(f"scores: expected a non-empty sequence of numbers, got {scores!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    if isinstance(sigma2, bool) or not isinstance(sigma2, (int, float)) or not (math.isfinite(sigma2) and sigma2 >= 0):
        raise ValueError(f"sigma2: expected a finite number >= 0, got {sigma2!r}")
    temperature = _check_temperature(temperature)
    s = np.array([np.nan if v is None else float(v) for v in scores], dtype=np.float64)
    finite = np.isfinite(s)
    if not finite.any():
        raise ValueError("scores: expected at least one finite score, got none")
    gap = np.where(finite, s - s[finite].min(), np.inf)
    if sigma2 == 0:
        w = (gap == 0).astype(np.float64)
    else:
        w = np.exp(-float(n) * gap / (temperature * float(sigma2)))
    return w / w.sum()


def optimism_weights(selection: RankSelection, criterion: str = "analytic_cv", temperature: float = 2.0) -> np.ndarray:
    """Exponential weights (see the module docstring) from a `select_rank` result: its estimated
    errors per candidate (criterion "analytic_cv": the predicted k-fold CV error; "test_error":
    train error + optimism) and sigma_hat^2 = RSS/(n - df_eff) of the best-scoring candidate."""
    if not isinstance(selection, RankSelection):
        raise TypeError(f"selection: expected a RankSelection (from select_rank), got {type(selection).__name__}")
    if criterion not in AVERAGING_CRITERIA:
        raise ValueError(f"criterion: expected one of {tuple(AVERAGING_CRITERIA)}, got {criterion!r}")
    temperature = _check_temperature(temperature)
    scores = selection.column(AVERAGING_CRITERIA[criterion])
    vals = [math.inf if v is None or not math.isfinite(v) else float(v) for v in scores]
    if not any(math.isfinite(v) for v in vals):
        raise ValueError(f"selection: no candidate has a finite {AVERAGING_CRITERIA[criterion]}")
    best = min(range(len(vals)), key=lambda i: (vals[i], selection.table[i]["df"]))
    sigma2 = float(selection.table[best]["sigma2"])
    return exponential_weights(vals, selection.n_samples, sigma2 if math.isfinite(sigma2) else 0.0, temperature)


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w >= 0, sum w = 1} (the sort-based algorithm, Held, Wolfe &
    Crowder 1974; Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.arange(1, v.size + 1)
    rho = np.nonzero(u - css / k > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def _support_solution(G: np.ndarray, b: np.ndarray, support: np.ndarray) -> np.ndarray | None:
    """The exact minimizer on the simplex when its support is `support` (the KKT system of
    min w'Gw - 2b'w s.t. sum w = 1 on the support), or None if it does not satisfy the KKT
    conditions of the whole problem (a negative weight, or a zero weight that should grow)."""
    S = np.nonzero(support)[0]
    k = S.size
    A = np.zeros((k + 1, k + 1))
    A[:k, :k] = G[np.ix_(S, S)]
    A[:k, k] = A[k, :k] = 1.0
    rhs = np.append(b[S], 1.0)
    sol = np.linalg.lstsq(A, rhs, rcond=None)[0]
    if not np.allclose(A @ sol, rhs, rtol=1e-10, atol=1e-12 * max(1.0, float(np.abs(rhs).max()))):
        return None
    w = np.zeros(G.shape[0])
    w[S] = sol[:k]
    if (w[S] < 0).any():
        return None
    grad = G @ w - b  # on the support it equals -sol[k]; off it, it must not be smaller
    scale = max(float(np.abs(G).max()), float(np.abs(b).max()), 1e-300)
    if (grad[~support] < -sol[k] - 1e-10 * scale).any():
        return None
    return w


def simplex_least_squares(P, y, tol: float = 1e-12, max_iter: int = 20_000) -> np.ndarray:
    """argmin ||y - P w||^2 over w >= 0, sum(w) = 1 (the stacking weights), in float64.

    Accelerated projected gradient (FISTA with adaptive restarts) on the K x K normal equations
    finds the support of the solution; every 10 iterations the exact minimizer on the current
    support is solved from its KKT system and returned once it satisfies the KKT conditions of
    the whole problem. Otherwise stops when an iteration moves w by less than tol (max-norm).
    P: (n, K) predictions of K models, y: (n,).
    """
    Pm = np.asarray(P.detach().cpu().numpy() if isinstance(P, Tensor) else P, dtype=np.float64)
    yv = np.asarray(y.detach().cpu().numpy() if isinstance(y, Tensor) else y, dtype=np.float64)
    if Pm.ndim != 2 or Pm.shape[1] < 1 or Pm.shape[0] < 1:
        raise ValueError(f"P: expected a (n, K) matrix with n, K >= 1, got shape {Pm.shape}")
    if yv.shape != (Pm.shape[0],):
        raise ValueError(f"y: expected shape ({Pm.shape[0]},) to match P's rows, got {yv.shape}")
    if not (np.isfinite(Pm).all() and np.isfinite(yv).all()):
        raise ValueError("P, y: expected finite values, found NaN or Inf")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol: expected a number > 0, got {tol!r}")
    if not is_int(max_iter) or max_iter < 1:
        raise ValueError(f"max_iter: expected an int >= 1, got {max_iter!r}")
    K = Pm.shape[1]
    G, b = Pm.T @ Pm, Pm.T @ yv
    L = float(np.linalg.eigvalsh(G)[-1])
    w = np.full(K, 1.0 / K)
    if K == 1 or L <= 0:
        return w
    z, t = w.copy(), 1.0

    def objective(v):
        return float(v @ G @ v - 2 * b @ v)

    f_prev = objective(w)
    for it in range(1, max_iter + 1):
        w_new = _project_simplex(z - (G @ z - b) / L)
        f_new = objective(w_new)
        # adaptive restart (O'Donoghue & Candes 2015) keeps the descent monotone; the slack keeps a
        # rounding-level rise at the minimum from restarting forever
        if f_new > f_prev + 1e-14 * abs(f_prev):
            z, t = w.copy(), 1.0
            continue
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = w_new + (t - 1) / t_new * (w_new - w)
        step = float(np.abs(w_new - w).max())
        w, t, f_prev = w_new, t_new, f_new
        if it % 10 == 0:
            exact = _support_solution(G, b, w > 1e-12)
            if exact is not None:
                return exact
        if step <= tol:
            break
    return w


def out_of_fold_predictions(
    model_family, X, y, candidates, cv: int = 5, random_state: int = 0, **estimator_kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """k-fold out-of-fold predictions of each candidate rank.

    The folds are select_rank's (`kfold_indices` with the same seed), so fold_errors matches
    select_rank(..., criterion="cv", random_state=random_state)'s cv_error column (its mean over folds).
    Returns (P (n, K): the prediction for sample i of the candidate-k fit that did not see i,
    fold_errors (K, cv): held-out MSE per candidate and fold)."""
    if isinstance(model_family, str) and model_family not in FAMILIES:
        raise ValueError(f"model_family: expected one of {sorted(FAMILIES)} or a callable, got {model_family!r}")
    if not isinstance(model_family, str) and not callable(model_family):
        raise TypeError(f"model_family: expected a string or a callable, got {type(model_family).__name__}")
    if not is_int(cv) or cv < 2:
        raise ValueError(f"cv: expected an int >= 2, got {cv!r}")
    if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)):
        raise ValueError(f"random_state: expected an int, got {random_state!r}")
    Xt, yt = check_Xy(X, y, min_modes=2 if model_family in ("lowrank", "matrix") else 1)
    n = int(Xt.shape[0])
    if cv > n:
        raise ValueError(f"cv: expected at most n = {n} folds, got {cv}")
    cands = check_candidates(model_family, candidates, tuple(Xt.shape[1:]))
    folds = kfold_indices(n, cv, as_generator(int(random_state)))
    P = np.zeros((n, len(cands)))
    errs = np.zeros((len(cands), cv))
    for j, rank in enumerate(cands):
        for k, test in enumerate(folds):
            train = torch.cat([f for i, f in enumerate(folds) if i != k])
            est = make_estimator(model_family, rank, dict(estimator_kwargs, random_state=int(random_state)))
            est.fit(Xt[train], yt[train])
            pred = torch.as_tensor(est.predict(Xt[test]), dtype=torch.float64)
            P[test.numpy(), j] = pred.cpu().numpy()
            errs[j, k] = float(((yt[test] - pred) ** 2).mean())
    return P, errs


class AveragedRegressor(EstimatorParams):
    """The average of low-rank regressors fitted at every candidate rank, weighted by their
    estimated test errors (weighting="exp") or by stacking (weighting="stacking"); see the module
    docstring for the rules and where they depart from the literature.

    Args:
        family: "cp", "tucker", "lowrank" (alias "matrix"), or a callable rank -> estimator (as
           select_rank takes).
        candidates: the ranks to average over (ints; for "tucker" also per-mode tuples).
        weighting: "exp" (exponential weights on the estimated error) or "stacking".
        criterion: the estimated error the exponential weights use: "analytic_cv" (default, as
           select_rank's: the predicted k-fold CV error) or "test_error" (train error + optimism,
           the estimate for the fit on all n samples). With "stacking" it only sets which rank
           `selected_rank_` reports.
        temperature: T > 0 of the exponential weights (2: Akaike weights; smaller -> selection).
        cv: folds of "stacking" and the k of "analytic_cv", an int >= 2.
        df_rule: the df the optimism charges, as select_rank's ("stein", "manifold", "bootstrap").
        ridge, n_iter_max, tol, init, fit_intercept: passed to every member (see CPRegressor).
        random_state: None or an int: the members' seed and the folds.
    Fitted attributes: weights_ (K,), candidates_, estimators_ (fits on all the data, one per
        candidate), selection_ (the RankSelection: the per-rank table), selected_rank_ (the rank
        select_rank picks with `criterion`), coef_ (sum_k w_k B_k), intercept_, n_features_in_,
        n_samples_, oof_predictions_ ((n, K), stacking only).
    """

    def __init__(
        self,
        family="cp",
        candidates=(1, 2, 3, 4),
        weighting="exp",
        criterion="analytic_cv",
        temperature=2.0,
        cv=5,
        df_rule="stein",
        ridge=0.0,
        n_iter_max=200,
        tol=1e-8,
        init="moment",
        fit_intercept=False,
        random_state=None,
    ):
        self.family = family
        self.candidates = candidates
        self.weighting = weighting
        self.criterion = criterion
        self.temperature = temperature
        self.cv = cv
        self.df_rule = df_rule
        self.ridge = ridge
        self.n_iter_max = n_iter_max
        self.tol = tol
        self.init = init
        self.fit_intercept = fit_intercept
        self.random_state = random_state

    def _estimator_kwargs(self) -> dict:
        return {
            "ridge": self.ridge,
            "n_iter_max": self.n_iter_max,
            "tol": self.tol,
            "init": self.init,
            "fit_intercept": self.fit_intercept,
        }

    def _validate_params(self):
        if isinstance(self.family, str):
            if self.family not in FAMILIES:
                raise ValueError(f"family: expected one of {sorted(FAMILIES)} or a callable, got {self.family!r}")
        elif not callable(self.family):
            raise TypeError(f"family: expected a string or a callable rank -> estimator, got {self.family!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.criterion not in AVERAGING_CRITERIA:
            raise ValueError(f"criterion: expected one of {tuple(AVERAGING_CRITERIA)}, got {self.criterion!r}")
        _check_temperature(self.temperature)
        if not is_int(self.cv) or self.cv < 2:
            raise ValueError(f"cv: expected an int >= 2, got {self.cv!r}")
        if self.df_rule not in DF_RULES:
            raise ValueError(f"df_rule: expected one of {DF_RULES}, got {self.df_rule!r}")
        check_fit_settings(self.ridge, self.n_iter_max, self.tol, self.init)
        if not isinstance(self.fit_intercept, bool):
            raise ValueError(f"fit_intercept: expected a bool, got {self.fit_intercept!r}")
        rs = self.random_state
        if rs is not None and (isinstance(rs, bool) or not isinstance(rs, (int, np.integer))):
            raise ValueError(f"random_state: expected None or an int, got {rs!r}")

    def fit(self, X, y):
        """Fit one member per candidate on all the data, then the weights. Returns self."""
        self._validate_params()
        Xt, yt = check_Xy(X, y, min_modes=2 if self.family in ("lowrank", "matrix") else 1)
        # checked before any fit (select_rank checks them too, but only after its argument checks)
        check_candidates(self.family, self.candidates, tuple(Xt.shape[1:]))
        if self.cv > Xt.shape[0]:
            raise ValueError(f"cv: expected at most n = {Xt.shape[0]} folds, got {self.cv}")
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if self.random_state is None else int(self.random_state)
        sel = select_rank(
            self.family,
            Xt,
            yt,
            self.candidates,
            criterion=self.criterion,
            cv=self.cv,
            random_state=seed,
            df_rule=self.df_rule,
            **self._estimator_kwargs(),
        )
        if self.weighting == "exp":
            w = optimism_weights(sel, self.criterion, self.temperature)
        else:
            P, _ = out_of_fold_predictions(
                self.family, Xt, yt, sel.candidates, cv=self.cv, random_state=seed, **self._estimator_kwargs()
            )
            self.oof_predictions_ = P
            w = simplex_least_squares(P, yt)
        self.weights_ = w
        self.candidates_ = list(sel.candidates)
        self.estimators_ = list(sel.estimators_)
        self.selection_ = sel
        self.selected_rank_ = sel.rank_
        members = [e for e in self.estimators_ if hasattr(e, "coef_")]
        if len(members) == len(self.estimators_):
            self.coef_ = sum(float(wk) * e.coef_ for wk, e in zip(w, members))
            self.intercept_ = float(sum(float(wk) * float(getattr(e, "intercept_", 0.0)) for wk, e in zip(w, members)))
        self.n_features_in_ = tuple(Xt.shape[1:])
        self.n_samples_ = int(Xt.shape[0])
        return self

    def _check_fitted(self):
        if not hasattr(self, "weights_"):
            raise RuntimeError(f"{type(self).__name__}: call fit(X, y) before predict/score")

    def predict(self, X):
        """sum_k w_k (prediction of member k); numpy in, numpy out; tensor in, tensor out."""
        self._check_fitted()
        Xt = check_Xy(X, min_modes=len(self.n_features_in_))
        if tuple(Xt.shape[1:]) != self.n_features_in_:
            raise ValueError(
                f"X: expected samples of shape {self.n_features_in_} (as in fit), got {tuple(Xt.shape[1:])}"
            )
        out = torch.zeros(Xt.shape[0], dtype=torch.float64, device=Xt.device)
        for wk, est in zip(self.weights_, self.estimators_):
            if wk > 0:  # members of weight 0 (an infinite estimated error) do not contribute
                out = out + float(wk) * torch.as_tensor(est.predict(Xt), dtype=torch.float64, device=Xt.device)
        if isinstance(X, Tensor):
            return out.to(X.dtype if X.is_floating_point() else torch.float64)
        return out.cpu().numpy()

    def score(self, X, y):
        """Coefficient of determination R^2 of the averaged prediction."""
        self._check_fitted()
        Xt, yt = check_Xy(X, y, min_modes=len(self.n_features_in_))
        pred = torch.as_tensor(self.predict(Xt), dtype=torch.float64)
        ss_res = float(((yt - pred) ** 2).sum())
        ss_tot = float(((yt - yt.mean()) ** 2).sum())
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
