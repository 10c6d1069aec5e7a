"""The `convex` and `relu` data-driven low-rank methods (tensorpress.compress.convex / .relu)."""

from __future__ import annotations

import math

import pytest
import torch

from tensorpress.compress.convex import (
    LowRankFit,
    PreactBasis,
    _project,
    constrained_lstsq,
    fit_convex,
    fit_convex_weights,
    project_box_nuclear,
    project_l1_ball,
    project_nuclear_ball,
)
from tensorpress.compress.relu import fit_gelu, fit_relu, gelu_loss, ml_sigma, relu_nll

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread(restore_threads):
    # small problems: one thread avoids OpenMP contention on the shared 2-core machine
    torch.set_num_threads(1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(g, m, d, decay=1.0, shift=0.2):
    """Correlated inputs: rows ~ N(shift, Q diag(10^-decay·i/d)² Qᵀ)."""
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    scale = Q * torch.logspace(0, -decay, d, dtype=F64)
    return lambda k: torch.randn(k, d, generator=g, dtype=F64) @ scale.T + shift


def _layer(g, out_f, in_f, alpha=0.7):
    """A weight with a power-law spectrum, like trained layers."""
    U = torch.linalg.qr(torch.randn(out_f, min(out_f, in_f), generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(in_f, min(out_f, in_f), generator=g, dtype=F64))[0]
    s = torch.arange(1, min(out_f, in_f) + 1, dtype=F64) ** -alpha
    return 3.0 * (U * s) @ V.T


def _stats(X, Xt):
    return dict(n=X.shape[0], mean_in=Xt.mean(0), mean_ref=X.mean(0), gram_in=Xt.T @ Xt, cross=Xt.T @ X)


def _centered(stats, W):
    n, mu_in, mu_ref = stats["n"], stats["mean_in"], stats["mean_ref"]
    G = stats["gram_in"] - n * torch.outer(mu_in, mu_in)
    C = stats["cross"] - n * torch.outer(mu_in, mu_ref)
    return G, C, W @ C.T


def _ridge(G, ridge=1e-6):
    return G + ridge * torch.trace(G) / G.shape[0] * torch.eye(G.shape[0], dtype=F64)


def _activation_fit(W, b, X, Xt, r, ridge=1e-6):
    """Baseline: rank-r activation-aware least squares (best rank r in the X̃ metric)."""
    P = X @ W.T + b
    mu = Xt.mean(0)
    Xc = Xt - mu
    L = torch.linalg.cholesky(_ridge(Xc.T @ Xc, ridge))
    A = torch.linalg.solve_triangular(L, Xc.T, upper=False).T
    c = P.mean(0)
    U, S, Vh = torch.linalg.svd((P - c).T @ A, full_matrices=False)
    Wh = torch.linalg.solve_triangular(L.T, ((U[:, :r] * S[:r]) @ Vh[:r]).T, upper=True).T
    return Wh, c - Wh @ mu


def _activation_exact(W, b, X, Xt, r):
    """The activation-aware rank-r fit without ridge: Ŵᵀ = X̃_c⁺ [Π P_c]_r (Π: projection on
    the range of X̃_c), free bias; X̃_c must have full column rank."""
    P = X @ W.T + b
    c = P.mean(0)
    Xc = Xt - Xt.mean(0)
    Qo, _ = torch.linalg.qr(Xc)
    U, S, Vh = torch.linalg.svd(Qo @ (Qo.T @ (P - c)), full_matrices=False)
    Wh = torch.linalg.lstsq(Xc, (U[:, :r] * S[:r]) @ Vh[:r]).solution.T
    return Wh, c - Wh @ Xt.mean(0)


def _relu_err(W, b, Wh, bh, X, Xt):
    Y = torch.relu(X @ W.T + b)
    return float(torch.linalg.vector_norm(Y - torch.relu(Xt @ Wh.T + bh)) / torch.linalg.vector_norm(Y))


@pytest.fixture(scope="module")
def problem():
    g = _gen(0)
    m, d, h = 600, 24, 16
    draw = _inputs(g, m, d, decay=1.0)
    X = draw(m)
    E = 0.1 * torch.randn(d, d, generator=g, dtype=F64) / d**0.5
    Xt = X + X @ E
    W = _layer(g, h, d)
    b = torch.randn(h, generator=g, dtype=F64)
    return W, b, X, Xt


# ----------------------------------------------------------------------------- convex
def test_l1_and_nuclear_projection():
    s = torch.tensor([5.0, 3.0, 1.0, 0.5], dtype=F64)
    p = project_l1_ball(s, 4.0)
    assert torch.allclose(p, torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=F64))
    assert project_l1_ball(s, 100.0) is s
    Z = torch.randn(7, 5, generator=_gen(1), dtype=F64)
    P = project_nuclear_ball(Z, 2.0)
    assert float(torch.linalg.svdvals(P).sum()) == pytest.approx(2.0, rel=1e-10)
    # it is the Euclidean projection: <Z - P, Q - P> <= 0 for feasible Q
    for k in range(10):
        Q = torch.randn(7, 5, generator=_gen(10 + k), dtype=F64)
        Q = Q * (1.9 / float(torch.linalg.svdvals(Q).sum()))
        assert float(((Z - P) * (Q - P)).sum()) <= 1e-10


def test_convex_weights_unconstrained_converges_to_least_squares(problem):
    W, b, X, Xt = problem
    st = _stats(X, Xt)
    G, C, B = _centered(st, W)
    W_ls = torch.linalg.solve(_ridge(G), B.T).T  # the ridge least-squares solution
    b_ls = b + W @ st["mean_ref"] - W_ls @ st["mean_in"]
    full = min(W.shape)
    fit = fit_convex_weights(W, b, **st, rank=full, radius=math.inf, init="weight", n_iter=5000, tol=1e-13)
    assert isinstance(fit, LowRankFit)
    assert fit.first.shape == (full, W.shape[1]) and fit.second.shape == (W.shape[0], full)
    assert fit.bias.shape == (W.shape[0],) and fit.first.dtype == F64
    assert fit.info["converged"] and fit.info["iterations"] > 10  # really iterated from W
    assert float(torch.linalg.vector_norm(fit.weight() - W_ls) / torch.linalg.vector_norm(W_ls)) < 1e-7
    assert torch.allclose(fit.bias, b_ls, rtol=1e-6, atol=1e-8)
    # with the default init (projected least squares) it is immediate
    fit2 = fit_convex_weights(W, b, **st, rank=full, radius=math.inf)
    assert torch.allclose(fit2.weight(), W_ls, rtol=1e-9, atol=1e-10)


def test_convex_weights_unconstrained_rank_r_is_activation(problem):
    """With no constraint, truncation in the G metric gives the activation-aware solution."""
    W, b, X, Xt = problem
    r = 4
    fit = fit_convex_weights(W, b, **_stats(X, Xt), rank=r, radius=math.inf, gram_ref=X.T @ X)
    W_a, b_a = _activation_fit(W, b, X, Xt, r)
    assert torch.allclose(fit.weight(), W_a, rtol=1e-7, atol=1e-9)
    assert torch.allclose(fit.bias, b_a, rtol=1e-7, atol=1e-9)
    assert fit.info["objective"] == pytest.approx(fit.info["objective_activation"], rel=1e-9)
    # balanced factors: first firstᵀ = secondᵀ second = diag(singular values)
    assert torch.allclose(fit.first @ fit.first.T, fit.second.T @ fit.second, atol=1e-9)
    # rel_error from the statistics matches the error computed on the data
    Y = (X - X.mean(0)) @ W.T
    direct = torch.linalg.vector_norm(Y - (Xt - Xt.mean(0)) @ fit.weight().T) / torch.linalg.vector_norm(Y)
    assert fit.info["rel_error"] == pytest.approx(float(direct), rel=1e-6)


@pytest.mark.parametrize("use_box", [False, True])
def test_convex_active_constraints_kkt(problem, use_box):
    W, b, X, Xt = problem
    st = _stats(X, Xt)
    G, C, B = _centered(st, W)
    Gr = _ridge(G)
    W_ls = torch.linalg.solve(Gr, B.T).T
    radius = 0.3 * float(torch.linalg.svdvals(W_ls).sum())
    box = 0.5 * float(W_ls.abs().max()) if use_box else None
    sol, info = constrained_lstsq(Gr, B, radius=radius, box=box, init=W_ls, n_iter=3000, tol=1e-12)

    def f(x):
        return 0.5 * float((x * (x @ Gr)).sum()) - float((x * B).sum())

    assert float(torch.linalg.svdvals(sol).sum()) <= radius * (1 + 1e-9)
    assert float(torch.linalg.svdvals(sol).sum()) >= radius * 0.999  # the ball is active
    if box is not None:
        assert float(sol.abs().max()) <= box * (1 + 1e-12)
        assert info["dykstra_rounds"] > 0
    assert f(sol) == pytest.approx(info["objective"], rel=1e-12)
    start, _ = _project(W_ls, radius, box, 200)
    assert f(sol) <= f(start) and info["objective"] <= info["objective_init"]
    # first-order optimality (variational inequality) against random feasible points, which
    # also makes f(sol) no worse than any of them (f convex)
    grad = sol @ Gr - B
    scale = abs(f(sol))
    for k in range(20):
        Z = torch.randn(W.shape, generator=_gen(100 + k), dtype=F64)
        Z = Z * min(radius / float(torch.linalg.svdvals(Z).sum()), (box or math.inf) / float(Z.abs().max()))
        assert float((grad * (Z - sol)).sum()) >= -1e-5 * scale
        assert f(sol) <= f(Z)
    # a projected-gradient step does not move it (fixed point)
    step, _ = _project(sol - grad / info["lipschitz"], radius, box, 200)
    assert float(torch.linalg.vector_norm(step - sol)) <= 1e-5 * float(torch.linalg.vector_norm(sol))


def test_fit_convex_weights_default_radius_and_truncation(problem):
    W, b, X, Xt = problem
    r = 4
    st = _stats(X, Xt)
    fit = fit_convex_weights(W, b, **st, rank=r)
    # default radius: the nuclear norm of the rank-r activation-aware solution
    W_a, _ = _activation_fit(W, b, X, Xt, r)
    assert fit.info["radius"] == pytest.approx(float(torch.linalg.svdvals(W_a).sum()), rel=1e-9)
    assert fit.info["nuclear_norm"] <= fit.info["radius"] * (1 + 1e-9)
    # the activation-aware solution is feasible, so the convex optimum is at least as good
    f_act = fit.info["objective_activation"]
    assert fit.info["objective_convex"] <= f_act + 1e-9 * abs(f_act)
    assert fit.first.shape == (r, W.shape[1]) and fit.second.shape == (W.shape[0], r)
    assert fit.info["converged"]
    # euclidean truncation keeps the nuclear-norm ball; box constraints are met before truncation
    box = 0.2 * float(W.abs().max())
    fe = fit_convex_weights(W, b, **st, rank=r, box=box, truncation="euclidean")
    assert float(torch.linalg.svdvals(fe.weight()).sum()) <= fe.info["radius"] * (1 + 1e-9)
    assert fe.info["max_abs"] <= box * (1 + 1e-12)
    assert torch.linalg.matrix_rank(fe.weight()) <= r


def test_fit_convex_weights_validation_and_no_mutation(problem):
    W, b, X, Xt = problem
    st = _stats(X, Xt)
    copies = {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
    Wc, bc = W.clone(), b.clone()
    fit_convex_weights(W, b, **st, rank=3, box=0.5)
    fit_convex_weights(W, None, **st, rank=3)
    assert torch.equal(W, Wc) and torch.equal(b, bc)
    assert all(torch.equal(st[k], v) for k, v in copies.items())
    h, d = W.shape
    with pytest.raises(ValueError, match="rank"):
        fit_convex_weights(W, b, **st, rank=0)
    with pytest.raises(ValueError, match="rank"):
        fit_convex_weights(W, b, **st, rank=min(h, d) + 1)
    with pytest.raises(TypeError, match="gram_in.*float64"):
        fit_convex_weights(W, b, **{**st, "gram_in": st["gram_in"].float()}, rank=2)
    with pytest.raises(ValueError, match="cross"):
        fit_convex_weights(W, b, **{**st, "cross": st["cross"][:, :-1]}, rank=2)
    with pytest.raises(ValueError, match="mean_in"):
        fit_convex_weights(W, b, **{**st, "mean_in": torch.full((d,), float("nan"), dtype=F64)}, rank=2)
    with pytest.raises(ValueError, match="bias"):
        fit_convex_weights(W, b[:-1], **st, rank=2)
    with pytest.raises(TypeError, match="weight"):
        fit_convex_weights(W.numpy(), b, **st, rank=2)
    with pytest.raises(ValueError, match="radius"):
        fit_convex_weights(W, b, **st, rank=2, radius=-1.0)
    with pytest.raises(ValueError, match="box"):
        fit_convex_weights(W, b, **st, rank=2, box=0.0)
    with pytest.raises(ValueError, match="n"):
        fit_convex_weights(W, b, **{**st, "n": 0}, rank=2)
    with pytest.raises(ValueError, match="truncation"):
        fit_convex_weights(W, b, **st, rank=2, truncation="frobenius")


# ----------------------------------------------------------------------------- convex (Zhang & Saab)
def _orthonormal(g, m, k):
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64))[0]


@pytest.mark.parametrize("which", ["both", "box", "ball"])
def test_project_box_nuclear_is_the_projection(which):
    """Feasible, and the variational inequality <Z − V, U − V> <= 0 holds for feasible U."""
    g = _gen(7)
    m, K, n = 60, 8, 5
    B = _orthonormal(g, m, K)
    Z = 3.0 * torch.randn(n, K, generator=g, dtype=F64)
    peak = float((B @ Z.T).abs().max())
    nuc = float(torch.linalg.svdvals(Z).sum())
    alpha = 0.4 * peak if which != "ball" else 2.0 * peak
    radius = 0.5 * nuc if which != "box" else 2.0 * nuc
    V, info, _ = project_box_nuclear(Z, B, alpha, radius, tol=1e-9, max_iter=5000)
    assert info["converged"] and info["iterations"] > (0 if which != "ball" else -1)
    assert float(torch.linalg.svdvals(V).sum()) <= radius * (1 + 1e-9)
    assert float((B @ V.T).abs().max()) <= alpha * (1 + 1e-12)
    gap = float(torch.linalg.vector_norm(Z - V))
    for k in range(30):
        U = torch.randn(n, K, generator=_gen(200 + k), dtype=F64)
        U = U * min(radius / float(torch.linalg.svdvals(U).sum()), alpha / float((B @ U.T).abs().max()))
        U = V + torch.rand((), generator=_gen(300 + k), dtype=F64) * (U - V)  # feasible, near V too
        assert float(((Z - V) * (U - V)).sum()) <= 1e-6 * gap * float(torch.linalg.vector_norm(U - V)) + 1e-12
    if which == "ball":  # the box is inactive at the ball's projection: exact, no ADMM
        assert info["iterations"] == 0 and torch.allclose(V, project_nuclear_ball(Z, radius))


def test_preact_basis_orthonormal_and_weights(problem):
    W, b, X, Xt = problem
    basis = PreactBasis(Xt, 1e-6)
    full = basis.full()
    assert basis.k == X.shape[1]
    assert torch.allclose(full.T @ full, torch.eye(basis.k + 1, dtype=F64), atol=1e-9)
    V = torch.randn(W.shape[0], basis.k, generator=_gen(5), dtype=F64)
    first, second = basis.factors(V, basis.k)  # full rank: the weight with pre-activations A Vᵀ
    assert torch.allclose((Xt - basis.mu) @ (second @ first).T, basis.A @ V.T, atol=1e-8)


def test_fit_convex_is_zhang_saab_program(problem):
    """Default α (the activation-aware fit is feasible, so the program can only lower the
    calibration error before truncation); feasibility; optimality against feasible points;
    the output weights reproduce the truncated solution's pre-activations."""
    W, b, X, Xt = problem
    r, m, out_f = 4, X.shape[0], W.shape[0]
    fit = fit_convex(W, b, X, Xt, r, tol=1e-8, max_iter=5000)
    info = fit.info
    P = X @ W.T + b
    W_a, b_a = _activation_exact(W, b, X, Xt, r)
    Q_act = Xt @ W_a.T + b_a
    assert info["alpha_rule"] == "activation"
    assert info["alpha"] == pytest.approx(float(Q_act.abs().max()), rel=1e-8)
    assert info["radius"] == pytest.approx(info["alpha"] * math.sqrt(r * m * out_f), rel=1e-12)
    assert info["converged"]
    assert info["rel_error_convex"] <= info["rel_error_activation"] * (1 + 1e-9)
    # the convex solution, rebuilt: least squares fit of P restricted to the set beats feasible points
    basis = PreactBasis(Xt, 1e-6)
    assert fit.first.shape == (r, W.shape[1]) and fit.second.shape == (out_f, r)
    assert torch.linalg.matrix_rank(fit.weight()) <= r
    Q_fit = Xt @ fit.weight().T + fit.bias
    energy = float(torch.linalg.vector_norm(P - P.mean(0)))
    assert float(torch.linalg.vector_norm(Q_fit - P)) / energy == pytest.approx(info["rel_error"], rel=1e-7)
    assert basis.k == X.shape[1]
    # with X̃ = X, α = max |P| and no ball, P itself is feasible: "convex" = "activation"
    same = fit_convex(W, b, X, X, r, alpha="target", radius=math.inf)
    assert same.info["iterations"] == 0 and same.info["rel_error_convex"] < 1e-9
    W_s, b_s = _activation_exact(W, b, X, X, r)
    assert torch.allclose(same.weight(), W_s, rtol=1e-7, atol=1e-9)
    assert torch.allclose(same.bias, b_s, rtol=1e-7, atol=1e-9)
    # a tight α: every entry of the rank-r output before truncation is within it
    tight = fit_convex(W, b, X, Xt, r, alpha=0.5 * info["alpha"], tol=1e-8, max_iter=5000)
    assert tight.info["iterations"] > 0 and tight.info["converged"]
    assert tight.info["box_active_fraction"] > info["box_active_fraction"]
    assert tight.info["rel_error_convex"] > info["rel_error_convex"]


def test_fit_convex_optimality_of_the_program():
    """The solution's objective is no worse than any feasible point in the range (checked with
    random feasible pre-activations), and a tight nuclear bound is attained."""
    g = _gen(11)
    m, d, h, r = 300, 10, 8, 2
    X = torch.randn(m, d, generator=g, dtype=F64)
    W = torch.randn(h, d, generator=g, dtype=F64)
    b = torch.randn(h, generator=g, dtype=F64)
    fit = fit_convex(W, b, X, X, r, alpha=2.0, radius=60.0, tol=1e-9, max_iter=20000)
    info = fit.info
    assert info["converged"] and info["ball_active"] and info["box_active_fraction"] > 0
    P = X @ W.T + b
    energy = float(torch.linalg.vector_norm(P - P.mean(0)))
    best = info["rel_error_convex"] * energy
    B = PreactBasis(X, 1e-6).full()
    for k in range(20):
        V = torch.randn(h, d + 1, generator=_gen(400 + k), dtype=F64)
        V = V * min(60.0 / float(torch.linalg.svdvals(V).sum()), 2.0 / float((B @ V.T).abs().max()))
        assert best <= float(torch.linalg.vector_norm(B @ V.T - P)) + 1e-9


def test_fit_convex_validation_and_no_mutation(problem):
    W, b, X, Xt = problem
    saved = [t.clone() for t in (W, b, X, Xt)]
    fit_convex(W, b, X, Xt, 2, max_iter=5)
    fit_convex(W, None, X, Xt, 2, alpha=1.0, max_iter=5)
    assert all(torch.equal(t, s) for t, s in zip((W, b, X, Xt), saved))
    with pytest.raises(ValueError, match="rank"):
        fit_convex(W, b, X, Xt, 0)
    with pytest.raises(ValueError, match="alpha"):
        fit_convex(W, b, X, Xt, 2, alpha="max")
    with pytest.raises(ValueError, match="alpha"):
        fit_convex(W, b, X, Xt, 2, alpha=-1.0)
    with pytest.raises(ValueError, match="radius"):
        fit_convex(W, b, X, Xt, 2, radius=0.0)
    with pytest.raises(ValueError, match="X_in"):
        fit_convex(W, b, X, Xt[:-1], 2)
    with pytest.raises(ValueError, match="max_iter"):
        fit_convex(W, b, X, Xt, 2, max_iter=-1)


# ----------------------------------------------------------------------------- relu: σ and the box
def test_ml_sigma_recovers_the_noise_level():
    g = _gen(12)
    Q = torch.randn(3000, 40, generator=g, dtype=F64) - 0.3
    for sigma in (0.1, 0.5, 2.0):
        Y = (Q + sigma * torch.randn(Q.shape, generator=g, dtype=F64)).clamp_min(0)
        est = ml_sigma(Q, Y)
        assert est == pytest.approx(sigma, rel=0.03)

        def loglik(s, Y=Y):
            act = Y > 0
            return float(
                (-torch.log(torch.tensor(s)) - 0.5 * ((Y - Q) / s) ** 2)[act].sum()
                + torch.special.log_ndtr(-Q / s)[~act].sum()
            )

        assert loglik(est) >= max(loglik(est * 1.02), loglik(est / 1.02))
    # a perfect fit (no positive residual, every zero target below 0): σ̂ = 0
    assert ml_sigma(Q, Q.clamp_min(0)) == 0.0 or ml_sigma(Q, Q.clamp_min(0)) < 1e-6


def test_relu_theorem_estimator_box_and_sigma_rules(problem):
    W, b, X, Xt = problem
    fit = fit_relu(W, b, X, Xt, 3, alpha=1.0, n_iter=15, polish_iter=0)
    info = fit.info
    assert info["alpha"] == 1.0 and info["sigma_rule"] == "ml" and info["start"] == "convex"
    assert info["admm_iterations"] > 0 and info["box_scale"] <= 1.0
    assert info["radius"] == pytest.approx(math.sqrt(3 * X.shape[0] * W.shape[0]), rel=1e-12)
    heur = fit_relu(W, b, X, Xt, 3, sigma="heuristic", n_iter=3, polish_iter=3)
    assert heur.info["sigma_rule"] == "heuristic" and heur.info["sigma"] != info["sigma"]
    with pytest.raises(ValueError, match="sigma"):
        fit_relu(W, b, X, Xt, 2, sigma="mle")
    with pytest.raises(ValueError, match="alpha"):
        fit_relu(W, b, X, Xt, 2, alpha=0.0)
    with pytest.raises(ValueError, match="admm_tol"):
        fit_relu(W, b, X, Xt, 2, admm_tol=-1.0)


# ----------------------------------------------------------------------------- relu
def test_relu_nll_gradient_and_stability():
    g = _gen(3)
    M = torch.randn(30, 7, generator=g, dtype=F64) * 3
    Y = torch.relu(torch.randn(30, 7, generator=g, dtype=F64))
    sigma = 0.4
    Ma = M.clone().requires_grad_(True)
    act = Y > 0
    ref = 0.5 * ((Y - Ma) ** 2)[act].sum() - sigma**2 * torch.special.log_ndtr(-Ma / sigma)[~act].sum()
    ref.backward()
    value, grad = relu_nll(M, Y, sigma)
    assert value == pytest.approx(float(ref.detach()), rel=1e-12)
    assert torch.allclose(grad, Ma.grad, rtol=1e-10, atol=1e-12)
    # extreme pre-activations stay finite; the zero-target loss tends to ½ M₊²
    big = torch.tensor([[-1e4, -50.0, 0.0, 50.0, 1e4]], dtype=F64)
    v, gr = relu_nll(big, torch.zeros_like(big), 0.01)
    assert math.isfinite(v) and torch.isfinite(gr).all()
    assert float(gr[0, 0]) == 0.0 and float(gr[0, 3]) == pytest.approx(50.0, rel=1e-6)
    assert float(gr[0, 4]) == pytest.approx(1e4, rel=1e-3)  # rounding ~ eps·(M/σ)² there


def test_relu_full_rank_reproduces_layer(problem):
    W, b, X, _ = problem
    fit = fit_relu(W, b, X, X, min(W.shape), n_iter=20, polish_iter=20)
    assert _relu_err(W, b, fit.weight(), fit.bias, X, X) < 1e-3


def _mlp_problem(seed, m=1200, d=40, h=80, offset=1.0):
    """A random 2-layer ReLU MLP's first layer: correlated inputs, power-law weight spectrum,
    biases giving ~20% active units; X̃ perturbed as after compressing earlier layers."""
    g = _gen(seed)
    draw = _inputs(g, m, d, decay=1.0)
    W = _layer(g, h, d)
    P = draw(4000) @ W.T
    b = -P.mean(0) + 0.5 * P.std(0) * torch.randn(h, generator=g, dtype=F64) - offset * P.std(0)
    E = 0.1 * torch.randn(d, d, generator=g, dtype=F64) / d**0.5
    X, Xte = draw(m), draw(m)
    return W, b, X, X + X @ E, Xte, Xte + Xte @ E


def test_relu_beats_activation_on_post_relu_error():
    """Held-out post-ReLU error: relu <= activation-aware < weight SVD, in the sparse regime the
    method is designed for, and the calibration objective F never gets worse."""
    results = []
    for seed, r in ((0, 6), (1, 12)):
        W, b, X, Xt, Xte, Xtte = _mlp_problem(seed)
        U, S, Vh = torch.linalg.svd(W)
        e_svd = _relu_err(W, b, (U[:, :r] * S[:r]) @ Vh[:r], b, Xte, Xtte)
        W_a, b_a = _activation_fit(W, b, X, Xt, r)
        e_act = _relu_err(W, b, W_a, b_a, Xte, Xtte)
        fit = fit_relu(W, b, X, Xt, r)  # the defaults
        e_relu = _relu_err(W, b, fit.weight(), fit.bias, Xte, Xtte)
        assert fit.first.shape == (r, W.shape[1]) and fit.second.shape == (W.shape[0], r)
        assert torch.linalg.matrix_rank(fit.weight()) <= r
        assert fit.info["objective"] <= fit.info["objective_activation"]
        assert 0.1 < fit.info["active_fraction"] < 0.35
        # calibration post-ReLU error improves too
        assert _relu_err(W, b, fit.weight(), fit.bias, X, Xt) < _relu_err(W, b, W_a, b_a, X, Xt)
        results.append((e_svd, e_act, e_relu))
        print(
            f"seed {seed} rank {r}: held-out post-ReLU error svd {e_svd:.4f} activation {e_act:.4f} "
            f"relu {e_relu:.4f} (active {fit.info['active_fraction']:.2f}, start {fit.info['start']})"
        )
        assert e_act < e_svd
        assert e_relu < e_act
    assert sum(e[2] / e[1] for e in results) / len(results) < 0.99, results  # >= 1% better on average


def test_relu_defaults_and_options(problem):
    W, b, X, Xt = problem
    fit = fit_relu(W, b, X, Xt, 3, n_iter=10, polish_iter=10)
    assert fit.info["sigma"] > 0 and fit.info["radius"] > 0
    assert fit.info["iterations"] <= 10 and fit.info["polish_iterations"] <= 10
    plain = fit_relu(W, b, X, Xt, 3, n_iter=0, polish_iter=0)  # = activation-aware
    W_a, b_a = _activation_exact(W, b, X, Xt, 3)
    assert torch.allclose(plain.weight(), W_a, rtol=1e-7, atol=1e-9)
    assert torch.allclose(plain.bias, b_a, rtol=1e-7, atol=1e-9)
    nobias = fit_relu(W, None, X, Xt, 3, sigma=0.1, radius=math.inf, n_iter=5, polish_iter=5)
    assert nobias.info["sigma"] == 0.1 and nobias.bias.shape == (W.shape[0],)
    f32 = fit_relu(W.float(), b.float(), X.float(), Xt.float(), 3, n_iter=5, polish_iter=5)
    assert f32.first.dtype == F64


def test_fit_relu_validation_and_no_mutation(problem):
    W, b, X, Xt = problem
    saved = [t.clone() for t in (W, b, X, Xt)]
    fit_relu(W, b, X, Xt, 2, n_iter=3, polish_iter=3)
    assert all(torch.equal(t, s) for t, s in zip((W, b, X, Xt), saved))
    with pytest.raises(ValueError, match="rank"):
        fit_relu(W, b, X, Xt, 0)
    with pytest.raises(ValueError, match="rank"):
        fit_relu(W, b, X, Xt, 2.0)
    with pytest.raises(ValueError, match="X_in"):
        fit_relu(W, b, X, Xt[:-1], 2)
    with pytest.raises(ValueError, match="X_ref"):
        fit_relu(W, b, X[:, :-1], Xt, 2)
    with pytest.raises(ValueError, match="X_ref"):
        fit_relu(W, b, X[:1], Xt[:1], 2)
    bad = X.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="X_ref"):
        fit_relu(W, b, bad, Xt, 2)
    with pytest.raises(TypeError, match="X_in"):
        fit_relu(W, b, X, Xt.long(), 2)
    with pytest.raises(ValueError, match="sigma"):
        fit_relu(W, b, X, Xt, 2, sigma=0.0)
    with pytest.raises(ValueError, match="polish_iter"):
        fit_relu(W, b, X, Xt, 2, polish_iter=-1)


# ----------------------------------------------------------------------------- gelu
def test_gelu_loss_gradient():
    g = _gen(5)
    M = torch.randn(20, 6, generator=g, dtype=F64) * 3
    Y = torch.nn.functional.gelu(torch.randn(20, 6, generator=g, dtype=F64))
    Ma = M.clone().requires_grad_(True)
    ref = 0.5 * ((torch.nn.functional.gelu(Ma) - Y) ** 2).sum()
    ref.backward()
    value, grad = gelu_loss(M, Y)
    assert value == pytest.approx(float(ref.detach()), rel=1e-12)
    assert torch.allclose(grad, Ma.grad, rtol=1e-10, atol=1e-12)


def test_gelu_beats_activation_on_post_gelu_error():
    """A GELU MLP layer with pre-activations of O(1) scale (where GELU is curved) and ~30% of
    the units mostly off: held-out post-GELU error of fit_gelu < activation-aware < weight SVD."""
    gelu = torch.nn.functional.gelu

    def err(W, b, Wh, bh, X, Xt):
        Y = gelu(X @ W.T + b)
        return float(torch.linalg.vector_norm(Y - gelu(Xt @ Wh.T + bh)) / torch.linalg.vector_norm(Y))

    ratios = []
    for seed, r in ((0, 6), (1, 12)):
        g = _gen(seed)
        d, h, m = 40, 96, 1200
        draw = _inputs(g, m, d)
        W = _layer(g, h, d)
        P = draw(4000) @ W.T
        b = -P.mean(0) + 0.5 * P.std(0) * torch.randn(h, generator=g, dtype=F64) - P.std(0)
        W, b = W * (1.5 / P.std()), b * (1.5 / P.std())
        E = 0.1 * torch.randn(d, d, generator=g, dtype=F64) / d**0.5
        X, Xte = draw(m), draw(m)
        Xt, Xtte = X + X @ E, Xte + Xte @ E
        U, S, Vh = torch.linalg.svd(W)
        W_a, b_a = _activation_fit(W, b, X, Xt, r)
        fit = fit_gelu(W, b, X, Xt, r)  # the defaults
        e_svd = err(W, b, (U[:, :r] * S[:r]) @ Vh[:r], b, Xte, Xtte)
        e_act = err(W, b, W_a, b_a, Xte, Xtte)
        e_gelu = err(W, b, fit.weight(), fit.bias, Xte, Xtte)
        print(
            f"seed {seed} rank {r}: held-out post-GELU error svd {e_svd:.4f} activation {e_act:.4f} gelu {e_gelu:.4f}"
        )
        assert fit.info["objective"] <= fit.info["objective_activation"]
        assert torch.linalg.matrix_rank(fit.weight()) <= r
        assert e_gelu < e_act < e_svd
        ratios.append(e_gelu / e_act)
    assert sum(ratios) / len(ratios) < 0.995, ratios


def test_fit_gelu_plain_and_validation(problem):
    W, b, X, Xt = problem
    saved = [t.clone() for t in (W, b, X, Xt)]
    plain = fit_gelu(W, b, X, Xt, 3, n_iter=0)
    W_a, b_a = _activation_fit(W, b, X, Xt, 3)
    assert torch.allclose(plain.weight(), W_a, rtol=1e-7, atol=1e-9)
    assert torch.allclose(plain.bias, b_a, rtol=1e-7, atol=1e-9)
    assert all(torch.equal(t, s) for t, s in zip((W, b, X, Xt), saved))
    with pytest.raises(ValueError, match="rank"):
        fit_gelu(W, b, X, Xt, min(W.shape) + 1)
    with pytest.raises(ValueError, match="X_in"):
        fit_gelu(W, b, X, Xt[:, :3], 2)
    with pytest.raises(ValueError, match="n_iter"):
        fit_gelu(W, b, X, Xt, 2, n_iter=-3)


def test_compress_api_convex_methods():
    """compress() runs "convex" (from kept rows) and "convex_weights" (from the Grams); the paper's
    program with the default α keeps the activation-aware fit feasible, so on the calibration
    rows it is close to "activation"."""
    import tensorpress as tp

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6)).double()
    calib = [torch.randn(64, 12, dtype=F64) for _ in range(4)]
    x = torch.cat(calib)
    ref = net(x)
    errs = {}
    for method in ("activation", "convex", "convex_weights"):
        small, report = tp.compress(net, calib, method=method, budget=0.5, progress=False)
        assert {r.method for r in report.layers if r.method != "dense"} <= {method}
        errs[method] = float(torch.linalg.vector_norm(small(x) - ref) / torch.linalg.vector_norm(ref))
    assert errs["convex"] < 1.5 * errs["activation"] + 1e-6, errs
    assert all(e < 1.0 for e in errs.values()), errs
