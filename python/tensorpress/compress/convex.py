"""The convex low-rank methods: Zhang & Saab's pre-activation program (`convex`) and a
weight-space variant (`convex_weights`).

Notation (Zhang & Saab, "Theoretical Guarantees for Low-Rank Compression of Deep Neural
Networks", arXiv:2502.02766, Section 4): a layer y = x Wᵀ + b, calibration inputs X (original
model) and X̃ (model compressed so far), m rows each; N1 = out features; the pre-activations
P = X Wᵀ + 1bᵀ (m × N1) are the observations and Q = X̃ Ŵᵀ + 1ĉᵀ the compressed layer's.

`fit_convex` (method "convex") is their convex program (Theorem 4.4 / Corollary 4.7):

    min ‖Q − P‖_F   over Q = X̃ Ŵᵀ + 1ĉᵀ   s.t.   ‖Q‖_∞ ≤ α,   ‖Q‖_* ≤ α √(r m N1),

then the rank-r output. In an orthonormal basis B of the range of [X̃_c, 1] (X̃_c the centered
X̃), Q = B V and ‖Q‖_* = ‖V‖_*, ‖Q − P‖_F² = ‖V − BᵀP‖_F² + const, so the program is the
Euclidean projection of BᵀP onto {‖V‖_* ≤ α√(rmN1)} ∩ {‖BV‖_∞ ≤ α}: `project_box_nuclear`,
by ADMM (Boyd et al. 2011, §5, with residual balancing), stopped on relative primal and dual
residuals. Departures, all stated in the docstrings: (1) the paper absorbs the bias into W and
counts it in the rank; here the bias stays free (not rank-limited), as in every method of this
package (the box and the ball still bound the full pre-activations including the bias);
(2) α is a bound the theorem assumes on the planted low-rank pre-activations, unknown in
practice: the default rule takes α = max |Q_act| of the activation-aware rank-r fit Q_act (the
closed form of their Theorem 4.1 / Section 3), which makes Q_act feasible (a rank-r matrix with
entries ≤ α has ‖·‖_* ≤ √r ‖·‖_F ≤ α√(rmN1)), so the program can only lower the calibration
error before truncation; (3) directions of X̃_c with energy below the ridge are dropped from B.
The rank-r output is the best rank-r weight in the X̃ metric for the solution Q̂ (truncated
SVD of its coordinates V̂). The constraint set, the statement numbers and the rank-r output
follow issue 29's reading of the paper; only its abstract and third-party summaries could be
read here, so the theorems' constants and side conditions were not checked against the text.

`fit_convex_weights` (method "convex_weights") is this package's earlier "convex" method: a
nuclear-norm ball (and optional box) on the weights Ŵ themselves, with the radius of the
activation-aware fit, then truncation. It is not the paper's program (the constraints are on
Ŵ, not on X̃Ŵᵀ; no entrywise bound by default). For a layer y = x Wᵀ + b the output error with
a free bias is

    ‖X Wᵀ + 1bᵀ − X̃ Ŵᵀ − 1b̂ᵀ‖_F² = tr(Ŵ G Ŵᵀ) − 2 tr(Ŵ C Wᵀ) + const,

with the centered statistics G = X̃ᵀX̃ − n μ̃μ̃ᵀ and C = X̃ᵀX − n μ̃μᵀ and the optimal bias
b̂ = b + Wμ − Ŵμ̃; it minimizes this over {‖Ŵ‖_* ≤ radius} ∩ {|Ŵ_ij| ≤ box} by accelerated
projected gradient (FISTA, step 1/λ_max(G), restarts) and truncates to rank r. It needs only
the Grams; `constrained_lstsq` is its solver alone on plain (G, B) inputs.

The result type `LowRankFit` and the helpers for the activation-aware (G-metric) truncation
are shared with the `relu` method (tensorpress.compress.relu).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tensorpress._validate import check_int
from tensorpress.compress.lowrank import (
    DEFAULT_RIDGE,
    LowRankFit,  # noqa: F401
    small_problem_threads,
)
from tensorpress.compress.quadratic import ridged_cholesky

__all__ = [
    "LowRankFit",
    "PreactBasis",
    "constrained_lstsq",
    "fit_convex",
    "fit_convex_weights",
    "project_box_nuclear",
    "project_l1_ball",
    "project_nuclear_ball",
]

# Dykstra's alternating projections onto ball ∩ box stop after this many rounds or when a
# round moves the point by less than DYKSTRA_TOL relative to its norm.
DEFAULT_DYKSTRA_ITER = 50
DYKSTRA_TOL = 1e-10
# On CPU the solvers' many small LAPACK calls run single-threaded: see
# tensorpress.compress.lowrank.small_problem_threads.


# ----------------------------------------------------------------------------- validation
_REAL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name, t, shape=None, ndim=None, float64=False, device=None):
    """Type, dtype, shape, device and finiteness of one argument; returns it unchanged."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if float64 and t.dtype != torch.float64:
        raise TypeError(
            f"{name}: expected dtype float64 (calibration statistics are accumulated in float64), got {t.dtype}"
        )
    if t.dtype not in _REAL_FLOATS:
        raise TypeError(f"{name}: expected a real floating-point dtype, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}d tensor, got {t.dim()}d with shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of weight), got {t.device}")
    if t.numel() and not torch.isfinite(t).all():
        raise ValueError(f"{name}: expected finite values, found NaN or Inf")
    return t


def _check_positive(name, v, allow_none=True, allow_inf=False):
    if v is None and allow_none:
        return None
    ok = (
        not isinstance(v, bool)
        and isinstance(v, (int, float))
        and v > 0
        and (allow_inf or math.isfinite(v))
        and not math.isnan(v)
    )
    if not ok:
        extra = " (or math.inf)" if allow_inf else ""
        none = " or None" if allow_none else ""
        raise ValueError(f"{name}: expected a positive finite number{extra}{none}, got {v!r}")
    return float(v)


def _check_weight_bias_rank(weight, bias, rank):
    _check_tensor("weight", weight, ndim=2)
    out_f, in_f = weight.shape
    if out_f == 0 or in_f == 0:
        raise ValueError(f"weight: expected a non-empty (out, in) matrix, got shape {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, shape=(out_f,), device=weight.device)
    check_int("rank", rank, 1, min(out_f, in_f))
    return out_f, in_f


def _svd(Z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD (torch.linalg.svd), single-threaded on CPU for min(m, n) < SINGLE_THREAD_MAX_K."""
    with small_problem_threads(Z.device, min(Z.shape[-2:])):
        return torch.linalg.svd(Z, full_matrices=False)


def _svdvals(Z: Tensor) -> Tensor:
    """Singular values, threads as in `svd`."""
    with small_problem_threads(Z.device, min(Z.shape[-2:])):
        return torch.linalg.svdvals(Z)


# ----------------------------------------------------------------------------- linear algebra
def _solve_right_lower(M: Tensor, L: Tensor) -> Tensor:
    """M L⁻¹ for lower-triangular L."""
    Lt, Mt = L.transpose(-1, -2), M.transpose(-1, -2)
    return torch.linalg.solve_triangular(Lt, Mt, upper=True).transpose(-1, -2)


def _solve_right_lower_t(M: Tensor, L: Tensor) -> Tensor:
    """M L⁻ᵀ for lower-triangular L."""
    return torch.linalg.solve_triangular(L, M.transpose(-1, -2), upper=False).transpose(-1, -2)


def balanced_factors(left: Tensor, right: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Balanced rank-`rank` factors of left @ right (left: out×k, right: k×in), keeping the top
    singular triplets: returns (first (rank×in), second (out×rank), singular values (rank,)).
    Zero singular values are padded when left @ right has rank below `rank`."""
    q1, r1 = torch.linalg.qr(left)
    q2, r2 = torch.linalg.qr(right.transpose(0, 1))
    u, s, vh = _svd(r1 @ r2.transpose(0, 1))
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    second = (q1 @ u[:, :k]) * root
    first = root[:, None] * (vh[:k] @ q2.transpose(0, 1))
    sv = s[:k]
    if k < rank:  # pad with zero directions so the shapes are always (rank, in) and (out, rank)
        first = torch.cat([first, first.new_zeros(rank - k, first.shape[1])])
        second = torch.cat([second, second.new_zeros(second.shape[0], rank - k)], dim=1)
        sv = torch.cat([sv, sv.new_zeros(rank - k)])
    return first, second, sv


def metric_truncation(V: Tensor, L: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-r Ŵ in the metric of G = L Lᵀ given V = Ŵ_full L: Ŵ = [V]_r L⁻¹, i.e. the
    minimizer of ‖(Ŵ − Ŵ_full) L‖_F = ‖X̃(Ŵ − Ŵ_full)ᵀ‖_F over rank ≤ r. Balanced factors."""
    U, S, Vh = _svd(V)
    left = U[:, :rank] * S[:rank]
    right = _solve_right_lower(Vh[:rank], L)
    first, second, _ = balanced_factors(left, right, rank)
    return first, second


def project_l1_ball(s: Tensor, radius: float) -> Tensor:
    """Euclidean projection of a nonnegative vector onto {x ≥ 0, Σx ≤ radius}."""
    if radius == math.inf or float(s.sum()) <= radius:
        return s
    srt, _ = torch.sort(s, descending=True)
    css = torch.cumsum(srt, 0)
    j = torch.arange(1, s.shape[0] + 1, dtype=s.dtype, device=s.device)
    cond = srt - (css - radius) / j > 0
    rho = int(torch.nonzero(cond).max()) + 1
    theta = (float(css[rho - 1]) - radius) / rho
    return (s - theta).clamp_min(0)


def project_nuclear_ball(Z: Tensor, radius: float) -> Tensor:
    """Euclidean (Frobenius) projection of a matrix onto {‖Ŵ‖_* ≤ radius}: SVD, then the
    singular values projected onto the l1 ball. No SVD when ‖Z‖_* ≤ √min(shape) ‖Z‖_F already
    proves Z inside."""
    if radius == math.inf or math.sqrt(min(Z.shape)) * float(torch.linalg.vector_norm(Z)) <= radius:
        return Z
    U, S, Vh = _svd(Z)
    if float(S.sum()) <= radius:
        return Z
    return (U * project_l1_ball(S, radius)) @ Vh


def _project(Z: Tensor, radius: float, box: float | None, n_dykstra: int) -> tuple[Tensor, int]:
    """Projection onto {‖·‖_* ≤ radius} ∩ {|·| ≤ box}. With both sets, Dykstra's algorithm,
    then a final scaling by min(1, radius/‖·‖_*): both sets are symmetric, convex and contain
    0, so the scaled point lies exactly in both. Returns (point, Dykstra rounds)."""
    if box is None:
        return project_nuclear_ball(Z, radius), 0
    if radius == math.inf:
        return Z.clamp(-box, box), 0
    x = Z
    p = torch.zeros_like(Z)
    q = torch.zeros_like(Z)
    rounds = 0
    for rounds in range(1, n_dykstra + 1):  # noqa: B007 (the count is returned)
        y = project_nuclear_ball(x + p, radius)
        p = x + p - y
        x_new = (y + q).clamp(-box, box)
        q = y + q - x_new
        moved = float(torch.linalg.vector_norm(x_new - x))
        x = x_new
        if moved <= DYKSTRA_TOL * max(float(torch.linalg.vector_norm(x)), 1e-300):
            break
    nuc = float(_svdvals(x).sum())
    if nuc > radius:
        x = x * (radius / nuc)
    return x, rounds


# ----------------------------------------------------------------------------- the solver
def constrained_lstsq(
    gram: Tensor,
    target: Tensor,
    *,
    radius: float = math.inf,
    box: float | None = None,
    init: Tensor | None = None,
    n_iter: int = 1000,
    tol: float = 1e-9,
    n_dykstra: int = DEFAULT_DYKSTRA_ITER,
) -> tuple[Tensor, dict]:
    """Minimize f(Ŵ) = ½ tr(Ŵ G Ŵᵀ) − ⟨Ŵ, B⟩ over {‖Ŵ‖_* ≤ radius} ∩ {|Ŵ_ij| ≤ box}.

    Accelerated projected gradient (FISTA) with step 1/λ_max(G) and function-value restart
    (a step that would raise f is discarded and the momentum reset), so f decreases
    monotonically over the iterates, which are all feasible.

    Args:
        gram: G (in, in), symmetric positive semidefinite (regularize it before if singular:
            the unconstrained minimizer is B G⁻¹).
        target: B (out, in).
        radius: nuclear-norm bound (math.inf: none). box: entrywise bound (None: none).
        init: (out, in) starting point, projected onto the set first (default: 0).
        n_iter: maximum number of gradient steps. tol: stop when a step moves the iterate by
            less than tol relative to its norm.
        n_dykstra: maximum alternating-projection rounds per step when both sets are active.
    Returns:
        (Ŵ (out, in), info) with info keys iterations, converged, restarts, objective (f at Ŵ),
        objective_init, lipschitz, dykstra_rounds (total).
    """
    _check_tensor("gram", gram, ndim=2)
    d = gram.shape[0]
    _check_tensor("gram", gram, shape=(d, d))
    _check_tensor("target", target, ndim=2, device=gram.device)
    if target.shape[1] != d:
        raise ValueError(f"target: expected shape (out, {d}) to match gram, got {tuple(target.shape)}")
    radius = _check_positive("radius", radius, allow_none=False, allow_inf=True)
    box = _check_positive("box", box)
    check_int("n_iter", n_iter, 0)
    check_int("n_dykstra", n_dykstra, 1)
    tol = _check_positive("tol", tol, allow_none=False)
    with small_problem_threads(gram.device, min(target.shape)):
        G = gram.to(torch.float64)
        B = target.to(torch.float64)
        if init is None:
            x = torch.zeros_like(B)
        else:
            _check_tensor("init", init, shape=tuple(B.shape), device=gram.device)
            x = init.to(torch.float64)
        x, rounds_total = _project(x, radius, box, n_dykstra)
        lip = float(torch.linalg.eigvalsh(0.5 * (G + G.T))[-1])
        if not lip > 0:
            lip = 1.0

        def objective(z, zG):
            return 0.5 * float((z * zG).sum()) - float((z * B).sum())

        xG = x @ G
        f = objective(x, xG)
        info = {"objective_init": f, "lipschitz": lip}
        y, yG, t = x, xG, 1.0
        converged, restarts, it = False, 0, 0
        for it in range(1, n_iter + 1):  # noqa: B007 (iterations reported after the loop)
            z, rounds = _project(y - (yG - B) / lip, radius, box, n_dykstra)
            rounds_total += rounds
            zG = z @ G
            fz = objective(z, zG)
            # restart (O'Donoghue & Candès): on an objective increase, or when the momentum
            # points against the gradient-mapping step, <y - z, z - x> > 0
            if fz > f + 1e-13 * abs(f) or (t > 1.0 and float(((y - z) * (z - x)).sum()) > 0):
                if fz <= f + 1e-13 * abs(f):  # gradient restart: keep the (descending) step
                    restarts += 1
                    step = float(torch.linalg.vector_norm(z - x))
                    x, xG, f = z, zG, fz
                    y, yG, t = x, xG, 1.0
                    if step <= tol * max(float(torch.linalg.vector_norm(x)), 1e-300):
                        converged = True
                        break
                    continue
                if t == 1.0:  # a plain projected-gradient step from x did not descend: at the optimum
                    converged = True  # (up to the accuracy of the projection)
                    break
                restarts += 1
                y, yG, t = x, xG, 1.0
                continue
            t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            beta = (t - 1.0) / t_new
            step = float(torch.linalg.vector_norm(z - x))
            y, yG = z + beta * (z - x), zG + beta * (zG - xG)
            x, xG, f, t = z, zG, fz, t_new
            if step <= tol * max(float(torch.linalg.vector_norm(x)), 1e-300):
                converged = True
                break
        info.update(iterations=it, converged=converged, restarts=restarts, objective=f, dykstra_rounds=rounds_total)
        return x, info


# ----------------------------------------------------------------------------- the method
def fit_convex_weights(
    weight: Tensor,
    bias: Tensor | None,
    n: int,
    mean_in: Tensor,
    mean_ref: Tensor,
    gram_in: Tensor,
    cross: Tensor,
    rank: int,
    *,
    radius: float | None = None,
    box: float | None = None,
    init: str | Tensor = "lstsq",
    truncation: str = "metric",
    gram_ref: Tensor | None = None,
    ridge: float = DEFAULT_RIDGE,
    n_iter: int = 1000,
    tol: float = 1e-9,
    n_dykstra: int = DEFAULT_DYKSTRA_ITER,
) -> LowRankFit:
    """The `convex_weights` method: rank-r compression by nuclear-ball/box constrained least
    squares on the weights (a weight-space heuristic, not Zhang & Saab's program: see the
    module docstring).

    Solves min tr(Ŵ G Ŵᵀ) − 2 tr(Ŵ C Wᵀ) s.t. ‖Ŵ‖_* ≤ radius, |Ŵ_ij| ≤ box (see the module
    docstring) with `constrained_lstsq`, where G is regularized to G + δI, δ = ridge·trace(G)/in
    (Grams of calibration activations are often ill-conditioned), then truncates to rank r.

    Args:
        weight: W (out, in), any real floating dtype. bias: b (out,) or None (taken as 0).
        n: number of calibration rows the statistics were accumulated over (int >= 1).
        mean_in: μ̃ (in,), row mean of X̃. mean_ref: μ (in,), row mean of X.
        gram_in: X̃ᵀX̃ (in, in), uncentered. cross: X̃ᵀX (in, in), uncentered.
            All four statistics must be float64 and on weight's device.
        rank: r in [1, min(out, in)].
        radius: nuclear-norm bound. None (default): the nuclear norm of the best rank-r
            activation-aware solution [W Cᵀ L⁻ᵀ]_r L⁻¹ (G + δI = L Lᵀ), which is thus feasible,
            so before truncation the convex solution is at least as good on the calibration
            objective. math.inf: no bound.
        box: bound on |Ŵ_ij|; None (default): no box.
        init: "lstsq" (default: the unconstrained least-squares solution W Cᵀ (G + δI)⁻¹,
            projected onto the set), "activation" (the rank-r activation-aware solution),
            "weight" (W), or an (out, in) tensor; always projected onto the set first.
        truncation: "metric" (default): best rank-r approximation of the convex solution Ŵ_c
            in the G-metric, [Ŵ_c L]_r L⁻¹, which is exactly optimal for the objective when the
            constraints are inactive; the truncated Ŵ can then leave the sets slightly.
            "euclidean": truncated SVD of Ŵ_c, which keeps ‖Ŵ‖_* ≤ radius (the box is not
            preserved by any rank truncation). Lossless either way when rank(Ŵ_c) <= r, which
            the nuclear ball tends to produce.
        gram_ref: optional XᵀX (in, in) uncentered, float64: adds info["rel_error"], the
            relative output error ‖X_c Wᵀ − X̃_c Ŵᵀ‖_F / ‖X_c Wᵀ‖_F (centered: the free bias
            removes the mean part) on the calibration data.
        ridge, n_iter, tol, n_dykstra: see above and `constrained_lstsq`.
    Returns:
        LowRankFit(first (r, in), second (out, r), bias (out,), info) in float64, with info keys
        iterations, converged, restarts, radius, box, ridge_delta, objective (tr(ŴGŴᵀ) −
        2tr(ŴCWᵀ) of the returned Ŵ with the unregularized G; add tr(W G_ref Wᵀ) for the
        squared error), objective_convex (same, for the untruncated convex solution),
        objective_activation (same, for the rank-r activation-aware solution), solution_rank
        (numerical rank of Ŵ_c), nuclear_norm, max_abs (of Ŵ_c), and rel_error if gram_ref.
    """
    out_f, in_f = _check_weight_bias_rank(weight, bias, rank)
    dev = weight.device
    check_int("n", n, 1)
    _check_tensor("mean_in", mean_in, shape=(in_f,), float64=True, device=dev)
    _check_tensor("mean_ref", mean_ref, shape=(in_f,), float64=True, device=dev)
    _check_tensor("gram_in", gram_in, shape=(in_f, in_f), float64=True, device=dev)
    _check_tensor("cross", cross, shape=(in_f, in_f), float64=True, device=dev)
    if gram_ref is not None:
        _check_tensor("gram_ref", gram_ref, shape=(in_f, in_f), float64=True, device=dev)
    radius = _check_positive("radius", radius, allow_inf=True)
    box = _check_positive("box", box)
    ridge = _check_positive("ridge", ridge, allow_none=False)
    if truncation not in ("metric", "euclidean"):
        raise ValueError(f"truncation: expected 'metric' or 'euclidean', got {truncation!r}")
    if isinstance(init, str):
        if init not in ("lstsq", "activation", "weight"):
            raise ValueError(f"init: expected 'lstsq', 'activation', 'weight' or a tensor, got {init!r}")
    else:
        _check_tensor("init", init, shape=(out_f, in_f), device=dev)
    check_int("n_iter", n_iter, 0)
    check_int("n_dykstra", n_dykstra, 1)
    tol = _check_positive("tol", tol, allow_none=False)

    with small_problem_threads(dev, min(out_f, in_f)):
        f64 = torch.float64
        W = weight.detach().to(f64)
        b = bias.detach().to(f64) if bias is not None else W.new_zeros(out_f)
        G = gram_in - n * torch.outer(mean_in, mean_in)  # new tensors: the caller's are untouched
        G = 0.5 * (G + G.T)
        C = cross - n * torch.outer(mean_in, mean_ref)
        L, delta = ridged_cholesky(G, ridge)
        G_reg = G + delta * torch.eye(in_f, dtype=f64, device=dev)
        B = W @ C.T  # the objective is tr(ŴGŴᵀ) − 2⟨Ŵ, B⟩
        T = _solve_right_lower_t(B, L)  # B L⁻ᵀ: the target in whitened coordinates

        def obj(w):
            return float((w * (w @ G)).sum()) - 2.0 * float((w * B).sum())

        a_first, a_second = metric_truncation(T, L, rank)
        W_act = a_second @ a_first
        if radius is None:
            radius = float(_svdvals(W_act).sum())
            if not radius > 0:  # W C = 0: nothing to fit; any tiny ball gives Ŵ = 0
                radius = 1e-300

        if isinstance(init, Tensor):
            x0 = init.to(f64)
        elif init == "lstsq":
            x0 = _solve_right_lower(T, L)  # B (L Lᵀ)⁻¹
        elif init == "activation":
            x0 = W_act
        else:
            x0 = W
        W_c, sinfo = constrained_lstsq(
            G_reg, B, radius=radius, box=box, init=x0, n_iter=n_iter, tol=tol, n_dykstra=n_dykstra
        )
        if truncation == "metric":
            first, second = metric_truncation(W_c @ L, L, rank)
        else:
            U, S, Vh = _svd(W_c)
            first, second, _ = balanced_factors(U[:, :rank] * S[:rank], Vh[:rank], rank)
        W_hat = second @ first
        bias_hat = b + W @ mean_ref - W_hat @ mean_in
        sv = _svdvals(W_c)
        info = {
            "method": "convex_weights",
            "iterations": sinfo["iterations"],
            "converged": sinfo["converged"],
            "restarts": sinfo["restarts"],
            "dykstra_rounds": sinfo["dykstra_rounds"],
            "radius": radius,
            "box": box,
            "ridge_delta": delta,
            "truncation": truncation,
            "objective": obj(W_hat),
            "objective_convex": obj(W_c),
            "objective_activation": obj(W_act),
            "solution_rank": int((sv > sv[0] * 1e-10).sum()) if float(sv[0]) > 0 else 0,
            "nuclear_norm": float(sv.sum()),
            "max_abs": float(W_c.abs().max()),
        }
        if gram_ref is not None:
            Gr = gram_ref - n * torch.outer(mean_ref, mean_ref)
            const = float((W * (W @ Gr)).sum())
            info["rel_error"] = math.sqrt(max(info["objective"] + const, 0.0) / const) if const > 0 else 0.0
        return LowRankFit(first, second, bias_hat, info)


# ----------------------------------------------------------------------------- Zhang & Saab's program
def _check_layer_samples(weight, bias, rank, X_ref, X_in):
    """Validate a fit's layer and sample rows; returns (out_features, in_features, device)."""
    out_f, in_f = _check_weight_bias_rank(weight, bias, rank)
    dev = weight.device
    _check_tensor("X_ref", X_ref, ndim=2, device=dev)
    if X_ref.shape[1] != in_f:
        raise ValueError(f"X_ref: expected shape (m, {in_f}) to match weight, got {tuple(X_ref.shape)}")
    if X_ref.shape[0] < 2:
        raise ValueError(f"X_ref: expected at least 2 rows, got {X_ref.shape[0]}")
    _check_tensor("X_in", X_in, shape=tuple(X_ref.shape), device=dev)
    return out_f, in_f, dev


class PreactBasis:
    """Orthonormal coordinates of the centered pre-activations a linear layer on X_in can make.

    X̃_c = X_in − 1μ̃ᵀ = A S Vkᵀ with A (m×k) orthonormal columns, from the eigenvectors of
    X̃_cᵀX̃_c whose eigenvalues exceed δ = ridge · trace/in (weaker directions carry less than
    the ridge and are dropped). A ⟂ 1 (X̃_c is centered), so [A, 1/√m] is an orthonormal basis
    of the range of [X̃_c, 1]: M = A Vᵀ + 1cᵀ has ‖M − 1cᵀ‖_* = ‖V‖_* and the weight with those
    pre-activations is Ŵ = V S⁻¹ Vkᵀ."""

    def __init__(self, X_in: Tensor, ridge: float) -> None:
        self.m = X_in.shape[0]
        self.mu = X_in.mean(0)
        Xc = X_in - self.mu
        G = Xc.T @ Xc
        evals, evecs = torch.linalg.eigh(0.5 * (G + G.T))
        self.delta = ridge * float(evals.clamp_min(0).sum()) / G.shape[0]
        keep = evals > max(self.delta, 1e-300)
        self.vecs = evecs[:, keep]
        self.s = evals[keep].sqrt()
        self.k = int(self.s.shape[0])
        self.A = (Xc @ self.vecs) / self.s

    def full(self) -> Tensor:
        """[A, 1/√m] (m × (k+1))."""
        return torch.cat([self.A, self.A.new_full((self.m, 1), self.m**-0.5)], dim=1)

    def factors(self, V: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        """Balanced rank-`rank` factors (first (r, in), second (out, r)) of the weight whose
        centered pre-activations are A [V]_rᵀ: the best rank-r weight in the X̃ metric."""
        U, S, Vh = _svd(V)
        k = min(rank, S.shape[0])
        left = U[:, :k] * S[:k]
        right = (Vh[:k] / self.s) @ self.vecs.T
        first, second, _ = balanced_factors(left, right, rank)
        return first, second


def truncate(V: Tensor, rank: int) -> Tensor:
    """Best rank-`rank` approximation of V (truncated SVD)."""
    U, S, Vh = _svd(V)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def project_box_nuclear(
    Z: Tensor,
    basis: Tensor,
    alpha: float,
    radius: float,
    *,
    tol: float = 1e-5,
    max_iter: int = 500,
    rho: float = 1.0,
    state: tuple | None = None,
) -> tuple[Tensor, dict, tuple]:
    """Euclidean projection of Z (n×K) onto {V: ‖V‖_* ≤ radius, ‖basis Vᵀ‖_∞ ≤ alpha}, for a
    basis (m×K) with orthonormal columns (so ‖V − Z‖_F = ‖basis Vᵀ − basis Zᵀ‖_F).

    ADMM on V and Q = basis Vᵀ (scaled dual U; Boyd et al. 2011, §3): V ← P_*((Z + ρ(Q − U)ᵀ
    basis)/(1 + ρ)), Q ← clip(basis Vᵀ + U, ±alpha), U ← U + basis Vᵀ − Q, with residual
    balancing of ρ (§3.4.1). Stops when the primal residual ‖basis Vᵀ − Q‖_F ≤ tol · max(‖basis
    Vᵀ‖_F, ‖Q‖_F, ‖Z‖_F) and the dual residual, bounded by ρ‖Q − Q_prev‖_F, ≤ tol · max(ρ‖U‖_F,
    ‖Z‖_F) (Boyd's relative criterion with the absolute part set to the problem's scale ‖Z‖_F:
    with few active box entries U is tiny and a purely relative test would not stop). Shortcut:
    when the nuclear projection P_*(Z) already satisfies the box it is the exact answer (0
    iterations). The returned V always lies in both sets: it is in the ball by construction and
    is scaled by min(1, alpha / ‖basis Vᵀ‖_∞) at the end (both sets are symmetric, convex and
    contain 0); info["box_scale"] says how far from 1 that was. `state` (returned) warm-starts
    a later call on a nearby Z. Returns (V, info, state)."""
    V = project_nuclear_ball(Z, radius)
    BV = basis @ V.T
    peak = float(BV.abs().max())
    if peak <= alpha:
        return V, {"iterations": 0, "converged": True, "box_scale": 1.0, "rho": rho}, state or ()
    if state:
        Q, U, rho = state
    else:
        Q, U = BV.clamp(-alpha, alpha), torch.zeros_like(BV)
    converged, it, r_norm, s_norm = False, 0, math.inf, math.inf
    scale_z = max(float(torch.linalg.vector_norm(Z)), 1e-300)  # the problem's scale, for the tolerances
    for it in range(1, max_iter + 1):  # noqa: B007 (iterations reported after the loop)
        V = project_nuclear_ball((Z + rho * ((Q - U).T @ basis)) / (1.0 + rho), radius)
        BV = basis @ V.T
        Q_new = (BV + U).clamp(-alpha, alpha)
        U = U + BV - Q_new
        r_norm = float(torch.linalg.vector_norm(BV - Q_new))
        s_norm = rho * float(torch.linalg.vector_norm(Q_new - Q))
        Q = Q_new
        eps_pri = tol * max(float(torch.linalg.vector_norm(BV)), float(torch.linalg.vector_norm(Q)), scale_z)
        eps_dual = tol * max(rho * float(torch.linalg.vector_norm(U)), scale_z)
        if r_norm <= eps_pri and s_norm <= eps_dual:
            converged = True
            break
        # residual balancing on the residuals relative to their thresholds; U is the dual / ρ
        if r_norm / eps_pri > 10.0 * s_norm / eps_dual:
            rho, U = 2.0 * rho, 0.5 * U
        elif s_norm / eps_dual > 10.0 * r_norm / eps_pri:
            rho, U = 0.5 * rho, 2.0 * U
    peak = float((basis @ V.T).abs().max())
    scale = min(1.0, alpha / peak) if peak > 0 else 1.0
    info = {
        "iterations": it,
        "converged": converged,
        "box_scale": scale,
        "rho": rho,
        "primal_residual": r_norm,
        "dual_residual": s_norm,
    }
    return V * scale, info, (Q, U, rho)


def choose_alpha(alpha, Q_act: Tensor, P: Tensor) -> tuple[float, str]:
    """The entrywise bound α and the rule that gave it: None / "activation" → max |Q_act| (the
    activation-aware rank-r pre-activations), "target" → max |P| (the original ones), or a
    positive float as given."""
    if alpha is None or alpha == "activation":
        value, rule = float(Q_act.abs().max()), "activation"
    elif alpha == "target":
        value, rule = float(P.abs().max()), "target"
    else:
        value, rule = _check_positive("alpha", alpha, allow_none=False), "given"
    return max(value, 1e-300), rule


def _check_alpha(alpha):
    if isinstance(alpha, str) or alpha is None:
        if alpha not in (None, "activation", "target"):
            raise ValueError(f"alpha: expected None, 'activation', 'target' or a positive float, got {alpha!r}")
        return alpha
    return _check_positive("alpha", alpha, allow_none=False)


def fit_convex(
    weight: Tensor,
    bias: Tensor | None,
    X_ref: Tensor,
    X_in: Tensor,
    rank: int,
    *,
    alpha: float | str | None = None,
    radius: float | None = None,
    tol: float = 1e-5,
    max_iter: int = 500,
    ridge: float = DEFAULT_RIDGE,
) -> LowRankFit:
    """The `convex` method: Zhang & Saab's convex program (Theorem 4.4 / Corollary 4.7) on the
    pre-activations, then the rank-r output (see the module docstring for the reduction to a
    projection and the departures: free bias, the α rule, dropped weak directions).

    Solves min ‖Q − P‖_F over Q = X̃Ŵᵀ + 1ĉᵀ with ‖Q‖_∞ ≤ α and ‖Q‖_* ≤ radius (P = X_ref Wᵀ +
    b), by `project_box_nuclear` to a relative ADMM residual `tol`, then returns the best
    rank-r weight in the X̃ metric for the solution, with its free bias.

    Args:
        weight: W (out, in); bias: b (out,) or None (taken as 0); any real floating dtype.
        X_ref: (m, in) inputs of the original model at this layer; X_in: (m, in) inputs of the
            model compressed so far, rows paired with X_ref (m >= 2). Same device as weight.
        rank: r in [1, min(out, in)].
        alpha: the entrywise bound α: None or "activation" (default): max |Q_act| of the
            activation-aware rank-r pre-activations on these rows (an estimate of the bound
            the theorem assumes on the planted low-rank pre-activations; Q_act is feasible);
            "target": max |P| (then P's projection is typically feasible and, unless the ball
            binds, the method reduces to "activation"); or a positive float.
        radius: the nuclear bound. None (default): the paper's α √(r m N1) (m rows, N1 = out);
            a positive float or math.inf.
        tol: ADMM stopping tolerance (relative primal and dual residuals); max_iter: its cap.
        ridge: input directions with energy below ridge · trace(X̃_cᵀX̃_c)/in are dropped.
    Returns:
        LowRankFit(first (r, in), second (out, r), bias (out,), info), float64. info keys:
        alpha, alpha_rule, radius, iterations, converged, primal_residual, dual_residual,
        box_scale, nuclear_norm (of the convex solution's centered-and-bias coordinates),
        ball_active (nuclear bound attained), box_active_fraction (share of entries at ±α),
        solution_rank, basis_dim, ridge_delta, and the relative calibration errors
        ‖Q − P‖_F / ‖P − 1P̄ᵀ‖_F of the result (rel_error), the convex solution before
        truncation (rel_error_convex) and the activation-aware fit (rel_error_activation).
    """
    out_f, in_f, dev = _check_layer_samples(weight, bias, rank, X_ref, X_in)
    alpha = _check_alpha(alpha)
    radius = _check_positive("radius", radius, allow_inf=True)
    tol = _check_positive("tol", tol, allow_none=False)
    check_int("max_iter", max_iter, 0)
    ridge = _check_positive("ridge", ridge, allow_none=False)

    with small_problem_threads(dev, min(out_f, in_f)):
        f64 = torch.float64
        W = weight.detach().to(f64)
        b = bias.detach().to(f64) if bias is not None else W.new_zeros(out_f)
        P = X_ref.to(f64) @ W.T + b  # new tensors: the caller's are untouched
        basis = PreactBasis(X_in.to(f64), ridge)
        m, k = basis.m, basis.k
        c0 = P.mean(0)
        Zx = (P - c0).T @ basis.A  # coordinates of P's projection (out × k); the bias part is c0
        V_act = truncate(Zx, rank)
        Q_act = basis.A @ V_act.T + c0
        alpha_value, rule = choose_alpha(alpha, Q_act, P)
        if radius is None:
            radius = alpha_value * math.sqrt(rank * m * out_f)
        B = basis.full()
        Z = torch.cat([Zx, math.sqrt(m) * c0[:, None]], dim=1)
        V, pinfo, _ = project_box_nuclear(Z, B, alpha_value, radius, tol=tol, max_iter=max_iter)
        Vx, c = V[:, :k], V[:, k] / math.sqrt(m)
        first, second = basis.factors(Vx, rank)
        W_hat = second @ first
        bias_hat = c - W_hat @ basis.mu

        energy = float(torch.linalg.vector_norm(P - c0))

        def rel(Q):
            return float(torch.linalg.vector_norm(Q - P)) / energy if energy > 0 else 0.0

        Q_conv = B @ V.T
        sv = _svdvals(V)
        info = {
            "method": "convex",
            "alpha": alpha_value,
            "alpha_rule": rule,
            "radius": radius,
            **pinfo,
            "nuclear_norm": float(sv.sum()),
            "ball_active": bool(float(sv.sum()) >= radius * (1 - 1e-6)),
            "box_active_fraction": float((Q_conv.abs() >= alpha_value * (1 - 1e-6)).double().mean()),
            "solution_rank": int((sv > sv[0] * 1e-10).sum()) if float(sv[0]) > 0 else 0,
            "basis_dim": k,
            "ridge_delta": basis.delta,
            "rel_error": rel(basis.A @ truncate(Vx, rank).T + c),
            "rel_error_convex": rel(Q_conv),
            "rel_error_activation": rel(Q_act),
        }
        return LowRankFit(first, second, bias_hat, info)
