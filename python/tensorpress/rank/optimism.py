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
* AIC = n log(RSS/n) + 2 df, BIC = n log(RSS/n) + df log n (Gaussian likelihood, sigma
  profiled out).

All functions return inf where df >= n - 1 (the formulas have no finite value there).
"""
from __future__ import annotations

import math

__all__ = ["noise_variance", "optimism", "estimated_test_error", "aic", "bic"]


def _check(rss, n, df):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    if isinstance(df, bool) or not isinstance(df, int) or df < 0:
        raise ValueError(f"df: expected an int >= 0, got {df!r}")
    if isinstance(rss, bool) or not isinstance(rss, (int, float)) or not rss >= 0 or not math.isfinite(rss):
        raise ValueError(f"rss: expected a finite number >= 0, got {rss!r}")


def noise_variance(rss: float, n: int, df: int) -> float:
    """sigma_hat^2 = RSS / (n - df) (inf when df >= n)."""
    _check(rss, n, df)
    return rss / (n - df) if df < n else math.inf


def optimism(rss: float, n: int, df: int) -> float:
    """Opt_hat = sigma_hat^2 (df/n + df/(n - df - 1)) with sigma_hat^2 = RSS/(n - df): the
    estimated expected test error minus training error of a fit with df free parameters."""
    _check(rss, n, df)
    if df >= n - 1:
        return math.inf
    return noise_variance(rss, n, df) * (df / n + df / (n - df - 1))


def estimated_test_error(rss: float, n: int, df: int) -> float:
    """RSS/n + Opt_hat = sigma_hat^2 (n - 1)/(n - df - 1): the estimated mean squared error
    of the fit on new data."""
    _check(rss, n, df)
    if df >= n - 1:
        return math.inf
    return rss / n + optimism(rss, n, df)


def aic(rss: float, n: int, df: int) -> float:
    """n log(RSS/n) + 2 df (Gaussian errors, variance profiled out)."""
    _check(rss, n, df)
    return n * math.log(max(rss / n, 1e-300)) + 2 * df


def bic(rss: float, n: int, df: int) -> float:
    """n log(RSS/n) + df log n."""
    _check(rss, n, df)
    return n * math.log(max(rss / n, 1e-300)) + df * math.log(n)
