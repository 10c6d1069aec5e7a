"""The GEMMs of the tiled path (tiled_gemm_tc_kernel) and of the fused kernels (block_gemm_tc)
on the tensor cores (nvcuda::wmma): fp16 and bf16 operands, and fp32 data on tf32, against the
float64 reference of the same inputs, with error bounds from the operand precision; outputs
and workspaces poisoned with NaN first. On the CPU emulation the fragments follow the model of
csrc/testing/cuda_emu_include/mma.h.

The SIMT tiled kernel stays the path for float64 and for tensor_cores=False (the raw bindings'
default), tested in test_tt_cuda.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from gpu_util import DEV, GPU, KERNELS, rel_err, stream, sync
from test_tt_cuda import SHAPES, _paths, _problem, _reference

import tensorpress  # noqa: F401  (registers the ops)
from tensorpress.ops import tt as T
from tensorpress.ops.tt_plan import choose_cuda_plan, cuda_limits, cuda_schedule

pytestmark = GPU

# Every step's input is rounded to the operand type (unit roundoff u) and multiplied exactly
# with float accumulation: a few u per step (4 steps at most here), plus the output's rounding.
U = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-11}
STAGING = 36096 + 32  # csrc/tt/tt_cuda_schedule.h kCudaFusedTensorCoreStaging
TOL = {dt: 12 * u for dt, u in U.items()}


def _call(x, mats, dims, order, gy=None, tensor_cores=True, misalign_workspace=False, path="tiled"):
    merged = tuple(tuple(dims[i : i + 4]) for i in range(0, len(dims), 4))
    backward = gy is not None
    sched = cuda_schedule(
        merged, tuple(order), x.shape[0], backward, x.dtype, cuda_limits(DEV), path, tensor_cores=tensor_cores
    )
    assert sched.path == path
    nan = float("nan")
    ws = torch.full((max(sched.workspace, 1) + 1,), nan, dtype=mats[0].dtype, device=DEV)
    ws = ws[1:] if misalign_workspace else ws[:-1]
    tables = T._tables(dims, order, x.device)
    if not backward:
        y = torch.full((x.shape[0], math.prod(dims[1::4])), nan, dtype=x.dtype, device=DEV)
        KERNELS.tt_forward(
            x, mats, dims, order, y, ws, 1, tables=tables, path=path, stream=stream(), tensor_cores=tensor_cores
        )
        sync()
        return y
    gx = torch.full_like(x, nan)
    gm = [torch.full_like(m, nan) for m in mats]
    KERNELS.tt_backward(
        x, mats, dims, order, gy, gx, gm, ws, 1, tables=tables, path=path, stream=stream(), tensor_cores=tensor_cores
    )
    sync()
    return gx, gm


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("case", [(0, 0), (1, 1), (1, 2), (3, 0)], ids=lambda c: f"shape{c[0]}-plan{c[1]}")
@pytest.mark.parametrize("batch", (1, 70))
def test_tensor_core_tiled_forward_and_backward(case, dtype, batch):
    gen = torch.Generator().manual_seed(50 + 10 * case[0] + case[1] + batch)
    shape = SHAPES[case[0]]
    _, mats64, mats, dims, order = _problem(shape, case[1], dtype, gen)
    x = torch.randn(batch, math.prod(shape[1]), generator=gen).to(DEV, dtype)
    gy = torch.randn(batch, math.prod(shape[0]), generator=gen).to(DEV, dtype)
    y_ref, gx_ref, gm_ref = _reference(x, gy, mats64, dims, order)
    assert "tiled" in _paths(dims, order, batch, dtype, backward=False)
    y = _call(x, mats, dims, order)
    assert rel_err(y, y_ref) < TOL[dtype]
    gx, gm = _call(x, mats, dims, order, gy)
    assert rel_err(gx, gx_ref) < TOL[dtype]
    for t, (g, r) in enumerate(zip(gm, gm_ref)):
        assert rel_err(g, r) < TOL[dtype], f"grad_mats[{t}]"
    if dtype == torch.float32:  # tf32 really was used: the SIMT kernel is far closer
        y_simt = _call(x, mats, dims, order, tensor_cores=False)
        assert rel_err(y_simt, y_ref) < 2e-6 < rel_err(y, y_ref)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("case", [(0, 0), (1, 1), (1, 2), (3, 0)], ids=lambda c: f"shape{c[0]}-plan{c[1]}")
@pytest.mark.parametrize("batch", (1, 70))
def test_tensor_core_fused_forward_and_backward(case, dtype, batch):
    """The fused kernels' step GEMMs (forward, core gradients accumulated into the block's
    partial, input gradients scattered through the gather tables) on the tensor cores."""
    gen = torch.Generator().manual_seed(150 + 10 * case[0] + case[1] + batch)
    shape = SHAPES[case[0]]
    _, mats64, mats, dims, order = _problem(shape, case[1], dtype, gen)
    x = torch.randn(batch, math.prod(shape[1]), generator=gen).to(DEV, dtype)
    gy = torch.randn(batch, math.prod(shape[0]), generator=gen).to(DEV, dtype)
    y_ref, gx_ref, gm_ref = _reference(x, gy, mats64, dims, order)
    y = _call(x, mats, dims, order, path="fused")
    assert rel_err(y, y_ref) < TOL[dtype]
    gx, gm = _call(x, mats, dims, order, gy, path="fused")
    assert rel_err(gx, gx_ref) < TOL[dtype]
    for t, (g, r) in enumerate(zip(gm, gm_ref)):
        assert rel_err(g, r) < TOL[dtype], f"grad_mats[{t}]"
    if dtype == torch.float32:  # tf32 really was used: the SIMT fused kernel is far closer
        y_simt = _call(x, mats, dims, order, tensor_cores=False, path="fused")
        assert rel_err(y_simt, y_ref) < 2e-6 < rel_err(y, y_ref)


def test_fused_schedule_reserves_the_tensor_core_staging():
    """With tensor cores the fused kernels' shared memory holds the operand staging too; a plan
    that only just fits without it runs tiled with it, never over the limit."""
    gen = torch.Generator().manual_seed(3)
    _, _, _, dims, order = _problem(SHAPES[2], 0, torch.float32, gen)
    merged = tuple(tuple(dims[i : i + 4]) for i in range(0, len(dims), 4))
    limits = cuda_limits(DEV)
    simt = cuda_schedule(merged, tuple(order), 1, False, torch.float32, limits, tensor_cores=False)
    tc = cuda_schedule(merged, tuple(order), 1, False, torch.float32, limits, tensor_cores=True)
    assert simt.path == tc.path == "fused" and simt.samples == tc.samples == 1
    assert tc.smem_bytes == simt.smem_bytes + STAGING and tc.smem_bytes <= limits.smem_per_block
    tight = dataclasses.replace(limits, smem_per_block=simt.smem_bytes + STAGING // 2)
    assert cuda_schedule(merged, tuple(order), 1, False, torch.float32, tight, tensor_cores=False).path == "fused"
    assert cuda_schedule(merged, tuple(order), 1, False, torch.float32, tight, tensor_cores=True).path == "tiled"


@pytest.mark.tsan
def test_fused_tensor_cores_under_the_race_detector():
    test_tensor_core_fused_forward_and_backward((0, 0), torch.bfloat16, 70)


@pytest.mark.tsan
def test_tensor_core_kernel_under_the_race_detector():
    """The smallest case (the emulation's ThreadSanitizer subset): staging, fragments and the
    epilogue through shared memory, forward and backward."""
    test_tensor_core_tiled_forward_and_backward((0, 0), torch.bfloat16, 70)


def test_tensor_cores_on_a_chunked_large_shape_bfloat16():
    """4096 features, more than 64 columns per GEMM (several tiles), split core gradients."""
    from test_tt_cuda import LARGE

    gen = torch.Generator().manual_seed(9)
    _, mats64, mats, dims, order = _problem(LARGE, 0, torch.bfloat16, gen)
    x = torch.randn(3, 4096, generator=gen).to(DEV, torch.bfloat16)
    gy = torch.randn(3, 4096, generator=gen).to(DEV, torch.bfloat16)
    y_ref, gx_ref, gm_ref = _reference(x, gy, mats64, dims, order)
    assert rel_err(_call(x, mats, dims, order), y_ref) < TOL[torch.bfloat16]
    gx, gm = _call(x, mats, dims, order, gy)
    assert rel_err(gx, gx_ref) < TOL[torch.bfloat16]
    assert all(rel_err(g, r) < TOL[torch.bfloat16] for g, r in zip(gm, gm_ref))


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values at an address 4 bytes past a 16-byte boundary (a contiguous view)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_vector_and_scalar_operand_loads_agree_bit_for_bit(dtype):
    """The 16-byte vector staging (aligned float operands with unit stride) and the scalar
    gather (here forced by misaligning the step matrices and the workspace) load the same
    values: forward and every gradient agree exactly."""
    gen = torch.Generator().manual_seed(77)
    _, mats64, mats, dims, order = _problem(SHAPES[2], 0, dtype, gen)  # N = 64 columns: full vector tiles
    x = torch.randn(70, 1024, generator=gen).to(DEV, dtype)
    gy = torch.randn(70, 1024, generator=gen).to(DEV, dtype)
    y_vec = _call(x, mats, dims, order)
    gx_vec, gm_vec = _call(x, mats, dims, order, gy)
    odd = [_misaligned(m) for m in mats]
    y_sc = _call(x, odd, dims, order, misalign_workspace=True)
    gx_sc, gm_sc = _call(x, odd, dims, order, gy, misalign_workspace=True)
    assert torch.equal(y_vec, y_sc) and torch.equal(gx_vec, gx_sc)
    assert all(torch.equal(a, b) for a, b in zip(gm_vec, gm_sc))
    y_ref, _, _ = _reference(x, gy, mats64, dims, order)
    assert rel_err(y_vec, y_ref) < TOL[dtype]


def test_float64_refuses_tensor_cores():
    gen = torch.Generator().manual_seed(1)
    _, _, mats, dims, order = _problem(SHAPES[0], 0, torch.float64, gen)
    x = torch.randn(2, 6, dtype=torch.float64, generator=gen).to(DEV)
    with pytest.raises(ValueError, match="tensor_cores: expected False for float64"):
        _call(x, mats, dims, order)


def test_public_api_uses_tensor_cores_as_torch_matmul_would(monkeypatch):
    """tt_matmul decides per call: fp16/bf16 always, float32 when TF32 is allowed."""
    seen = []
    real = KERNELS.tt_forward

    class Spy:
        def __getattr__(self, name):
            return getattr(KERNELS, name)

        def tt_forward(self, *args, **kwargs):
            seen.append(kwargs["tensor_cores"])
            return real(*args, **kwargs)

    from tensorpress import _cuda_kernels

    active = _cuda_kernels.active()
    monkeypatch.setattr(active, "module", Spy())
    gen = torch.Generator().manual_seed(2)
    cores64, *_ = _problem(SHAPES[1], 0, torch.float32, gen)
    x = torch.randn(4, 42, generator=gen).to(DEV)
    cores = [c.to(DEV, torch.float32) for c in cores64]
    plan = choose_cuda_plan([tuple(c.shape) for c in cores], 4, cuda_limits(DEV), torch.float32, allow_dense=False)
    plan = dataclasses.replace(plan, path="tiled")
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        T.tt_matmul(x, cores, plan=plan)
        torch.backends.cuda.matmul.allow_tf32 = True
        T.tt_matmul(x, cores, plan=plan)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    T.tt_matmul(x.to(torch.bfloat16), [c.to(torch.bfloat16) for c in cores], plan=plan)
    assert seen == [False, True, True]
