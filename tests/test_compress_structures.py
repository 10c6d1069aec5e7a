"""compress() with the tensor structures: data-aware TT (Linear) and Tucker-2 / CP (Conv2d)."""

import copy

import pytest
import torch
from torch import nn

import tensorpress
from tensorpress.compress.conv import fit_cp_conv, fit_tucker_conv
from tensorpress.compress.saving import load_compressed, save_compressed
from tensorpress.compress.stats import GramStats
from tensorpress.compress.tt import (
    _CoreMap,
    _extend_left,
    _extend_right,
    fit_tt_activation,
    fit_tt_svd,
    tt_params,
    uniform_tt_rank,
)
from tensorpress.nn import CPConv2d, TTLinear, TuckerConv2d
from tensorpress.nn.patches import conv_patches
from tensorpress.ops.tt import tt_to_dense

F64 = torch.float64


def correlated(n, d, seed=0, decay=3.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=F64)
    return (torch.randn(n, d, generator=g, dtype=F64) * torch.logspace(0, -decay, d, dtype=F64)) @ mix + 0.5


def one_shot(x):
    st = GramStats(x.shape[1], paired=False)
    st.update(x)
    return st


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------ TT
def test_tt_core_map_is_the_tt_matrix_and_its_adjoint():
    torch.manual_seed(0)
    cores = [torch.randn(1, 3, 2, 4, dtype=F64), torch.randn(4, 4, 5, 3, dtype=F64), torch.randn(3, 2, 3, 1, dtype=F64)]
    one = torch.ones(1, 1, 1, dtype=F64)
    cmap = _CoreMap(_extend_left(one, cores[0]), _extend_right(cores[2], one), 4, 5)
    assert rel(cmap.apply(cores[1]), tt_to_dense(cores)) < 1e-13
    g, z = torch.randn_like(cores[1]), torch.randn(24, 30, dtype=F64)
    assert abs((cmap.apply(g) * z).sum() - (g * cmap.adjoint(z)).sum()) < 1e-10


def test_tt_core_update_solves_the_least_squares_problem():
    """The last core update of a sweep, with enough CG steps, equals the explicit solution of
    its normal equations (built column by column from the linear map, float64)."""
    torch.manual_seed(1)
    w = torch.randn(6, 8, dtype=F64)
    st = one_shot(correlated(400, 8, decay=1.0))
    fit = fit_tt_activation(w, None, st, 2, (2, 3), (2, 4), sweeps=1, cg_iters=500)
    cores = list(fit.cores)  # a sweep ends by updating core 0 against the fixed core 1
    gram = st.cov_in + 1e-6 * st.cov_in.diagonal().mean() * torch.eye(8, dtype=F64)
    one = torch.ones(1, 1, 1, dtype=F64)
    cmap = _CoreMap(one, _extend_right(cores[1], one), 2, 2)
    basis = torch.eye(cores[0].numel(), dtype=F64).reshape(-1, *cores[0].shape)
    normal = torch.stack([cmap.adjoint(cmap.apply(b) @ gram).reshape(-1) for b in basis], 1)
    rhs = cmap.adjoint(w @ st.cov_cross.T).reshape(-1)
    best = torch.linalg.solve(normal, rhs)
    assert rel(cores[0].reshape(-1), best) < 1e-8


def test_tt_als_lowers_the_objective_and_beats_tt_svd_on_data():
    torch.manual_seed(2)
    w = torch.randn(24, 30, dtype=F64)
    x = correlated(3000, 30)
    st = one_shot(x)
    fit = fit_tt_activation(w, None, st, 3, (3, 4, 2), (2, 5, 3))
    hist = fit.info["objective"]
    assert all(b <= a * (1 + 1e-10) + 1e-9 for a, b in zip(hist, hist[1:]))
    assert hist[-1] < 0.7 * hist[0]
    y = x @ w.T
    err_als = rel(x @ fit.weight().T + fit.bias, y)
    svd = fit_tt_svd(w, None, 3, (3, 4, 2), (2, 5, 3))
    err_svd = rel(x @ svd.weight().T, y)
    assert err_als < 0.8 * err_svd
    # the reported objective is the squared centered output error (plus the tiny ridge term)
    yc = y - y.mean(0)
    yh = x @ fit.weight().T
    assert abs(((yh - yh.mean(0)) - yc).square().sum().item() / hist[-1] - 1) < 1e-3


def test_tt_full_rank_is_exact_and_budget_rank_fits():
    torch.manual_seed(3)
    lin = nn.Linear(12, 8).double()
    st = one_shot(correlated(500, 12, decay=1.0))
    fit = fit_tt_activation(lin.weight, lin.bias, st, 100, (2, 4), (3, 4), ridge=0.0)
    assert rel(fit.weight(), lin.weight.detach()) < 1e-8
    assert rel(fit.bias, lin.bias.detach()) < 1e-8
    big = nn.Linear(384, 1536)
    out_f, in_f = (4, 8, 8, 6), (4, 4, 6, 4)
    for budget in (0.1, 0.5):
        r = uniform_tt_rank(big, budget, out_f, in_f)
        caps = [min(r, c) for c in (16, 16 * 32 * 2, 24)]
        assert tt_params(out_f, in_f, caps) + 1536 <= budget * (384 * 1536 + 1536)


def test_tt_fit_rejects_bad_arguments():
    w = torch.randn(6, 8)
    with pytest.raises(ValueError, match="out_factors"):
        fit_tt_svd(w, None, 2, (2, 2), (2, 4))
    with pytest.raises(ValueError, match="ranks"):
        fit_tt_svd(w, None, 0, (2, 3), (2, 4))
    with pytest.raises(ValueError, match="stats"):
        fit_tt_activation(w, None, one_shot(torch.randn(10, 5, dtype=F64)), 2, (2, 3), (2, 4))


# ------------------------------------------------------------------------------------------ conv
@pytest.mark.parametrize(
    "kw",
    [
        dict(padding=1),
        dict(padding="same", dilation=2),
        dict(stride=2, padding=2, padding_mode="reflect"),
        dict(padding=(1, 0), padding_mode="circular"),
        dict(kernel_size=(4, 2), padding="same"),
    ],
)
def test_conv_patches_reproduce_the_conv(kw):
    k = kw.pop("kernel_size", 3)
    conv = nn.Conv2d(3, 5, k, **kw).double()
    x = torch.randn(2, 3, 9, 8, dtype=F64)
    y = conv(x)
    p = conv_patches(conv, x)
    yh = (p @ conv.weight.reshape(5, -1).T + conv.bias).reshape(2, -1, 5).transpose(1, 2).reshape(y.shape)
    assert rel(yh, y) < 1e-13


def smooth_images(n, c, hw, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g)
    return nn.functional.avg_pool2d(x, 3, 1, 1) + 0.3


@pytest.mark.parametrize("kind", ["tucker", "cp"])
def test_conv_fits_use_the_data(kind):
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    x = smooth_images(32, 8, 12)
    st = one_shot(conv_patches(conv, x).double())
    fit = fit_tucker_conv if kind == "tucker" else fit_cp_conv
    rank = (4, 4) if kind == "tucker" else 6
    weights_only, data = fit(conv, None, rank), fit(conv, st, rank)
    hist = data.info["objective"]
    assert all(b <= a * (1 + 1e-10) + 1e-9 for a, b in zip(hist, hist[1:]))
    with torch.no_grad():
        y = conv(x)
        e_w = rel(weights_only.module.float()(x), y)
        e_d = rel(data.module.float()(x), y)
    assert e_d < 0.85 * e_w
    # ConvFit.weight() is the module's kernel as the matrix the patches multiply
    assert rel(data.weight(), data.module.to_dense().reshape(12, -1).double()) < 1e-12


def test_full_rank_tucker_conv_fit_is_exact():
    conv = nn.Conv2d(4, 5, 3, padding=1).double()
    x = smooth_images(8, 4, 10).double()
    st = one_shot(conv_patches(conv, x))
    fit = fit_tucker_conv(conv, st, (5, 4), ridge=0.0)
    with torch.no_grad():
        assert rel(fit.module(x), conv(x)) < 1e-6
    with pytest.raises(ValueError, match="stats"):
        fit_tucker_conv(conv, one_shot(torch.randn(10, 7, dtype=F64)), 2)


# ------------------------------------------------------------------------------------------ compress()
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 36), nn.ReLU(), nn.Linear(36, 10))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 24, 3, padding=1, stride=2)
        self.c3 = nn.Conv2d(24, 24, 3, padding="same", bias=False)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.head(x.mean((2, 3)))


def _heldout_error(model, cmp, x):
    with torch.no_grad():
        return rel(cmp(x), model(x))


def test_compress_tt_structure():
    torch.manual_seed(5)
    model = MLP().eval()
    data = correlated(1024, 24).float()  # one distribution: calibration and held-out rows
    calib, held = list(data[:512].split(128)), data[512:]
    before = copy.deepcopy(model.state_dict())
    errs = {}
    for method in ("svd", "whitened", "activation"):
        cmp, report = tensorpress.compress(model, calib, structure="tt", method=method, budget=0.5)
        assert all(isinstance(cmp.get_submodule(r.name), TTLinear) for r in report.layers)
        assert {r.name for r in report.layers} == {"net.0", "net.2", "net.4"}
        assert report.kept_fraction <= 0.5
        errs[method] = _heldout_error(model, cmp, held)
    assert errs["activation"] < errs["svd"] and errs["whitened"] < errs["svd"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_compress_tt_ranks_and_round_trip(tmp_path):
    torch.manual_seed(6)
    model = MLP().eval()
    calib = list(correlated(128, 24).float().split(64))
    cmp, report = tensorpress.compress(
        model, calib, structure="tt", ranks={"net.0": 3, "net.2": [2, 4, 2], "net.4": 2}, include="net.*"
    )
    assert cmp.net[2].ranks == (2, 4, 2) and cmp.net[0].ranks[0] <= 3
    path = save_compressed(cmp, report, tmp_path / "m.safetensors")
    back = load_compressed(model, path)
    x = torch.randn(5, 24)
    with torch.no_grad():
        assert torch.allclose(back(x), cmp(x))


@pytest.mark.parametrize("structure, layer_type", [("tucker", TuckerConv2d), ("cp", CPConv2d)])
def test_compress_conv_structures(structure, layer_type, tmp_path):
    torch.manual_seed(7)
    model = CNN().eval()
    calib = [smooth_images(16, 3, 16, seed=s) for s in range(3)]
    held = smooth_images(32, 3, 16, seed=11)
    errs = {}
    for method in ("svd", "activation"):
        cmp, report = tensorpress.compress(model, calib, structure=structure, method=method, budget=0.4)
        assert [r.name for r in report.layers] == ["c1", "c2", "c3"]
        assert all(isinstance(cmp.get_submodule(n), layer_type) for n in ("c1", "c2", "c3"))
        assert report.kept_fraction <= 0.4 + 1e-9
        assert all(r.params_after < r.params_before and r.flops_after < r.flops_before for r in report.layers)
        errs[method] = _heldout_error(model, cmp, held)
    assert errs["activation"] < errs["svd"]
    path = save_compressed(cmp, report, tmp_path / "c.safetensors")
    back = load_compressed(model, path)
    with torch.no_grad():
        assert torch.allclose(back(held), cmp(held), atol=1e-6)


def test_compress_structure_bad_input():
    model, calib = MLP(), [torch.randn(8, 24)]
    with pytest.raises(ValueError, match="method"):
        tensorpress.compress(model, calib, structure="tt", method="relu")
    with pytest.raises(ValueError, match="rank_rule"):
        tensorpress.compress(model, calib, structure="tt", rank_rule="bic")
    with pytest.raises(ValueError, match="structure"):
        tensorpress.compress(model, calib, structure="tensor-ring")
    with pytest.raises(ValueError, match="model: no eligible layer"):
        tensorpress.compress(model, calib, structure="tucker")
    with pytest.raises(ValueError, match="ranks: layer 'c2'"):
        tensorpress.compress(
            CNN(), [torch.randn(2, 3, 8, 8)], structure="tucker", ranks={"c1": 2, "c2": (1, 2, 3), "c3": 2}
        )
