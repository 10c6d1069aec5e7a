"""compress(): statistics, closed-form fits, sequential engine, allocation, report, saving."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import tensorpress as tp
from _util import rel_err
from tensorpress.compress import GramStats, fit_activation, fit_svd, load_compressed, save_compressed, sequential
from tensorpress.compress import lowrank as compress_lowrank
from tensorpress.compress.allocate import allocate_uniform, dense_params
from tensorpress.compress.lowrank import error_curve
from tensorpress.compress.output_error import output_error
from tensorpress.nn import LowRankLinear


def _correlated(n, d, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + offset


# ----------------------------------------------------------------------------- statistics
def test_gram_stats_streaming_matches_direct_float64():
    x = _correlated(700, 12, offset=50.0)
    xt = x + 0.1 * _correlated(700, 12, seed=1, offset=0.0)
    st = GramStats(12)
    for a, b in zip(x.split(97), xt.split(97)):
        st.update(a.float(), b.float())
    xc, xtc = x - x.mean(0), xt - xt.mean(0)
    assert st.n == 700
    assert rel_err(st.mean_ref, x.mean(0)) < 1e-6
    assert rel_err(st.cov_ref, xc.T @ xc) < 1e-5
    assert rel_err(st.cov_in, xtc.T @ xtc) < 1e-5
    assert rel_err(st.cov_cross, xtc.T @ xc) < 1e-5
    assert rel_err(st.gram_in(), xt.T @ xt) < 1e-6


def test_gram_stats_merge_equals_one_accumulator():
    x, xt = _correlated(400, 8), _correlated(400, 8, seed=3)
    whole, a, b = GramStats(8), GramStats(8), GramStats(8)
    whole.update(x, xt)
    a.update(x[:150], xt[:150])
    b.update(x[150:] + 0.0, xt[150:])
    a.merge_(b)
    assert a.n == whole.n
    for attr in ("cov_ref", "cov_in", "cov_cross", "mean_ref", "mean_in"):
        assert rel_err(getattr(a, attr), getattr(whole, attr)) < 1e-12, attr


def test_gram_stats_in_panels_match_direct_float64(monkeypatch):
    """Wide Grams are summed as their upper block triangle (here panels of 5 over 12
    features, the last one narrower), mirrored at first read; rows added after a read go
    into the whole matrices."""
    from tensorpress.compress import stats as stats_mod

    monkeypatch.setattr(stats_mod, "GRAM_PANEL", 5)
    x = _correlated(600, 12, offset=20.0)
    xt = x + 0.2 * _correlated(600, 12, seed=2, offset=0.0)
    paired, one_shot = GramStats(12), GramStats(12, paired=False)
    for a, b in zip(x[:400].split(90), xt[:400].split(90)):
        paired.update(a, b)
        one_shot.update(a)
    assert rel_err(paired.cov_in, (xt[:400] - xt[:400].mean(0)).T @ (xt[:400] - xt[:400].mean(0))) < 1e-10
    paired.update(x[400:], xt[400:])  # after a read
    one_shot.update(x[400:])
    xc, xtc = x - x.mean(0), xt - xt.mean(0)
    for got, want in ((paired.cov_ref, xc.T @ xc), (paired.cov_in, xtc.T @ xtc), (one_shot.cov_ref, xc.T @ xc)):
        assert rel_err(got, got.T) < 1e-13 and rel_err(got, want) < 1e-10
    assert rel_err(paired.cov_cross, xtc.T @ xc) < 1e-10


def test_gram_stats_projected_on_a_weight_keep_only_the_cross_product_times_it():
    x = _correlated(500, 12, offset=30.0)
    xt = x + 0.1 * _correlated(500, 12, seed=4, offset=0.0)
    w = torch.randn(5, 12, dtype=torch.float64)
    proj, full = GramStats(12, project=w.float()), GramStats(12)
    for a, b in zip(x.split(120), xt.split(120)):
        proj.update(a.float(), b.float())
        full.update(a.float(), b.float())
    xc, xtc = x - x.mean(0), xt - xt.mean(0)
    w32 = w.float().double()  # the weight as the layer holds it
    assert rel_err(proj.cov_cross_times(w32), xtc.T @ xc @ w32.T) < 1e-5
    assert rel_err(proj.cov_cross_times(w32), full.cov_cross_times(w32)) < 1e-5
    assert rel_err(proj.cov_in, full.cov_in) < 1e-12
    with pytest.raises(ValueError, match="cov_cross_times"):
        _ = proj.cov_cross  # a property that refuses: the full cross term is not kept
    with pytest.raises(ValueError, match="weight"):
        proj.cov_cross_times(w32 + 1.0)
    with pytest.raises(ValueError, match="project"):
        GramStats(12, project=torch.randn(5, 11))
    with pytest.raises(ValueError, match="project"):
        proj.merge_(full)


def test_compress_projects_the_statistics_of_narrowing_layers_without_changing_the_fit(monkeypatch):
    """A layer whose output is narrower than half its input keeps X~^T X only times its
    weight; the compressed model is the one the full statistics give."""
    from tensorpress.compress import sequential

    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 6)).double()
    x = _correlated(900, 12, seed=8)
    calib, test_x = list(x[:600].split(150)), x[600:]
    made = []

    class Spy(sequential.GramStats):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.project is not None)

    monkeypatch.setattr(sequential, "GramStats", Spy)
    projected, _ = tp.compress(net, calib, budget=0.5)
    assert made == [False, False, True]  # 12->40 and 40->30 widen or keep, 30->6 narrows
    made.clear()

    class Full(sequential.GramStats):
        def __init__(self, *args, project=None, **kwargs):
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sequential, "GramStats", Full)
    full, _ = tp.compress(net, calib, budget=0.5)
    with torch.no_grad():
        assert rel_err(projected(test_x), full(test_x)) < 1e-10


def test_gram_stats_rejects_mismatched_rows():
    st = GramStats(4)
    with pytest.raises(ValueError, match="x_in"):
        st.update(torch.randn(5, 4), torch.randn(6, 4))


# ----------------------------------------------------------------------------- closed forms
def _direct_activation(w, b, x, xt, r):
    """Zhang & Saab's closed form on explicit (centered) data, float64: W^T = X~+ [P X W^T]_r."""
    xc, xtc = x - x.mean(0), xt - xt.mean(0)
    target = xc @ w.T
    proj = xtc @ torch.linalg.lstsq(xtc, target).solution
    u, s, vh = torch.linalg.svd(proj, full_matrices=False)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    w_hat = torch.linalg.lstsq(xtc, best).solution.T
    b_hat = b + w @ x.mean(0) - w_hat @ xt.mean(0)
    return w_hat, b_hat


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_fit_activation_matches_direct_closed_form(rank):
    d_in, d_out = 10, 7
    g = torch.Generator().manual_seed(rank)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, generator=g, dtype=torch.float64)
    x = _correlated(500, d_in)
    xt = x + 0.2 * _correlated(500, d_in, seed=9, offset=0.5)
    st = GramStats(d_in)
    st.update(x, xt)
    fit = fit_activation(w, b, st, rank, ridge=0.0)
    w_ref, b_ref = _direct_activation(w, b, x, xt, rank)
    y = x @ w.T + b
    y_fit = xt @ fit.weight().T + fit.bias
    y_ref = xt @ w_ref.T + b_ref
    assert rel_err(y_fit, y_ref) < 1e-8
    assert torch.linalg.matrix_rank(fit.weight()) == rank
    # the reported error agrees with the data
    assert math.isclose(output_error(_linear(w, b), fit, st), rel_err(y_fit, y), rel_tol=1e-6)


def test_fit_activation_optimal_against_perturbations():
    d_in, d_out, r = 9, 6, 3
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    x = _correlated(300, d_in)
    xt = x + 0.3 * torch.randn(300, d_in, dtype=torch.float64)
    st = GramStats(d_in)
    st.update(x, xt)
    fit = fit_activation(w, None, st, r, ridge=0.0)
    lin = _linear(w, None)
    best = output_error(lin, fit, st)
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        other = copy.deepcopy(fit)
        other.first = other.first + 1e-3 * torch.randn(other.first.shape, generator=g, dtype=torch.float64)
        other.second = other.second + 1e-3 * torch.randn(other.second.shape, generator=g, dtype=torch.float64)
        assert output_error(lin, other, st) >= best - 1e-12


def test_whitened_is_activation_on_one_shot_stats_and_beats_svd():
    d_in, d_out, r = 12, 8, 3
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    x = _correlated(400, d_in)
    one = GramStats(d_in, paired=False)
    one.update(x)
    paired = GramStats(d_in)
    paired.update(x, x)
    a, bfit = fit_activation(w, None, one, r, ridge=0.0), fit_activation(w, None, paired, r, ridge=0.0)
    assert rel_err(a.weight(), bfit.weight()) < 1e-8
    lin = _linear(w, None)
    assert output_error(lin, a, one) < output_error(lin, fit_svd(w, None, r), one)


def test_error_curve_matches_fits_at_every_rank():
    d_in, d_out = 8, 6
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    x = _correlated(300, d_in)
    st = GramStats(d_in, paired=False)
    st.update(x)
    info = fit_activation(w, None, st, d_out, ridge=0.0).info
    curve = error_curve(info)
    xc = x - x.mean(0)
    for r in range(1, d_out + 1):
        fit = fit_activation(w, None, st, r, ridge=0.0)
        direct = ((xc @ (w - fit.weight()).T) ** 2).sum().item()
        assert math.isclose(curve[r].item(), direct, rel_tol=1e-7, abs_tol=1e-9)


def test_fit_svd_is_best_frobenius_approximation():
    w = torch.randn(9, 7, dtype=torch.float64)
    fit = fit_svd(w, None, 3)
    s = torch.linalg.svdvals(w)
    assert math.isclose((w - fit.weight()).norm().item(), s[3:].norm().item(), rel_tol=1e-10)
    # balanced factors: equal norms row by row
    assert torch.allclose(fit.first.norm(dim=1), fit.second.norm(dim=0))


def _linear(w, b):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


# ----------------------------------------------------------------------------- LowRankLinear
def test_lowrank_linear_from_dense_forward_and_roundtrip():
    dense = nn.Linear(20, 12, dtype=torch.float64)
    low = LowRankLinear.from_dense(dense, 5)
    x = torch.randn(4, 3, 20, dtype=torch.float64)
    torch.testing.assert_close(low(x), low.to_linear()(x))
    s = torch.linalg.svdvals(dense.weight.detach())
    assert math.isclose((low.to_dense() - dense.weight).norm().item(), s[5:].norm().item(), rel_tol=1e-9)
    again = LowRankLinear(20, 12, 5, dtype=torch.float64)
    again.load_state_dict(low.state_dict())
    torch.testing.assert_close(again(x), low(x))
    assert "rank=5" in repr(low)


def test_lowrank_linear_gradcheck_and_dtypes():
    low = LowRankLinear(6, 5, 2, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, a, b: nn.functional.linear(nn.functional.linear(x, a), b), (x, low.first, low.second)
    )
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        layer = LowRankLinear(16, 8, 4, dtype=dtype)
        ref = nn.functional.linear(
            torch.ones(2, 16, dtype=torch.float64), layer.to_dense().double(), layer.bias.double()
        )
        out = layer(torch.ones(2, 16, dtype=dtype))
        assert out.dtype == dtype
        assert rel_err(out, ref) < (1e-2 if dtype != torch.float32 else 1e-5)


def test_lowrank_linear_compiles():
    layer = LowRankLinear(16, 8, 4)
    x = torch.randn(5, 16)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


@pytest.mark.parametrize("rank", [0, 9, 2.5, True])
def test_lowrank_linear_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(8, 10, rank)


def test_lowrank_linear_bad_input_shape():
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        LowRankLinear(8, 4, 2)(torch.randn(3, 7))


# ----------------------------------------------------------------------------- compress()
class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.a, self.b = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, scale=1.0):
        return x + scale * self.b(torch.relu(self.a(x)))


class _Net(nn.Module):
    def __init__(self, d_in=12, d=24, classes=5, depth=3):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList([_Block(d) for _ in range(depth)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, scale=0.5)
        return self.head(h)


def _net_and_data(seed=0, n=1200):
    torch.manual_seed(seed)
    net = _Net()
    x = _correlated(n, 12, seed=seed).float()
    return net, list(x.split(200)), _correlated(500, 12, seed=seed + 100).float()


def _out_err(a, b, x):
    with torch.no_grad():
        return rel_err(a(x), b(x))


def test_compress_leaves_the_original_untouched_and_replaces_layers():
    net, calib, test_x = _net_and_data()
    before = copy.deepcopy(net.state_dict())
    small, report = tp.compress(net, calib, budget=0.4)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(type(m) is nn.Linear for n, m in net.named_modules() if n.endswith((".a", ".b")))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
    assert isinstance(small.blocks[0].a, LowRankLinear)
    assert report.mode == "blocks"
    assert len(report.layers) == 8
    assert report.kept_fraction <= 0.4 + 1e-9
    assert report.model_params_after < report.model_params_before
    assert 0 < _out_err(small, net, test_x) < 1


def test_methods_order_on_correlated_inputs():
    net, calib, test_x = _net_and_data(seed=1)
    errs = {
        m: _out_err(tp.compress(net, calib, method=m, budget=0.3)[0], net, test_x)
        for m in ("svd", "whitened", "activation")
    }
    assert errs["activation"] <= errs["whitened"] * 1.02
    assert errs["whitened"] < errs["svd"]


def test_block_replay_equals_whole_model_passes(monkeypatch):
    # float64: the fits amplify rounding differences along ill-conditioned input directions,
    # and float32 BLAS results may differ with the threads the library picks under load
    net, calib, test_x = _net_and_data(seed=2)
    net, calib, test_x = net.double(), [c.double() for c in calib], test_x.double()
    small_blocks, rep_blocks = tp.compress(net, calib, budget=0.5)
    monkeypatch.setattr(sequential, "find_blocks", lambda model, targets: None)
    small_model, rep_model = tp.compress(net, calib, budget=0.5)
    assert rep_blocks.mode == "blocks" and rep_model.mode == "model"
    with torch.no_grad():
        assert rel_err(small_blocks(test_x), small_model(test_x)) < 1e-9


def test_explicit_ranks_and_keep_dense_under_rules():
    net, calib, test_x = _net_and_data(seed=3)
    ranks = {n: 2 for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    small, report = tp.compress(net, calib, ranks=ranks)
    assert all(r.rank == 2 for r in report.layers)
    for rule in ("optimism", "energy"):
        small, report = tp.compress(net, calib, budget=0.35, rank_rule=rule)
        assert report.kept_fraction <= 0.35 + 1e-9, rule
    uniform = _out_err(tp.compress(net, calib, budget=0.35)[0], net, test_x)
    ruled = _out_err(tp.compress(net, calib, budget=0.35, rank_rule="optimism")[0], net, test_x)
    assert ruled < uniform


def test_uniform_allocation_fits_the_budget():
    layers = {"a": nn.Linear(384, 1536), "b": nn.Linear(1536, 384), "c": nn.Linear(10, 3)}
    for budget in (0.05, 0.3, 0.5, 0.9, 1.0):
        ranks = allocate_uniform(layers, budget)
        for n, layer in layers.items():
            used = ranks[n] * (layer.in_features + layer.out_features) + layer.out_features
            assert used <= max(
                budget * dense_params(layer), 1 * (layer.in_features + layer.out_features) + layer.out_features
            )


def test_attention_mask_rows_are_dropped():
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 6)

        def forward(self, input_embeds, attention_mask):
            return self.proj(input_embeds) * attention_mask[..., None]

    model = Tok()
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    batch = {"input_embeds": torch.randn(2, 4, 6), "attention_mask": mask}
    _, report = tp.compress(model, [batch], method="whitened", budget=0.5)
    assert report.calibration_rows == int(mask.sum())


def test_save_and_load_compressed(tmp_path):
    net, calib, test_x = _net_and_data(seed=4)
    small, report = tp.compress(net, calib, budget=0.5)
    path = save_compressed(small, report, tmp_path / "m.safetensors")
    again = load_compressed(net, path)
    with torch.no_grad():
        torch.testing.assert_close(again(test_x), small(test_x))
    with pytest.raises(ValueError, match="path"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
        load_compressed(net, tmp_path / "plain.safetensors")


def test_report_outputs(tmp_path):
    net, calib, _ = _net_and_data(seed=5)
    _, report = tp.compress(net, calib, budget=0.5)
    text = str(report)
    assert "blocks.0.a" in text and "kept" in text
    assert report.to_markdown(tmp_path / "r.md").startswith("# Compression report")
    data = report.to_dict()
    assert data["layers"][0]["name"] == "inp" and math.isclose(data["kept_fraction"], report.kept_fraction)
    png = report.plot(tmp_path / "r.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("budget", [0, -0.1, 1.5, "half", True])
def test_bad_budget(budget):
    net, calib, _ = _net_and_data()
    with pytest.raises(ValueError, match="budget"):
        tp.compress(net, calib, budget=budget)


def test_bad_names_and_arguments():
    net, calib, _ = _net_and_data()
    with pytest.raises(ValueError, match="include"):
        tp.compress(net, calib, include=["blocks.9.a"])
    with pytest.raises(ValueError, match="ranks"):
        tp.compress(net, calib, ranks={"nope": 2})
    with pytest.raises(ValueError, match="ranks"):
        tp.compress(net, calib, ranks={"inp": 2}, include=["inp", "head"])
    with pytest.raises(ValueError, match="ranks"):
        tp.compress(net, calib, ranks={"inp": 99}, include=["inp"])
    with pytest.raises(ValueError, match="method"):
        tp.compress(net, calib, method="magic")
    with pytest.raises(ValueError, match="structure"):
        tp.compress(net, calib, structure="tensor-ring")
    with pytest.raises(ValueError, match="rank_rule"):
        tp.compress(net, calib, rank_rule="vibes")
    with pytest.raises(ValueError, match="calib"):
        tp.compress(net, None, method="activation")
    with pytest.raises(TypeError, match="calib"):
        tp.compress(net, torch.randn(10, 12))
    with pytest.raises(TypeError, match="model"):
        tp.compress("resnet", calib)
    with pytest.raises(ValueError, match="no eligible layer"):
        tp.compress(nn.Sequential(nn.ReLU()), calib)


def test_bad_calibration_data_fails_before_work_and_removes_hooks():
    net, calib, _ = _net_and_data()
    with pytest.raises(ValueError, match="calib"):
        tp.compress(net, [torch.randn(10, 7)])
    nan = [c.clone() for c in calib]
    nan[0][3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tp.compress(net, nan)
    # NaN appearing only in a later batch is caught while recording, hooks still removed
    late = [c.clone() for c in calib]
    late[2][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        tp.compress(net, late, method="whitened")
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
    assert not torch.isinf(calib[2]).any()


def test_method_dict_mixes_sequential_methods():
    net, calib, test_x = _net_and_data(seed=6)
    method = {"blocks.*.a": "relu", "head": "convex", "*": "activation"}
    small, report = tp.compress(net, calib, method=method, budget=0.5)
    by_name = {r.name: r.method for r in report.layers}
    assert by_name["blocks.1.a"] == "relu" and by_name["head"] == "convex" and by_name["inp"] == "activation"
    assert report.method == "activation+convex+relu"
    err = _out_err(small, net, test_x)
    assert err < _out_err(tp.compress(net, calib, method="svd", budget=0.5)[0], net, test_x)
    with pytest.raises(ValueError, match="method"):
        tp.compress(net, calib, method={"blocks.*": "activation"})  # inp and head unmatched
    with pytest.raises(ValueError, match="method"):
        tp.compress(net, calib, method={"*": "svd"})  # one-shot methods are not per layer


def test_cache_reuses_statistics_without_changing_results():
    net, calib, test_x = _net_and_data(seed=7)
    cache = {}
    plain, _ = tp.compress(net, calib, budget=0.4, rank_rule="optimism")
    cached, _ = tp.compress(net, calib, budget=0.4, rank_rule="optimism", cache=cache)
    assert any(k[0] == "one-shot" for k in cache) and any(k[0] == "sensitivity" for k in cache)
    again, _ = tp.compress(net, calib, budget=0.4, rank_rule="optimism", cache=cache)
    with torch.no_grad():
        assert rel_err(cached(test_x), plain(test_x)) < 1e-4
        assert rel_err(again(test_x), cached(test_x)) < 1e-6


def test_rank_rule_and_whitened_runs_share_one_decomposition_per_layer(monkeypatch):
    """The optimism rule's curves and sensitivities and a later whitened run at any budget
    truncate one cached full-rank whitened fit per layer; the results are those without it."""
    net, calib, test_x = _net_and_data(seed=8)
    cache = {}
    tp.compress(net, calib, budget=0.4, rank_rule="optimism", cache=cache)
    calls = []
    real = compress_lowrank.fit_activation  # every decomposition goes through it (the adapters import it at call time)
    monkeypatch.setattr(compress_lowrank, "fit_activation", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared, _ = tp.compress(net, calib, method="whitened", budget=0.3, cache=cache)
    assert calls == []
    fresh, _ = tp.compress(net, calib, method="whitened", budget=0.3)
    assert len(calls) == len([m for m in net.modules() if isinstance(m, nn.Linear)])
    with torch.no_grad():
        assert rel_err(shared(test_x), fresh(test_x)) < 1e-10


def test_gram_stats_reference_borrows_x_gram():
    x, xt = _correlated(300, 6), _correlated(300, 6, seed=5)
    one = GramStats(6, paired=False)
    one.update(x)
    borrowed, own = GramStats(6, reference=one), GramStats(6)
    borrowed.update(x, xt)
    own.update(x, xt)
    for attr in ("cov_ref", "cov_in", "cov_cross", "mean_ref"):
        assert rel_err(getattr(borrowed, attr), getattr(own, attr)) < 1e-10, attr
    with pytest.raises(ValueError, match="reference"):
        GramStats(6, paired=False, reference=one)


def test_truncating_a_full_fit_equals_fitting_at_the_rank():
    from tensorpress.compress.lowrank import fit_activation, fit_svd, truncate_fit
    from tensorpress.compress.stats import GramStats

    torch.manual_seed(11)
    w, b = torch.randn(7, 10, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    st = GramStats(10, paired=False)
    st.update(torch.randn(200, 10, dtype=torch.float64) @ torch.randn(10, 10, dtype=torch.float64) + 2)
    for r in (1, 3, 7):
        direct, cut = fit_activation(w, b, st, r), truncate_fit(fit_activation(w, b, st, 7), r, w, b, st)
        assert torch.allclose(direct.weight(), cut.weight(), atol=1e-10)
        assert torch.allclose(direct.bias, cut.bias, atol=1e-10)
        direct, cut = fit_svd(w, b, r), truncate_fit(fit_svd(w, b, 7), r, w, b)
        assert torch.allclose(direct.weight(), cut.weight(), atol=1e-10)
        assert torch.equal(direct.bias, cut.bias)
    with pytest.raises(ValueError, match="rank"):
        truncate_fit(fit_svd(w, b, 3), 5, w, b)
