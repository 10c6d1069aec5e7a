"""A resampling check of the analytic optimism: the parametric-bootstrap covariance penalty.

Efron ("The estimation of prediction error: covariance penalties and cross-validation", JASA
2004): for y = mu + eps with eps ~ N(0, sigma^2 I), the in-sample optimism of any fitting
procedure is 2/n sum_i cov(y_hat_i, y_i), and df = sum_i cov(y_hat_i, y_i) / sigma^2 is its
degrees of freedom. The parametric bootstrap estimates it by re-running the whole procedure
(initialization and ALS included) on y* = mu_hat + sigma_hat eps*:

    df_boot = 1/sigma_hat^2 * 1/(B - 1) sum_b sum_i (y_hat*_bi - mean_b y_hat*_i) eps*_bi sigma_hat.

It needs no derivative and no local-minimum assumption, so it checks the closed-form Stein
divergence of `tensorpress.rank.stein` (a first-order, at-the-fit quantity) where that is
least safe: above the true rank, at few samples per parameter, at low SNR. Plugged into the same
random-design formula (`tensorpress.rank.optimism`) it gives a resampling estimate of the
optimism and of the test error. It costs B refits per rank (B = 20 by default: about 4x the
time of 5-fold CV), which is why the analytic rule is the default and this is the check.

Where mu_hat and sigma_hat come from is our choice: mu_hat is the rank-R fit itself (so the
refits start from data the rank-R model represents exactly and what they fit beyond it is
noise) and sigma_hat^2 = RSS_R / (n - df_R) with the manifold df unless given. The same noise
draws are used for every rank when the same random_state is passed (common random numbers: the
differences between ranks are then less noisy than the values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tensorpress._validate import is_int
from tensorpress.rank.regressors import as_generator, check_Xy

__all__ = ["BootstrapDF", "covariance_penalty_df"]


@dataclass
class BootstrapDF:
    """df: the covariance-penalty degrees of freedom; se: its Monte Carlo standard error;
    sigma2: the noise variance the draws used; n_boot: the number of refits."""

    df: float
    se: float
    sigma2: float
    n_boot: int


def covariance_penalty_df(
    make_estimator, X, y, fitted=None, n_boot: int = 20, sigma2: float | None = None, random_state=None
) -> BootstrapDF:
    """The parametric-bootstrap covariance-penalty df of the fitting procedure make_estimator()
    (a callable returning a fresh, unfitted estimator with fit/predict) on (X, y).

    fitted: the estimator already fitted on (X, y) (fitted here when None); its predictions are
    mu_hat. sigma2: the noise variance of the draws (default RSS / (n - df), df the fit's
    manifold degrees_of_freedom). n_boot: refits, an int >= 2. random_state: seed of the draws.
    """
    if not is_int(n_boot) or n_boot < 2:
        raise ValueError(f"n_boot: expected an int >= 2, got {n_boot!r}")
    if sigma2 is not None and (
        isinstance(sigma2, bool) or not isinstance(sigma2, (int, float)) or not math.isfinite(sigma2) or sigma2 <= 0
    ):
        raise ValueError(f"sigma2: expected None or a finite number > 0, got {sigma2!r}")
    if not callable(make_estimator):
        raise TypeError(
            f"make_estimator: expected a callable returning an unfitted estimator, got {type(make_estimator).__name__}"
        )
    Xt, yt = check_Xy(X, y)
    n = int(Xt.shape[0])
    if fitted is None:
        fitted = make_estimator().fit(Xt, yt)
    mu = torch.as_tensor(fitted.predict(Xt), dtype=torch.float64).reshape(-1)
    if mu.shape[0] != n:
        raise ValueError(f"fitted: expected predictions for the {n} samples of X, got shape {tuple(mu.shape)}")
    if sigma2 is None:
        df = int(fitted.degrees_of_freedom)
        if df >= n:
            raise ValueError(f"fitted: the fit has df = {df} >= n = {n}; pass sigma2 explicitly")
        sigma2 = float(((yt - mu) ** 2).sum()) / (n - df)
        if not sigma2 > 0:
            raise ValueError("sigma2: the fit interpolates the data (RSS = 0); pass sigma2 explicitly")
    sigma = math.sqrt(sigma2)
    gen = as_generator(random_state)
    eps = torch.randn(n_boot, n, generator=gen, dtype=torch.float64)
    preds = torch.empty(n_boot, n, dtype=torch.float64)
    for b in range(n_boot):
        est = make_estimator().fit(Xt, mu + sigma * eps[b])
        preds[b] = torch.as_tensor(est.predict(Xt), dtype=torch.float64).reshape(-1)
    # cov(y_hat_i, y_i) / sigma^2 = cov(y_hat_i, eps_i) / sigma, summed over i, per draw
    centred = preds - preds.mean(0)
    per_draw = (centred * eps).sum(1) / sigma * n_boot / (n_boot - 1)
    return BootstrapDF(
        df=float(per_draw.mean()), se=float(per_draw.std() / math.sqrt(n_boot)), sigma2=sigma2, n_boot=n_boot
    )
