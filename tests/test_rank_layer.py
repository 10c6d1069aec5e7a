"""tensorpress.rank.select_layer_rank: a layer as multi-response regression; TT df."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tensorpress.ops import tt_to_dense
from tensorpress.rank import LayerFit, RankSelection, layer_optimism, optimism, select_layer_rank
from tensorpress.rank.layer import rrr_effective_df, tt_degrees_of_freedom


@pytest.fixture(autouse=True)
def one_thread(restore_threads):
    torch.set_num_threads(1)


def planted_layer(n, p, q, r, noise, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(q, r, generator=g, dtype=torch.float64) @ torch.randn(r, p, generator=g, dtype=torch.float64)
    W = W / W.norm() * math.sqrt(q)  # unit signal variance per output on N(0, I) inputs
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    Y = X @ W.T + noise * torch.randn(n, q, generator=g, dtype=torch.float64)
    return W.to(dtype), X.to(dtype), Y.to(dtype)


def brute_rrr(X, Y, r, intercept=False):
    """Reduced-rank regression the textbook way: project the OLS fitted values on their top-r
    right singular vectors."""
    bias = None
    if intercept:
        xm, ym = X.mean(0), Y.mean(0)
        X, Y = X - xm, Y - ym
    B = torch.linalg.lstsq(X, Y).solution  # (p, q)
    _, _, Vh = torch.linalg.svd(X @ B, full_matrices=False)
    Br = B @ Vh[:r].T @ Vh[:r]
    if intercept:
        bias = ym - xm @ Br
    return Br.T, bias


# ----------------------------------------------------------------------------- reduced-rank regression
@pytest.mark.parametrize("intercept", [False, True])
def test_rrr_closed_form_matches_brute_force(intercept):
    W, X, Y = planted_layer(80, 12, 9, 3, 0.5, seed=1)
    Y = Y + (2.0 if intercept else 0.0)
    X0, Y0 = X.clone(), Y.clone()
    for r in (1, 2, 3, 5, 9):
        sel = select_layer_rank(W, X, outputs=Y, candidates=[r], fit_intercept=intercept, random_state=0)
        est = sel.estimator_
        Wb, bb = brute_rrr(X, Y, r, intercept)
        assert isinstance(est, LayerFit)
        assert torch.linalg.matrix_rank(est.weight) == r
        assert float((est.weight - Wb).norm() / Wb.norm()) < 1e-10
        if intercept:
            assert float((est.bias - bb).norm() / bb.norm()) < 1e-10
        rss = float(((Y - est.predict(X)) ** 2).sum())
        assert sel.table[0]["train_error"] == pytest.approx(rss / Y.numel(), rel=1e-9)
        A, Bt = est.factors
        assert float((A @ Bt - est.weight).norm()) < 1e-10 * float(est.weight.norm())
    assert torch.equal(X, X0) and torch.equal(Y, Y0)  # inputs untouched


def test_rrr_is_optimal_against_perturbations():
    W, X, Y = planted_layer(60, 10, 8, 2, 1.0, seed=2)
    sel = select_layer_rank(W, X, outputs=Y, candidates=[2], random_state=0)
    A, Bt = sel.estimator_.factors
    best = float(((Y - X @ (A @ Bt).T) ** 2).sum())
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        A2 = A + 1e-2 * torch.randn(A.shape, generator=g, dtype=A.dtype)
        B2 = Bt + 1e-2 * torch.randn(Bt.shape, generator=g, dtype=Bt.dtype)
        assert float(((Y - X @ (A2 @ B2).T) ** 2).sum()) >= best - 1e-9


def test_cv_heldout_errors_match_direct_fits():
    W, X, Y = planted_layer(50, 8, 6, 2, 0.7, seed=3)
    sel = select_layer_rank(W, X, outputs=Y, candidates=[1, 2, 4], criterion="cv", cv=5, random_state=4)
    # redo the folds by hand with the brute-force fit
    from tensorpress.rank.regressors import as_generator
    from tensorpress.rank.select import kfold_indices

    folds = kfold_indices(50, 5, as_generator(4))
    for j, r in enumerate([1, 2, 4]):
        errs = []
        for k, test in enumerate(folds):
            train = torch.cat([f for i, f in enumerate(folds) if i != k])
            Wr, _ = brute_rrr(X[train], Y[train], r)
            errs.append(float(((Y[test] - X[test] @ Wr.T) ** 2).mean()))
        assert sel.table[j]["cv_error"] == pytest.approx(np.mean(errs), rel=1e-9)
        assert sel.table[j]["cv_std"] == pytest.approx(np.std(errs, ddof=1), rel=1e-7)


def test_optimism_formula_exact_for_ols_by_simulation():
    # full rank (ordinary least squares, q responses): E[test - train] = s^2 (p/n + p/(n-p-1))
    n, p, q, s2 = 30, 8, 5, 1.0
    g = torch.Generator().manual_seed(5)
    W = torch.randn(q, p, generator=g, dtype=torch.float64)
    gaps = []
    for _ in range(400):
        X = torch.randn(n, p, generator=g, dtype=torch.float64)
        Y = X @ W.T + torch.randn(n, q, generator=g, dtype=torch.float64)
        B = torch.linalg.lstsq(X, Y).solution
        train = float(((Y - X @ B) ** 2).mean())
        test = s2 + float(((B.T - W) ** 2).sum()) / q  # exact expectation over a new x ~ N(0, I)
        gaps.append(test - train)
    exact = s2 * (p / n + p / (n - p - 1))
    assert np.mean(gaps) == pytest.approx(exact, rel=0.06)
    # the plug-in with sigma_hat^2 = RSS/(nq - df) is exact in expectation
    assert layer_optimism(s2 * (n * q - p * q), n, q, p, p * q, rank=min(p, q)) == pytest.approx(exact)
    assert layer_optimism(s2 * (n * q - p * q), n, q, p, p * q) == pytest.approx(exact)
    # one response: the scalar rule of tensorpress.rank.optimism
    assert layer_optimism(7.0, 40, 1, 6, 6, rank=1) == pytest.approx(optimism(7.0, 40, 6))


def test_optimism_reduced_rank_by_simulation():
    # at the true rank with a strong signal the fit is locally linear: the formula holds
    n, p, q, r = 40, 12, 8, 2
    g = torch.Generator().manual_seed(6)
    W = 3 * torch.randn(q, r, generator=g, dtype=torch.float64) @ torch.randn(r, p, generator=g, dtype=torch.float64)
    gaps, est = [], []
    for _ in range(150):
        X = torch.randn(n, p, generator=g, dtype=torch.float64)
        Y = X @ W.T + torch.randn(n, q, generator=g, dtype=torch.float64)
        sel = select_layer_rank(W, X, outputs=Y, candidates=[r], random_state=0)
        row = sel.table[0]
        gaps.append(1.0 + float(((sel.estimator_.weight - W) ** 2).sum()) / q - row["train_error"])
        est.append(row["optimism"])
    assert np.mean(est) == pytest.approx(np.mean(gaps), rel=0.12)


def test_rrr_effective_df_is_the_divergence():
    # trace of d(fitted values)/d(outputs), by autograd through a plain RRR implementation
    W, X, Y = planted_layer(20, 5, 4, 2, 0.8, seed=9)
    P = X @ torch.linalg.solve(X.T @ X, X.T)

    def fitted(y, r):
        yh = P @ y.reshape(20, 4)
        U, S, Vh = torch.linalg.svd(yh, full_matrices=False)
        return (yh @ Vh[:r].T @ Vh[:r]).flatten()

    G = torch.linalg.svd((X @ torch.linalg.lstsq(X, Y).solution), full_matrices=False).S
    for r in (1, 2, 3):
        J = torch.autograd.functional.jacobian(lambda y, r=r: fitted(y, r), Y.flatten())
        assert rrr_effective_df(G, r, 5, 4) == pytest.approx(float(J.trace()), rel=1e-6)
        assert rrr_effective_df(G, r, 5, 4) >= r * (5 + 4 - r)
    assert rrr_effective_df(G, 4, 5, 4) == 20
    # well-separated spectrum: the manifold dimension
    assert rrr_effective_df(torch.tensor([1e6, 1e6 - 1, 1e-3, 1e-3]), 2, 6, 4) == pytest.approx(2 * 8, rel=1e-6)


def test_selects_true_rank_and_agrees_with_cv():
    hits = {"test_error": 0, "cv": 0, "optimism": 0}
    agree = 0
    for seed in range(8):
        W, X, Y = planted_layer(300, 24, 16, 4, 1.0, seed=10 + seed, dtype=torch.float32)
        sel = select_layer_rank(W, X, outputs=Y, candidates=range(1, 9), with_cv=True, random_state=seed)
        assert sel.criterion == "test_error"
        cv_rank = sel.candidates[int(np.argmin(sel.column("cv_error")))]
        opt_rank = sel.candidates[int(np.argmin(sel.column("optimism")))]
        hits["test_error"] += sel.rank_ == 4
        hits["cv"] += cv_rank == 4
        hits["optimism"] += opt_rank == 4
        agree += sel.rank_ == cv_rank
    assert hits["test_error"] >= 7 and hits["cv"] >= 7 and agree >= 7, (hits, agree)
    assert hits["optimism"] <= 2  # optimism alone under-selects (documented)


def test_noiseless_layer_and_rank_deficient_inputs():
    W, X, _ = planted_layer(100, 10, 7, 3, 0.0, seed=4)
    X = torch.cat([X, X[:, :2]], 1)  # 12 inputs, rank 10
    W = torch.cat([W, torch.zeros(7, 2, dtype=W.dtype)], 1)
    sel = select_layer_rank(W, X, candidates=[1, 2, 3, 4, 7], random_state=0)
    assert sel.rank_ == 3  # RSS = 0 from rank 3 on; smallest df wins ties
    assert sel.table[2]["df"] == 3 * (10 + 7 - 3)  # p_eff = 10
    assert float((sel.estimator_.predict(X) - X @ W.T).norm()) < 1e-8 * float((X @ W.T).norm())


def test_dead_inputs_take_the_cholesky_path_and_match_lstsq():
    # inputs that are always zero (dead ReLU units) are dropped before the Cholesky whitening:
    # p_eff counts the live ones and the least-squares weight equals lstsq on them
    from tensorpress.rank.layer import _stats, _whiten

    W, X, Y = planted_layer(100, 10, 7, 3, 0.5, seed=5)
    X = torch.cat([X, torch.zeros(100, 2, dtype=X.dtype)], 1)
    W = torch.cat([W, torch.zeros(7, 2, dtype=W.dtype)], 1)
    wh = _whiten(_stats(X, Y, False), 1e-10)
    assert wh.p_eff == 10
    ref = torch.linalg.lstsq(X[:, :10], Y).solution
    assert float((wh.ls_coef()[:10] - ref).norm() / ref.norm()) < 1e-10
    assert float(wh.ls_coef()[10:].abs().max()) == 0.0
    sel = select_layer_rank(W, X, outputs=Y, candidates=[3, 7], random_state=0)
    assert sel.table[0]["df"] == 3 * (10 + 7 - 3)


# ----------------------------------------------------------------------------- TT
def _tt_jacobian_rank(out_f, in_f, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = (1, *ranks, 1)
    shapes = [(full[k], out_f[k], in_f[k], full[k + 1]) for k in range(len(out_f))]
    cores = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    sizes = [c.numel() for c in cores]

    def f(flat):
        parts = torch.split(flat, sizes)
        return tt_to_dense([p.reshape(s) for p, s in zip(parts, shapes)]).flatten()

    J = torch.autograd.functional.jacobian(f, torch.cat([c.flatten() for c in cores]))
    return int(torch.linalg.matrix_rank(J))


@pytest.mark.parametrize(
    "out_f,in_f,ranks",
    [
        ((2, 3), (2, 2), (3,)),
        ((2, 2, 2), (2, 1, 2), (2, 3)),
        ((3, 2, 2), (2, 2, 3), (2, 2)),
        ((2, 2, 2, 2), (1, 2, 2, 1), (2, 3, 2)),
    ],
)
def test_tt_df_is_jacobian_rank(out_f, in_f, ranks):
    assert tt_degrees_of_freedom(list(ranks), out_f, in_f) == _tt_jacobian_rank(out_f, in_f, ranks)


def test_tt_df_caps():
    assert tt_degrees_of_freedom(100, (2, 3), (2, 2)) == 24  # the full space
    assert tt_degrees_of_freedom(3, (4, 4), (4, 4)) == 3 * 16 * 2 - 9
    # infeasible ranks reduce to the feasible ones: sizes (2, 2, 64): r_2 <= r_1 * 2
    assert tt_degrees_of_freedom((1, 8), (2, 2, 8), (1, 1, 8)) == tt_degrees_of_freedom((1, 2), (2, 2, 8), (1, 1, 8))
    with pytest.raises(ValueError, match="ranks"):
        tt_degrees_of_freedom((1, 2, 3), (2, 2), (2, 2))
    with pytest.raises(ValueError, match="in_factors"):
        tt_degrees_of_freedom(2, (2, 2), (2, 0))


def test_tt_selection_recovers_planted_tt_layer():
    g = torch.Generator().manual_seed(7)
    out_f, in_f = (4, 6), (4, 5)
    cores = [
        torch.randn(1, 4, 4, 3, generator=g, dtype=torch.float64),
        torch.randn(3, 6, 5, 1, generator=g, dtype=torch.float64),
    ]
    W = tt_to_dense(cores)
    W = W / W.norm() * math.sqrt(24)
    X = torch.randn(400, 20, generator=g, dtype=torch.float64)
    Y = X @ W.T + 0.3 * torch.randn(400, 24, generator=g, dtype=torch.float64)
    sel = select_layer_rank(
        W,
        X,
        family="tt",
        outputs=Y,
        candidates=[1, 2, 3, 4, 6],
        out_factors=out_f,
        in_factors=in_f,
        criterion="optimism",
        with_cv=True,
        random_state=0,
    )
    assert sel.rank_ == (3,)
    assert sel.candidates[int(np.argmin(sel.column("cv_error")))] == (3,)
    assert sel.table[2]["df"] == tt_degrees_of_freedom(3, out_f, in_f)
    cores_fit = sel.estimator_.factors
    assert float((tt_to_dense(list(cores_fit)).to(torch.float64) - sel.estimator_.weight).norm()) < 1e-8


# ----------------------------------------------------------------------------- conv kernels
def test_conv_tucker_cp_lowrank_on_images():
    g = torch.Generator().manual_seed(8)
    o, i, k = 6, 5, 3
    core = torch.randn(2, 2, k, k, generator=g, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(o, 2, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(i, 2, generator=g, dtype=torch.float64))[0]
    Wk = torch.einsum("abhw,oa,ib->oihw", core, U, V)
    imgs = torch.randn(12, i, 8, 8, generator=g, dtype=torch.float64)
    out = torch.nn.functional.conv2d(imgs, Wk, padding=1)
    sel = select_layer_rank(
        Wk, imgs, family="tucker", candidates=[1, 2, 3, (2, 3)], outputs=out, padding=1, random_state=0
    )
    assert sel.rank_ == (2, 2) and sel.table[1]["train_error"] < 1e-20
    assert sel.estimator_.weight.shape == (o, i * k * k)
    # patches + default outputs give the same statistics
    cols = torch.nn.functional.unfold(imgs, k, padding=1).transpose(1, 2).reshape(-1, i * k * k)
    sel2 = select_layer_rank(Wk, cols, family="tucker", candidates=[1, 2, 3, (2, 3)], random_state=0)
    assert sel2.column("train_error") == pytest.approx(sel.column("train_error"), abs=1e-12)
    cp = select_layer_rank(
        Wk, cols, family="cp", candidates=[1, 2, 4], random_state=0, decompose_kwargs={"n_iter_max": 30}
    )
    assert cp.table[0]["df"] == 1 * (o + i + k + k - 3)
    assert cp.column("train_error")[0] > cp.column("train_error")[2]
    lr = select_layer_rank(Wk, cols, family="lowrank", candidates=[1, 2, 6], random_state=0)
    assert lr.rank_ == 2 and lr.table[1]["train_error"] < 1e-20  # (out, in k k) matrix rank r_out


# ----------------------------------------------------------------------------- arguments
def test_bad_inputs():
    W, X, Y = planted_layer(40, 6, 4, 2, 0.1, seed=0)
    assert isinstance(select_layer_rank(W, X, candidates=[1, 2]), RankSelection)
    cases = [
        (dict(family="svd"), "family"),
        (dict(criterion="gcv"), "criterion"),
        (dict(cv=1), "cv"),
        (dict(cv=41, criterion="cv"), "cv"),
        (dict(candidates=[]), "candidates"),
        (dict(candidates=[0]), "candidates"),
        (dict(candidates="12"), "candidates"),
        (dict(outputs=Y[:, :3]), "outputs"),
        (dict(outputs=Y[:10]), "outputs"),
        (dict(family="cp"), "weight"),
        (dict(in_factors=(2, 3)), "in_factors"),
        (dict(family="tt", in_factors=(4, 2)), "in_factors"),
        (dict(rcond=2.0), "rcond"),
        (dict(fit_intercept=1), "fit_intercept"),
        (dict(random_state="x"), "random_state"),
    ]
    for kwargs, name in cases:
        kwargs = dict({"candidates": [1, 2]}, **kwargs)
        with pytest.raises(ValueError, match=name):
            select_layer_rank(W, X, **kwargs)
    with pytest.raises(ValueError, match="inputs: expected 6 features"):
        select_layer_rank(W, X[:, :5])
    with pytest.raises(ValueError, match="inputs: expected finite"):
        select_layer_rank(W, torch.full_like(X, float("nan")))
    with pytest.raises(ValueError, match="weight"):
        select_layer_rank(W[0], X)
    with pytest.raises(TypeError, match="inputs"):
        select_layer_rank(W, X.tolist())
    with pytest.raises(TypeError, match="weight"):
        select_layer_rank("w", X)
    with pytest.raises(ValueError, match="family 'tt' expects a 2-d"):
        select_layer_rank(torch.zeros(4, 3, 3, 3), torch.zeros(5, 27), family="tt")
    with pytest.raises(ValueError, match="candidates: no candidate has a finite"):
        select_layer_rank(W, X[:6], candidates=[1])  # n = 6 <= p + 1
