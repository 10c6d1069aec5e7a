"""tensorpress.rank.allocate_ranks: per-layer ranks under a total parameter budget."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest

from tensorpress.rank.budget import Allocation, allocate_ranks


def random_curves(rng, n_layers, n_cands, convex=False, integer=True):
    curves = {}
    for layer in range(n_layers):
        ranks = np.sort(rng.choice(np.arange(1, 4 * n_cands), n_cands, replace=False))
        width = int(rng.integers(5, 40))
        params = ranks * width if integer else ranks * width * rng.uniform(0.5, 1.5)
        if convex:
            err = rng.uniform(0.5, 2.0) * np.exp(-ranks / rng.uniform(2, 10))
        else:  # noisy, non-convex, with dominated points
            err = rng.uniform(0, 1) * np.exp(-ranks / 8.0) + rng.uniform(0, 0.3, n_cands)
        curves[f"layer{layer}"] = [
            (int(r), int(p) if integer else float(p), float(e)) for r, p, e in zip(ranks, params, err)
        ]
    return curves


def brute_force(curves, budget):
    names = list(curves)
    best = (math.inf, None)
    for combo in itertools.product(*[range(len(curves[n])) for n in names]):
        p = sum(curves[n][i][1] for n, i in zip(names, combo))
        if p <= budget:
            e = sum(curves[n][i][2] for n, i in zip(names, combo))
            if e < best[0]:
                best = (e, combo)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    curves = random_curves(rng, n_layers=int(rng.integers(2, 5)), n_cands=int(rng.integers(2, 6)))
    lo = sum(min(p for _, p, _ in c) for c in curves.values())
    hi = sum(max(p for _, p, _ in c) for c in curves.values())
    for frac in (0.0, 0.2, 0.5, 0.8, 1.0):
        budget = lo + frac * (hi - lo)
        opt, _ = brute_force(curves, budget)
        dp = allocate_ranks(curves, budget, method="dp")
        assert dp.params <= budget and dp.error == pytest.approx(opt, abs=1e-12)
        assert dp.gap == 0 and dp.method == "dp"
        lg = allocate_ranks(curves, budget, method="lagrangian")
        assert lg.params <= budget + 1e-9
        # feasible, certified: lower_bound <= optimum <= error = lower_bound + gap
        assert lg.lower_bound <= opt + 1e-12 <= lg.error + 1e-12
        assert lg.error - lg.lower_bound == pytest.approx(lg.gap, abs=1e-12)
        # the reported ranks and totals are consistent with the curves
        assert lg.error == pytest.approx(sum(curves[n][lg.choices[n]][2] for n in curves))
        assert all(curves[n][lg.choices[n]][0] == lg.ranks[n] for n in curves)


def test_lagrangian_exact_at_hull_breakpoints():
    # convex curves, budget at a point where whole hull segments fit: the relaxation is integral
    curves = {"a": [(1, 10, 1.0), (2, 20, 0.5), (4, 40, 0.3)], "b": [(1, 10, 2.0), (2, 20, 1.0), (4, 40, 0.9)]}
    res = allocate_ranks(curves, 40, method="lagrangian")
    assert res.ranks == {"a": 2, "b": 2} and res.params == 40 and res.gap == 0.0
    assert res.error == pytest.approx(1.5)


def test_lagrangian_small_gap_many_layers():
    rng = np.random.default_rng(7)
    curves = random_curves(rng, n_layers=30, n_cands=12, convex=True)
    lo = sum(min(p for _, p, _ in c) for c in curves.values())
    hi = sum(max(p for _, p, _ in c) for c in curves.values())
    budget = lo + 0.4 * (hi - lo)
    lg = allocate_ranks(curves, budget, method="lagrangian")
    dp = allocate_ranks(curves, budget, method="dp")
    assert dp.error <= lg.error + 1e-12 and lg.lower_bound <= dp.error + 1e-12
    assert lg.gap <= 0.01 * lg.error


def test_float_params_and_labels():
    curves = {"fc1": [(8, 1.5e3, 0.4), ("full", 9.9e3, 0.0)], "fc2": [((2, 2), 700.5, 1.0), ((4, 4), 2e3, 0.2)]}
    res = allocate_ranks(curves, 3600.0)
    assert res.method == "lagrangian"
    assert res.ranks == {"fc1": 8, "fc2": (4, 4)}
    res = allocate_ranks(curves, 1e6)
    assert res.ranks == {"fc1": "full", "fc2": (4, 4)}


def test_fast_for_100_layers_400_candidates():
    rng = np.random.default_rng(1)
    curves = {}
    for layer in range(100):
        ranks = np.arange(1, 401)
        params = ranks * int(rng.integers(500, 3000))
        err = rng.uniform(0.5, 2) * np.exp(-ranks / rng.uniform(20, 120)) + 1e-3 * rng.uniform(size=400)
        curves[layer] = list(zip(ranks.tolist(), params.tolist(), err.tolist()))
    total = sum(c[-1][1] for c in curves.values())
    t0 = time.perf_counter()
    res = allocate_ranks(curves, 0.25 * total)
    elapsed = time.perf_counter() - t0
    assert res.method == "lagrangian" and res.params <= 0.25 * total
    assert res.gap <= 1e-3 * res.error
    assert elapsed < 3.0, elapsed


def test_bad_inputs():
    ok = {"a": [(1, 10, 1.0), (2, 20, 0.5)]}
    assert isinstance(allocate_ranks(ok, 10), Allocation)
    with pytest.raises(ValueError, match="budget: 5 parameters is less than 10"):
        allocate_ranks(ok, 5)
    with pytest.raises(ValueError, match="budget"):
        allocate_ranks(ok, -1)
    with pytest.raises(ValueError, match="budget"):
        allocate_ranks(ok, float("nan"))
    with pytest.raises(ValueError, match="curves"):
        allocate_ranks({}, 10)
    with pytest.raises(ValueError, match="curves"):
        allocate_ranks([(1, 10, 1.0)], 10)
    with pytest.raises(ValueError, match=r"curves\['a'\]"):
        allocate_ranks({"a": []}, 10)
    with pytest.raises(ValueError, match=r"curves\['a'\]\[0\]"):
        allocate_ranks({"a": [(1, 10)]}, 10)
    with pytest.raises(ValueError, match="params"):
        allocate_ranks({"a": [(1, -3, 1.0)]}, 10)
    with pytest.raises(ValueError, match="error"):
        allocate_ranks({"a": [(1, 3, float("inf"))]}, 10)
    with pytest.raises(ValueError, match="method"):
        allocate_ranks(ok, 10, method="greedy")
    with pytest.raises(ValueError, match="method: 'dp' needs integer"):
        allocate_ranks({"a": [(1, 1.5, 1.0)]}, 10, method="dp")
