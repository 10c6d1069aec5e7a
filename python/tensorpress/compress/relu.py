"""The `relu` method: maximum-likelihood low-rank fit of a linear layer followed by ReLU
(Zhang & Saab, arXiv:2502.02766, Theorem 4.9), and the `gelu` method.

For a layer y = ReLU(x Wᵀ + b) with calibration inputs X_ref (original model) and X_in (model
compressed so far, m rows each), the observations are Y = ReLU(X_ref Wᵀ + b), modeled as in
Theorem 4.9 by Y = ReLU(Q + Z), Z ~ N(0, σ²) entrywise, with the compressed layer's
pre-activations Q = X̃_c Ŵᵀ + 1cᵀ (X̃_c the centered X_in, c free). The negative
log-likelihood, times σ², is

    F(Q) = ½ Σ_{Y>0} (Y − Q)² − σ² Σ_{Y=0} log Φ(−Q/σ)        (convex in Q, 1-smooth)

so entries whose target is 0 only have to stay (softly) below 0 instead of matching the
original negative pre-activation: rank is spent where the ReLU lets it through.

What follows the theorem and where it departs:

- the estimator (Theorem 4.9): minimize F over the paper's constraint set {‖Q‖_∞ ≤ α,
  ‖Q‖_* ≤ α√(r m N1)} (N1 = out), then keep the best rank r. Q is parametrized by orthonormal
  coordinates of the range of [X̃_c, 1] (tensorpress.compress.convex.PreactBasis), so every
  iterate is a linear layer's pre-activation and ‖Q‖_* is exact; the program is solved by
  accelerated projected gradient (step 1, F being 1-smooth) with the projection onto the
  intersection computed by ADMM (`project_box_nuclear`, warm-started, inexact to its
  tolerance), for `n_iter` steps (an early stop, not to convergence).
- α: the theorem assumes it bounds the planted pre-activations; the default rule (as for
  `convex`) is max |Q_act| of the activation-aware rank-r fit, which is then feasible.
- σ: the theorem takes it as known. Default: its maximum-likelihood estimate under the same
  model with Q fixed at the activation-aware rank-r pre-activations (a profile estimate: the
  Tobit likelihood is concave in 1/σ for fixed Q, so the root of its derivative is found by
  bisection). sigma="heuristic" is the earlier rule, 0.3 × the RMS residual of that fit.
- departures beyond the theorem: the bias is free (not rank-limited), and after truncation
  `polish_iter` projected-gradient steps on F over {rank ≤ r} (accelerated iterative hard
  thresholding, monotone) start from the better of the truncated solution and the
  activation-aware fit, so the result never has a higher F than the activation-aware fit;
  polish_iter=0 returns the theorem's estimator (the truncated constrained solution) as it is.

`fit_gelu` applies the activation-aware start and the rank-r polish to the post-GELU squared
error directly (no likelihood model is needed there: GELU is smooth and invertible enough that
the error itself is the loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tensorpress._validate import check_int
from tensorpress.compress.convex import (
    DEFAULT_RIDGE,
    LowRankFit,
    PreactBasis,
    _check_alpha,
    _check_layer_samples,
    _check_positive,
    _solve_right_lower,
    _solve_right_lower_t,
    _svd,
    balanced_factors,
    choose_alpha,
    project_box_nuclear,
    small_problem_threads,
    truncate,
)
from tensorpress.compress.quadratic import ridged_cholesky

__all__ = ["fit_relu", "fit_gelu", "relu_nll", "gelu_loss", "ml_sigma"]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
# sigma="heuristic": σ = SIGMA_FRACTION × the RMS residual of the activation-aware rank-r fit
# of the pre-activations. Measured on random 2-layer ReLU MLPs (in 64, hidden 128, 2000
# calibration and 2000 held-out rows, ranks 8 and 24, 9-51% active units): 0.3 gave the lowest
# held-out post-ReLU error of {1, 0.3, 0.1, 0.03} in most cases and was within 0.5% of the best
# in all. benchmarks/zhang_saab_theory.py compares it with the maximum-likelihood default.
SIGMA_FRACTION = 0.3


def relu_nll(M: Tensor, Y: Tensor, sigma: float, active: Tensor | None = None) -> tuple[float, Tensor]:
    """F(M) = ½ Σ_{Y>0} (Y − M)² − σ² Σ_{Y=0} log Φ(−M/σ) and its gradient dF/dM (same shape).

    The negative log-likelihood of Y = ReLU(M + Z), Z ~ N(0, σ²), times σ² (up to a constant);
    d²F/dM² lies in (0, 1], so the gradient is 1-Lipschitz. Numerically stable for any M
    (log Φ by torch.special.log_ndtr)."""
    if active is None:
        active = Y > 0
    t = -M / sigma
    log_cdf = torch.special.log_ndtr(t)
    # d/dM [−σ² log Φ(−M/σ)] = σ φ(t)/Φ(t), the ratio computed in logs
    ratio = torch.exp(-0.5 * t * t - _LOG_SQRT_2PI - log_cdf)
    diff = M - Y
    zero = M.new_zeros(())
    value = 0.5 * float(torch.where(active, diff * diff, zero).sum()) - sigma * sigma * float(
        torch.where(active, zero, log_cdf).sum()
    )
    grad = torch.where(active, diff, sigma * ratio)
    return value, grad


def ml_sigma(Q: Tensor, Y: Tensor, active: Tensor | None = None, rel_tol: float = 1e-6) -> float:
    """Maximum-likelihood σ of Y = ReLU(Q + Z), Z ~ N(0, σ²), for fixed pre-activations Q.

    In τ = 1/σ the log-likelihood n₊ log τ − τ² Σ_{Y>0}(Y − Q)²/2 + Σ_{Y=0} log Φ(−τQ) is
    concave (up to a constant), so its derivative is decreasing: bracket its root by factors of
    4 from τ = 1/RMS(Y − Q), then bisect in log τ to relative precision rel_tol. Returns
    math.inf when the likelihood grows without bound as σ → ∞ (never: needs n₊ = 0 and Q ≤ 0
    on no entry) and 0.0 when it does as σ → 0 (a perfect fit: no positive residual and every
    zero target has Q < 0)."""
    if active is None:
        active = Y > 0
    n_pos = int(active.sum())
    r2 = float(torch.where(active, (Y - Q) ** 2, Q.new_zeros(())).sum())
    Qz = Q[~active]

    def slope(tau):
        x = tau * Qz
        mills = torch.exp(-0.5 * x * x - _LOG_SQRT_2PI - torch.special.log_ndtr(-x))  # φ(x)/Φ(−x)
        return (n_pos / tau if n_pos else 0.0) - tau * r2 - float((Qz * mills).sum())

    rms = math.sqrt((r2 + float((Qz.clamp_min(0) ** 2).sum())) / max(Y.numel(), 1))
    if rms == 0.0:
        return 0.0
    lo = hi = 1.0 / rms
    for _ in range(60):
        if slope(lo) > 0:
            break
        lo /= 4.0
    else:
        return math.inf
    for _ in range(60):
        if slope(hi) < 0:
            break
        hi *= 4.0
    else:
        return 0.0
    while hi / lo > 1.0 + rel_tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    return 1.0 / math.sqrt(lo * hi)


def gelu_loss(M: Tensor, Y: Tensor) -> tuple[float, Tensor]:
    """½ ‖GELU(M) − Y‖_F² (exact, erf GELU) and its gradient (GELU(M) − Y) · GELU'(M)."""
    cdf = torch.special.ndtr(M)
    pdf = torch.exp(-0.5 * M * M - _LOG_SQRT_2PI)
    diff = M * cdf - Y
    return 0.5 * float((diff * diff).sum()), diff * (cdf + M * pdf)


class _Problem:
    """A loss of the pre-activations as a function of (V, c) with M = A Vᵀ + 1cᵀ."""

    def __init__(self, A: Tensor, loss):
        self.A, self.loss = A, loss
        self.m = A.shape[0]

    def __call__(self, V: Tensor, c: Tensor, need_grad: bool = True):
        """(F, dF/dV, dF/dc) at (V, c); the gradients are None unless need_grad."""
        value, gM = self.value(V, c)
        if not need_grad:
            return value, None, None
        return (value, *self.grad(gM))

    def value(self, V: Tensor, c: Tensor) -> tuple[float, Tensor]:
        """(F, dF/dM): the gradient with respect to the pre-activations, cheap to keep."""
        return self.loss(self.A @ V.T + c)

    def grad(self, gM: Tensor) -> tuple[Tensor, Tensor]:
        """(dF/dV, dF/dc) from dF/dM."""
        return gM.T @ self.A, gM.sum(0)


@dataclass
class _AdmmRuns:
    """The box-and-nuclear projections of one convex stage: the ADMM warm start carried from
    one projection to the next, the ADMM iterations in all and the last box scale."""

    state: tuple | None = None
    iterations: int = 0
    box_scale: float = 1.0


def _fista(
    prob: _Problem,
    V: Tensor,
    c: Tensor,
    project,
    n_iter: int,
    tol: float,
    lr: float = 1.0,
    backtrack: bool = False,
    c_step: float = 1.0,
):
    """Minimize F over {V: project(V) = V}, c free, by accelerated projected gradient: step 1
    for V and 1/m for c (F is 1-smooth in (V, √m c)), with function-value and gradient
    restarts (O'Donoghue & Candès), monotone: a step that raises F is discarded. `project` is
    the projection onto the nuclear ball (convex stage) or the rank-r set (polish stage; there
    the iteration is accelerated iterative hard thresholding, still monotone by the safeguard).
    With backtrack=True (losses without a known Lipschitz constant) a plain step that does not
    descend halves the step size lr, up to 10 times, before the iteration counts as stationary.
    c_step = 0 keeps c fixed (when A already spans the constant column).
    Returns (V, c, F, iterations, converged)."""
    m = prob.m
    halvings = 0
    f, gM = prob.value(V, c)
    ygV, ygc = prob.grad(gM)
    grad_x: tuple[Tensor, Tensor] | None = (ygV, ygc)  # (dF/dV, dF/dc) at x; None until needed
    xV, xc = V, c
    yV, yc = V, c
    t, converged, it = 1.0, False, 0
    for it in range(1, n_iter + 1):  # noqa: B007 (iterations reported after the loop)
        zV = project(yV - lr * ygV)
        zc = yc - c_step * lr * ygc / m
        fz, zgM = prob.value(zV, zc)  # its (V, c) gradient is formed only if a restart needs it
        sV, sc = zV - xV, zc - xc
        if fz > f + 1e-13 * abs(f):
            if t == 1.0:  # no descent from x itself: stationary up to rounding, or too long a step
                if backtrack and halvings < 10:
                    lr, halvings = 0.5 * lr, halvings + 1
                    continue
                converged = True
                break
            if grad_x is None:
                grad_x = prob.grad(gM)
            yV, yc, t = xV, xc, 1.0  # discard the step, reset momentum
            ygV, ygc = grad_x
            continue
        decrease = f - fz
        momentum_bad = t > 1.0 and (float(((yV - zV) * sV).sum()) + m * float(((yc - zc) * sc).sum())) > 0
        xV, xc, f, gM, grad_x = zV, zc, fz, zgM, None
        if decrease <= tol * max(abs(f), 1e-300):
            converged = True
            break
        if momentum_bad:
            grad_x = prob.grad(gM)
            yV, yc, t = xV, xc, 1.0
            ygV, ygc = grad_x
            continue
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        beta = (t - 1.0) / t_new
        yV, yc = zV + beta * sV, zc + beta * sc
        _, ygV, ygc = prob(yV, yc)
        t = t_new
    return xV, xc, f, it, converged


def _sigma(sigma, Q_act: Tensor, P: Tensor, Y: Tensor, active: Tensor) -> tuple[float, str]:
    """σ and the rule that gave it (see fit_relu), floored at 1e-3 × std(P)."""
    if sigma is None or sigma == "ml":
        value, rule = ml_sigma(Q_act, Y, active), "ml"
    elif sigma == "heuristic":
        resid = P - Q_act
        value, rule = SIGMA_FRACTION * math.sqrt(float((resid * resid).mean())), "heuristic"
    else:
        return float(sigma), "given"
    floor = max(1e-3 * float(P.std()), 1e-12)
    return (value if math.isfinite(value) and value > floor else floor), rule


def fit_relu(
    weight: Tensor,
    bias: Tensor | None,
    X_ref: Tensor,
    X_in: Tensor,
    rank: int,
    *,
    sigma: float | str | None = None,
    alpha: float | str | None = None,
    radius: float | None = None,
    n_iter: int = 20,
    polish_iter: int = 30,
    tol: float = 1e-7,
    admm_tol: float = 1e-4,
    ridge: float = DEFAULT_RIDGE,
) -> LowRankFit:
    """Rank-r compression of a linear layer followed by ReLU, by maximum likelihood (Theorem 4.9
    of Zhang & Saab; see the module docstring for what follows the theorem and where it departs).

    Args:
        weight: W (out, in); bias: b (out,) or None (taken as 0); any real floating dtype.
        X_ref: (m, in) inputs of the original model at this layer; X_in: (m, in) inputs of the
            model compressed so far (X_in = X_ref for the first layer), rows paired with X_ref
            (a subsample of a few thousand rows is enough; m >= 2). Same device as weight.
        rank: r in [1, min(out, in)].
        sigma: noise level σ of the model Y = ReLU(Q + Z). None or "ml" (default): the
            maximum-likelihood estimate at the activation-aware rank-r pre-activations
            (`ml_sigma`); "heuristic": 0.3 × the RMS residual of that fit; or a positive float.
            Estimates are floored at 1e-3 × the standard deviation of the pre-activations.
        alpha: the entrywise bound on the pre-activations: None / "activation" (default):
            max |Q_act| of the activation-aware rank-r fit; "target": max |X_ref Wᵀ + b|; or a
            positive float. radius: the nuclear bound; None (default): the theorem's
            α √(r m N1); math.inf: no ball.
        n_iter: projected-gradient steps of the convex stage (0 skips it).
        polish_iter: rank-constrained steps after truncation (0: none, the theorem's estimator
            alone). The defaults (20 + 30) are an early stop, chosen by measurement: on random
            2-layer ReLU MLPs most of the held-out gain came within 25-50 iterations, and
            running to convergence (~100 + 300) was no better held-out.
        tol: both stages stop when an accepted step lowers F by less than tol relative.
        admm_tol: relative residual tolerance of each projection onto the constraint set.
        ridge: input directions with energy below ridge · trace(X̃_cᵀX̃_c)/in are dropped.
    Returns:
        LowRankFit(first (r, in), second (out, r), bias (out,), info), float64. info keys:
        sigma, sigma_rule, alpha, alpha_rule, radius, ridge_delta, basis_dim, iterations /
        converged (convex stage), admm_iterations (total), box_scale (last projection),
        polish_iterations / polish_converged, objective (F of the result, per entry, i.e.
        divided by m·out), objective_activation (F of the activation-aware start),
        objective_convex (F of the constrained solution, before truncation),
        objective_truncated, start ("convex" or "activation": where the polish started),
        active_fraction (share of positive targets).
    """
    out_f, in_f, dev = _check_layer_samples(weight, bias, rank, X_ref, X_in)
    if isinstance(sigma, str) or sigma is None:
        if sigma not in (None, "ml", "heuristic"):
            raise ValueError(f"sigma: expected None, 'ml', 'heuristic' or a positive float, got {sigma!r}")
    else:
        sigma = _check_positive("sigma", sigma, allow_none=False)
    alpha = _check_alpha(alpha)
    radius = _check_positive("radius", radius, allow_inf=True)
    check_int("n_iter", n_iter, 0)
    check_int("polish_iter", polish_iter, 0)
    tol = _check_positive("tol", tol, allow_none=False)
    admm_tol = _check_positive("admm_tol", admm_tol, allow_none=False)
    ridge = _check_positive("ridge", ridge, allow_none=False)

    with small_problem_threads(dev, min(out_f, in_f)):
        f64 = torch.float64
        W = weight.detach().to(f64)
        b = bias.detach().to(f64) if bias is not None else W.new_zeros(out_f)
        P = X_ref.to(f64) @ W.T + b  # reference pre-activations (new tensors: the caller's are untouched)
        Y = P.clamp_min(0)
        basis = PreactBasis(X_in.to(f64), ridge)
        A, m, k = basis.A, basis.m, basis.k

        # 1. the activation-aware rank-r start: least squares of P on [X̃_c, 1], best rank r
        c0 = P.mean(0)
        V_act = truncate((P - c0).T @ A, rank)
        Q_act = A @ V_act.T + c0
        active = Y > 0
        sigma_value, sigma_rule = _sigma(sigma, Q_act, P, Y, active)
        alpha_value, alpha_rule = choose_alpha(alpha, Q_act, P)
        if radius is None:
            radius = alpha_value * math.sqrt(rank * m * out_f)
        loss = lambda M: relu_nll(M, Y, sigma_value, active)  # noqa: E731
        prob = _Problem(A, loss)
        f_act, _, _ = prob(V_act, c0, need_grad=False)
        scale = 1.0 / (m * out_f)
        info = {
            "method": "relu",
            "sigma": sigma_value,
            "sigma_rule": sigma_rule,
            "alpha": alpha_value,
            "alpha_rule": alpha_rule,
            "radius": radius,
            "ridge_delta": basis.delta,
            "basis_dim": k,
            "objective_activation": f_act * scale,
            "active_fraction": float(active.double().mean()),
        }

        # 2. the constrained ML program over the coordinates Ṽ = [V, √m c] in the basis [A, 1/√m]
        #    (c fixed at 0 in _fista: the constant column is part of the basis), 3. truncation
        if n_iter > 0:
            B = basis.full()
            full = _Problem(B, loss)
            admm = _AdmmRuns()

            def project(Z: Tensor) -> Tensor:
                V, pinfo, admm.state = project_box_nuclear(Z, B, alpha_value, radius, tol=admm_tol, state=admm.state)
                admm.iterations += pinfo["iterations"]
                admm.box_scale = pinfo["box_scale"]
                return V

            V0 = project(torch.cat([V_act, math.sqrt(m) * c0[:, None]], dim=1))
            zero = c0.new_zeros(out_f)
            V_c, _, f_c, its, conv = _fista(full, V0, zero, project, n_iter, tol, c_step=0.0)
            V_t, c_c = truncate(V_c[:, :k], rank), V_c[:, k] / math.sqrt(m)
            f_t, _, _ = prob(V_t, c_c, need_grad=False)
            info.update(
                iterations=its,
                converged=conv,
                admm_iterations=admm.iterations,
                box_scale=admm.box_scale,
                objective_convex=f_c * scale,
                objective_truncated=f_t * scale,
            )
        else:
            V_t, c_c, f_t = V_act, c0, f_act
            info.update(iterations=0, converged=False, objective_convex=None, objective_truncated=f_act * scale)
        if f_t <= f_act or polish_iter == 0:  # polish_iter=0: the theorem's estimator as it is
            V, c, info["start"] = V_t, c_c, "convex"
        else:
            V, c, info["start"] = V_act, c0, "activation"

        # 4. polish over rank <= r (a departure from the theorem; polish_iter=0 skips it)
        if polish_iter > 0:
            V, c, f, its, conv = _fista(prob, V, c, lambda Z: truncate(Z, rank), polish_iter, tol)
            info.update(polish_iterations=its, polish_converged=conv)
        else:
            f, _, _ = prob(V, c, need_grad=False)
            info.update(polish_iterations=0, polish_converged=False)
        info["objective"] = f * scale

        first, second = basis.factors(V, rank)
        W_hat = second @ first
        return LowRankFit(first, second, c - W_hat @ basis.mu, info)


def fit_gelu(
    weight: Tensor,
    bias: Tensor | None,
    X_ref: Tensor,
    X_in: Tensor,
    rank: int,
    *,
    n_iter: int = 30,
    tol: float = 1e-7,
    ridge: float = DEFAULT_RIDGE,
) -> LowRankFit:
    """Rank-r compression of a linear layer followed by (exact, erf) GELU: minimizes the
    post-GELU calibration error ½‖GELU(X̃_c Ŵᵀ + 1cᵀ) − GELU(X_ref Wᵀ + b)‖_F² over rank(Ŵ) <= r,
    c free, by accelerated projected gradient onto the rank-r set (in the X_in metric, as in
    `fit_relu`) from the activation-aware rank-r solution, with backtracking (the loss is not
    convex) and monotone safeguarding, so the result never has a larger post-GELU calibration
    error than the activation-aware fit.

    Arguments as in `fit_relu` (n_iter: iterations; 0 returns the activation-aware fit; the
    default 30 is an early stop: on random GELU MLPs 20 iterations gave nearly all of the
    held-out gain of 300).
    Returns LowRankFit; info keys iterations, converged, step (final step size), ridge_delta,
    objective / objective_activation (½ post-GELU squared error per entry, i.e. / (m·out)).
    """
    out_f, in_f, dev = _check_layer_samples(weight, bias, rank, X_ref, X_in)
    check_int("n_iter", n_iter, 0)
    tol = _check_positive("tol", tol, allow_none=False)
    ridge = _check_positive("ridge", ridge, allow_none=False)
    with small_problem_threads(dev, min(out_f, in_f)):
        f64 = torch.float64
        W = weight.detach().to(f64)
        b = bias.detach().to(f64) if bias is not None else W.new_zeros(out_f)
        Xi = X_in.to(f64)
        m = Xi.shape[0]
        P = X_ref.to(f64) @ W.T + b
        Y = torch.nn.functional.gelu(P)
        mu_in = Xi.mean(0)
        Xc = Xi - mu_in
        L, delta = ridged_cholesky(Xc.T @ Xc, ridge)
        A = _solve_right_lower_t(Xc, L)
        c = P.mean(0)
        V = truncate((P - c).T @ A, rank)
        prob = _Problem(A, lambda M: gelu_loss(M, Y))
        scale = 1.0 / (m * out_f)
        f_act, _, _ = prob(V, c, need_grad=False)
        # max GELU'² ≈ 1.13² bounds the Gauss-Newton part of the curvature; backtracking covers the rest
        lr = 1.0 / 1.3
        if n_iter > 0:
            V, c, f, its, conv = _fista(prob, V, c, lambda Z: truncate(Z, rank), n_iter, tol, lr=lr, backtrack=True)
        else:
            f, its, conv = f_act, 0, False
        info = {
            "method": "gelu",
            "iterations": its,
            "converged": conv,
            "ridge_delta": delta,
            "objective": f * scale,
            "objective_activation": f_act * scale,
        }
        U, S, Vh = _svd(V)
        first, second, _ = balanced_factors(U[:, :rank] * S[:rank], _solve_right_lower(Vh[:rank], L), rank)
        W_hat = second @ first
        return LowRankFit(first, second, c - W_hat @ mu_in, info)
