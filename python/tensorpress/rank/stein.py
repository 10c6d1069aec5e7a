"""Effective degrees of freedom of a fitted low-rank regression (Stein's divergence).

Our derivation, checked against a finite-difference (Monte Carlo) divergence in
tests/test_rank.py. Why it is needed: the manifold dimension df_R is the right count of free
parameters only where the fitted rank-R point is a regular, well-determined point of the model,
i.e. at or below the rank the data support. Above it, the extra components are fitted to the
noise, and a component chosen as the best of many noise directions lowers the training error
by far more than df/n sigma^2 (for a rank-one term fitted to a Gaussian p_1 x ... x p_D noise
tensor, by about its squared spectral norm, not by sum_d p_d - D + 1). With the manifold df,
train error + optimism was nearly flat or still falling above the true rank and over-selected
CP/Tucker ranks (benchmarks/rank_selection.py).

The fix. For y = f(theta) + eps with eps ~ N(0, sigma^2 I) and X held fixed, Stein's lemma gives
E[test - train] (in-sample) = 2 sigma^2 / n * E[div_y y_hat]: the covariance-penalty degrees of
freedom is the divergence of the fit. At a local minimum theta_hat of
L(theta) = 1/2 ||y - f(theta)||^2 (+ ridge/2 ||theta||^2) the first-order condition
J^T (y - f(theta_hat)) = ridge theta_hat, differentiated in y, gives

    (J^T J - H + ridge I) d theta = J^T dy,   H = sum_i r_i grad^2 f_i(theta_hat),

with J = df/dtheta (n x P) and r = y - f(theta_hat) the residuals, so

    df_eff = div y_hat = tr(J (J^T J - H + ridge I)^+ J^T).

For the models here f_i = <B(theta), X_i>, so H is the Hessian of theta -> <E, B(theta)> with
E = sum_i r_i X_i (no dependence on n after E is formed). Gauge directions (rescalings of CP
components, rotations of Tucker factors) leave B unchanged: they are in the null space of J and
are projected out (we work on the range of J^T J, whose dimension is the manifold df). On that
range, with the generalized eigenvalues mu_j of (J^T J - H + ridge I, J^T J),
df_eff = sum_j 1 / mu_j: mu_j = 1 (df_eff = df_R) when the residuals are not correlated with
the model's curvature, which is what happens at or below the supported rank; above it,
curvature directions that fit noise have mu_j << 1 and count for much more than one parameter.
For the matrix case in whitened coordinates this reproduces the singular-value formula of
`tensorpress.rank.layer.rrr_effective_df`.

Guard (ours, a heuristic): mu_j <= 0 means the ALS iterate is not a local minimum (not
converged, or a degenerate CP swamp); there the formula does not hold, and each such direction
is charged 1 / MU_FLOOR parameters (a direction along which the fit is unstable behaves as
fitted to the noise).

The random-design optimism of `tensorpress.rank.optimism` is then evaluated with df_eff in place
of df (sigma_hat^2 = RSS / (n - df_eff)).

Where the closed form falls short (measured, benchmarks/results/optimism_resampling.md): it is the
divergence at the one fit ALS found. Efron's covariance penalty, which the parametric bootstrap
of `tensorpress.rank.resampling` estimates by re-running the whole procedure, also counts the
jumps of the fitted values between local minima as the noise changes (the "search" degrees of
freedom of a non-convex procedure, which a divergence does not see). The two agree to a median
5-8%, except at few samples per parameter: at n = 2 df the bootstrap df of 3-way CP/Tucker fits at
the true rank is about 0.75 n against Stein's 0.6 n, and the rule then over-ranks where 5-fold CV
and the oracle do not.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["stein_degrees_of_freedom", "fit_sensitivity", "MU_FLOOR"]

MU_FLOOR = 0.05


def stein_degrees_of_freedom(estimator, X, y) -> float:
    """df_eff = div_y y_hat of a fitted CPRegressor / TuckerRegressor / LowRankRegressor at its
    fit on (X, y) (the same data it was fitted on; +1 with an intercept). See the module
    docstring. Returns a float >= 0."""
    for attr in ("_jacobian", "_param_vector", "_coef_of"):
        if not hasattr(estimator, attr):
            raise TypeError(
                f"estimator: expected a fitted CPRegressor, TuckerRegressor or LowRankRegressor, "
                f"got {type(estimator).__name__}"
            )
    Xc, yc = estimator.centered(X, y)
    if tuple(Xc.shape[1:]) != tuple(estimator.coef_.shape):
        raise ValueError(
            f"X: expected samples of shape {tuple(estimator.coef_.shape)} (as in fit), got {tuple(Xc.shape[1:])}"
        )
    return stein_df_centered(estimator, Xc.to(estimator.coef_.device), yc.to(estimator.coef_.device))


def stein_df_centered(estimator, Xc: Tensor, yc: Tensor) -> float:
    """stein_degrees_of_freedom on validated, centered float64 data (no checks)."""
    extra = 1.0 if estimator.fit_intercept else 0.0
    parts = _reduced_system(estimator, Xc, yc)
    if parts is None:
        return extra
    J, Q, s, M = parts
    A = (Q.T @ M @ Q) * s[:, None] * s[None, :]  # K^{-1/2} M K^{-1/2} on range(K)
    mu = torch.linalg.eigvalsh((A + A.T) / 2)
    return float((1.0 / mu.clamp_min(MU_FLOOR)).sum()) + extra


def fit_sensitivity(estimator, Xc: Tensor, yc: Tensor, z: Tensor) -> Tensor:
    """(d y_hat / d y) z at the fit: J (J^T J - H + ridge I)^+ J^T z on range(J^T J) (for tests
    against finite differences; no MU_FLOOR guard)."""
    parts = _reduced_system(estimator, Xc, yc)
    if parts is None:
        return torch.zeros_like(z)
    J, Q, s, M = parts
    return J @ (Q @ torch.linalg.solve(Q.T @ M @ Q, Q.T @ (J.T @ z)))


def _reduced_system(estimator, Xc: Tensor, yc: Tensor):
    """(J, Q, s, M): the Jacobian, an orthonormal basis Q of range(J^T J) with s = its
    eigenvalues^{-1/2}, and M = J^T J - H + ridge I; None when J = 0."""
    J = estimator._jacobian(Xc)  # (n, P)
    Xf = Xc.flatten(1)
    E = (Xf.T @ (yc - Xf @ estimator.coef_.flatten())).reshape(estimator.coef_.shape)
    if hasattr(estimator, "_coef_hessian"):
        H = estimator._coef_hessian(E)
    else:
        theta = estimator._param_vector().detach()
        H = torch.func.hessian(lambda t: (E * estimator._coef_of(t)).sum())(theta)
    K = J.T @ J
    M = K - (H + H.T) / 2
    if estimator.ridge:
        M = M + float(estimator.ridge) * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    w, V = torch.linalg.eigh(K)
    keep = w > 1e-10 * float(w.max()) if float(w.max()) > 0 else torch.zeros_like(w, dtype=torch.bool)
    if not bool(keep.any()):
        return None
    return J, V[:, keep], w[keep].rsqrt(), M
