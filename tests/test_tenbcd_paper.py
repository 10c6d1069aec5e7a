"""tenBCD with the authors' configuration (issue 25): the reshaped-tensor TT projection against a
float64 TT-SVD, the notebook's conv feature order, init="normal", projection_accept, the PaperCNN
preset, and bit-exact resumption from checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from tensorpress.train import (
    PAPER_LOGGED_TEST_ACC,
    ConvSpec,
    PaperCNN,
    ReshapedTTSpec,
    TenBCD,
    one_hot,
    reshaped_tt_spec,
    tt_project_reshaped,
    tt_reconstruct_reshaped,
)
from tensorpress.train.paper import PAPER_LAYER_SIZES, PAPER_RESHAPES
from tensorpress.train.spec import reshaped_bond_caps

D64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed), dtype=D64)


def _tt_svd_reference(T: torch.Tensor, cap: int) -> torch.Tensor:
    """A plain float64 TT-SVD (Oseledets 2011) of the tensor T, every bond capped at cap, by full
    SVDs of the unfoldings; returns the reconstructed tensor."""
    shape = T.shape
    cores, r, rest = [], 1, T.reshape(1, -1)
    for n in shape[:-1]:
        u, s, vh = torch.linalg.svd(rest.reshape(r * n, -1), full_matrices=False)
        k = min(cap, s.numel())
        cores.append(u[:, :k].reshape(r, n, k))
        rest, r = s[:k, None] * vh[:k], k
    full = rest.reshape(r, -1)
    for g in reversed(cores):
        full = (g.reshape(-1, g.shape[-1]) @ full).reshape(g.shape[0], -1)
    return full.reshape(shape)


def _structured(M, N, shape, seed):
    """A matrix whose reshape has a decaying TT spectrum (distinct singular values: a unique truncation)."""
    low = _tt_svd_reference(_randn(M * N, seed=seed).reshape(shape), 3).reshape(M, N)
    return low / low.norm() + 0.05 * _randn(M, N, seed=seed + 1) / math.sqrt(M * N)


# ----------------------------------------------------------------------------- spec and projection
def test_reshaped_spec_ranks_of_the_paper_layers():
    s1 = reshaped_tt_spec(1024, 5408, PAPER_RESHAPES[1], 40)
    s2 = reshaped_tt_spec(1024, 1024, PAPER_RESHAPES[2], 40)
    # each bond capped at min(40, r_{k-1} n_k, product of the later modes), as TensorLy's tensor_train does
    assert s1.ranks == (26, 40, 40, 40, 40, 32, 8, 4, 2)
    assert s2.ranks == (4, 16, 40, 40, 40, 40, 40, 16, 4)
    # cores (1, 26, 26), (26, 26, 40), three (40, 4, 40), (40, 4, 32), (32, 4, 8), (8, 2, 4), (4, 2, 2), (2, 2, 1)
    assert (
        s1.num_params
        == 26 * 26 + 26 * 26 * 40 + 3 * 40 * 4 * 40 + 40 * 4 * 32 + 32 * 4 * 8 + 8 * 2 * 4 + 4 * 2 * 2 + 2 * 2
    )
    assert s1.ratio < 0.01
    assert reshaped_tt_spec(1024, 1024, PAPER_RESHAPES[2], 700).ranks == (4, 16, 64, 256, 700, 256, 64, 16, 4)
    for shape, ranks, match in [((4, 4, 4), 3, "shape"), ((32, 32), [3, 3], "ranks"), ((32, 32), [40], "out of range")]:
        with pytest.raises(ValueError, match=match):
            reshaped_tt_spec(32, 32, shape, ranks)


@pytest.mark.parametrize(
    "M, N, shape, cap",
    [(12, 30, (3, 4, 5, 6), 4), (24, 20, (2, 6, 4, 2, 5), 3), (16, 16, (4, 4, 4, 4), 16)],
    ids=["truncating", "five-way", "full-rank"],
)
def test_reshaped_projection_equals_float64_tt_svd(M, N, shape, cap):
    W = torch.stack([_structured(M, N, shape, seed=s) for s in (1, 3)])
    spec = reshaped_tt_spec(M, N, shape, cap)
    cores, dense = tt_project_reshaped(W, shape, spec.ranks, method="lapack")
    assert [tuple(c.shape[1:]) for c in cores] == [
        (r0, n, r1) for r0, n, r1 in zip((1, *spec.ranks), shape, (*spec.ranks, 1))
    ]
    for b in range(2):
        ref = _tt_svd_reference(W[b].reshape(shape), cap).reshape(M, N)
        torch.testing.assert_close(dense[b], ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(tt_reconstruct_reshaped([c[b : b + 1] for c in cores], M, N)[0], ref)
    if spec.ranks == reshaped_bond_caps(shape):
        torch.testing.assert_close(dense, W, rtol=1e-10, atol=1e-12)  # nothing truncated: exact
    # one matrix without the batch dim gives the same
    c1, d1 = tt_project_reshaped(W[0], shape, spec.ranks, method="lapack")
    torch.testing.assert_close(d1, dense[0], rtol=1e-10, atol=1e-12)


def test_reshaped_projection_auto_with_warm_start_is_near_optimal():
    # the 676 x 8192 unfolding at rank 40 of the paper's 1,024 x 5,408 layer, scaled down: the
    # 520 x 512 unfolding of a (26, 26, 32, 16) tensor at rank 20 gets the warm-started subspace SVD
    M, N, shape = 676, 512, (26, 26, 32, 16)
    ranks = reshaped_tt_spec(M, N, shape, 20).ranks
    W0 = _structured(M, N, shape, seed=5)
    state = {}
    tt_project_reshaped(W0, shape, ranks, method="auto", generator=_gen(1), state=state)
    assert list(state) == [1]  # the one large unfolding
    W1 = W0 + 0.01 * _randn(M, N, seed=7) / math.sqrt(M * N)
    _, warm = tt_project_reshaped(W1, shape, ranks, method="auto", generator=_gen(2), state=state)
    _, exact = tt_project_reshaped(W1, shape, ranks, method="lapack")
    ref = _tt_svd_reference(W1.reshape(shape), 20).reshape(M, N)
    torch.testing.assert_close(exact, ref, rtol=1e-9, atol=1e-12)
    assert (W1 - warm).norm() <= 1.005 * (W1 - exact).norm()  # measured 1.002 (a noise-flat tail past rank 3)


def test_position_major_flatten_is_the_notebooks_feature_order():
    """ConvSpec(flatten="positions"): layer 1's structure sees the features as p * C + c (the
    notebook's X W1 reshaped to (n, P * C)); internally they stay channel-major like nn.Flatten."""
    conv = ConvSpec((1, 8, 8), out_channels=4, kernel_size=3, stride=2, flatten="positions")  # P = 9, C = 4
    m = TenBCD([64, 36, 8, 10], conv=conv, tt_layers={1: {"shape": (8, 6, 6), "ranks": 2}}, dtype=D64)
    imgs = _randn(5, 1, 8, 8, seed=2)
    out = torch.nn.functional.conv2d(imgs, _randn(4, 1, 3, 3, seed=3), stride=2)  # (n, C, 3, 3)
    ours = out.reshape(5, -1)  # channel-major
    notebook = out.permute(0, 2, 3, 1).reshape(5, -1)  # position-major
    W = _randn(8, 36, seed=4)
    torch.testing.assert_close(notebook, ours[:, m._col_perm[1]])
    # the weight the notebook's reshape sees is W's columns in that order, and it computes the same layer
    torch.testing.assert_close(m._canonical(1, W) @ notebook.T, W @ ours.T)
    torch.testing.assert_close(m._from_canonical(1, m._canonical(1, W)), W)


def test_init_normal_targets_and_projection_accept():
    X, y = torch.rand(40, 64, generator=_gen(1), dtype=D64), torch.randint(0, 10, (40,), generator=_gen(2))
    spec = {"shape": (8, 8, 8, 8), "ranks": 3}
    m = TenBCD(
        [64, 64, 64, 10], tt_layers={1: spec}, init="normal", init_std=0.01, init_target_rank=6, dtype=D64, seed=3
    )
    m.initialize(X, one_hot(y, 10))
    assert all(abs(float(w.std()) / 0.01 - 1) < 0.1 for w in m.weights_)
    # the first target: the TT-SVD at the init target rank (6), not at the layer's (3)
    torch.testing.assert_close(m.targets_[1], _tt_svd_reference(m.weights_[1].reshape(8, 8, 8, 8), 6).reshape(64, 64))
    assert [c.shape[-1] for c in m.cores_[1][:-1]] == [6, 6, 6]
    # "always": after a step the target is the projection of the new W, whether closer or not
    m2 = TenBCD(
        [64, 64, 64, 10],
        tt_layers={1: spec},
        init="normal",
        init_target_rank=6,
        projection_accept="always",
        dtype=D64,
        seed=3,
        svd_method="lapack",
    )
    m2.initialize(X, one_hot(y, 10))
    m2.step()
    ref = _tt_svd_reference(m2.weights_[1].reshape(8, 8, 8, 8), 3).reshape(64, 64)
    torch.testing.assert_close(m2.targets_[1], ref, rtol=1e-9, atol=1e-12)
    # "closer" (default) keeps the rank-6 target here: the rank-3 projection is further from W
    m.step()
    assert (m.weights_[1] - ref).norm() > (m.weights_[1] - m.targets_[1]).norm()
    with pytest.raises(ValueError, match="projection_accept"):
        TenBCD([64, 64, 10], projection_accept="sometimes")
    with pytest.raises(ValueError, match="init"):
        TenBCD([64, 64, 10], init="xavier")


def test_paper_preset_is_the_notebooks_configuration():
    cfg = PaperCNN(rank=40)
    m = cfg.build()
    assert m.layer_sizes == list(PAPER_LAYER_SIZES) and m.conv.out_features == 5408 and m.conv.flatten == "positions"
    assert (m.gamma, m.rho, m.alpha, m.tau, m.alpha_w, m.weight_decay, m.scale) == (5, 5, 1, 0.1, 1, 0, None)
    assert (m.init, m.init_std, m.init_target_rank, m.projection_accept) == ("normal", 0.01, 700, "always")
    assert sorted(m.tt_specs) == [1, 2] and all(isinstance(s, ReshapedTTSpec) for s in m.tt_specs.values())
    assert m.tt_specs[1].shape == (26, 26, 4, 4, 4, 4, 4, 2, 2, 2) and m.tt_specs[2].shape == (4,) * 10
    assert not m.sparsity and m.seed == 10
    scaled = PaperCNN(rank=40, variant="n-scaled").build()
    assert scaled.scale == "n" and scaled.init == "tt" and scaled.tau == 1.0
    assert PaperCNN(rank=220, overrides={"tau": 0.2}).build().tau == 0.2
    assert PAPER_LOGGED_TEST_ACC[1000] == 0.976
    with pytest.raises(ValueError, match="variant"):
        PaperCNN(variant="gpu")


# ----------------------------------------------------------------------------- checkpoints
def _small(**kw):
    conv = ConvSpec((1, 8, 8), out_channels=4, kernel_size=3, stride=1, flatten="positions")  # 144 features
    args = dict(
        conv=conv,
        tt_layers={1: {"shape": (12, 12, 8, 8), "ranks": 5}},
        init="normal",
        init_target_rank=50,
        projection_accept="always",
        scale=None,
        tau=0.1,
        alpha_w=1.0,
        weight_decay=0.0,
        seed=4,
    )
    args.update(kw)
    return TenBCD([64, 144, 64, 10], **args)


@pytest.fixture(scope="module")
def data():
    g = _gen(0)
    X, y = torch.rand(120, 64, generator=g), torch.randint(0, 10, (120,), generator=g)
    return X, one_hot(y, 10), X[:50], y[:50]


def _same_state(a: TenBCD, b: TenBCD):
    for name in ("weights_", "targets_", "U", "V", "P"):
        for s, t in zip(getattr(a, name), getattr(b, name)):
            assert (s is None and t is None) or torch.equal(s, t), name
    for ca, cb in zip(a.cores_, b.cores_):
        assert (ca is None and cb is None) or all(torch.equal(s, t) for s, t in zip(ca, cb))
    for k in ("iteration", "objective", "train_acc", "test_acc", "test_acc_free_w", "tt_gap"):
        assert a.history_[k] == b.history_[k], k
    assert a.n_iter_ == b.n_iter_


def test_resume_from_checkpoint_is_bit_exact(data, tmp_path):
    """A run interrupted after iteration 5 (last checkpoint at 4) and resumed ends in exactly
    the state of an uninterrupted run: weights, targets, cores, U, V, history."""
    X, Y, Xt, yt = data
    whole = _small(svd_method="auto").fit(X, Y, n_iter=7, X_test=Xt, y_test=yt, eval_every=2)

    class Stop(Exception):
        pass

    def stop(model, rec):
        if rec["iteration"] == 5:
            raise Stop

    ck = tmp_path / "run" / "ckpt.pt"
    with pytest.raises(Stop):
        _small(svd_method="auto").fit(
            X, Y, n_iter=7, X_test=Xt, y_test=yt, eval_every=2, checkpoint=ck, checkpoint_every=2, callback=stop
        )
    assert torch.load(ck, weights_only=True)["n_iter"] == 4
    seen = []
    resumed = _small(svd_method="auto").fit(
        X,
        Y,
        n_iter=7,
        X_test=Xt,
        y_test=yt,
        eval_every=2,
        checkpoint=ck,
        resume=True,
        callback=lambda m, r: seen.append(r["iteration"]),
    )
    assert seen == [5, 6, 7]
    _same_state(resumed, whole)
    assert torch.load(ck, weights_only=True)["n_iter"] == 7  # the last iteration is always checkpointed
    # nothing left to do: resuming a finished run changes nothing
    again = _small(svd_method="auto").fit(
        X, Y, n_iter=7, X_test=Xt, y_test=yt, eval_every=2, checkpoint=ck, resume=True
    )
    _same_state(again, whole)


def test_resume_refuses_other_settings_or_data(data, tmp_path):
    X, Y, _, _ = data
    ck = tmp_path / "ckpt.pt"
    _small().fit(X, Y, n_iter=1, checkpoint=ck)
    with pytest.raises(ValueError, match="tau = 0.1 .*this model: 0.2"):
        _small(tau=0.2).fit(X, Y, n_iter=2, checkpoint=ck, resume=True)
    with pytest.raises(ValueError, match="other training data"):
        _small().fit(X.flip(0), Y.flip(0), n_iter=2, checkpoint=ck, resume=True)
    (tmp_path / "junk.pt").write_bytes(b"")
    torch.save({"a": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a tenBCD checkpoint"):
        _small().fit(X, Y, n_iter=2, checkpoint=tmp_path / "junk.pt", resume=True)
    with pytest.raises(ValueError, match="resume"):
        _small().fit(X, Y, n_iter=2, resume=True)
    # no checkpoint yet: resume=True starts fresh
    fresh = _small().fit(X, Y, n_iter=1, checkpoint=tmp_path / "new.pt", resume=True)
    assert fresh.n_iter_ == 1 and (tmp_path / "new.pt").exists()


def test_progress_bar_shows_running_accuracy(data, capsys):
    X, Y, Xt, yt = data
    _small().fit(X, Y, n_iter=2, X_test=Xt, y_test=yt, progress=True)
    err = capsys.readouterr().err
    assert "tenBCD" in err and "2/2" in err and "test=" in err and "train=" in err


def test_step_sq_is_the_squared_change_of_every_block(data):
    X, Y, _, _ = data
    m = _small(dtype=D64).initialize(X.double(), Y)
    for _ in range(2):
        before = [t.clone() for t in (*m.weights_, *m.U, *m.V, m.targets_[1])]
        m.step()
        after = (*m.weights_, *m.U, *m.V, m.targets_[1])
        expect = sum(float((a - b).square().sum()) for a, b in zip(after, before))
        assert m._step_sq == pytest.approx(expect, rel=1e-10) and expect > 0
        m._objective_cached()
    fitted = _small().fit(X, Y, n_iter=3)
    assert len(fitted.history_["step_sq"]) == 3 and all(v > 0 for v in fitted.history_["step_sq"])


def test_train_backprop_keeps_masked_weights_at_zero():
    from tensorpress.train import prune_projection, train_backprop

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 16, bias=False), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    X, y = torch.randn(64, 20, generator=_gen(5)), torch.randint(0, 3, (64,), generator=_gen(6))
    mask = (prune_projection(net[0].weight.detach(), 0.75) != 0).float()
    before = net[2].weight.detach().clone()
    train_backprop(net, X, y, epochs=2, lr=1e-2, masks={"0.weight": mask})
    assert int((net[0].weight != 0).sum()) <= int(mask.sum()) == 80
    assert torch.all(net[0].weight[mask == 0] == 0) and not torch.equal(net[2].weight, before)
    with pytest.raises(ValueError, match="masks"):
        train_backprop(net, X, y, epochs=1, masks={"0.weight": mask[:3]})
