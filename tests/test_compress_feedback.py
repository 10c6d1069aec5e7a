"""Residual feedback: low-rank fits that also make up for the residual stream's error."""

import pytest
import torch
from torch import nn

import tensorpress
from tensorpress.compress.calibrate import residual_partners
from tensorpress.compress.lowrank import fit_activation
from tensorpress.compress.stats import GramStats, OffsetStats

F64 = torch.float64


class PostNormOut(nn.Module):
    """BERT's output block: norm(dense(x) + residual)."""

    def __init__(self, inner, width):
        super().__init__()
        self.dense = nn.Linear(inner, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x, residual):
        return self.norm(self.dense(x) + residual)


class PreNormOut(nn.Module):
    """Not a post-norm residual branch: the norm sees dense(x) alone."""

    def __init__(self, inner, width):
        super().__init__()
        self.dense = nn.Linear(inner, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x, residual):
        return self.norm(self.dense(x)) + residual


class Block(nn.Module):
    def __init__(self, width=16, inner=48, out_cls=PostNormOut):
        super().__init__()
        self.up = nn.Linear(width, inner)
        self.out = out_cls(inner, width)

    def forward(self, h):
        return self.out(torch.relu(self.up(h)), h)


class Stack(nn.Module):
    def __init__(self, n=3, out_cls=PostNormOut):
        super().__init__()
        self.blocks = nn.ModuleList(Block(out_cls=out_cls) for _ in range(n))

    def forward(self, h):
        for b in self.blocks:
            h = b(h)
        return h


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, 16, generator=g)
    return (torch.randn(n, 16, generator=torch.Generator().manual_seed(seed + 1)) * torch.logspace(0, -1, 16)) @ mix


def test_offset_stats_match_a_direct_float64_computation():
    torch.manual_seed(0)
    x, d = torch.randn(300, 6, dtype=F64) * 3 + 5, torch.randn(300, 4, dtype=F64) + 0.5
    st = OffsetStats(6, 4)
    for xs, ds in zip(x.split(70), d.split(70)):
        st.update(xs, ds)
    xc, dc = x - x.mean(0), d - d.mean(0)
    assert torch.allclose(st.cov_cross, xc.T @ dc, rtol=1e-10, atol=1e-9)
    assert torch.allclose(st.mean_d, d.mean(0))
    with pytest.raises(ValueError, match="d: expected 5 rows"):
        st.update(torch.randn(5, 6), torch.randn(4, 4))


def test_activation_fit_with_offset_solves_the_shifted_problem():
    """Full rank: the fit is the least-squares regression of X W^T + b + D on [X~, 1]."""
    torch.manual_seed(1)
    w, b = torch.randn(5, 8, dtype=F64), torch.randn(5, dtype=F64)
    x = torch.randn(400, 8, dtype=F64) + 1.0
    x_in = x + 0.1 * torch.randn_like(x)
    d = 0.3 * torch.randn(400, 5, dtype=F64) + x_in[:, :5] * 0.2
    gs = GramStats(8)
    gs.update(x, x_in)
    off = OffsetStats(8, 5)
    off.update(x_in, d)
    fit = fit_activation(w, b, gs, 5, ridge=0.0, offset=off)
    target = x @ w.T + b + d
    design = torch.cat([x_in, torch.ones(400, 1, dtype=F64)], 1)
    sol = torch.linalg.lstsq(design, target).solution
    assert torch.allclose(fit.weight(), sol[:8].T, rtol=1e-8, atol=1e-8)
    assert torch.allclose(fit.bias, sol[8], rtol=1e-8, atol=1e-8)
    # at a lower rank it still beats the fit that ignores D, on the shifted target
    low, plain = fit_activation(w, b, gs, 2, offset=off), fit_activation(w, b, gs, 2)
    err = lambda f: (x_in @ f.weight().T + f.bias - target).norm()  # noqa: E731
    assert err(low) < err(plain)
    with pytest.raises(ValueError, match="offset"):
        fit_activation(w, b, gs, 2, offset=OffsetStats(8, 3))


def test_residual_partners_finds_post_norm_branches_only():
    post, pre = Stack(), Stack(out_cls=PreNormOut)
    x = data(32)

    def targets(m):
        return {n: m.get_submodule(n) for n in ("blocks.0.up", "blocks.0.out.dense", "blocks.2.out.dense")}

    assert residual_partners(post, targets(post), x) == {
        "blocks.0.out.dense": "blocks.0.out",
        "blocks.2.out.dense": "blocks.2.out",
    }
    assert residual_partners(pre, targets(pre), x) == {}


def test_compress_with_residual_feedback_lowers_the_output_error():
    torch.manual_seed(2)
    model = Stack(n=4).eval()
    x = data(3000)
    calib, held = list(x[:2000].split(250)), x[2000:]
    errs = {}
    for fb in (False, True):
        cmp, report = tensorpress.compress(model, calib, budget=0.35, residual_feedback=fb)
        assert report.residual_feedback == ([f"blocks.{i}.out.dense" for i in range(4)] if fb else [])
        with torch.no_grad():
            errs[fb] = ((cmp(held) - model(held)).norm() / model(held).norm()).item()
    assert errs[True] < 0.95 * errs[False]


def test_residual_feedback_is_on_by_default_and_ignored_by_one_shot_methods():
    model, calib = Stack(n=2).eval(), list(data(400).split(200))
    _, report = tensorpress.compress(model, calib, budget=0.5)
    assert report.residual_feedback == ["blocks.0.out.dense", "blocks.1.out.dense"]
    _, report = tensorpress.compress(model, calib, budget=0.5, method="whitened")
    assert report.residual_feedback == []


def test_layers_kept_dense_are_refitted_on_the_compressed_inputs():
    torch.manual_seed(4)
    model = Stack(n=2).eval()
    x = data(3000)
    calib, held = list(x[:2000].split(250)), x[2000:]
    ranks = {"blocks.0.up": 3, "blocks.0.out.dense": 3, "blocks.1.up": 3, "blocks.1.out.dense": None}
    cmp, report = tensorpress.compress(model, calib, ranks=ranks)
    last = cmp.blocks[1].out.dense
    assert type(last) is nn.Linear and last is not model.blocks[1].out.dense
    assert not torch.equal(last.weight, model.blocks[1].out.dense.weight)
    row = {r.name: r for r in report.layers}["blocks.1.out.dense"]
    assert row.structure == "dense" and row.params_after == row.params_before
    # against keeping the original weights behind the same compressed layers: the refit makes
    # up for the upstream error
    with torch.no_grad():
        plain = Stack(n=2).eval()
        plain.load_state_dict(model.state_dict())
        for n in ("blocks.0.up", "blocks.0.out.dense", "blocks.1.up"):
            parent, _, child = n.rpartition(".")
            setattr(plain.get_submodule(parent), child, cmp.get_submodule(n))
        ref = model(held)
        err_refit = ((cmp(held) - ref).norm() / ref.norm()).item()
        err_plain = ((plain(held) - ref).norm() / ref.norm()).item()
    assert err_refit < err_plain


def test_a_shared_cache_keeps_the_original_models_rows_and_changes_no_result(monkeypatch):
    """With a cache, the original model's rows of every stage (inputs and residuals) are kept
    and a second call replays only the compressed model; the results are those without it,
    and with the byte cap at 0 nothing is kept."""
    from tensorpress.compress import sequential

    torch.manual_seed(3)
    model = Stack(n=3).eval()
    calib, held = list(data(1200).split(200)), data(300, seed=9)
    calls = []
    handle = model.blocks[2].out.dense.register_forward_pre_hook(lambda *_: calls.append(1))
    plain, _ = tensorpress.compress(model, calib, budget=0.4)
    calls.clear()
    cache = {}
    first, _ = tensorpress.compress(model, calib, budget=0.4, cache=cache)
    first_calls = len(calls)
    calls.clear()
    again, _ = tensorpress.compress(model, calib, budget=0.6, cache=cache)
    handle.remove()
    kept = [k for k in cache if isinstance(k, tuple) and k[0] == "ref-stage-rows"]
    assert len(kept) == 6 * len(calib)  # 2 stages per block, every batch
    assert any(k[2] == ("blocks.2.out.dense",) for k in kept)  # residual rows kept with the stage
    assert len(calls) <= first_calls - len(calib)  # no replay of the original per batch
    fresh, _ = tensorpress.compress(model, calib, budget=0.6)
    monkeypatch.setattr(sequential, "REF_ROWS_BYTES", 0)
    capped_cache = {}
    capped, _ = tensorpress.compress(model, calib, budget=0.4, cache=capped_cache)
    assert not any(isinstance(k, tuple) and k[0] == "ref-stage-rows" for k in capped_cache)
    with torch.no_grad():
        assert torch.equal(first(held), plain(held)) and torch.equal(capped(held), plain(held))
        assert torch.equal(again(held), fresh(held))
