"""tenBCD (python/tensorpress/train): exact block minimizers, monotone objective, projections,
accuracy on scikit-learn digits, bad input, to_torch()."""

from __future__ import annotations

import math

import pytest
import torch

from tensorpress.decompose import tt_matrix_svd
from tensorpress.nn import TTLinear
from tensorpress.ops.tt import tt_to_dense
from tensorpress.train import (
    ConvSpec,
    DivergenceError,
    TenBCD,
    one_hot,
    prune_projection,
    ranks_for_ratio,
    train_backprop,
    tt_project,
)
from tensorpress.train.updates import (
    gram,
    gram_factor,
    relu_prox,
    update_u_hidden,
    update_u_out,
    update_v_hidden,
    update_v_out,
    update_w,
)

D64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed), dtype=D64)


@pytest.fixture(scope="module")
def digits():
    sklearn = pytest.importorskip("sklearn.datasets")
    d = sklearn.load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    p = torch.randperm(len(X), generator=_gen(0))
    return X[p[:1400]], y[p[:1400]], X[p[1400:]], y[p[1400:]]


def _assert_stationary(f, X, tol=1e-9):
    """X minimizes the strictly convex quadratic f: its gradient vanishes, and perturbations cost more."""
    X = X.detach().clone().requires_grad_(True)
    val = f(X)
    (g,) = torch.autograd.grad(val, X)
    scale = max(1.0, float(val.detach().abs()))
    assert float(g.abs().max()) < tol * scale
    with torch.no_grad():
        for s in range(3):
            d = _randn(*X.shape, seed=100 + s) * 1e-3
            assert f(X + d) > val and f(X - d) > val


# ----------------------------------------------------------------------------- block updates
def test_update_v_out_and_u_out_are_block_minimizers():
    g, r, a = 5.0, 3.0, 1.0
    Y, U, V0, P = (_randn(10, 40, seed=s) for s in range(4))
    V = update_v_out(Y, U, V0, g, a)
    _assert_stationary(
        lambda V: 0.5 * (V - Y).square().sum() + g / 2 * (V - U).square().sum() + a / 2 * (V - V0).square().sum(), V
    )
    Un = update_u_out(V, P, g, r)
    _assert_stationary(lambda U: g / 2 * (V - U).square().sum() + r / 2 * (U - P).square().sum(), Un)


@pytest.mark.parametrize("n", [50, 12], ids=["direct", "woodbury"])  # n < d_in switches to the n x n system
@pytest.mark.parametrize("tau, decay", [(0.0, 0.0), (7.0, 0.0), (7.0, 3.0)])
@pytest.mark.parametrize("rows", [9, 80])  # the solve goes from the left below FEW_ROWS rows, else from the right
def test_update_w_is_block_minimizer(n, tau, decay, rows):
    r, a = 5.0, 1.0
    W0, T = _randn(rows, 20, seed=1), _randn(rows, 20, seed=2)
    U, Vp = _randn(rows, n, seed=3), _randn(20, n, seed=4)
    W = update_w(W0, U, Vp, r, a, tau, T, decay=decay)
    assert gram_factor(Vp, r, a + tau).woodbury == (n < 20)

    def f(W):
        return (
            r / 2 * (U - W @ Vp).square().sum()
            + tau / 2 * (W - T).square().sum()
            + a / 2 * (W - W0).square().sum()
            + decay / 2 * W.square().sum()
        )

    _assert_stationary(f, W)
    direct = torch.linalg.solve(
        (a + tau + decay) * torch.eye(20, dtype=D64) + r * Vp @ Vp.T, (a * W0 + tau * T + r * U @ Vp.T).T
    ).T
    torch.testing.assert_close(W, direct, rtol=1e-9, atol=1e-10)
    # a reused factorization gives the same answer; one built for another diagonal is refused
    c = a + tau + decay
    torch.testing.assert_close(update_w(W0, U, Vp, r, a, tau, T, factor=gram_factor(Vp, r, c), decay=decay), W)
    with pytest.raises(ValueError, match="factor"):
        update_w(W0, U, Vp, r, a, tau, T, factor=gram_factor(Vp, r, c + 1.0), decay=decay)


@pytest.mark.parametrize("shape", [(3, 5), (1024, 1500), (777, 1031)])
def test_squared_norm_of_float32_accumulates_in_float64(shape):
    from tensorpress.train.tenbcd import _sq

    T = (_randn(*shape, seed=21) * 3 + 1).float()
    exact = float(T.double().square().sum())
    assert abs(_sq(T) / exact - 1) < 1e-7
    assert abs(_sq(T.T) / exact - 1) < 1e-7  # any layout
    assert _sq(_randn(*shape, seed=21)) == pytest.approx(float(_randn(*shape, seed=21).square().sum()), rel=1e-12)


@pytest.mark.parametrize("d", [300, 513, 1024])
def test_gram_is_the_product_with_its_transpose(d):
    A = _randn(d, 200, seed=20)
    G = gram(A, 2.5)
    torch.testing.assert_close(G, 2.5 * A @ A.T, rtol=1e-12, atol=1e-10)
    assert torch.equal(A, _randn(d, 200, seed=20))  # input untouched


@pytest.mark.parametrize("m", [30, 4], ids=["direct", "woodbury"])  # W_{i+1} with fewer rows -> m x m system
@pytest.mark.parametrize("n", [25, 90])  # samples: the direct solve runs on the n x 16 transpose, see FEW_ROWS
def test_update_v_hidden_is_block_minimizer(m, n):
    g, r = 5.0, 2.0
    W, Un, R = _randn(m, 16, seed=5), _randn(m, n, seed=6), _randn(16, n, seed=7).clamp_min(0)
    V = update_v_hidden(W, Un, R, g, r)
    _assert_stationary(lambda V: g / 2 * (V - R).square().sum() + r / 2 * (Un - W @ V).square().sum(), V)
    direct = torch.linalg.solve(r * W.T @ W + g * torch.eye(16, dtype=D64), r * W.T @ Un + g * R)
    torch.testing.assert_close(V, direct, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("m", [30, 4], ids=["direct", "woodbury"])
def test_update_v_hidden_with_product_returns_the_next_layers_product(m):
    W, Un, R = _randn(m, 16, seed=5), _randn(m, 40, seed=6), _randn(16, 40, seed=7).clamp_min(0)
    V, WV = update_v_hidden(W, Un, R, 5.0, 2.0, with_product=True)
    torch.testing.assert_close(V, update_v_hidden(W, Un, R, 5.0, 2.0), rtol=0, atol=0)
    torch.testing.assert_close(WV, W @ V, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d", [300, 600, 1100])
def test_gram_lower_triangle_for_cholesky(d):
    A = _randn(d, 50, seed=22)
    G = gram(A, 0.5, lower=True)
    torch.testing.assert_close(torch.tril(G), torch.tril(0.5 * A @ A.T), rtol=1e-12, atol=1e-10)
    L = torch.linalg.cholesky(torch.tril(G) + torch.tril(G, -1).T + torch.eye(d, dtype=D64))
    torch.testing.assert_close(torch.linalg.cholesky(G + torch.eye(d, dtype=D64)), L)  # reads the lower one only


def test_update_v_hidden_float32_woodbury_close_to_float64():
    W, Un, R = _randn(10, 300, seed=8), _randn(10, 50, seed=9), _randn(300, 50, seed=10)
    ref = update_v_hidden(W, Un, R, 5.0, 5.0)
    got = update_v_hidden(W.float(), Un.float(), R.float(), 5.0, 5.0)
    assert float((got.double() - ref).norm() / ref.norm()) < 1e-5


def test_relu_prox_matches_brute_force_grid():
    """argmin_u (ReLU(u) - V)^2 + g (u - B)^2 against a fine grid, over all sign patterns of V, B."""
    vals = torch.tensor([-2.0, -0.3, 0.0, 0.4, 1.7], dtype=D64)
    V, B = torch.meshgrid(vals, vals, indexing="ij")
    V, B = V.reshape(-1), B.reshape(-1)
    grid = torch.linspace(-4, 4, 160001, dtype=D64)
    for g in (0.2, 1.0, 3.0):
        u = relu_prox(V, B, g)

        def cost(u, g=g):
            return (u.clamp_min(0) - V[..., None]).square() + g * (u - B[..., None]).square()

        best = cost(grid[None, :]).min(1).values
        ours = cost(u[:, None])[:, 0]
        assert torch.all(ours <= best + 1e-12)  # never worse than any grid point
        assert torch.all(ours >= best - 1e-8)  # and the grid gets within its spacing
        # where the minimizer is unique, the grid's argmin is next to ours
        arg = grid[cost(grid[None, :]).argmin(1)]
        second = cost(grid[None, :]).topk(2000, largest=False).values[:, -1]
        unique = (second - best) > 1e-6
        assert torch.all((arg - u).abs()[unique] < 1e-3)


def test_update_u_hidden_beats_perturbations_and_grid():
    g, r, a = 5.0, 5.0, 1.0
    V, P, U0 = _randn(6, 7, seed=11).clamp_min(0), _randn(6, 7, seed=12), _randn(6, 7, seed=13)
    U = update_u_hidden(V, P, U0, g, r, a)

    def cost(U):
        return g / 2 * (V - U.clamp_min(0)).square() + r / 2 * (U - P).square() + a / 2 * (U - U0).square()

    grid = torch.linspace(-5, 5, 100001, dtype=D64)
    full = (
        g / 2 * (V[..., None] - grid.clamp_min(0)).square()
        + r / 2 * (grid - P[..., None]).square()
        + a / 2 * (grid - U0[..., None]).square()
    )
    assert torch.all(cost(U) <= full.min(-1).values + 1e-12)
    for s in range(5):
        assert torch.all(cost(U + 1e-3 * _randn(6, 7, seed=20 + s)) >= cost(U) - 1e-15)


# ----------------------------------------------------------------------------- projections
def test_prune_projection():
    W = _randn(20, 30, seed=14)
    for s in (0.0, 0.5, 0.9):
        Z = prune_projection(W, s)
        keep = round((1 - s) * W.numel())
        assert int((Z != 0).sum()) == keep
        assert torch.equal(Z[Z != 0], W[Z != 0])
        # kept entries all at least as large as every dropped one
        if s > 0:
            assert W[Z != 0].abs().min() >= W[Z == 0].abs().max()
        # the closest matrix with `keep` non-zeros: beats random supports of the same size
        for t in range(5):
            mask = torch.zeros(W.numel(), dtype=torch.bool)
            mask[torch.randperm(W.numel(), generator=_gen(t))[:keep]] = True
            assert (W - Z).norm() <= (W - W * mask.reshape(W.shape)).norm()
    with pytest.raises(ValueError, match="sparsity"):
        prune_projection(W, 1.0)


def test_tt_project_matches_tt_matrix_svd_and_batches():
    W = _randn(3, 48, 60, seed=15)
    outf, inf, ranks = (4, 3, 4), (3, 5, 4), (5, 7)
    cores, dense = tt_project(W, outf, inf, ranks, method="lapack")
    assert [tuple(c.shape) for c in cores] == [(3, 1, 4, 3, 5), (3, 5, 3, 5, 7), (3, 7, 4, 4, 1)]
    for b in range(3):
        ref = tt_matrix_svd(W[b], outf, inf, max_rank=list(ranks))
        torch.testing.assert_close(dense[b], tt_to_dense(ref.cores), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dense[b], tt_to_dense([c[b] for c in cores]), rtol=1e-10, atol=1e-12)
        c1, d1 = tt_project(W[b], outf, inf, ranks, method="lapack")
        torch.testing.assert_close(d1, dense[b], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ranks", [(12, 16), (12, 7), (5, 16)])
def test_tt_project_bonds_that_do_not_truncate_skip_the_svd_and_give_the_same_projection(ranks):
    # (12, .): the first unfolding is 12 x 240, kept whole (identity core); (., 16): the last
    # is 12*15 x 16 or 5*15 x 16, kept whole (thin QR); the others truncate by SVD
    W = _randn(2, 48, 60, seed=19)
    outf, inf = (4, 3, 4), (3, 5, 4)
    cores, dense = tt_project(W, outf, inf, ranks, method="lapack")
    for b in range(2):
        ref = tt_matrix_svd(W[b], outf, inf, max_rank=list(ranks))
        torch.testing.assert_close(dense[b], tt_to_dense(ref.cores), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dense[b], tt_to_dense([c[b] for c in cores]), rtol=1e-10, atol=1e-12)
    if ranks == (12, 16):
        torch.testing.assert_close(dense, W, rtol=1e-10, atol=1e-12)  # nothing truncated: exact
    for c in cores[:-1]:  # left-orthonormal cores, as the SVD would give
        u = c.reshape(2, -1, c.shape[-1])
        torch.testing.assert_close(u.mT @ u, torch.eye(u.shape[-1], dtype=D64).expand(2, -1, -1), rtol=0, atol=1e-12)


def test_tt_project_warm_start_from_the_previous_subspace_is_near_optimal():
    # the tenBCD case: the same layer projected again after a small change; the 1024 x 1024
    # middle unfolding gets the (warm-started) subspace SVD, the others exact SVDs
    outf = inf = (4, 8, 8, 4)
    ranks = (16, 40, 16)
    planted = tt_to_dense(tt_matrix_svd(_randn(1024, 1024, seed=16), outf, inf, max_rank=list(ranks)).cores)
    W0 = planted / planted.norm() + 0.3 * _randn(1024, 1024, seed=17) / 1024
    state = {}
    tt_project(W0, outf, inf, ranks, method="auto", generator=_gen(1), state=state)
    assert list(state) == [1] and state[1].shape == (1, 1024, 50)
    first = state[1].clone()
    W1 = W0 + 0.01 * _randn(1024, 1024, seed=18) / 1024
    _, warm = tt_project(W1, outf, inf, ranks, method="auto", generator=_gen(2), state=state)
    _, exact = tt_project(W1, outf, inf, ranks, method="lapack")
    assert not torch.equal(state[1], first)  # the subspace moved with W
    assert (W1 - warm).norm() <= 1.001 * (W1 - exact).norm()
    assert (warm - exact).norm() < 1e-2 * exact.norm()


def test_ranks_for_ratio():
    s = ranks_for_ratio(784, 1024, 0.09)
    assert s.ranks[0] <= 16 and abs(math.log(s.ratio / 0.09)) < 0.1


# ----------------------------------------------------------------------------- the method
def _small_model(**kw):
    args = dict(tt_layers={0: 4, 1: [4, 8, 4]}, prune={2: 0.5}, dtype=D64, seed=1)
    args.update(kw)
    return TenBCD([64, 64, 64, 16, 10], **args)


def test_every_block_update_never_increases_the_objective(digits):
    X, y, _, _ = digits
    m = _small_model().initialize(X[:200], one_hot(y[:200], 10))
    prev = m.objective()
    names = set()
    for _ in range(2):
        for name, f in m.step(trace_blocks=True):
            assert f <= prev * (1 + 1e-12) + 1e-9, f"{name} raised F from {prev} to {f}"
            prev, _ = f, names.add(name)
        m._objective_cached()  # refresh the cached products as fit() does
    assert {"V[3]", "U[3]", "W[3]", "V[0]", "U[0]", "W[0]", "T[0]", "T[1]", "T[2]"} <= names


def test_objective_non_increasing_over_iterations_and_cached_matches(digits):
    X, y, Xt, yt = digits
    m = _small_model(dtype=torch.float32).fit(
        X[:500], one_hot(y[:500], 10), n_iter=15, X_test=Xt, y_test=yt, eval_every=5
    )
    f = m.history_["objective"]
    assert len(f) == 15 and all(b <= a * (1 + 1e-5) for a, b in zip(f, f[1:]))
    assert f[-1] < 0.8 * f[0]  # measured 0.70 (alpha_w = 0.1 n keeps the W steps short)
    assert m.history_["test_acc"][4] is not None and m.history_["test_acc"][3] is None
    assert abs(m._objective_cached() - m.objective()) <= 1e-5 * m.objective()
    assert set(m.history_["tt_gap"][-1]) == {0, 1, 2}


def test_accuracy_on_digits_with_tt_weights(digits):
    """64 -> 256 -> 256 -> 10, TT ranks 4 and 8: the TT network itself classifies digits."""
    X, y, Xt, yt = digits
    m = TenBCD([64, 256, 256, 10], tt_layers={0: 4, 1: 8}, seed=0)
    m.fit(X, one_hot(y, 10), n_iter=20, X_test=Xt, y_test=yt, eval_every=20)
    acc = m.history_["test_acc"][-1]
    assert acc >= 0.90, acc  # measured 0.935 (0.95 after 40 iterations)
    assert max(m.tt_gaps().values()) < 0.05  # tau scaled with n keeps W on its TT projection
    assert m.score(Xt, yt) == pytest.approx(acc)
    m.refit_output(X, one_hot(y, 10))
    assert m.score(Xt, yt) >= 0.90


def test_tau_scale_matters(digits):
    """Without scaling tau by n, W drifts from its TT projection much further (the other weight
    terms off, so that only tau's scale differs)."""
    X, y, _, _ = digits
    gaps = {}
    for scale in ("n", None):
        m = TenBCD(
            [64, 128, 10], tt_layers={0: 2}, tau=0.1, alpha_w=0.0, weight_decay=0.0, scale=scale, seed=0, dtype=D64
        )
        m.fit(X[:400], one_hot(y[:400], 10), n_iter=10, eval_every=10)
        gaps[scale] = m.tt_gaps()[0]
    assert gaps[None] > 4 * gaps["n"]  # measured 7.9x after 10 iterations


def test_to_torch_matches_predict(digits):
    X, y, Xt, _ = digits
    m = _small_model().fit(X[:300], one_hot(y[:300], 10), n_iter=3)
    net = m.to_torch()
    assert isinstance(net[0], TTLinear) and isinstance(net[2], TTLinear) and isinstance(net[4], torch.nn.Linear)
    assert int((net[4].weight != 0).sum()) == 16 * 64 // 2
    with torch.no_grad():
        torch.testing.assert_close(net(Xt.double()), m.decision_function(Xt), rtol=1e-9, atol=1e-9)
    assert torch.equal(net(Xt.double()).argmax(1), m.predict(Xt))


def test_conv_front_trains_and_exports(digits):
    X, y, Xt, _ = digits
    conv = ConvSpec((1, 8, 8), out_channels=4, kernel_size=3, stride=1)  # 4 * 6 * 6 = 144
    m = TenBCD(
        [64, 144, 64, 10],
        conv=conv,
        tt_layers={1: {"ranks": 4, "in_factors": (4, 6, 6), "out_factors": (4, 4, 4)}},
        dtype=D64,
    )
    m.initialize(X[:200], one_hot(y[:200], 10))
    prev = m.objective()
    for name, f in m.step(trace_blocks=True):
        assert f <= prev * (1 + 1e-12), name
        prev = f
    m._objective_cached()
    m.step()
    net = m.to_torch()
    with torch.no_grad():
        torch.testing.assert_close(net(Xt.double()), m.decision_function(Xt), rtol=1e-9, atol=1e-9)


def test_adam_baseline_on_same_init(digits):
    X, y, Xt, yt = digits
    m = TenBCD([64, 256, 256, 10], tt_layers={0: 4, 1: 8}, seed=0).initialize(X, one_hot(y, 10))
    net = m.to_torch()
    with torch.no_grad():  # same init: the exported network computes the tenBCD network's outputs
        torch.testing.assert_close(net(Xt), m.decision_function(Xt), rtol=1e-4, atol=1e-5)
    hist = train_backprop(net, X, y, epochs=4, optimizer="adam", lr=3e-3, X_test=Xt, y_test=yt)
    assert hist["test_acc"][-1] > 0.9


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layer_sizes=[64, 67, 10], tt_layers={0: 2}), r"tt_layers\[0\].*67"),  # 67 does not factor
        (dict(layer_sizes=[64, 64, 10], tt_layers={0: 100}), r"tt_layers\[0\].*larger than possible"),
        (dict(layer_sizes=[64, 64, 10], tt_layers={0: [4, 100, 4]}), r"tt_layers\[0\].*larger than possible"),
        (dict(layer_sizes=[64, 64, 10], tt_layers={5: 4}), "tt_layers"),
        (dict(layer_sizes=[64, 64, 10], tt_layers={0: 4}, prune={0: 0.5}), r"prune\[0\]"),
        (dict(layer_sizes=[64, 64, 10], prune={1: 1.5}), r"prune\[1\]"),
        (dict(layer_sizes=[64, 64, 10], gamma=0.0), "gamma"),
        (dict(layer_sizes=[64, 64, 10], tau=-1.0), "tau"),
        (dict(layer_sizes=[64, 64, 10], scale="sqrt"), "scale"),
        (dict(layer_sizes=[64, 64, 10], alpha_w=-1.0), "alpha_w"),
        (dict(layer_sizes=[64, 64, 10], weight_decay=float("nan")), "weight_decay"),
        (dict(layer_sizes=[64]), "layer_sizes"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TenBCD(**kwargs)


def test_bad_data_is_rejected_before_training(digits):
    X, y, _, _ = digits
    X, y = X[:50], y[:50]
    Y = one_hot(y, 10)
    m = TenBCD([64, 32, 10], tt_layers={0: 2})
    bad_y = Y.clone()
    bad_y[0, :2] = 0.5
    cases = [
        ((X, bad_y), "Y: expected one-hot"),
        ((X, Y * 2), "Y: expected one-hot"),
        ((X, Y[:40]), r"Y: expected one-hot of shape \(50, 10\)"),
        ((X, one_hot(y, 12)), r"Y: expected one-hot of shape \(50, 10\)"),
        ((X[:, :60], Y), "X: expected 64 features"),
        ((torch.where(torch.arange(64) == 3, float("nan"), X), Y), "X: .*finite"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            m.fit(*args, n_iter=1)
        assert m.n_iter_ == 0 and not m.history_
    with pytest.raises(ValueError, match="y_test"):
        m.fit(X, Y, n_iter=1, X_test=X, y_test=y[:10])
    with pytest.raises(ValueError, match="n_iter"):
        m.fit(X, Y, n_iter=-1)


def test_divergence_names_iteration_and_block(digits):
    X, y, _, _ = digits
    m = TenBCD([64, 32, 32, 10], tt_layers={1: 4}, dtype=D64)

    def poison(model, rec):
        if rec["iteration"] == 2:
            model.V[0][0, 0] = float("nan")  # V[0] feeds only W[1]'s update in the next sweep

    with pytest.raises(DivergenceError, match=r"iteration 3.*W\[1\]"):
        m.fit(X[:100], one_hot(y[:100], 10), n_iter=5, callback=poison)
    assert m.n_iter_ == 2 and len(m.history_["objective"]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(digits):
    X, y, Xt, _ = digits
    cpu = _small_model().fit(X[:300], one_hot(y[:300], 10), n_iter=3)
    gpu = _small_model(device="cuda").fit(X[:300].cuda(), one_hot(y[:300], 10).cuda(), n_iter=3)
    torch.testing.assert_close(gpu.decision_function(Xt.cuda()).cpu(), cpu.decision_function(Xt), rtol=1e-6, atol=1e-6)


def test_weight_terms_scale_with_n_and_enter_the_objective(digits):
    X, y, _, _ = digits
    for scale, k in (("n", 300), (None, 1)):
        m = TenBCD(
            [64, 32, 10], tt_layers={0: 2}, tau=0.5, alpha_w=0.2, weight_decay=0.03, scale=scale, dtype=D64
        ).initialize(X[:300], one_hot(y[:300], 10))
        assert (m.tau_eff, m.alpha_w_eff, m.decay_eff) == pytest.approx((0.5 * k, 0.2 * k, 0.03 * k))
        m.step()
        _, terms = m.objective(terms=True)
        assert terms["decay"] == pytest.approx(0.5 * 0.03 * k * sum(float(w.square().sum()) for w in m.weights_))
        assert m._objective_cached() == pytest.approx(sum(terms.values()), rel=1e-12)


def test_weight_decay_shrinks_the_weights(digits):
    X, y, _, _ = digits
    norms = {}
    for wd in (0.0, 0.05):
        m = TenBCD([64, 64, 10], weight_decay=wd, dtype=D64, seed=3).fit(X[:400], one_hot(y[:400], 10), n_iter=5)
        norms[wd] = sum(float(w.norm()) for w in m.weights_)
    assert norms[0.05] < 0.9 * norms[0.0]


def test_gcv_ridge_matches_brute_force():
    from tensorpress.train.tenbcd import gcv_ridge

    H, Y = _randn(12, 40, seed=5), _randn(3, 40, seed=6)
    Y = Y + 2.0 * _randn(3, 12, seed=7) @ H  # a signal to fit, plus noise
    G, B = H @ H.T, Y @ H.T
    lam = gcv_ridge(G, B, float(Y.square().sum()), 40)
    lams = torch.linalg.eigvalsh(G).mean() * torch.logspace(-8, 2, 61, dtype=D64)

    def gcv(lam):
        hat = H.T @ torch.linalg.solve(G + lam * torch.eye(12, dtype=D64), H)  # n x n hat matrix
        rss = (Y - Y @ hat).square().sum()
        return float(rss / (40 * (1 - torch.trace(hat) / 40) ** 2))

    scores = [gcv(float(v)) for v in lams]
    assert lam == pytest.approx(float(lams[min(range(len(scores)), key=scores.__getitem__)]), rel=1e-9)
    assert 0 < lam < float(lams[-1])  # an interior optimum here


def test_refit_output_gcv_and_fixed_ridge(digits):
    X, y, Xt, yt = digits
    m = TenBCD([64, 128, 10], tt_layers={0: 4}, seed=0, dtype=D64).fit(X[:300], one_hot(y[:300], 10), n_iter=5)
    before = [w.clone() for w in m.weights_]
    m.refit_output(X[:300], one_hot(y[:300], 10))
    gcv_lam = m.refit_ridge_
    H = m._forward(X[:300].double(), m.effective_weights(), upto=1)
    G = H @ H.T
    W = torch.linalg.solve(G + gcv_lam * torch.eye(128, dtype=D64), H @ one_hot(y[:300], 10).double()).T
    torch.testing.assert_close(m.weights_[-1], W, rtol=1e-8, atol=1e-10)
    assert torch.equal(m.weights_[0], before[0])  # only the output layer changes
    m.refit_output(X[:300], one_hot(y[:300], 10), ridge=1e-4)
    assert m.refit_ridge_ == pytest.approx(1e-4 * float(G.diagonal().mean()), rel=1e-5)
    with pytest.raises(ValueError, match="ridge"):
        m.refit_output(X[:300], one_hot(y[:300], 10), ridge=-1.0)


def test_refit_output_with_fewer_samples_than_hidden_units_in_float32(digits):
    """H H^T is singular when n < d: the refit still solves (in float64), matches the ridge
    solution and fits the training set (the quick benchmark's 500 digits vs 1024 units)."""
    X, y, _, _ = digits
    m = TenBCD([64, 256, 10], seed=1).fit(X[:100], one_hot(y[:100], 10), n_iter=3)  # float32, n = 100 < 256
    m.refit_output(X[:100], one_hot(y[:100], 10))
    assert math.isfinite(m.refit_ridge_) and m.refit_ridge_ > 0
    H = m._forward(X[:100].double(), [w.double() for w in m.effective_weights()], upto=1)
    W = torch.linalg.solve(H @ H.T + m.refit_ridge_ * torch.eye(256, dtype=D64), H @ one_hot(y[:100], 10).double()).T
    torch.testing.assert_close(m.weights_[-1].double(), W, rtol=2e-3, atol=2e-4)
    assert m.score(X[:100], y[:100]) > 0.9
