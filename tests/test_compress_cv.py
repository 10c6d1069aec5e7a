"""rank_rule="cv": held-out error curves from per-fold statistics, checked against explicit
fits and evaluations on the rows, and the allocation they give inside compress()."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tensorpress as tp
from _util import rel_err
from tensorpress.compress import GramStats, fit_activation
from tensorpress.compress.crossval import cv_error_curves, heldout_error_curve, merge_stats


def _rows(n, d, seed, offset=2.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + offset


def _stats(x):
    st = GramStats(x.shape[1], paired=False)
    for part in x.split(64):
        st.update(part)
    return st


def _layer(d_in, d_out, seed):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out).double()


def _direct_error(layer, train_x, test_x, rank, ridge):
    """Squared output error on test_x of the rank-r fit from train_x, by explicit evaluation."""
    fit = fit_activation(layer.weight, layer.bias, _stats(train_x), rank, ridge=ridge)
    with torch.no_grad():
        want = layer(test_x)
    got = test_x @ fit.weight().T + fit.bias
    return (want - got).square().sum().item()


def test_heldout_curve_matches_explicit_fits_at_every_rank():
    layer = _layer(10, 7, seed=0)
    train_x, test_x = _rows(400, 10, seed=1), _rows(150, 10, seed=2, offset=2.5)
    ridge = 1e-13  # the curve is exact for the unridged fit
    err, energy = heldout_error_curve(layer, _stats(train_x), _stats(test_x), ridge=ridge)
    assert err.shape == (8,)
    for r in range(1, 8):
        assert err[r].item() == pytest.approx(_direct_error(layer, train_x, test_x, r, ridge), rel=1e-7, abs=1e-9)
    # rank 0: only the training mean is predicted
    with torch.no_grad():
        mean_pred = layer(train_x).mean(0)
        assert err[0].item() == pytest.approx((layer(test_x) - mean_pred).square().sum().item(), rel=1e-9)
        assert energy == pytest.approx(layer(test_x).square().sum().item(), rel=1e-9)
    # held-out error is not monotone like the training error, but it never goes below zero and
    # at full rank only the difference of means is left
    assert (err >= 0).all()


def test_cv_curves_equal_a_brute_force_k_fold_loop():
    layer = _layer(9, 12, seed=3)
    x = _rows(500, 9, seed=4)
    parts = list(x.split(100))  # five folds
    folds = [{"l": _stats(p)} for p in parts]
    ridge = 1e-13
    curves = cv_error_curves({"l": layer}, folds, ridge=ridge)["l"]
    with torch.no_grad():
        energy = layer(x).square().sum().item()
    for r in (1, 3, 6, 9):
        total = sum(
            _direct_error(layer, torch.cat([q for j, q in enumerate(parts) if j != k]), parts[k], r, ridge)
            for k in range(5)
        )
        assert curves[r].item() == pytest.approx(total / energy, rel=1e-7)


def test_merge_stats_sums_the_rows_and_keeps_shared_accumulators():
    x = _rows(300, 6, seed=5)
    shared_a, shared_b = _stats(x[:120]), _stats(x[120:])
    parts = [
        {"q": shared_a, "k": shared_a, "o": _stats(x[:120] * 2)},
        {"q": shared_b, "k": shared_b, "o": _stats(x[120:] * 2)},
    ]
    merged = merge_stats(parts)
    assert merged["q"] is merged["k"] and merged["q"] is not merged["o"]
    whole = _stats(x)
    assert merged["q"].n == 300
    assert rel_err(merged["q"].cov_ref, whole.cov_ref) < 1e-12
    assert rel_err(merged["o"].mean_ref, 2 * whole.mean_ref) < 1e-12
    assert parts[0]["q"].n == 120  # the parts are left as they were


class _Planted(nn.Module):
    """Three layers whose weights have planted ranks 2, 8 and 3 (plus a little noise)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 16)
        with torch.no_grad():
            for layer, rank in ((self.a, 2), (self.b, 8), (self.c, 3)):
                out_f, in_f = layer.weight.shape
                w = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g) / in_f**0.5
                layer.weight.copy_(w + 0.01 * torch.randn(out_f, in_f, generator=g) / in_f**0.5)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _calib(n=2000, batches=10):
    return list(_rows(n, 16, seed=8).float().split(n // batches))


def test_cv_rule_agrees_with_the_optimism_rule_on_planted_ranks():
    net, calib = _Planted(), _calib()
    before = copy.deepcopy(net.state_dict())
    ranks = {}
    for rule in ("optimism", "cv"):
        small, report = tp.compress(net, calib, method="whitened", budget=0.45, rank_rule=rule)
        assert report.kept_fraction <= 0.45 + 1e-9
        assert report.rank_rule == rule and report.rank_rule_seconds > 0
        ranks[rule] = {r.name: r.rank for r in report.layers}
    assert ranks["cv"] == ranks["optimism"]
    # the budget is spent where the planted ranks are: the rank-8 layer gets the most
    assert ranks["cv"]["b"] >= 8 and ranks["cv"]["a"] >= 2 and ranks["cv"]["c"] >= 3
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_cv_rule_with_a_cache_reuses_the_folds():
    net, calib = _Planted(), _calib()
    cache = {}
    _, first = tp.compress(net, calib, method="whitened", budget=0.3, rank_rule="cv", cache=cache)
    assert any(k[0] == "folds" for k in cache) and any(k[0] == "cv-curves" for k in cache)
    _, again = tp.compress(net, calib, method="whitened", budget=0.3, rank_rule="cv", cache=cache)
    _, plain = tp.compress(net, calib, method="whitened", budget=0.3, rank_rule="cv")
    assert [r.rank for r in again.layers] == [r.rank for r in first.layers] == [r.rank for r in plain.layers]


def test_cv_rule_bad_input_is_named_before_work():
    net = _Planted()
    with pytest.raises(ValueError, match="cv_folds"):
        tp.compress(net, _calib(), rank_rule="cv", cv_folds=1)
    with pytest.raises(ValueError, match="calib.*cv_folds=5.*at least 5"):
        tp.compress(net, _calib(batches=4), rank_rule="cv")
