"""The CUDA TT-matrix kernels (fused and tiled) against the float64 CPU reference.

Every op (forward, grad_x, every step-matrix gradient), every dtype, both kernels, several
plans per shape and batches that cross the kernels' block and chunk boundaries; outputs and
workspaces are poisoned with NaN first, so an element the kernel never writes fails the
comparison.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from gpu_util import DEV, EMULATED, GPU, GPU_SIZE, KERNELS, REAL_GPU, random_cores, rel_err, stream, sync

import tensorpress  # noqa: F401  (registers the ops)
from tensorpress.ops import tt as T
from tensorpress.ops.tt import merge_group, step_matrices, tt_contract_torch, tt_matmul, tt_matmul_reference
from tensorpress.ops.tt_plan import (
    choose_cuda_plan,
    choose_plan,
    cuda_limits,
    cuda_schedule,
    decode_split,
    flat_dims,
    plan_info,
)

pytestmark = GPU

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# step-matrix gradients come out in float32 (float64 for float64), computed from the same
# rounded inputs as the reference: only the accumulation differs
GRAD_MAT_TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}

# (out_factors, in_factors, ranks, [(groups, order), ...])
SHAPES = [
    ((2, 3), (3, 2), (2,), [(((0,), (1,)), (0, 1)), (((0,), (1,)), (1, 0)), (((0, 1),), (0,))]),
    (
        (3, 5, 2),
        (2, 7, 3),
        (4, 5),
        [(((0,), (1,), (2,)), (0, 1, 2)), (((0,), (1,), (2,)), (1, 2, 0)), (((0, 1), (2,)), (1, 0))],
    ),
    (
        (4, 8, 8, 4),
        (4, 8, 8, 4),
        (8, 8, 8),
        [
            (((0,), (1,), (2,), (3,)), (0, 1, 2, 3)),
            (((0,), (1,), (2,), (3,)), (3, 2, 1, 0)),
            (((0, 1), (2, 3)), (0, 1)),
        ],
    ),
    ((2, 2, 2, 2, 2), (2, 2, 2, 2, 2), (3, 4, 5, 3), [(((0,), (1,), (2,), (3,), (4,)), (2, 1, 3, 0, 4))]),
]
# too large for one block's shared memory: only the tiled kernel (several chunks at batch 300)
LARGE = ((8, 8, 8, 8), (8, 8, 8, 8), (16, 16, 16), [(((0,), (1,), (2,), (3,)), (0, 1, 2, 3))])
BATCHES = (1, 5, 64, 300)


def _problem(shape, plan_idx, dtype, gen):
    out_f, in_f, ranks, plans = shape
    groups, order = plans[plan_idx]
    cores64 = random_cores(out_f, in_f, ranks, gen)
    merged = [merge_group(cores64, g) for g in groups]
    mats64 = step_matrices(merged, order)
    dims = flat_dims(tuple(g.shape) for g in merged)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mats = [m.to(DEV, acc) for m in mats64]
    return cores64, mats64, mats, dims, list(order)


def _paths(dims, order, batch, dtype, backward):
    merged = tuple(tuple(dims[i : i + 4]) for i in range(0, len(dims), 4))
    fits = cuda_schedule(merged, tuple(order), max(batch, 1), backward, dtype, cuda_limits(DEV)).fits_fused
    return ("fused", "tiled") if fits else ("tiled",)


def _forward(x, mats, dims, order, path):
    """The binding called directly, on NaN-poisoned output and workspace."""
    merged = tuple(tuple(dims[i : i + 4]) for i in range(0, len(dims), 4))
    sched = cuda_schedule(merged, tuple(order), x.shape[0], False, x.dtype, cuda_limits(DEV), path)
    assert sched.path == path
    y = torch.full((x.shape[0], math.prod(dims[1::4])), float("nan"), dtype=x.dtype, device=DEV)
    ws = torch.full((max(sched.workspace, 1),), float("nan"), dtype=mats[0].dtype, device=DEV)
    KERNELS.tt_forward(
        x, mats, dims, order, y, ws, 1, tables=T._tables(dims, order, x.device), path=path, stream=stream()
    )
    sync()
    return y


def _backward(x, mats, dims, order, gy, path, need_x=True, need_mats=True):
    merged = tuple(tuple(dims[i : i + 4]) for i in range(0, len(dims), 4))
    sched = cuda_schedule(merged, tuple(order), x.shape[0], True, x.dtype, cuda_limits(DEV), path)
    assert sched.path == path
    nan = float("nan")
    gx = torch.full_like(x, nan) if need_x else None
    gm = [torch.full_like(m, nan) for m in mats] if need_mats else [None] * len(mats)
    ws = torch.full((max(sched.workspace, 1),), nan, dtype=mats[0].dtype, device=DEV)
    KERNELS.tt_backward(
        x, mats, dims, order, gy, gx, gm, ws, 1, tables=T._tables(dims, order, x.device), path=path, stream=stream()
    )
    sync()
    return gx, gm


def _reference(x, gy, mats64, dims, order):
    """Forward and all gradients in float64 on the CPU (the plan executed with torch ops)."""
    x64 = x.detach().to("cpu", torch.float64).requires_grad_()
    m64 = [m.clone().requires_grad_() for m in mats64]
    y = tt_contract_torch(x64, m64, dims, order)
    gx, *gm = torch.autograd.grad(y, [x64, *m64], gy.to("cpu", torch.float64))
    return y.detach(), gx, gm


# the smallest shape also runs under ThreadSanitizer (the emulation's tsan subset)
CASES = [
    pytest.param((s, p), marks=[pytest.mark.tsan] if s == 0 else [])
    for s in range(len(SHAPES))
    for p in range(len(SHAPES[s][3]))
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"shape{c[0]}-plan{c[1]}")
def test_forward_backward_all_paths(case, dtype):
    if EMULATED and case[0] == 2 and dtype in (torch.float16, torch.float64):
        pytest.skip(
            "the CPU emulation runs the 1024-feature shape in float32 and bfloat16 only (40 s a case); "
            "float16 and float64 run on the other shapes"
        )
    gen = torch.Generator().manual_seed(1000 * case[0] + case[1])
    shape = SHAPES[case[0]]
    cores64, mats64, mats, dims, order = _problem(shape, case[1], dtype, gen)
    for batch in BATCHES:
        x = torch.randn(batch, math.prod(shape[1]), generator=gen).to(DEV, dtype)
        gy = torch.randn(batch, math.prod(shape[0]), generator=gen).to(DEV, dtype)
        y_ref, gx_ref, gm_ref = _reference(x, gy, mats64, dims, order)
        if batch == BATCHES[-1]:  # the plan's reference agrees with the plain core-by-core sweep
            assert rel_err(y_ref, tt_matmul_reference(x.to("cpu", torch.float64), cores64)) < 1e-12
        for path in _paths(dims, order, batch, dtype, backward=False):
            y = _forward(x, mats, dims, order, path)
            assert rel_err(y, y_ref) < TOL[dtype], (path, batch)
        for path in _paths(dims, order, batch, dtype, backward=True):
            gx, gm = _backward(x, mats, dims, order, gy, path)
            assert rel_err(gx, gx_ref) < TOL[dtype], (path, batch, "grad_x")
            for t, (g, r) in enumerate(zip(gm, gm_ref)):
                assert rel_err(g, r) < GRAD_MAT_TOL[dtype], (path, batch, f"grad_mats[{t}]")


# (on the CPU emulation float32 only: a minute and a half each; bfloat16 differs in its loads
# and stores only, covered at smaller sizes)
@pytest.mark.parametrize("dtype", (torch.float32, pytest.param(torch.bfloat16, marks=GPU_SIZE)), ids=str)
def test_large_shape_tiled_several_chunks(dtype):
    gen = torch.Generator().manual_seed(7)
    cores64, mats64, mats, dims, order = _problem(LARGE, 0, dtype, gen)
    assert _paths(dims, order, 1, dtype, backward=False) == ("tiled",)
    merged = tuple(tuple(dims[i : i + 4]) for i in range(0, len(dims), 4))
    # a few samples more than one chunk of the backward's bounded workspace holds
    batch = cuda_schedule(merged, tuple(order), 300, True, dtype, cuda_limits(DEV)).samples + 5
    assert cuda_schedule(merged, tuple(order), batch, True, dtype, cuda_limits(DEV)).chunks == 2
    x = torch.randn(batch, 4096, generator=gen).to(DEV, dtype)
    gy = torch.randn(batch, 4096, generator=gen).to(DEV, dtype)
    y_ref, gx_ref, gm_ref = _reference(x, gy, mats64, dims, order)
    assert rel_err(_forward(x, mats, dims, order, "tiled"), y_ref) < TOL[dtype]
    gx, gm = _backward(x, mats, dims, order, gy, "tiled")
    assert rel_err(gx, gx_ref) < TOL[dtype]
    for g, r in zip(gm, gm_ref):
        assert rel_err(g, r) < GRAD_MAT_TOL[dtype]


# both steps of this plan have K > 16, so both are split: the second step sums the first's
# partial products as it reads them, the output permutation sums the second's
DECODE_SHAPE = ((4, 6), (24, 5), (6,), [(((0,), (1,)), (0, 1))])
# (name, shape, plan, whether a step is split) of the decode tests: the small shapes, the
# 1024-feature one (float32 only) and DECODE_SHAPE
DECODE_CASES = [
    pytest.param(("shape0", SHAPES[0], 0, False), marks=[pytest.mark.tsan]),
    ("shape1-plan1", SHAPES[1], 1, False),
    ("shape1-plan2", SHAPES[1], 2, True),
    ("shape3", SHAPES[3], 0, False),
    ("shape2-plan2", SHAPES[2], 2, True),
    pytest.param(("decode-shape", DECODE_SHAPE, 0, True), marks=[pytest.mark.tsan]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c[0])
def test_decode_path_forward(case, dtype):
    """The decode path (each step's K range split across blocks, the partial products summed
    by the next step's operand reads and by the output permutation) against float64, on
    NaN-poisoned output and workspace; a backward asked of it runs the tiled kernels."""
    name, shape, plan_idx, splits_expected = case
    if shape is SHAPES[2] and dtype != torch.float32:
        pytest.skip("the 1024-feature shape runs in float32 only on the decode path (the others cover the dtypes)")
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    cores64, mats64, mats, dims, order = _problem(shape, plan_idx, dtype, gen)
    merged = tuple(tuple(dims[i : i + 4]) for i in range(0, len(dims), 4))
    limits = cuda_limits(DEV)
    split_steps = 0
    for batch in (1, 3, 16):
        sched = cuda_schedule(merged, tuple(order), batch, False, dtype, limits, "decode")
        assert sched.path == "decode" and sched.target_blocks == 2 * limits.sm_count
        steps = plan_info(tuple(dims), tuple(order)).steps
        split_steps += sum(decode_split(sched.samples * s.rows, s.K, s.N, sched.target_blocks)[0] > 1 for s in steps)
        x = torch.randn(batch, math.prod(shape[1]), generator=gen).to(DEV, dtype)
        y_ref = tt_contract_torch(x.to("cpu", torch.float64), mats64, dims, order)
        assert rel_err(_forward(x, mats, dims, order, "decode"), y_ref) < TOL[dtype], batch
    assert (split_steps > 0) == splits_expected
    if name == "decode-shape":
        assert split_steps == 2 * 3  # both steps, at every batch
    back = cuda_schedule(merged, tuple(order), 3, True, dtype, limits, "decode")
    assert back.path == "tiled"
    # a backward asked of the decode path (a training call on a decode plan) runs the tiled kernels
    x = torch.randn(3, math.prod(shape[1]), generator=gen).to(DEV, dtype)
    gy = torch.randn(3, math.prod(shape[0]), generator=gen).to(DEV, dtype)
    gx = torch.full_like(x, float("nan"))
    gm = [torch.full_like(m, float("nan")) for m in mats]
    ws = torch.full((max(back.workspace, 1),), float("nan"), dtype=mats[0].dtype, device=DEV)
    tables = T._tables(dims, order, x.device)
    KERNELS.tt_backward(x, mats, dims, order, gy, gx, gm, ws, 1, tables=tables, path="decode", stream=stream())
    sync()
    _, gx_ref, gm_ref = _reference(x, gy, mats64, dims, order)
    assert rel_err(gx, gx_ref) < TOL[dtype]
    assert all(rel_err(g, r) < GRAD_MAT_TOL[dtype] for g, r in zip(gm, gm_ref))


@pytest.mark.tsan
@pytest.mark.parametrize("path", ("fused", "tiled"))
def test_partial_gradients(path):
    """Only grad_x, or only the step-matrix gradients."""
    gen = torch.Generator().manual_seed(3)
    cores64, mats64, mats, dims, order = _problem(SHAPES[1], 1, torch.float32, gen)
    x = torch.randn(37, 42, generator=gen).to(DEV)
    gy = torch.randn(37, 30, generator=gen).to(DEV)
    _, gx_ref, gm_ref = _reference(x, gy, mats64, dims, order)
    gx, gm = _backward(x, mats, dims, order, gy, path, need_mats=False)
    assert rel_err(gx, gx_ref) < 1e-5 and gm == [None] * len(mats)
    gx, gm = _backward(x, mats, dims, order, gy, path, need_x=False)
    assert gx is None and all(rel_err(g, r) < 1e-5 for g, r in zip(gm, gm_ref))


@pytest.mark.parametrize("path", ("fused", "tiled"))
def test_gradcheck_and_gradgradcheck_float64_on_gpu(path):
    """First and second-order gradients through the CUDA custom op (its backward has its own
    autograd)."""
    gen = torch.Generator().manual_seed(11)
    out_f, in_f, ranks = (2, 3, 2), (3, 2, 2), (2, 3)
    cores = [g.to(DEV).requires_grad_() for g in random_cores(out_f, in_f, ranks, gen)]
    x = torch.randn(4, 12, dtype=torch.float64, generator=gen).to(DEV).requires_grad_()
    plan = choose_cuda_plan([tuple(g.shape) for g in cores], 4, cuda_limits(DEV), torch.float64, allow_dense=False)
    plan = dataclasses.replace(plan, path=path)
    assert torch.autograd.gradcheck(lambda x, *c: tt_matmul(x, list(c), plan=plan), (x, *cores))
    assert torch.autograd.gradgradcheck(lambda x, *c: tt_matmul(x, list(c), plan=plan), (x, *cores))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@REAL_GPU
def test_ttlinear_follows_autocast_on_gpu(dtype):
    """Under CUDA autocast TTLinear computes and returns autocast's dtype, like nn.Linear."""
    from tensorpress.nn import TTLinear

    torch.manual_seed(0)
    layer = TTLinear(1024, 512, ranks=8).to(DEV)
    x = torch.randn(64, 1024, device=DEV)
    with torch.autocast("cuda", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    ref = x.double() @ layer.to_dense().detach().double().T + layer.bias.detach().double()
    assert rel_err(y, ref) < 3e-2
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


@pytest.mark.tsan
def test_empty_batch():
    gen = torch.Generator().manual_seed(5)
    _, _, mats, dims, order = _problem(SHAPES[1], 0, torch.float32, gen)
    for path in ("fused", "tiled"):
        x = torch.empty(0, 42, device=DEV)
        assert _forward(x, mats, dims, order, path).shape == (0, 30)
        gx, gm = _backward(x, mats, dims, order, torch.empty(0, 30, device=DEV), path)
        assert gx.shape == (0, 42) and all(torch.equal(g, torch.zeros_like(g)) for g in gm)
    assert _forward(torch.empty(0, 42, device=DEV), mats, dims, order, "decode").shape == (0, 30)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_api_auto_plan(dtype):
    """tt_matmul on CUDA tensors: the CUDA cost model's plan (fused, tiled or dense), forward
    and backward, against float64."""
    gen = torch.Generator().manual_seed(13)
    out_f, in_f, ranks = (4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8)
    cores64 = random_cores(out_f, in_f, ranks, gen)
    for batch in (1, 16, 256):
        plan = choose_plan([tuple(g.shape) for g in cores64], batch, device="cuda", dtype=dtype)
        assert plan.path in ("fused", "tiled", "decode", "dense")
        cores = [g.to(DEV, dtype).requires_grad_() for g in cores64]
        x = torch.randn(batch, 1024, generator=gen).to(DEV, dtype).requires_grad_()
        bias = torch.randn(1024, generator=gen).to(DEV, dtype).requires_grad_()
        y = tt_matmul(x, cores, bias=bias)
        assert y.dtype == dtype and y.device.type == DEV
        ref = tt_matmul_reference(x.detach().double().cpu(), [g.detach().double().cpu() for g in cores])
        ref = ref + bias.detach().double().cpu()
        assert rel_err(y, ref) < TOL[dtype], plan.path
        y.float().square().sum().backward()
        assert torch.isfinite(x.grad.float()).all() and all(torch.isfinite(g.grad.float()).all() for g in cores)
        # (the loss goes through float32: the bias gradient is float32-accurate in every dtype)
        assert rel_err(bias.grad, (2 * y.detach().float()).sum(0)) < max(TOL[dtype], 2e-5)


@REAL_GPU
def test_non_default_stream_and_graph_capture():
    gen = torch.Generator().manual_seed(17)
    cores64 = random_cores((4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8), gen)
    cores = [g.to(DEV, torch.float32) for g in cores64]
    plan = choose_cuda_plan([tuple(g.shape) for g in cores], 8, cuda_limits(DEV), torch.float32, allow_dense=False)
    prepared = T.prepare_tt(cores, plan)
    x = torch.randn(8, 1024, generator=gen).to(DEV)
    ref = tt_matmul_reference(x.double().cpu(), cores64)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = tt_matmul(x, cores, plan=plan, prepared=prepared)
    side.synchronize()
    assert rel_err(y, ref) < 2e-5
    # capture (the first call above built the tables: no host-to-device copy while capturing)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            tt_matmul(static_x, cores, plan=plan, prepared=prepared)  # warm-up on the side stream
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(graph):
            static_y = tt_matmul(static_x, cores, plan=plan, prepared=prepared)
    x2 = torch.randn(8, 1024, generator=gen).to(DEV)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(static_y, tt_matmul_reference(x2.double().cpu(), cores64)) < 2e-5


def test_bad_input_on_cuda():
    gen = torch.Generator().manual_seed(19)
    _, _, mats, dims, order = _problem(SHAPES[1], 0, torch.float32, gen)
    x = torch.randn(4, 42, device=DEV)
    y = torch.empty(4, 30, device=DEV)
    tables = T._tables(dims, order, x.device)
    ws = torch.empty(1, device=DEV)
    st = stream()
    if not EMULATED:  # (the emulation's device is the CPU)
        with pytest.raises(ValueError, match="mats\\[0\\]"):
            KERNELS.tt_forward(x, [mats[0].cpu(), *mats[1:]], dims, order, y, ws, 1, tables=tables, stream=st)
    with pytest.raises(ValueError, match="stream"):
        KERNELS.tt_forward(x, mats, dims, order, y, ws, 1, tables=tables)
    with pytest.raises(TypeError, match="mats\\[1\\]"):
        KERNELS.tt_forward(x, [mats[0], mats[1].double(), mats[2]], dims, order, y, ws, 1, tables=tables, stream=st)
    with pytest.raises(ValueError, match="tables"):
        KERNELS.tt_forward(x, mats, dims, order, y, ws, 1, tables=tables[:-1], stream=st)
    with pytest.raises(ValueError, match="path"):
        KERNELS.tt_forward(x, mats, dims, order, y, ws, 1, tables=tables, path="fast", stream=st)
    big = ((8, 8, 8, 8), (8, 8, 8, 8), (16, 16, 16))
    _, _, bmats, bdims, border = _problem((*big, [(((0,), (1,), (2,), (3,)), (0, 1, 2, 3))]), 0, torch.float32, gen)
    with pytest.raises(ValueError, match="shared memory"):
        KERNELS.tt_forward(
            torch.randn(2, 4096, device=DEV),
            bmats,
            bdims,
            border,
            torch.empty(2, 4096, device=DEV),
            ws,
            1,
            tables=T._tables(bdims, border, x.device),
            path="fused",
            stream=st,
        )
    with pytest.raises(ValueError, match="workspace"):
        KERNELS.tt_forward(
            torch.randn(2, 4096, device=DEV),
            bmats,
            bdims,
            border,
            torch.empty(2, 4096, device=DEV),
            ws,
            1,
            tables=T._tables(bdims, border, x.device),
            path="tiled",
            stream=st,
        )
