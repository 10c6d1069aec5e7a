"""The fused TT-matrix contraction (tensorpress::tt_contract) against the einsum reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorpress  # noqa: F401  (registers the custom ops)
from _util import make_plan, random_cores, rel_err, tt_flops
from tensorpress.ops import choose_plan, tt_matmul, tt_matmul_reference, tt_to_dense
from tensorpress.ops.tt import merge_group, step_matrices, tt_contract_torch
from tensorpress.ops.tt_plan import _orders, _partitions, flat_dims, merge_shapes

FACTORS = (2, 3, 4, 5, 7)
MAX_FEATURES = 4096
# per-sample FLOPs allowed for the contraction (keeps one example well under a second)
MAX_SAMPLE_FLOPS = 1_500_000
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


# ----------------------------------------------------------------------------- strategies
@st.composite
def factor_lists(draw, d):
    """d factors from FACTORS whose product stays <= MAX_FEATURES."""
    out, budget = [], MAX_FEATURES
    for k in range(d):
        left = d - k - 1
        choices = [f for f in FACTORS if f * 2**left <= budget]
        f = draw(st.sampled_from(choices))
        out.append(f)
        budget //= f
    return out


def naive_sample_flops(shapes) -> int:
    """Per-sample FLOPs of the reference sweep (core by core, no merging)."""
    return tt_flops(shapes, range(len(shapes)))


def plan_sample_flops(shapes, groups, order) -> int:
    return tt_flops([merge_shapes(shapes, g)[0] for g in groups], order)


@st.composite
def tt_problems(draw, min_d=2, max_d=5):
    d = draw(st.integers(min_d, max_d))
    m = draw(factor_lists(d))
    n = draw(factor_lists(d))
    ranks = [draw(st.integers(1, 16)) for _ in range(d - 1)]
    shapes = tuple(((1, *ranks)[k], m[k], n[k], (*ranks, 1)[k]) for k in range(d))
    # shrink ranks until the reference sweep is cheap enough
    while naive_sample_flops(shapes) > MAX_SAMPLE_FLOPS and max(ranks) > 1:
        ranks = [max(1, r // 2) for r in ranks]
        shapes = tuple(((1, *ranks)[k], m[k], n[k], (*ranks, 1)[k]) for k in range(d))
    # a plan: any partition and order whose cost is modest, or the dense route, or the auto choice
    candidates = [
        (g, o)
        for g in _partitions(d)
        for o in _orders(len(g))
        if plan_sample_flops(shapes, g, o) + merge_cost(shapes, g) <= 4 * MAX_SAMPLE_FLOPS
    ]
    kind = draw(st.sampled_from(["fused", "fused", "fused", "dense", "auto"]))
    if kind == "dense" and math.prod(m) * math.prod(n) > 1 << 20:
        kind = "fused"
    lead = draw(
        st.one_of(
            st.just(()),
            st.integers(0, 40).map(lambda b: (b,)),
            st.sampled_from([(2, 3), (3, 0, 2), (2, 1, 4), (1, 1, 5)]),
        )
    )
    groups, order = draw(st.sampled_from(candidates)) if kind == "fused" else (None, None)
    return m, n, ranks, shapes, kind, groups, order, lead


def merge_cost(shapes, groups):
    return sum(merge_shapes(shapes, g)[1] for g in groups)


def plan_for(kind, shapes, groups, order, batch):
    if kind == "fused":
        return make_plan(shapes, groups, order, batch)
    if kind == "dense":
        return make_plan(shapes, None, None, batch, dense=True)
    return None


def all_plans(shapes):
    d = len(shapes)
    return [(g, o) for g in _partitions(d) for o in _orders(len(g))]


def reference_grads(x, cores, grad_out):
    """y and the gradients of <y, grad_out> wrt x and every core, all in float64."""
    x64 = x.detach().to(torch.float64).requires_grad_(True)
    c64 = [g.detach().to(torch.float64).requires_grad_(True) for g in cores]
    y = tt_matmul_reference(x64, c64)
    grads = torch.autograd.grad(y, [x64, *c64], grad_out.to(torch.float64), allow_unused=True)
    return y.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [x64, *c64])]


def check_forward_backward(m, n, ranks, dtype, plan, lead, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N, M = math.prod(n), math.prod(m)
    cores = random_cores(m, n, ranks, dtype=dtype, generator=gen, requires_grad=True)
    x = torch.randn(*lead, N, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    grad_out = torch.randn(*lead, M, generator=gen, dtype=torch.float64).to(dtype)
    x_before = x.detach().clone()
    cores_before = [g.detach().clone() for g in cores]

    y = tt_matmul(x, cores, plan)
    assert y.shape == (*lead, M)
    assert y.dtype == dtype
    grads = torch.autograd.grad(y, [x, *cores], grad_out)
    y_ref, grads_ref = reference_grads(x, cores, grad_out)

    tol = TOL[dtype]
    assert rel_err(y, y_ref) <= tol, f"forward: rel err {rel_err(y, y_ref):.3g} > {tol} (plan {plan})"
    names = ["x"] + [f"cores[{k}]" for k in range(len(cores))]
    for name, g, g_ref, t in zip(names, grads, grads_ref, [x, *cores]):
        assert g.shape == t.shape and g.dtype == dtype
        assert rel_err(g, g_ref) <= tol, f"grad {name}: rel err {rel_err(g, g_ref):.3g} > {tol} (plan {plan})"
    # inputs untouched
    assert torch.equal(x.detach(), x_before)
    for g, g0 in zip(cores, cores_before):
        assert torch.equal(g.detach(), g0)


# ----------------------------------------------------------------------------- hypothesis: random shapes and plans
@settings(max_examples=40, deadline=None)
@given(problem=tt_problems(), dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**16))
def test_random_plan_matches_reference(problem, dtype, seed):
    m, n, ranks, shapes, kind, groups, order, lead = problem
    batch = math.prod(lead) if lead else 1
    plan = plan_for(kind, shapes, groups, order, batch)
    check_forward_backward(m, n, ranks, dtype, plan, lead, seed)


@settings(max_examples=25, deadline=None)
@given(problem=tt_problems(max_d=4), dtype=st.sampled_from([torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_half_dtypes_match_float64_reference(problem, dtype, seed):
    m, n, ranks, shapes, kind, groups, order, lead = problem
    batch = math.prod(lead) if lead else 1
    plan = plan_for(kind, shapes, groups, order, batch)
    check_forward_backward(m, n, ranks, dtype, plan, lead, seed)


@settings(max_examples=25, deadline=None)
@given(problem=tt_problems(), seed=st.integers(0, 2**16))
def test_every_plan_of_random_shape(problem, seed):
    """Every partition x order of one random shape gives the same result as the reference."""
    m, n, ranks, shapes, _, _, _, lead = problem
    gen = torch.Generator().manual_seed(seed)
    cores = random_cores(m, n, ranks, generator=gen)
    lead = lead if 0 < math.prod(lead or (1,)) <= 8 else (3,)
    x = torch.randn(*lead, math.prod(n), generator=gen, dtype=torch.float64)
    y_ref = tt_matmul_reference(x, cores)
    batch = math.prod(lead) if lead else 1
    for groups, order in all_plans(shapes):
        if plan_sample_flops(shapes, groups, order) + merge_cost(shapes, groups) > 4 * MAX_SAMPLE_FLOPS:
            continue
        y = tt_matmul(x, cores, make_plan(shapes, groups, order, batch))
        assert rel_err(y, y_ref) <= 1e-10, (groups, order)


# ----------------------------------------------------------------------------- every plan, forward and backward
FIXED_SHAPES = [
    # (out_factors, in_factors, ranks)
    ((3, 2), (5, 4), (3,)),
    ((2, 7, 3), (3, 2, 5), (4, 6)),
    ((4, 3, 5, 2), (2, 5, 3, 7), (3, 7, 2)),
    ((2, 3, 2, 5, 3), (3, 2, 5, 2, 2), (2, 5, 7, 3)),
    ((1, 4, 1), (3, 1, 5), (2, 2)),  # size-1 factors
    ((2, 2, 2, 2), (2, 2, 2, 2), (1, 1, 1)),  # rank 1
    ((3, 5, 2), (2, 3, 4), (16, 16)),  # ranks above the useful maximum (valid, redundant)
]


def _plan_ids():
    out = []
    for m, n, r in FIXED_SHAPES:
        shapes = tuple(((1, *r)[k], m[k], n[k], (*r, 1)[k]) for k in range(len(m)))
        for groups, order in all_plans(shapes):
            out.append(pytest.param(m, n, r, groups, order, id=f"m{m}-n{n}-r{r}-g{groups}-o{order}"))
    return out


@pytest.mark.parametrize("m,n,ranks,groups,order", _plan_ids())
def test_every_plan_forward_backward(m, n, ranks, groups, order):
    shapes = tuple(((1, *ranks)[k], m[k], n[k], (*ranks, 1)[k]) for k in range(len(m)))
    for dtype, lead in ((torch.float64, (2, 3)), (torch.float32, (7,))):
        plan = make_plan(shapes, groups, order, math.prod(lead))
        check_forward_backward(list(m), list(n), list(ranks), dtype, plan, lead, seed=len(order))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dense_plan_forward_backward(dtype):
    m, n, ranks = (4, 3, 5), (2, 5, 3), (3, 4)
    shapes = tuple(((1, *ranks)[k], m[k], n[k], (*ranks, 1)[k]) for k in range(3))
    plan = make_plan(shapes, None, None, 6, dense=True)
    check_forward_backward(list(m), list(n), list(ranks), dtype, plan, (2, 3))


@pytest.mark.parametrize(
    "m,n,ranks",
    [((6, 5), (4, 7), (3,)), ((4, 3, 5, 2), (2, 5, 3, 3), (3, 4, 2)), ((2, 3, 2, 2, 3), (3, 2, 2, 3, 2), (2, 3, 4, 2))],
)
def test_dense_route_even_and_odd_chains(m, n, ranks):
    """The dense route splits the chain into two merged halves (d // 2 cores on the left)."""
    shapes = tuple(((1, *ranks)[k], m[k], n[k], (*ranks, 1)[k]) for k in range(len(m)))
    plan = make_plan(shapes, None, None, 5, dense=True)
    check_forward_backward(list(m), list(n), list(ranks), torch.float64, plan, (5,))


def test_dense_route_keeps_no_weight_sized_tensor_for_backward():
    """What the dense route saves for backward: x and the small merged halves, not W (M x N)."""
    gen = torch.Generator().manual_seed(21)
    m = n = (4, 8, 8, 4)
    cores = random_cores(m, n, (4, 4, 4), dtype=torch.float32, generator=gen, requires_grad=True)
    x = torch.randn(8, 1024, generator=gen, requires_grad=True)
    plan = make_plan(tuple(tuple(g.shape) for g in cores), None, None, 8, dense=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = tt_matmul(x, cores, plan)
    assert x.numel() in saved
    assert max(saved) < 1024 * 1024 // 8, f"a weight-sized tensor is saved for backward: {max(saved)} elements"
    y.sum().backward()
    ref = x.detach() @ tt_to_dense([g.detach() for g in cores]).T
    assert rel_err(y.detach(), ref) <= 1e-5


def test_auto_plan_large_batch_forward_backward():
    # a batch large enough that the kernel splits it into several blocks and workers
    m, n, ranks = (4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8)
    shapes = tuple(((1, *ranks)[k], m[k], n[k], (*ranks, 1)[k]) for k in range(4))
    plan = choose_plan(shapes, 300, allow_dense=False)
    check_forward_backward(list(m), list(n), list(ranks), torch.float64, plan, (300,))


# ----------------------------------------------------------------------------- the custom op directly
@pytest.mark.parametrize(
    "groups,order",
    [
        (((0,), (1,), (2,)), (0, 1, 2)),
        (((0,), (1,), (2,)), (1, 2, 0)),
        (((0, 1), (2,)), (1, 0)),
        (((0,), (1, 2)), (0, 1)),
    ],
)
def test_custom_op_matches_torch_execution(groups, order):
    gen = torch.Generator().manual_seed(1)
    cores = random_cores((3, 4, 5), (5, 2, 3), (4, 6), generator=gen)
    merged = [merge_group(cores, g) for g in groups]
    mats = step_matrices(merged, order)
    dims = flat_dims([tuple(g.shape) for g in merged])
    x = torch.randn(9, 30, generator=gen, dtype=torch.float64)
    y = torch.ops.tensorpress.tt_contract(x, mats, dims, list(order))
    y_torch = tt_contract_torch(x, mats, dims, list(order))
    y_dense = x @ tt_to_dense(cores).T
    assert rel_err(y, y_torch) <= 1e-12
    assert rel_err(y, y_dense) <= 1e-12


# ----------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize(
    "kind,groups,order",
    [
        ("auto", None, None),
        ("fused", ((0,), (1,), (2,)), (0, 1, 2)),
        ("fused", ((0,), (1,), (2,)), (2, 1, 0)),
        ("fused", ((0,), (1,), (2,)), (1, 0, 2)),
        ("fused", ((0, 1), (2,)), (1, 0)),
        ("fused", ((0,), (1, 2)), (0, 1)),
        ("dense", None, None),
    ],
)
def test_gradcheck(kind, groups, order):
    gen = torch.Generator().manual_seed(3)
    m, n, ranks = (2, 3, 2), (3, 2, 2), (2, 3)
    shapes = tuple(((1, *ranks)[k], m[k], n[k], (*ranks, 1)[k]) for k in range(3))
    cores = random_cores(m, n, ranks, generator=gen, requires_grad=True)
    x = torch.randn(2, 2, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    plan = plan_for(kind, shapes, groups, order, 4)

    def f(x, *cores):
        return tt_matmul(x, list(cores), plan)

    assert torch.autograd.gradcheck(f, (x, *cores), eps=1e-6, atol=1e-8, rtol=1e-6)
    if kind == "dense":  # plain torch ops: twice differentiable too
        assert torch.autograd.gradgradcheck(f, (x, *cores), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize(
    "groups,order", [(((0,), (1,), (2,)), (0, 1, 2)), (((0,), (1,), (2,)), (2, 1, 0)), (((0, 1), (2,)), (1, 0))]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_wrt_x_only_frozen_cores(groups, order, dtype):
    """Frozen TT weights (no core requires grad) inside a network that trains earlier layers."""
    gen = torch.Generator().manual_seed(14)
    m, n, ranks = (3, 4, 5), (5, 2, 3), (4, 6)
    cores = random_cores(m, n, ranks, dtype=dtype, generator=gen)
    shapes = [tuple(g.shape) for g in cores]
    x = torch.randn(2, 5, 30, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    g_out = torch.randn(2, 5, 60, generator=gen, dtype=torch.float64).to(dtype)
    y = tt_matmul(x, cores, make_plan(shapes, groups, order, 10))
    (gx,) = torch.autograd.grad(y, x, g_out)
    _, ref = reference_grads(x, cores, g_out)
    assert rel_err(gx, ref[0]) <= TOL[dtype]


def test_grad_wrt_some_cores_only():
    gen = torch.Generator().manual_seed(15)
    cores = random_cores((3, 4, 5), (5, 2, 3), (4, 6), generator=gen)
    shapes = [tuple(g.shape) for g in cores]
    x = torch.randn(7, 30, generator=gen, dtype=torch.float64)
    g_out = torch.randn(7, 60, generator=gen, dtype=torch.float64)
    _, ref = reference_grads(x, cores, g_out)
    for k in range(3):
        cs = [g.clone().requires_grad_(j == k) for j, g in enumerate(cores)]
        y = tt_matmul(x, cs, make_plan(shapes, ((0,), (1,), (2,)), (1, 0, 2), 7))
        (gk,) = torch.autograd.grad(y, cs[k], g_out)
        assert rel_err(gk, ref[k + 1]) <= 1e-10


def test_gradcheck_only_x_and_only_cores():
    gen = torch.Generator().manual_seed(4)
    m, n, ranks = (3, 2), (2, 3), (2,)
    cores = random_cores(m, n, ranks, generator=gen)
    x = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    shapes = [tuple(g.shape) for g in cores]
    for plan in (None, make_plan(shapes, ((0,), (1,)), (1, 0), 3), make_plan(shapes, ((0,), (1,)), (0, 1), 3)):
        assert torch.autograd.gradcheck(lambda x, plan=plan: tt_matmul(x, cores, plan), (x,))
        cores_g = [g.clone().requires_grad_(True) for g in cores]
        x_const = x.detach()
        assert torch.autograd.gradcheck(
            lambda *c, plan=plan, x_const=x_const: tt_matmul(x_const, list(c), plan), tuple(cores_g)
        )
        # only one core requires grad
        c0 = cores[0].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda c, plan=plan, x_const=x_const: tt_matmul(x_const, [c, cores[1]], plan), (c0,)
        )


# ----------------------------------------------------------------------------- opcheck
def _op_samples():
    gen = torch.Generator().manual_seed(5)
    samples = []
    for m, n, ranks, groups, order, batch, dtype in [
        ((3, 4), (2, 5), (3,), ((0,), (1,)), (0, 1), 4, torch.float64),
        ((3, 4), (2, 5), (3,), ((0,), (1,)), (1, 0), 3, torch.float32),
        ((2, 3, 2), (3, 2, 2), (2, 3), ((0,), (1,), (2,)), (1, 2, 0), 5, torch.float64),
        ((2, 3, 2), (3, 2, 2), (2, 3), ((0, 1), (2,)), (1, 0), 2, torch.float32),
        ((2, 3, 2), (3, 2, 2), (2, 3), ((0,), (1,), (2,)), (0, 1, 2), 0, torch.float64),
    ]:
        cores = random_cores(m, n, ranks, dtype=dtype, generator=gen)
        merged = [merge_group(cores, g) for g in groups]
        mats = [mm.requires_grad_(True) for mm in step_matrices(merged, order)]
        dims = flat_dims([tuple(g.shape) for g in merged])
        x = torch.randn(batch, math.prod(n), generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
        samples.append((x, mats, dims, list(order)))
    return samples


@pytest.mark.parametrize("idx", range(5))
def test_opcheck_tt_contract(idx):
    x, mats, dims, order = _op_samples()[idx]
    torch.library.opcheck(torch.ops.tensorpress.tt_contract.default, (x, mats, dims, order))
    # also without grads required
    torch.library.opcheck(
        torch.ops.tensorpress.tt_contract.default, (x.detach(), [m.detach() for m in mats], dims, order)
    )


@pytest.mark.parametrize("idx", range(5))
@pytest.mark.parametrize("need_x,need_mats", [(True, True), (True, False), (False, True), (False, False)])
def test_opcheck_tt_contract_backward(idx, need_x, need_mats):
    x, mats, dims, order = _op_samples()[idx]
    x, mats = x.detach(), [m.detach() for m in mats]
    M = math.prod(dims[1::4])
    grad_out = torch.randn(x.shape[0], M, dtype=torch.float64).to(x.dtype)
    args = (x, mats, dims, order, grad_out, need_x, need_mats)
    torch.library.opcheck(torch.ops.tensorpress.tt_contract_backward.default, args)
    # and it agrees with autograd through the torch execution of the plan
    grads = torch.ops.tensorpress.tt_contract_backward(*args)
    xr = x.double().requires_grad_(True)
    mr = [m.double().requires_grad_(True) for m in mats]
    y = tt_contract_torch(xr, mr, dims, order)
    ref = torch.autograd.grad(y, [xr, *mr], grad_out.double())
    tol = TOL[x.dtype]
    if need_x:
        assert rel_err(grads[0], ref[0]) <= tol
    else:
        assert grads[0].numel() == 0
    for g, r in zip(grads[1:], ref[1:]):
        if need_mats:
            assert rel_err(g, r) <= tol
        else:
            assert g.numel() == 0


# ----------------------------------------------------------------------------- threads
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, 7, 64, 513])
def test_result_independent_of_thread_count(restore_threads, dtype, batch):
    gen = torch.Generator().manual_seed(6)
    m, n, ranks = (4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8)
    shapes = tuple(((1, *ranks)[k], m[k], n[k], (*ranks, 1)[k]) for k in range(4))
    cores = random_cores(m, n, ranks, dtype=dtype, generator=gen)
    x = torch.randn(batch, 1024, generator=gen, dtype=torch.float64).to(dtype)
    g_out = torch.randn(batch, 1024, generator=gen, dtype=torch.float64).to(dtype)
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for groups, order in [
            (((0,), (1,), (2,), (3,)), (0, 1, 2, 3)),
            (((0, 1), (2, 3)), (0, 1)),
            (((0,), (1,), (2,), (3,)), (2, 1, 3, 0)),
        ]:
            plan = make_plan(shapes, groups, order, batch)
            xr = x.clone().requires_grad_(True)
            cr = [g.clone().requires_grad_(True) for g in cores]
            y = tt_matmul(xr, cr, plan)
            grads = torch.autograd.grad(y, [xr, *cr], g_out)
            results[(threads, groups, order)] = (y.detach(), grads)
    # Splitting the batch differently across workers changes the GEMM sizes (and, for the
    # core gradients, how per-worker partial sums are grouped): only rounding may differ.
    tol_y, tol_g = (1e-14, 1e-12) if dtype == torch.float64 else (1e-6, 1e-5)
    for key in [k for k in results if k[0] == 1]:
        y1, g1 = results[key]
        y2, g2 = results[(2, *key[1:])]
        assert rel_err(y1, y2) <= tol_y, key
        for a, b in zip(g1, g2):
            assert rel_err(a, b) <= tol_g, key


@pytest.mark.parametrize("threads", [1, 2])
def test_deterministic_for_fixed_thread_count(restore_threads, threads):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(11)
    m, n, ranks = (4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8)
    cores = random_cores(m, n, ranks, dtype=torch.float32, generator=gen, requires_grad=True)
    x = torch.randn(200, 1024, generator=gen, requires_grad=True)
    g_out = torch.randn(200, 1024, generator=gen)
    runs = []
    for _ in range(3):
        y = tt_matmul(x, cores)
        runs.append((y.detach(), torch.autograd.grad(y, [x, *cores], g_out)))
    for y, grads in runs[1:]:
        assert torch.equal(y, runs[0][0])
        for a, b in zip(grads, runs[0][1]):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("lead", [(0,), (0, 5), (3, 0)])
def test_batch_zero(lead):
    cores = random_cores((3, 4), (2, 5), (3,), requires_grad=True)
    x = torch.zeros(*lead, 10, dtype=torch.float64, requires_grad=True)
    y = tt_matmul(x, cores)
    assert y.shape == (*lead, 12)
    grads = torch.autograd.grad(y.sum(), [x, *cores])
    assert grads[0].shape == x.shape
    for g, c in zip(grads[1:], cores):
        assert g.shape == c.shape
        assert torch.count_nonzero(g) == 0
    # and through the custom op directly, with an explicit fused plan
    shapes = [tuple(c.shape) for c in cores]
    y = tt_matmul(x, cores, make_plan(shapes, ((0,), (1,)), (1, 0), 0))
    assert y.shape == (*lead, 12)
    grads = torch.autograd.grad(y.sum(), [x, *cores])
    for g in grads[1:]:
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("lead", [(0,), (0, 5), (3, 0)])
def test_batch_zero_with_zero_strides(lead):
    """Empty tensors are contiguous to torch whatever their strides (e.g. expanded ones, as
    the gradient of y.sum() is): forward and backward must accept them."""
    cores = random_cores((3, 4), (2, 5), (3,), requires_grad=True)
    x = torch.zeros((), dtype=torch.float64).expand(*lead, 10)
    assert x.is_contiguous()
    y = tt_matmul(x, cores)
    assert y.shape == (*lead, 12)
    xl = torch.zeros(*lead, 10, dtype=torch.float64, requires_grad=True)
    g_out = torch.zeros((), dtype=torch.float64).expand(*lead, 12)
    grads = torch.autograd.grad(tt_matmul(xl, cores), [xl, *cores], g_out)
    assert grads[0].shape == xl.shape
    for g in grads[1:]:
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("lead", [(0,), (0, 5), (3, 0)])
def test_reference_batch_zero(lead):
    """The einsum reference handles an empty batch like tt_matmul does."""
    cores = random_cores((3, 4), (2, 5), (3,))
    x = torch.zeros(*lead, 10, dtype=torch.float64)
    assert tt_matmul(x, cores).shape == (*lead, 12)
    assert tt_matmul_reference(x, cores).shape == (*lead, 12)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(7)
    m, n, ranks = (3, 5, 2), (2, 7, 3), (4, 5)
    cores = random_cores(m, n, ranks, generator=gen)
    N = 42
    # (leaf base, how the view is made from it)
    cases = {
        "transposed": (torch.randn(N, 11, generator=gen, dtype=torch.float64), lambda b: b.T),
        "sliced": (torch.randn(9, 2 * N, generator=gen, dtype=torch.float64), lambda b: b[:, ::2]),
        "row_sliced": (torch.randn(20, N, generator=gen, dtype=torch.float64), lambda b: b[::3]),
        "permuted_3d": (torch.randn(N, 3, 4, generator=gen, dtype=torch.float64), lambda b: b.permute(1, 2, 0)),
        "expanded": (torch.randn(1, N, generator=gen, dtype=torch.float64), lambda b: b.expand(6, N)),
    }
    shapes = [tuple(c.shape) for c in cores]
    for name, (base, view) in cases.items():
        x = view(base)
        assert not x.is_contiguous(), name
        before = base.clone()
        y_ref = tt_matmul_reference(x.contiguous(), cores)
        for plan in (None, make_plan(shapes, ((0,), (1,), (2,)), (1, 0, 2), 1)):
            y = tt_matmul(x, cores, plan)
            assert rel_err(y, y_ref) <= 1e-12, name
        assert torch.equal(base, before), name
        # backward into the base through the non-contiguous view (cores trainable too;
        # frozen cores are covered by test_grad_wrt_x_only_frozen_cores)
        leaf = base.clone().requires_grad_(True)
        cr = [g.clone().requires_grad_(True) for g in cores]
        y = tt_matmul(view(leaf), cr)
        g_out = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        grads = torch.autograd.grad(y, [leaf, *cr], g_out)
        grads_ref = torch.autograd.grad(tt_matmul_reference(view(leaf), cr), [leaf, *cr], g_out)
        for g, r in zip(grads, grads_ref):
            assert rel_err(g, r) <= 1e-12, name


def test_non_contiguous_view_grad():
    gen = torch.Generator().manual_seed(8)
    cores = random_cores((3, 4), (2, 5), (3,), generator=gen, requires_grad=True)
    base = torch.randn(10, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    y = tt_matmul(base.T, cores)
    grads = torch.autograd.grad(y, [base, *cores], torch.ones(6, 12, dtype=torch.float64))
    y_ref = tt_matmul_reference(base.T, cores)
    grads_ref = torch.autograd.grad(y_ref, [base, *cores], torch.ones(6, 12, dtype=torch.float64))
    for g, r in zip(grads, grads_ref):
        assert rel_err(g, r) <= 1e-12


def test_non_contiguous_cores():
    gen = torch.Generator().manual_seed(9)
    cores = random_cores((3, 4), (2, 5), (3,), generator=gen)
    nc = [g.transpose(1, 2).contiguous().transpose(1, 2) for g in cores]
    assert not nc[1].is_contiguous()
    x = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    assert rel_err(tt_matmul(x, nc), tt_matmul_reference(x, cores)) <= 1e-12


def test_single_sample_one_dim_input():
    cores = random_cores((3, 4), (2, 5), (3,))
    x = torch.randn(10, dtype=torch.float64)
    y = tt_matmul(x, cores)
    assert y.shape == (12,)
    assert rel_err(y, tt_to_dense(cores) @ x) <= 1e-12


def test_single_core():
    g = torch.randn(1, 6, 5, 1, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    assert rel_err(tt_matmul(x, [g]), x @ g[0, :, :, 0].T) <= 1e-12


def test_tt_to_dense_matches_entrywise_definition():
    gen = torch.Generator().manual_seed(10)
    m, n, ranks = (2, 3), (3, 2), (2,)
    cores = random_cores(m, n, ranks, generator=gen)
    W = tt_to_dense(cores)
    assert W.shape == (6, 6)
    for i1 in range(2):
        for i2 in range(3):
            for j1 in range(3):
                for j2 in range(2):
                    v = (cores[0][:, i1, j1, :] @ cores[1][:, i2, j2, :]).item()
                    assert abs(W[i1 * 3 + i2, j1 * 2 + j2].item() - v) <= 1e-14


# ----------------------------------------------------------------------------- concurrency and fork
def test_concurrent_calls_from_python_threads(restore_threads):
    """The kernel releases the GIL and shares one worker pool: concurrent callers stay correct."""
    import threading

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(12)
    m, n, ranks = (4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8)
    shapes = tuple(((1, *ranks)[k], m[k], n[k], (*ranks, 1)[k]) for k in range(4))
    cores = random_cores(m, n, ranks, generator=gen)
    xs = [torch.randn(64 + 13 * i, 1024, generator=gen, dtype=torch.float64) for i in range(4)]
    refs = [tt_matmul_reference(x, cores) for x in xs]
    plans = [make_plan(shapes, ((0,), (1,), (2,), (3,)), (1, 2, 0, 3), 1), None]
    errors, results = [], {}

    def work(i):
        try:
            for rep in range(3):
                plan = plans[(i + rep) % 2]
                xr = xs[i].clone().requires_grad_(True)
                cr = [g.clone().requires_grad_(True) for g in cores]  # (frozen cores: tested apart)
                y = tt_matmul(xr, cr, plan)
                gx = torch.autograd.grad(y, [xr, *cr], torch.ones_like(y))[0]
                results[(i, rep)] = (rel_err(y, refs[i]), gx)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a kernel call hung"
    assert not errors, errors
    W = tt_to_dense(cores)
    for (i, rep), (err, gx) in results.items():
        assert err <= 1e-12, (i, rep)
        assert rel_err(gx, torch.ones(xs[i].shape[0], 1024, dtype=torch.float64) @ W) <= 1e-12


def test_works_in_forked_child(restore_threads):
    """The kernel's worker pool is rebuilt in a forked child (DataLoader workers fork).

    The child calls only the custom op (allocation, no torch compute) and compares with numpy:
    torch's own OpenMP/BLAS thread pools are not fork-safe, and a hang there would not be
    tensorpress's.
    """
    import os
    import pickle
    import select
    import signal

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(13)
    m, n, ranks = (4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8)
    shapes = [((1, *ranks)[k], m[k], n[k], (*ranks, 1)[k]) for k in range(4)]
    cores = random_cores(m, n, ranks, generator=gen)
    x = torch.randn(300, 1024, generator=gen, dtype=torch.float64)
    order = [0, 1, 2, 3]
    mats, dims = step_matrices(cores, order), flat_dims(shapes)
    y_parent = torch.ops.tensorpress.tt_contract(x, mats, dims, order)  # starts the parent's pool
    assert rel_err(y_parent, tt_matmul_reference(x, cores)) <= 1e-12
    expected = y_parent.numpy().tobytes()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            y = torch.ops.tensorpress.tt_contract(x, mats, dims, order)
            msg = pickle.dumps(y.numpy().tobytes() == expected)
        except BaseException as e:  # noqa: BLE001
            msg = pickle.dumps(repr(e))
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 60)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        assert ready, "the tt_contract kernel hung in a forked child"
        result = pickle.loads(os.read(r, 1 << 16))
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert result is True, result


@pytest.mark.parametrize("m, n, ranks", [((12, 19), (17, 9), (11,)), ((9, 16, 10), (10, 8, 9), (13, 9))])
def test_float32_gathering_permutations_every_plan(m, n, ranks):
    """Factors >= 8 with ragged remainders make the kernel's permutations run as vectorized
    8x8 transposes plus scalar edges; every plan must still agree with the float64 reference."""
    gen = torch.Generator().manual_seed(3)
    cores64 = random_cores(m, n, ranks, generator=gen)
    cores = [g.float() for g in cores64]
    x64 = torch.randn(11, math.prod(n), generator=gen, dtype=torch.float64)
    reference = tt_matmul_reference(x64, cores64)
    shapes = [tuple(g.shape) for g in cores]
    for groups, order in all_plans(shapes):
        plan = make_plan(shapes, groups, order, batch=11)
        x = x64.float().requires_grad_()
        y = tt_matmul(x, cores, plan)
        assert rel_err(y, reference) <= 1e-5, (groups, order)
        (grad_x,) = torch.autograd.grad(y, x, torch.ones_like(y))
        (ref_grad,) = torch.autograd.grad(
            tt_matmul_reference(x64.requires_grad_(), cores64), x64, torch.ones_like(reference)
        )
        x64 = x64.detach()
        assert rel_err(grad_x, ref_grad) <= 1e-5, (groups, order)


def test_eager_inference_skips_the_custom_op_dispatch_only_without_autograd(monkeypatch):
    """Without autograd on plain CPU tensors apply_tt calls the kernel directly (the op's
    dispatch is a third of a small batch's time); with autograd it goes through the op."""
    from tensorpress.ops import tt as tt_ops

    gen = torch.Generator().manual_seed(3)
    cores = random_cores((4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8), generator=gen)
    plan = choose_plan([tuple(g.shape) for g in cores], 5)
    assert not plan.dense
    x = torch.randn(5, 1024, generator=gen, dtype=torch.float64)
    mats = tt_ops.prepare_tt(cores, plan)
    with torch.no_grad():
        through_op = tt_ops.tt_contract(x, mats, flat_dims(plan.merged_shapes), list(plan.order))

    def no_dispatch(*args, **kwargs):
        raise AssertionError("the custom op was dispatched")

    monkeypatch.setattr(tt_ops, "tt_contract", no_dispatch)
    with torch.no_grad():
        direct = tt_ops.apply_tt(x, mats, plan)
    assert torch.equal(direct, through_op)
    assert rel_err(direct, tt_matmul_reference(x, cores)) <= 1e-12
    # autograd wanted: the op (and its backward) must run
    with pytest.raises(AssertionError, match="dispatched"):
        tt_ops.apply_tt(x.clone().requires_grad_(), mats, plan)
    # not a plain CPU tensor: no shortcut
    assert not tt_ops._eager_cpu_inference(x.to("meta"), [m.to("meta") for m in mats])
    assert not tt_ops._eager_cpu_inference(x.float().half(), mats)


def test_eager_training_of_a_layer_runs_one_node_without_the_custom_op(monkeypatch):
    """TTLinear training on the CPU (parameters, a bias): prepare + kernels as one autograd
    node, the custom op never dispatched, same values and gradients as the op's route."""
    from tensorpress.nn import TTLinear
    from tensorpress.ops import tt as tt_ops

    torch.manual_seed(8)
    layer = TTLinear(1024, 1024, 8, in_factors=(4, 8, 8, 4), out_factors=(4, 8, 8, 4), dtype=torch.float64)
    x = torch.randn(6, 1024, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 1024, dtype=torch.float64)
    params = [x, *layer.cores, layer.bias]
    plan = layer.plan(6)
    assert not plan.dense
    mats = tt_ops.prepare_tt(layer._core_list(), plan)
    y_op = tt_ops.tt_contract(x, mats, flat_dims(plan.merged_shapes), list(plan.order), "auto", layer.bias)
    grads_op = torch.autograd.grad(y_op, params, g)

    def no_dispatch(*args, **kwargs):
        raise AssertionError("the custom op was dispatched")

    monkeypatch.setattr(tt_ops, "tt_contract", no_dispatch)
    monkeypatch.setattr(tt_ops, "step_matrices_of_groups", no_dispatch)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_EagerCpuTrainingBackward"
    grads = torch.autograd.grad(y, params, g)
    assert torch.equal(y, y_op)
    for a, b in zip(grads, grads_op):
        assert rel_err(a, b) <= 1e-13
    # frozen cores: only x and the bias get gradients (the layer then keeps its step
    # matrices between calls and runs them through the op)
    monkeypatch.undo()
    for c in layer.cores:
        c.requires_grad_(False)
    gx, gb = torch.autograd.grad(layer(x), [x, layer.bias], g)
    assert rel_err(gx, grads_op[0]) <= 1e-13 and rel_err(gb, grads_op[-1]) <= 1e-13
