"""Analytic optimism of a low-rank regression fit, and the information criteria beside it.

Our derivation (the formulas of Shi, Chi & Luo, "Asymptotic Optimism for Tensor Regression
Models ...", were not at hand; what follows is ours, checked by simulation in
tests/test_rank.py and benchmarks/rank_selection.py):

* Model: y = <B, X> + eps, X with i.i.d. N(0, 1) entries, eps ~ N(0, sigma^2), n samples.
* Least squares with p free parameters under this Gaussian random design: the training error
  has E[RSS/n] = sigma^2 (n - p)/n and the test error at a new X has
  E[err] = sigma^2 (1 + p/(n - p - 1)) (the mean of an inverse Wishart), so the expected
  optimism, test minus training error, is exactly sigma^2 (p/n + p/(n - p - 1)).
* A rank-R model at or above the true rank is, near its fit, a least-squares fit on a
  smooth manifold of dimension df_R (CP: R(sum_d p_d - D + 1); Tucker: prod R_d +
  sum_d R_d(p_d - R_d); matrix: R(p + q - R)), so asymptotically p -> df_R.
  Below the true rank the omitted part ||B - B_R||_F^2 acts as extra noise (for Gaussian X,
  <B - B_R, X> is independent Gaussian noise), so sigma^2 -> sigma^2 + ||B - B_R||^2.
* Both cases are covered by plugging in sigma_hat^2_R = RSS_R / (n - df_R):

      Opt_hat(R) = sigma_hat^2_R (df_R/n + df_R/(n - df_R - 1)),
      Err_hat(R) = RSS_R/n + Opt_hat(R) = sigma_hat^2_R (n - 1)/(n - df_R - 1).

  Opt_hat alone penalizes the rank far more steeply than Err_hat, which is what decides
  which of the two agrees with cross-validation (see `select_rank`).
* Above the rank the data support, the manifold df undercounts: extra components fitted to
  the noise lower RSS_R by far more than df_R/n sigma^2, and train error + optimism with the
  manifold df over-selected CP/Tucker ranks. `select_rank` therefore plugs in the effective
  (Stein divergence) df of the fit, `tensorpress.rank.stein.stein_degrees_of_freedom`, which
  equals df_R at well-determined fits and grows above the true rank (df may be a float here).
  Diagnosis (ours, benchmarks/rank_selection.py and tests/test_rank.py): of the suspects, the
  df was the cause. With the manifold df, on 10x10x10 CP/Tucker of true rank 2 (n = 4 df,
  SNR 10) train error + optimism picked rank 3 or 4 in every seed while 5-fold CV picked 2;
  Stein's df at rank 3 was 100-140 against a manifold 84, and about 56 (= manifold) at rank 2.
  Non-converged ALS fits (n_iter_max = 30) made it worse (the over-ranked RSS still falling or
  non-monotone): the benchmark now uses n_iter_max = 100, and fits that are not local minima
  are charged extra df (see `tensorpress.rank.stein`). sigma_hat^2 is estimated at each rank
  (RSS_R / (n - df_eff,R)), not from the largest candidate: below the true rank the omitted
  part must count as noise, and the largest candidate's fit is the least reliable. The
  criterion: "test_error" (train error + optimism) estimates the test error of the fit on all
  the data; "test_error_1se" picks from those estimates by the one-standard-error rule (see
  `tensorpress.rank.select.one_standard_error_choice`); the default, "analytic_cv", estimates
  what k-fold CV measures (below); "optimism" alone ranks (sigma^2 + omitted part) x df, which under-selects at low
  SNR (it chose rank 1 in all our SNR-1 trials).
* What k-fold cross-validation estimates is not the test error of the fit on all n samples
  but that of fits on m = n (k - 1)/k samples, E[CV_k] = sigma^2 (m - 1)/(m - p - 1) for least
  squares under the same random design (exact in expectation; tests/test_rank_analytic_cv.py
  checks it by simulation). `estimated_cv_error` plugs in sigma_hat^2_R and df_eff,R: the k-fold
  CV error predicted in closed form from the one fit on all the data (criterion "analytic_cv"
  of `select_rank`, its default). Its penalty on df is steeper than Err_hat's, which at few
  samples per parameter also makes up for the df a divergence does not see (the "search" df
  of a non-convex fit, `tensorpress.rank.stein`): on the synthetic grid of
  benchmarks/rank_selection.py it picks ranks that predict better than both Err_hat's minimum
  and 5-fold CV itself, and agrees with 5-fold CV more often than the best-predicting rank does.
* AIC = n log(RSS/n) + 2 df, BIC = n log(RSS/n) + df log n (Gaussian likelihood, sigma
  profiled out).

All functions return inf where df >= n - 1 (the formulas have no finite value there).
"""

from __future__ import annotations

import math

from tensorpress._validate import is_int

__all__ = ["noise_variance", "optimism", "estimated_test_error", "estimated_cv_error", "aic", "bic"]


def _check(rss, n, df):
    if not is_int(n) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    if isinstance(df, bool) or not isinstance(df, (int, float)) or not df >= 0 or not math.isfinite(df):
        raise ValueError(f"df: expected a finite number >= 0 (an int, or a float effective df), got {df!r}")
    if isinstance(rss, bool) or not isinstance(rss, (int, float)) or not rss >= 0 or not math.isfinite(rss):
        raise ValueError(f"rss: expected a finite number >= 0, got {rss!r}")


def noise_variance(rss: float, n: int, df: float) -> float:
    """sigma_hat^2 = RSS / (n - df) (inf when df >= n)."""
    _check(rss, n, df)
    return rss / (n - df) if df < n else math.inf


def optimism(rss: float, n: int, df: float) -> float:
    """Opt_hat = sigma_hat^2 (df/n + df/(n - df - 1)) with sigma_hat^2 = RSS/(n - df): the
    estimated expected test error minus training error of a fit with df free parameters."""
    _check(rss, n, df)
    if df >= n - 1:
        return math.inf
    return noise_variance(rss, n, df) * (df / n + df / (n - df - 1))


def estimated_test_error(rss: float, n: int, df: float) -> float:
    """RSS/n + Opt_hat = sigma_hat^2 (n - 1)/(n - df - 1): the estimated mean squared error
    of the fit on new data."""
    _check(rss, n, df)
    if df >= n - 1:
        return math.inf
    return rss / n + optimism(rss, n, df)


def estimated_cv_error(rss: float, n: int, df: float, k: int) -> float:
    """sigma_hat^2 (m - 1)/(m - df - 1) with m = n (k - 1)/k training samples per fold: the
    expected k-fold cross-validation error of the model, predicted from its fit on all n samples
    (sigma_hat^2 = RSS/(n - df)); inf where df >= m - 1 (no finite value: a fold's fit would
    interpolate)."""
    _check(rss, n, df)
    if not is_int(k) or k < 2:
        raise ValueError(f"k: expected an int >= 2 (the folds), got {k!r}")
    m = n * (k - 1) / k
    if df >= m - 1:
        return math.inf
    return noise_variance(rss, n, df) * (m - 1) / (m - df - 1)


def aic(rss: float, n: int, df: float) -> float:
    """n log(RSS/n) + 2 df (Gaussian errors, variance profiled out)."""
    _check(rss, n, df)
    return n * math.log(max(rss / n, 1e-300)) + 2 * df


def bic(rss: float, n: int, df: float) -> float:
    """n log(RSS/n) + df log n."""
    _check(rss, n, df)
    return n * math.log(max(rss / n, 1e-300)) + df * math.log(n)
