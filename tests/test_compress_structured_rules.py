"""Rank rules (optimism, cv, energy) for the tensor structures tt, tucker and cp."""

import math

import pytest
import torch
from torch import nn

import tensorpress
from tensorpress.compress.crossval import merge_stats
from tensorpress.compress.output_error import output_error
from tensorpress.compress.stats import GramStats
from tensorpress.compress.structured_rules import (
    CANDIDATE_FRACTIONS,
    CURVE_EFFORT,
    CURVE_MIN_GAIN,
    allocate_structured,
    candidate_ranks,
    measure_curves,
)
from tensorpress.compress.structures import ADAPTERS, budget_params
from tensorpress.ops.tt import tt_to_dense

F64 = torch.float64


def stats_of(x):
    st = GramStats(x.shape[1], paired=False)
    st.update(x)
    return st


def jacobian_rank(fn, params):
    """Rank of the Jacobian of params -> fn(*params).flatten() at a random point (float64)."""
    jac = torch.autograd.functional.jacobian(lambda *p: fn(*p).reshape(-1), tuple(params))
    full = torch.cat([j.reshape(j.shape[0], -1) for j in jac], 1)
    return int(torch.linalg.matrix_rank(full))


# ---------------------------------------------------------------------------- degrees of freedom
@pytest.mark.parametrize("rank", [(2, 3, 2), (1, 4, 3), (3, 5, 2)])
def test_tt_dof_is_the_dimension_of_the_tt_manifold(rank):
    """rank_dof = (rank of the Jacobian of cores -> W at a generic point) + the bias."""
    layer = nn.Linear(24, 36)
    adapter = ADAPTERS["tt"]
    out_f, in_f = adapter.factors(layer)
    full = (1, *rank, 1)
    torch.manual_seed(0)
    cores = [torch.randn(full[k], m, n, full[k + 1], dtype=F64) for k, (m, n) in enumerate(zip(out_f, in_f))]
    assert adapter.rank_dof(layer, rank) == jacobian_rank(lambda *c: tt_to_dense(list(c)), cores) + 36


@pytest.mark.parametrize("ranks", [(3, 2), (4, 5), (2, 2)])
def test_tucker_dof_is_the_dimension_of_the_tucker2_manifold(ranks):
    conv = nn.Conv2d(6, 7, 3)
    torch.manual_seed(1)
    r_out, r_in = ranks
    factors = [
        torch.randn(7, r_out, dtype=F64),
        torch.randn(r_out, r_in, 3, 3, dtype=F64),
        torch.randn(r_in, 6, dtype=F64),
    ]
    kernel = lambda a, c, b: torch.einsum("oa,abhw,bi->oihw", a, c, b)  # noqa: E731
    assert ADAPTERS["tucker"].rank_dof(conv, ranks) == jacobian_rank(kernel, factors) + 7


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_cp_dof_is_the_dimension_of_the_cp_manifold(rank):
    conv = nn.Conv2d(6, 7, 3)
    torch.manual_seed(2)
    factors = [
        torch.randn(7, rank, dtype=F64),
        torch.randn(rank, 6, dtype=F64),
        torch.randn(rank, 3, dtype=F64),
        torch.randn(rank, 3, dtype=F64),
    ]
    kernel = lambda a, b, c, d: torch.einsum("or,ri,rh,rw->oihw", a, b, c, d)  # noqa: E731
    assert ADAPTERS["cp"].rank_dof(conv, rank) == jacobian_rank(kernel, factors) + 7


# ---------------------------------------------------------------------------- curves
@pytest.mark.parametrize(
    "structure,layer", [("tt", nn.Linear(24, 36)), ("tucker", nn.Conv2d(8, 12, 3)), ("cp", nn.Conv2d(8, 12, 3))]
)
def test_candidates_are_distinct_smaller_than_the_layer_and_include_the_budget(structure, layer):
    adapter = ADAPTERS[structure]
    ranks = candidate_ranks(adapter, layer, 0.37)
    params = [adapter.rank_params(layer, r) for r in ranks]
    assert len(set(ranks)) == len(ranks) >= 4
    assert params == sorted(params) and params[-1] < budget_params(layer)
    assert adapter.uniform_rank(layer, 0.37) in ranks
    assert len(ranks) <= len(CANDIDATE_FRACTIONS) + 1


def _planted_linear_data(seed=0, n=1200, d=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64) @ torch.randn(d, d, generator=g, dtype=F64) + 0.3


def test_curves_are_the_fits_errors_and_the_heldout_errors_are_explicit_kfold():
    torch.manual_seed(3)
    layer = nn.Linear(24, 36).double()
    x = _planted_linear_data()
    chunks = x.split(200)
    folds = [{"l": stats_of(torch.cat(chunks[k::3]))} for k in range(3)]
    shot = merge_stats(folds)
    adapter = ADAPTERS["tt"]
    ticks = []
    curves = measure_curves(adapter, {"l": layer}, shot, 0.4, folds, tick=lambda: ticks.append(1))
    cands = curves["l"]
    assert len(ticks) == 4 * len(cands)
    assert [c.rank for c in cands] == candidate_ranks(adapter, layer, 0.4)  # TT ladders are never capped
    errs = [c.train for c in cands]
    assert errs[0] > errs[-1]  # more parameters fit better
    for c in cands[::3]:
        fit = adapter.fit("whitened", layer, stats_of(x), c.rank, dict(CURVE_EFFORT))
        assert math.isclose(c.train, output_error(layer, fit, stats_of(x)) ** 2, rel_tol=1e-9)
        assert c.params == adapter.rank_params(layer, c.rank) and c.dof < c.params
        # explicit K-fold: fit on the other folds' rows, squared error on the held-out rows
        err = energy = 0.0
        for k in range(3):
            test = torch.cat(chunks[k::3])
            train = torch.cat([torch.cat(chunks[j::3]) for j in range(3) if j != k])
            fit = adapter.fit("whitened", layer, stats_of(train), c.rank, dict(CURVE_EFFORT))
            with torch.no_grad():
                y = layer(test)
                err += (test @ fit.weight().T + fit.bias - y).square().sum().item()
                energy += y.square().sum().item()
        assert math.isclose(c.heldout, err / energy, rel_tol=1e-7)
        assert c.heldout >= c.train * 0.9


def test_allocation_respects_the_budget_and_favours_the_layer_that_needs_rank():
    """Two layers, one with an exactly low-TT-rank weight: every rule moves parameters to the
    other, stays within the budget, and optimism beats uniform ranks on summed error."""
    torch.manual_seed(4)
    adapter = ADAPTERS["tt"]
    easy, hard = nn.Linear(24, 36).double(), nn.Linear(24, 36).double()
    out_f, in_f = adapter.factors(easy)
    cores = [
        torch.randn(1, out_f[0], in_f[0], 2, dtype=F64),
        *[torch.randn(2, m, n, 2, dtype=F64) for m, n in zip(out_f[1:-1], in_f[1:-1])],
        torch.randn(2, out_f[-1], in_f[-1], 1, dtype=F64),
    ]
    with torch.no_grad():
        easy.weight.copy_(tt_to_dense(cores) / 3)
    layers = {"easy": easy, "hard": hard}
    x = _planted_linear_data(seed=5, n=4000)
    shot = {"easy": stats_of(x), "hard": stats_of(x)}
    curves = measure_curves(adapter, layers, shot, 0.4)
    total = 0.4 * sum(budget_params(m) for m in layers.values())
    uniform = {n: adapter.uniform_rank(m, 0.4) for n, m in layers.items()}
    by_rank = {n: {c.rank: c for c in cs} for n, cs in curves.items()}
    for rule in ("optimism", "energy"):
        chosen = allocate_structured(rule, layers, curves, 4000, 0.4)
        params = {
            n: budget_params(layers[n]) if r is None else adapter.rank_params(layers[n], r) for n, r in chosen.items()
        }
        assert sum(params.values()) <= total
        assert params["hard"] > adapter.rank_params(hard, uniform["hard"])
        assert params["easy"] < adapter.rank_params(easy, uniform["easy"])
    chosen = allocate_structured("optimism", layers, curves, 4000, 0.4)
    summed = sum(0.0 if r is None else by_rank[n][r].train for n, r in chosen.items())
    assert summed < sum(by_rank[n][uniform[n]].train for n in layers)


def _cp_rank2_conv(seed):
    """Conv2d(8, 12, 3) whose kernel is exactly CP rank 2."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(8, 12, 3).double()
    a, b, c, d = (torch.randn(n, 2, generator=g, dtype=F64) for n in (12, 8, 3, 3))
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,ir,hr,wr->oihw", a, b, c, d))
    return conv


def _patches(n_images, seed, channels=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_images, channels, 10, 10, generator=g, dtype=F64)
    return torch.nn.functional.unfold(x, 3).transpose(1, 2).reshape(-1, channels * 9)


def test_cp_ladders_stop_where_a_higher_rank_stops_paying():
    """An exactly rank-2 CP kernel: the ladder stops at the first candidate that does not lower
    the best error by CURVE_MIN_GAIN, every candidate before it did, and the ranks above are
    never fitted (the progress ticks still count them, once per fold)."""
    conv = _cp_rank2_conv(9)
    adapter = ADAPTERS["cp"]
    full = candidate_ranks(adapter, conv, 0.5)
    x = _patches(40, 10)
    folds = [{"c": stats_of(x[k::2])} for k in range(2)]
    shot = merge_stats(folds)
    ticks, fitted = [], []
    fit = adapter.fit

    class Counting:
        caps_flat_curves = True

        def __getattr__(self, name):
            return getattr(adapter, name)

        def fit(self, method, layer, stats, rank, ridge_kw):
            fitted.append(rank)
            return fit(method, layer, stats, rank, ridge_kw)

    curves = measure_curves(Counting(), {"c": conv}, shot, 0.5, folds, tick=lambda: ticks.append(1))
    errs = [c.train for c in curves["c"]]
    assert 2 <= len(errs) < len(full) and [c.rank for c in curves["c"]] == full[: len(errs)]
    for k in range(1, len(errs) - 1):
        assert errs[k] <= (1 - CURVE_MIN_GAIN) * min(errs[:k])
    assert errs[-1] > (1 - CURVE_MIN_GAIN) * min(errs[:-1]) or min(errs[:-1]) <= 1e-12
    assert min(errs) < 1e-6  # rank 2 is inside the ladder and fits the kernel
    assert set(fitted) == set(full[: len(errs)]) and len(fitted) == 3 * len(errs)  # all rows + 2 folds
    assert len(ticks) == 3 * len(full)
    assert all(c.heldout is not None for c in curves["c"])


# ---------------------------------------------------------------------------- compress()
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(24, 36), nn.Linear(36, 24)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 12, 3, padding=1)
        self.c2 = nn.Conv2d(12, 16, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def _kept(report):
    return sum(r.params_after for r in report.layers) / sum(r.params_before for r in report.layers)


@pytest.mark.parametrize("rule", ["optimism", "cv", "energy"])
def test_compress_tt_with_a_rank_rule(rule):
    torch.manual_seed(6)
    model = MLP()
    with torch.no_grad():  # layer a is nearly TT rank 1: the rules should spend little on it
        adapter = ADAPTERS["tt"]
        out_f, in_f = adapter.factors(model.a)
        cores = [torch.randn(1, m, n, 1) for m, n in zip(out_f, in_f)]
        model.a.weight.copy_(tt_to_dense(cores) * 0.05 + 1e-3 * torch.randn(36, 24))
    calib = [_planted_linear_data(seed=s, n=300).float() for s in range(6)]
    cmp, report = tensorpress.compress(model, calib, structure="tt", method="whitened", budget=0.45, rank_rule=rule)
    assert report.rank_rule == rule and report.rank_rule_seconds > 0
    assert _kept(report) <= 0.45 + 1e-9
    by_name = {r.name: r for r in report.layers}
    uniform = tensorpress.compress(model, calib, structure="tt", method="whitened", budget=0.45)[1]
    uni = {r.name: r for r in uniform.layers}
    assert by_name["a"].params_after < uni["a"].params_after
    held = _planted_linear_data(seed=99, n=500).float()
    with torch.no_grad():
        ref = model(held)
        err = ((cmp(held) - ref).norm() / ref.norm()).item()
        err_uniform = (
            (tensorpress.compress(model, calib, structure="tt", method="whitened", budget=0.45)[0](held) - ref).norm()
            / ref.norm()
        ).item()
    assert err < err_uniform


@pytest.mark.parametrize("structure", ["tucker", "cp"])
def test_compress_conv_with_a_rank_rule(structure):
    torch.manual_seed(7)
    model = CNN()
    g = torch.Generator().manual_seed(8)
    calib = [torch.nn.functional.avg_pool2d(torch.randn(6, 4, 12, 12, generator=g), 3, 1, 1) for _ in range(5)]
    cmp, report = tensorpress.compress(model, calib, structure=structure, budget=0.4, rank_rule="optimism")
    assert _kept(report) <= 0.4 + 1e-9
    assert all(r.structure in (structure, "dense") for r in report.layers)
    with torch.no_grad():
        x = calib[0]
        assert torch.isfinite(cmp(x)).all()
        assert ((cmp(x) - model(x)).norm() / model(x).norm()).item() < 0.5


def test_compress_cp_rule_says_where_the_ladder_stopped():
    """compress() with a rank rule on an exactly rank-2 CP conv: the rank kept is inside the
    ladder that was measured, the budget is left unused and the report says why."""
    conv = _cp_rank2_conv(11).float()
    model = nn.Sequential(conv)
    g = torch.Generator().manual_seed(12)
    calib = [torch.randn(8, 8, 10, 10, generator=g) for _ in range(4)]
    _, report = tensorpress.compress(model, calib, structure="cp", budget=0.5, rank_rule="optimism")
    full = candidate_ranks(ADAPTERS["cp"], conv, 0.5)
    (layer,) = report.layers
    assert layer.structure == "cp" and layer.rank < full[-1]
    assert _kept(report) < 0.5
    assert any("ranks above" in n and "'0'" in n for n in report.notes), report.notes


def test_compress_structured_rule_bad_input():
    model, calib = MLP(), [torch.randn(8, 24)]
    with pytest.raises(ValueError, match="rank_rule"):
        tensorpress.compress(model, calib, structure="tt", rank_rule="bic")
    with pytest.raises(ValueError, match="calib"):
        tensorpress.compress(model, None, structure="tt", method="svd", rank_rule="optimism")
    with pytest.raises(ValueError, match="calib: rank_rule='cv'"):
        tensorpress.compress(model, calib * 3, structure="tt", rank_rule="cv")
