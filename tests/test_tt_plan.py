"""Plan search: the cheapest merge partition / absorb order, and the dense route."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _util import make_plan, random_cores, rel_err, tt_flops
from tensorpress.nn import TTLinear
from tensorpress.ops import TTPlan, choose_plan, tt_matmul, tt_matmul_reference
from tensorpress.ops.tt_plan import (
    _orders,
    _partitions,
    dense_flops,
    dense_route_cost,
    merge_shapes,
    plan_cost,
    plan_info,
)


def shapes_of(m, n, ranks):
    full = (1, *ranks, 1)
    return tuple((full[k], m[k], n[k], full[k + 1]) for k in range(len(m)))


def contraction_flops(merged, order) -> int:
    """Per-sample arithmetic FLOPs of the contraction steps alone."""
    return tt_flops(merged, order)


def brute_force(shapes, batch):
    """(cost, groups, order) of every fused candidate."""
    out = []
    for groups in _partitions(len(shapes)):
        merged, merge = zip(*(merge_shapes(shapes, g) for g in groups))
        for order in _orders(len(groups)):
            out.append((sum(merge) + plan_cost(tuple(merged), order, batch), groups, order))
    return out


# ----------------------------------------------------------------------------- candidate enumeration
@pytest.mark.parametrize("d", range(1, 7))
def test_partitions_and_orders_are_complete(d):
    parts = list(_partitions(d))
    assert len(parts) == 2 ** (d - 1) == len(set(parts))
    for p in parts:
        assert [k for g in p for k in g] == list(range(d))
    orders = list(_orders(d))
    assert len(orders) == 2 ** (d - 1) == len(set(orders))
    for o in orders:
        assert sorted(o) == list(range(d))
        lo = hi = o[0]
        for k in o[1:]:
            assert k in (lo - 1, hi + 1)
            lo, hi = min(lo, k), max(hi, k)
    # exactly the valid interval-growing permutations
    valid = set()
    for perm in itertools.permutations(range(d)):
        lo = hi = perm[0]
        ok = True
        for k in perm[1:]:
            if k not in (lo - 1, hi + 1):
                ok = False
                break
            lo, hi = min(lo, k), max(hi, k)
        if ok:
            valid.add(perm)
    assert valid == set(orders)


# ----------------------------------------------------------------------------- minimum cost
SHAPES = [
    shapes_of((4, 8, 8, 4), (4, 8, 8, 4), (16, 16, 16)),
    shapes_of((8, 8, 8, 8), (8, 8, 8, 8), (8, 32, 8)),
    shapes_of((3, 5, 7), (7, 5, 3), (4, 9)),
    shapes_of((2, 3, 4, 5, 2), (5, 4, 3, 2, 2), (2, 6, 12, 4)),
    shapes_of((16, 64), (32, 32), (32,)),
    shapes_of((1, 4, 1), (3, 1, 5), (2, 2)),
]


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("batch", [1, 7, 64, 1024, 100_000])
def test_choose_plan_is_minimum_cost(shapes, batch):
    plan = choose_plan(shapes, batch)
    fused = choose_plan(shapes, batch, allow_dense=False)
    candidates = brute_force(shapes, batch)
    best = min(c[0] for c in candidates)
    assert not fused.dense
    assert fused.cost == best
    assert fused.batch == batch
    # the reported plan's cost is what the cost model says of it
    merged = tuple(merge_shapes(shapes, g)[0] for g in fused.groups)
    assert fused.merged_shapes == merged
    merge = sum(merge_shapes(shapes, g)[1] for g in fused.groups)
    assert fused.cost == merge + plan_cost(merged, fused.order, batch)
    # and its FLOPs are the arithmetic alone
    assert fused.flops == merge + batch * contraction_flops(merged, fused.order)
    assert sorted(k for g in fused.groups for k in g) == list(range(len(shapes)))
    assert sorted(fused.order) == list(range(len(fused.groups)))
    assert plan.dense_flops == fused.dense_flops == dense_flops(shapes, batch)
    assert plan.cost == min(best, dense_route_cost(shapes, batch))


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 5), data=st.data(), batch=st.integers(0, 5000))
def test_choose_plan_minimum_cost_random(d, data, batch):
    m = data.draw(st.lists(st.sampled_from([1, 2, 3, 4, 5, 7, 8]), min_size=d, max_size=d))
    n = data.draw(st.lists(st.sampled_from([1, 2, 3, 4, 5, 7, 8]), min_size=d, max_size=d))
    ranks = data.draw(st.lists(st.integers(1, 32), min_size=d - 1, max_size=d - 1))
    shapes = shapes_of(m, n, ranks)
    plan = choose_plan(shapes, batch)
    fused = choose_plan(shapes, batch, allow_dense=False)
    best = min(c[0] for c in brute_force(shapes, batch))
    assert fused.cost == best
    if plan.dense:
        assert plan.flops == plan.dense_flops and plan.cost == dense_route_cost(shapes, batch) <= best
    else:
        assert plan.cost == best < dense_route_cost(shapes, batch)


def test_naive_sweep_is_about_4x_more_flops_for_1024_square():
    shapes = shapes_of((4, 8, 8, 4), (4, 8, 8, 4), (16, 16, 16))
    naive = min(contraction_flops(shapes, (0, 1, 2, 3)), contraction_flops(shapes, (3, 2, 1, 0)))
    for batch in (1, 16, 64, 256):
        plan = choose_plan(shapes, batch, allow_dense=False)  # the fused plans' own savings
        per_sample = contraction_flops(plan.merged_shapes, plan.order)
        assert naive / per_sample >= 3.5, (str(plan), naive, per_sample)
    # including the merge, amortized over a moderate batch
    plan = choose_plan(shapes, 64, allow_dense=False)
    assert naive * 64 / plan.flops >= 3.5
    # and the gain is real work: the chosen plan computes the same thing
    gen = torch.Generator().manual_seed(0)
    cores = random_cores((4, 8, 8, 4), (4, 8, 8, 4), (16, 16, 16), generator=gen)
    x = torch.randn(5, 1024, generator=gen, dtype=torch.float64)
    assert rel_err(tt_matmul(x, cores, choose_plan(shapes, 5)), tt_matmul_reference(x, cores)) <= 1e-10


# ----------------------------------------------------------------------------- dense route
@pytest.mark.parametrize("shapes", SHAPES)
def test_dense_only_when_not_more_flops(shapes):
    for batch in (0, 1, 3, 16, 128, 1024, 8192, 65536, 1_000_000):
        plan = choose_plan(shapes, batch)
        fused = choose_plan(shapes, batch, allow_dense=False)
        if plan.dense:
            assert dense_route_cost(shapes, batch) <= fused.cost, (batch, str(plan))
            assert plan.groups == (tuple(range(len(shapes))),)
            assert plan.flops == plan.dense_flops
        else:
            assert fused == plan
            assert plan.cost < dense_route_cost(shapes, batch), (batch, str(plan))


def test_dense_chosen_for_huge_batch_when_cheaper():
    shapes = shapes_of((4, 8, 8, 4), (4, 8, 8, 4), (16, 16, 16))
    small = choose_plan(shapes, 1)
    assert not small.dense
    huge = choose_plan(shapes, 1_000_000)
    fused = choose_plan(shapes, 1_000_000, allow_dense=False)
    # the only fused candidate as cheap is merging everything, i.e. the dense product itself
    assert fused.cost >= dense_route_cost(shapes, 1_000_000)
    unmerged = [c for c in brute_force(shapes, 1_000_000) if len(c[1]) > 1]
    assert min(c[0] for c in unmerged) > huge.dense_flops
    assert huge.dense
    # a highly compressible layer never goes dense: its fused contraction is always cheaper
    lowrank = shapes_of((8, 8, 8, 8), (8, 8, 8, 8), (2, 2, 2))
    for batch in (1, 1000, 1_000_000):
        assert not choose_plan(lowrank, batch).dense
    # allow_dense=False never goes dense
    assert not choose_plan(shapes, 1_000_000, allow_dense=False).dense


def test_dense_plan_executes_correctly():
    shapes = shapes_of((4, 8, 8, 4), (4, 8, 8, 4), (16, 16, 16))
    gen = torch.Generator().manual_seed(1)
    cores = random_cores((4, 8, 8, 4), (4, 8, 8, 4), (16, 16, 16), generator=gen)
    x = torch.randn(3, 1024, generator=gen, dtype=torch.float64)
    plan = make_plan(shapes, None, None, 3, dense=True)
    assert rel_err(tt_matmul(x, cores, plan), tt_matmul_reference(x, cores)) <= 1e-10


def test_plan_cost_is_per_sample_and_covers_the_arithmetic():
    for shapes in SHAPES[:4]:
        for order in _orders(len(shapes)):
            one = plan_cost(shapes, order, 1)
            assert plan_cost(shapes, order, 0) == 0
            assert plan_cost(shapes, order, 10) == 10 * one
            assert one >= tt_flops(shapes, order)


@pytest.mark.parametrize(
    "core_dims, order, expected",
    [
        # 1024x1024 rank 8 as two merged cores (1,32,32,8) (8,32,32,1), left first: x's two axes
        # swap (a 32x32 transpose), then [n1, m0, b0] -> [m0, n1, b0] moves runs of 8
        ((1, 32, 32, 8, 8, 32, 32, 1), (0, 1), {"copy": 0, "short_runs": 8192, "transpose": 1024}),
        # right first: [n0, b0, m1] -> [m1, n0, b0] moves the innermost axis, then y's two axes swap
        ((1, 32, 32, 8, 8, 32, 32, 1), (1, 0), {"copy": 0, "short_runs": 0, "transpose": 9216}),
        # runs of 20 contiguous elements stay memcpy runs
        ((1, 3, 1, 16, 16, 20, 1, 20, 20, 1, 17, 1), (0, 1, 2), {"copy": 21233, "short_runs": 0, "transpose": 0}),
        # one core: x is contracted as it lies, nothing moves
        ((1, 8, 8, 1), (0,), {"copy": 0, "short_runs": 0, "transpose": 0}),
    ],
)
def test_permuted_elements_by_how_the_kernel_moves_them(core_dims, order, expected):
    assert plan_info(core_dims, order).permute_elements._asdict() == expected


def test_flop_counter_on_a_known_case():
    # (4,8,8,4) rank 16, absorbed left to right: 2*1024*64 + 2*16384*128 + 2*16384*128 + 2*16384*4
    shapes = shapes_of((4, 8, 8, 4), (4, 8, 8, 4), (16, 16, 16))
    assert tt_flops(shapes, (0, 1, 2, 3)) == 131072 + 4194304 + 4194304 + 131072
    # one merged core is a dense matrix-vector product
    assert tt_flops([merge_shapes(shapes, (0, 1, 2, 3))[0]], (0,)) == 2 * 1024 * 1024


def test_choose_plan_accepts_lists_and_caches():
    shapes = [[1, 4, 4, 8], [8, 4, 4, 1]]
    a = choose_plan(shapes, 10)
    b = choose_plan(tuple(tuple(s) for s in shapes), 10)
    assert a == b
    assert isinstance(a, TTPlan)


# ----------------------------------------------------------------------------- visibility from the layer
def test_ttlinear_plan_visible_and_printable():
    layer = TTLinear(1024, 1024, ranks=16)
    assert layer.core_shapes == shapes_of((4, 8, 8, 4), (4, 8, 8, 4), (16, 16, 16))
    small = layer.plan(32)
    assert isinstance(small, TTPlan)
    assert small == choose_plan(layer.core_shapes, 32)
    assert small.batch == 32
    text = str(small)
    assert "fused" in text
    for g in small.groups:
        assert "[" + ",".join(map(str, g)) + "]" in text
    assert str(list(small.order)) in text
    assert "batch 32" in text
    big = layer.plan(1_000_000)
    assert big.dense
    assert "dense" in str(big) and "batch 1000000" in str(big)


@pytest.mark.parametrize(
    "core,vendor,family",
    [
        ("Haswell", "AuthenticAMD", "avx2"),  # AVX2 kernels: torch's GEMM runs at about our rate
        ("SkylakeX", "GenuineIntel", "avx2"),  # MKL runs AVX-512 on Intel too
        ("SkylakeX", "AuthenticAMD", "avx512_on_amd"),  # MKL stays on AVX2 on AMD, our OpenBLAS does not
        ("Cooperlake", "AuthenticAMD", "avx512_on_amd"),
        ("Zen", "AuthenticAMD", "avx2"),
    ],
)
def test_dense_speed_advantage_follows_the_gemm_kernels(core, vendor, family):
    from tensorpress.ops import tt_plan

    assert tt_plan.gemm_family(core, vendor) == family
    assert tt_plan.DENSE_SPEED_ADVANTAGE[family] == (0.42 if family == "avx512_on_amd" else 1.0)


def test_cheaper_dense_route_wins_only_where_torch_gemm_is_as_fast(monkeypatch):
    """1024x1024 rank 16 at batch 256: with torch's GEMM as fast as ours the dense route wins
    its tie with the single merged core; at 0.42x our rate a fused plan does."""
    from tensorpress.ops import tt_plan

    shapes = ((1, 4, 4, 16), (16, 8, 8, 16), (16, 8, 8, 16), (16, 4, 4, 1))
    for advantage, dense in ((1.0, True), (0.42, False)):
        monkeypatch.setattr(tt_plan, "dense_speed_advantage", lambda a=advantage: a)
        assert tt_plan.ranked_plans.__wrapped__(shapes, 256)[0].dense is dense


def test_training_plans_leave_out_the_single_merged_core(monkeypatch):
    """Where the single merged core is the cheapest forward (our GEMM faster than torch's),
    a training step does not take it: its backward runs the merge chain over W-sized tensors."""
    from tensorpress.ops import tt_plan

    tt_plan.ranked_plans.cache_clear()
    monkeypatch.setattr(tt_plan, "dense_speed_advantage", lambda: 0.42)
    try:
        torch.manual_seed(0)
        layer = TTLinear(1024, 1024, 16, in_factors=(4, 8, 8, 4), out_factors=(4, 8, 8, 4), dtype=torch.float64)
        inference, training = layer.plan(256), layer.plan(256, training=True)
        assert inference.groups == ((0, 1, 2, 3),) and not inference.dense
        assert len(training.groups) > 1 and not training.dense  # 2.4x cheaper than torch's dense GEMM here
        assert all(len(p.groups) > 1 or p.dense for p in tt_plan.ranked_plans(layer.core_shapes, 256, True, True))
        # without the dense route nothing is left out
        assert any(len(p.groups) == 1 for p in tt_plan.ranked_plans(layer.core_shapes, 256, False, True))
        # a training call runs the training plan
        x = torch.randn(256, 1024, dtype=torch.float64)
        y = layer(x)
        seen, stack = set(), [y.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and type(node).__name__ not in seen:
                seen.add(type(node).__name__)
                stack.extend(f for f, _ in node.next_functions)
        assert "_EagerCpuTrainingBackward" in seen, seen
        assert y.grad_fn.plan == training  # the node is its own context
        with torch.no_grad():
            assert torch.allclose(layer(x), y, rtol=1e-10, atol=1e-12)
    finally:
        monkeypatch.undo()
        tt_plan.ranked_plans.cache_clear()
