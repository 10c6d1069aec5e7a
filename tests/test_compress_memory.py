"""compress()'s memory plan (issue 28 item 1) and the fast patch statistics (item 2): the
representations of a layer's statistics, the plan's choices and errors, the peak memory of a
run measured in a subprocess, and the accuracy of the approximated fits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import tensorpress as tp
from tensorpress.compress.memory import MemoryPlanError, parse_memory, plan_memory
from tensorpress.compress.stats import GramStats, conv_patch_gram
from tensorpress.nn.patches import conv_patches

F64 = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("b,c,length,k", [(3, 4, 20, 5), (2, 3, 9, 5), (5, 3, 30, 2), (2, 3, 10, 1)])
def test_conv_patch_gram_is_the_gram_of_the_patches(b, c, length, k):
    torch.manual_seed(0)
    u = torch.randn(b, c, length, dtype=F64)
    rows = u.unfold(2, k, 1).permute(0, 2, 1, 3).reshape(-1, c * k)
    assert rel_err(conv_patch_gram(u, k), rows.T @ rows) < 1e-13
    assert conv_patch_gram(u[:, :, : 2 * k - 2], k) is None if k > 1 else True  # fewer positions than offsets


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, (5, 1), padding="same"),
        nn.Conv2d(3, 4, (1, 4), padding=(0, 1), stride=(2, 1)),
        nn.Conv2d(3, 4, (6, 1), stride=(1, 2), padding=(1, 1), padding_mode="reflect"),
        nn.Conv2d(3, 4, (7, 1)),  # 6 positions < 7 offsets: the patches' own Gram
        nn.Conv2d(3, 4, 3, padding=1),  # not a tall kernel: rows a chunk at a time
    ],
)
@pytest.mark.parametrize("paired", [True, False])
def test_update_conv_equals_the_statistics_of_the_patch_rows(conv, paired):
    torch.manual_seed(1)
    conv = conv.double()
    x = torch.randn(6, 3, 12, 5, dtype=F64) + 3.0
    xt = x + 0.1 * torch.randn_like(x)
    w = conv.weight.reshape(4, -1)
    proj = w if paired else None
    fast = GramStats(w.shape[1], paired=paired, project=proj, conv=conv, buffer_bytes=1000)
    ref = GramStats(w.shape[1], paired=paired, project=proj)
    for a, b in zip(x.split(2), xt.split(2)):
        fast.update_conv(a, b, max_rows=7)
        ref.update(conv_patches(conv, a), conv_patches(conv, b))
    assert fast.n == ref.n
    assert rel_err(fast.cov_in, ref.cov_in) < 1e-12
    assert rel_err(fast.cov_cross_times(w), ref.cov_cross_times(w)) < 1e-12
    assert abs(fast.ref_energy(w) - ref.ref_energy(w)) < 1e-10 * ref.ref_energy(w)
    assert rel_err(fast.mean_in, ref.mean_in) < 1e-12


@pytest.mark.parametrize("kronecker", [False, True])
def test_an_empty_first_batch_adds_nothing(kronecker):
    """A batch of no samples before the first real one: the statistics are those of the real
    batches alone (the per-channel shift of a tall kernel was once the NaN mean of nothing,
    and every statistic after it NaN)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, (3, 1)).double()
    w = conv.weight.reshape(4, -1)
    x = torch.randn(4, 3, 10, 2, dtype=F64) + 1.0
    xt = x + 0.1 * torch.randn_like(x)
    kw = dict(project=w, kronecker=(3, 3)) if kronecker else dict(project=w)
    got = GramStats(w.shape[1], paired=True, conv=conv, **kw)
    ref = GramStats(w.shape[1], paired=True, conv=conv, **kw)
    got.update_conv(x[:0], xt[:0])
    for st in (got, ref):
        st.update_conv(x, xt)
    assert got.n == ref.n > 0
    assert torch.isfinite(got.mean_ref).all() and torch.equal(got.mean_ref, ref.mean_ref)
    assert torch.equal(got.cov_cross_times(w), ref.cov_cross_times(w))
    v = torch.randn(2, w.shape[1], dtype=F64)
    assert torch.equal(got.in_apply(v), ref.in_apply(v))


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 4, (5, 1), padding=(2, 0)), nn.Conv2d(3, 4, (1, 4), stride=(2, 1))])
@pytest.mark.parametrize("paired", [True, False])
def test_kronecker_factors_from_the_signals_equal_those_of_the_patch_rows(conv, paired):
    torch.manual_seed(6)
    conv = conv.double()
    x = torch.randn(6, 3, 12, 5, dtype=F64) + 3.0
    xt = x + 0.1 * torch.randn_like(x)
    w = conv.weight.reshape(4, -1)
    shape = (3, w.shape[1] // 3)
    fast = GramStats(w.shape[1], paired=paired, project=w, kronecker=shape, conv=conv)
    ref = GramStats(w.shape[1], paired=paired, project=w, kronecker=shape)
    for a, b in zip(x.split(2), xt.split(2)):
        fast.update_conv(a, b, max_rows=7)
        ref.update(conv_patches(conv, a), conv_patches(conv, b))
    v = torch.randn(2, w.shape[1], dtype=F64)
    assert rel_err(fast.in_apply(v), ref.in_apply(v)) < 1e-12
    assert rel_err(fast.cov_cross_times(w), ref.cov_cross_times(w)) < 1e-12
    assert abs(fast.energy_offset(w) - ref.energy_offset(w)) < 1e-9 * abs(ref.energy_offset(w))


def test_kronecker_statistics_are_exact_for_separable_patches_and_the_error_of_w_is_that_of_the_inputs():
    torch.manual_seed(2)
    c, k, n = 5, 4, 4000
    a_half = torch.randn(c, c, dtype=F64)
    s_half = torch.randn(k, k, dtype=F64)
    # rows with covariance (A A^T) (x) (S S^T): vec of A Z S^T, Z white
    z = torch.randn(n, c, k, dtype=F64)
    x = torch.einsum("ce,nek,lk->ncl", a_half, z, s_half).reshape(n, c * k)
    xt = x + 0.3 * torch.randn_like(x)
    w = torch.randn(3, c * k, dtype=F64)
    kron = GramStats(c * k, project=w, kronecker=(c, k))
    exact = GramStats(c * k, project=w)
    for a, b in zip(x.split(1000), xt.split(1000)):
        kron.update(a, b)
        exact.update(a, b)
    v = torch.randn(2, c * k, dtype=F64)
    # the sample covariance is separable only up to sampling noise
    assert rel_err(kron.in_apply(v), exact.in_apply(v)) < 0.15
    # W^ = W: the error is exactly ||(X - X~) W^T||^2 (only dW = 0 is weighed by the approximation)
    from tensorpress.compress.quadratic import OutputObjective

    d = (x - x.mean(0)) - (xt - xt.mean(0))
    want = float(((d @ w.T) ** 2).sum())
    assert abs(OutputObjective(w, kron, 0.0)(w) - want) < 1e-8 * want
    assert abs(OutputObjective(w, exact, 0.0)(w) - want) < 1e-8 * want
    with pytest.raises(ValueError, match="kronecker"):
        GramStats(c * k, kronecker=(c, k))  # needs project=
    with pytest.raises(ValueError, match="kronecker"):
        GramStats(c * k, project=w, kronecker=(c, k + 1))
    with pytest.raises(ValueError, match="not kept as a matrix"):
        _ = kron.cov_in


def test_plan_keeps_the_exact_gram_when_it_fits_and_steps_down_when_not():
    big = nn.Conv2d(1024, 8, (64, 1))  # 65,536 features: a 34 GB float64 Gram
    mid = nn.Conv2d(512, 16, 3)  # 4,608 features: 170 MB
    layers = {"big": big, "mid": mid}
    methods = {"big": "activation", "mid": "activation"}
    plan = plan_memory(layers, methods, "tucker", 8 << 30, "test", sequential=True, one_shot=False)
    assert plan.layers["big"].representation == "kronecker" and plan.layers["big"].kronecker == (1024, 64)
    assert plan.layers["mid"].representation == "exact"
    assert plan.peak <= 8 << 30 and plan.layers["big"].exact_bytes > 34e9
    small = plan_memory({"mid": mid}, methods, "tucker", 400 << 20, "test", sequential=True, one_shot=False)
    assert small.layers["mid"].representation in ("exact-fp32", "kronecker") and small.peak <= 400 << 20
    assert any("mid" in line and "instead of" in line for line in small.lines())
    # a Linear has no Kronecker form: exact or float32, else the error
    with pytest.raises(MemoryPlanError, match="'fc'.*exclude=\\['fc'\\]"):
        plan_memory({"fc": nn.Linear(20000, 4)}, {"fc": "activation"}, "lowrank", 1 << 30, "t", True, False)
    # weights only: no statistics at all
    none = plan_memory(layers, {"big": None, "mid": None}, "tucker", 1 << 20, "t", sequential=False, one_shot=False)
    assert {m.representation for m in none.layers.values()} == {"none"} and none.peak == 0


def test_parse_memory_accepts_sizes_and_names_the_argument():
    assert parse_memory("512M") == 512 << 20 and parse_memory("1.5GiB") == int(1.5 * (1 << 30))
    assert parse_memory(1000) == 1000
    for bad in ("lots", "-1G", 0, float("nan")):
        with pytest.raises(ValueError, match="max_memory"):
            parse_memory(bad)
    with pytest.raises(TypeError, match="max_memory"):
        parse_memory(True)


def test_compress_refuses_a_layer_that_cannot_fit_before_any_calibration_pass():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(30000, 4)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.fc(x)

    model = Counting()
    with pytest.raises(MemoryPlanError) as info:
        tp.compress(model, [torch.randn(2, 30000)], max_memory="64M")
    msg = str(info.value)
    assert "'fc'" in msg and "30,000 input features" in msg and "64.0 MiB" in msg and "method='svd'" in msg
    assert model.calls == 0
    with pytest.raises(ValueError, match="max_memory"):
        tp.compress(model, [torch.randn(2, 30000)], max_memory="big")


def _channel_mixed(n, c, h, w, rank, seed):
    """Inputs whose channels are a low-rank mix plus a little noise (what data-aware fits exploit)."""
    mix = torch.randn(c, rank, generator=torch.Generator().manual_seed(123))  # the same for every batch
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, h, w, generator=g)
    return torch.einsum("cr,nrhw->nchw", mix, z) + 0.05 * torch.randn(n, c, h, w, generator=g)


def _held_out_error(model, small, x):
    with torch.no_grad():
        y, yh = model(x), small(x)
    return float((y - yh).norm() / y.norm())


@pytest.mark.slow
def test_kronecker_fit_of_a_512_channel_3x3_conv_beats_weights_only_at_the_same_parameters():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(512, 16, 3, padding=1))
    calib = [_channel_mixed(4, 512, 8, 8, 24, s) for s in range(3)]
    held = _channel_mixed(4, 512, 8, 8, 24, 9)
    # the exact float64 paired statistics need about 0.8 GB here; 40 MB forces the Kronecker form;
    # the same Tucker ranks (all 16 outputs, 24 of 512 input channels) for both fits
    ranks = {"0": (16, 24)}
    kron_model, kron = tp.compress(model, calib, structure="tucker", ranks=ranks, max_memory="40M")
    svd_model, svd = tp.compress(model, calib, structure="tucker", method="svd", ranks=ranks)
    assert kron.layers[0].statistics == "kronecker" and svd.layers[0].statistics == "none"
    assert kron.layers[0].params_after == svd.layers[0].params_after
    assert kron.memory["layers"]["0"]["representation"] == "kronecker"
    assert any("kronecker" in line and "instead of" in line for line in kron.memory_lines)
    assert "kronecker" in kron.table()
    e_kron, e_svd = _held_out_error(model, kron_model, held), _held_out_error(model, svd_model, held)
    assert e_kron < 0.5 * e_svd, (e_kron, e_svd)


def test_kronecker_fit_is_close_to_the_exact_fit_on_a_tall_kernel():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(32, 8, (16, 1)))
    calib = [_channel_mixed(16, 32, 40, 1, 6, s) for s in range(3)]
    held = _channel_mixed(16, 32, 40, 1, 6, 9)
    ranks = {"0": (8, 6)}  # all outputs, 6 of 32 input channels (the data's rank)
    exact_model, exact = tp.compress(model, calib, structure="tucker", ranks=ranks)
    kron_model, kron = tp.compress(model, calib, structure="tucker", ranks=ranks, max_memory="1.5M")
    svd_model, _ = tp.compress(model, calib, structure="tucker", method="svd", ranks=ranks)
    assert exact.layers[0].statistics == "exact" and kron.layers[0].statistics == "kronecker"
    e_exact, e_kron = _held_out_error(model, exact_model, held), _held_out_error(model, kron_model, held)
    e_svd = _held_out_error(model, svd_model, held)
    assert e_kron < 0.6 * e_svd and e_exact < 0.6 * e_svd and e_kron < 2 * e_exact + 0.02, (e_exact, e_kron, e_svd)


def test_svd_gathers_no_statistics_unless_the_error_column_is_asked_for():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    calib = [torch.randn(32, 16)]
    _, quiet = tp.compress(model, calib, method="svd")
    assert all(r.statistics == "none" and r.rows == 0 for r in quiet.layers)
    assert all(r.rel_error != r.rel_error for r in quiet.layers)  # nan
    _, asked = tp.compress(model, calib, method="svd", report_error=True)
    assert all(r.statistics == "exact" and r.rows == 32 and 0 < r.rel_error < 1 for r in asked.layers)
    with pytest.raises(TypeError, match="report_error"):
        tp.compress(model, calib, method="svd", report_error="yes")


PEAK_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys, threading, time, torch
    from torch import nn
    import tensorpress as tp
    torch.manual_seed(0)
    torch.set_num_threads(1)
    # 1,024 channels, 64x1 kernels: 65,536-feature patches (exact float64 Gram: 34 GB)
    model = nn.Sequential(nn.Conv2d(1024, 8, (64, 1))).eval()
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(1024, 16, generator=g)
    calib = []
    for _ in range(2):  # the patch rows take 134 MB a batch: together over the budget
        z = torch.randn(8, 16, 127, 1, generator=g)
        calib.append(torch.einsum("cr,nrhw->nchw", mix, z) + 0.05 * torch.randn(8, 1024, 127, 1, generator=g))
    # the same code paths once on a small layer first: the pages of torch's libraries they touch
    # count in the RSS but are not the run's memory
    warm = nn.Sequential(nn.Conv2d(16, 4, (8, 1))).eval()
    tp.compress(warm, [torch.randn(4, 16, 20, 1)], structure="tucker", budget=0.25, max_memory="256K")
    # anonymous memory only (RssAnon, sampled every millisecond): file-backed pages of the
    # libraries come and go with the machine's memory pressure and are not the run's memory
    def anon():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
    gc.collect()
    before, peak, running = anon(), [0], [True]
    def sample():
        while running[0]:
            peak[0] = max(peak[0], anon())
            time.sleep(0.001)
    sampler = threading.Thread(target=sample)
    sampler.start()
    small, report = tp.compress(model, calib, structure="tucker", budget=0.25, max_memory=sys.argv[1])
    running[0] = False
    sampler.join()
    peak[0] = max(peak[0], anon())
    print(json.dumps({"increase": peak[0] - before, "stats": report.layers[0].statistics,
                      "estimate": report.memory["peak"], "rows": report.layers[0].rows}))
    """
)


@pytest.mark.slow
def test_peak_memory_of_a_1024_channel_64x1_conv_stays_under_the_budget():
    budget = 192 << 20
    # the child imports tensorpress as this process did (the installed package in CI, the
    # source tree with PYTHONPATH=python in development)
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(budget)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["stats"] == "kronecker" and got["rows"] == 2 * 8 * 64
    assert got["estimate"] <= budget
    assert 0 < got["increase"] <= budget, got
