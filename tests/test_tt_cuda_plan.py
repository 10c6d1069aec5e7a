"""The CUDA side of the TT contraction that runs without a GPU: the dispatcher's choice
(fused / tiled / dense), the C++ schedule, and the gather tables the CUDA kernels index
through (executed here with torch ops, exactly as the kernels use them, against the float64
reference)."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

import tensorpress
from _util import random_cores, rel_err
from tensorpress._ext import _C
from tensorpress.ops.tt import merge_group, step_matrices, tt_contract_torch, tt_matmul_reference
from tensorpress.ops.tt_plan import (
    CUDA_PATHS,
    H100_LIMITS,
    H100_RATES,
    CudaLimits,
    CudaRates,
    _orders,
    _partitions,
    choose_cuda_plan,
    cuda_plan_costs,
    cuda_schedule,
    decode_split,
    dense_flops,
    flat_dims,
    merge_shapes,
    plan_info,
    tensor_cores_for,
)


def tt_shapes(out_f, in_f, ranks):
    full = (1, *ranks, 1)
    return tuple((full[k], out_f[k], in_f[k], full[k + 1]) for k in range(len(out_f)))


# ----------------------------------------------------------------------------- dispatcher
def test_small_layer_small_batch_runs_fused():
    shapes = tt_shapes((4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8))
    plan = choose_cuda_plan(shapes, 64, H100_LIMITS, torch.float32, allow_dense=False)
    assert plan.path == "fused"
    assert cuda_schedule(plan.merged_shapes, plan.order, 64, False, torch.float32, H100_LIMITS).path == "fused"


def test_state_too_large_for_shared_memory_runs_tiled():
    # 4096x4096 r32: one sample's intermediate (512 n's x 8 m's x 32) alone is 512 KiB
    shapes = tt_shapes((8, 8, 8, 8), (8, 8, 8, 8), (32, 32, 32))
    plan = choose_cuda_plan(shapes, 4, H100_LIMITS, torch.float32, allow_dense=False)
    assert plan.path in ("tiled", "decode")  # at batch 4 the split (decode) tiled GEMMs
    assert choose_cuda_plan(shapes, 256, H100_LIMITS, torch.float32, allow_dense=False).path == "tiled"
    for groups in _partitions(4):
        merged = tuple(merge_shapes(shapes, g)[0] for g in groups)
        for order in _orders(len(groups)):
            assert "fused" not in cuda_plan_costs(merged, order, 4, H100_LIMITS)


def test_decode_path_for_a_big_layer_at_batch_one():
    """4096x4096 TT rank 8 at batch 1 (float32): every step of the tiled path would fill a
    few SMs; the decode path's split steps fill them all, and the model prefers it to the
    dense layer (which reads the whole 64 MB weight). At large batch it is never chosen."""
    shapes = tt_shapes((8, 8, 8, 8), (8, 8, 8, 8), (8, 8, 8))
    plan = choose_cuda_plan(shapes, 1, H100_LIMITS, torch.float32)
    assert plan.path == "decode"
    costs = cuda_plan_costs(plan.merged_shapes, plan.order, 1, H100_LIMITS)
    assert costs["decode"] < costs["tiled"]
    for batch, dtype in ((4096, torch.float32), (4096, torch.bfloat16), (512, torch.bfloat16)):
        assert choose_cuda_plan(shapes, batch, H100_LIMITS, dtype).path != "decode"


@pytest.mark.parametrize("batch", [1, 2, 7, 16, 100])
def test_decode_split_mirrors_the_cpp_schedule(batch):
    """The cost model's decode_split is the C++ one: the workspace the C++ schedule sizes is
    two buffers of the largest step output times its splits; the splits reach the target
    block count where the K range allows, never exceed the limit, and leave no slice empty."""
    shapes = tt_shapes((4, 8, 8, 4), (4, 8, 8, 4), (16, 16, 16))
    for groups in _partitions(4):
        merged = tuple(merge_shapes(shapes, g)[0] for g in groups)
        for order in _orders(len(groups)):
            sched = cuda_schedule(merged, order, batch, False, torch.float32, H100_LIMITS, "decode")
            assert sched.path == "decode" and sched.target_blocks == 2 * H100_LIMITS.sm_count
            steps = plan_info(tuple(flat_dims(merged)), tuple(order)).steps
            most = 0
            for s in steps:
                splits, per = decode_split(sched.samples * s.rows, s.K, s.N, sched.target_blocks)
                assert 1 <= splits <= 32 and per % 16 == 0 and (splits - 1) * per < s.K <= splits * per
                tiles = math.ceil(sched.samples * s.rows / 64) * math.ceil(s.N / 64)
                most_splits = min(32, math.ceil(s.K / 16))
                # the target, up to the rounding of the slices to whole 16-deep tiles
                assert splits == most_splits or 2 * tiles * splits >= min(sched.target_blocks, tiles * most_splits)
                most = max(most, splits * sched.samples * s.rows * s.N)
            assert sched.workspace == 2 * most
            back = cuda_schedule(merged, order, batch, True, torch.float32, H100_LIMITS, "decode")
            assert back.path == "tiled"  # the decode path is inference-only


def test_tiny_shared_memory_forces_the_global_memory_paths():
    shapes = tt_shapes((4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8))
    tiny = CudaLimits(smem_per_block=1024, smem_per_sm=2048, sm_count=132)
    assert choose_cuda_plan(shapes, 64, tiny, torch.float32, allow_dense=False).path in ("tiled", "decode")


def test_full_rank_large_batch_goes_dense():
    # ranks at their maximum: the TT needs more FLOPs than W itself
    shapes = tt_shapes((8, 8), (8, 8), (64,))
    plan = choose_cuda_plan(shapes, 65536, H100_LIMITS, torch.bfloat16)
    assert plan.dense and plan.path == "dense"
    assert plan.flops == dense_flops(shapes, 65536)
    # without the dense route, the same call runs one of our kernels
    assert choose_cuda_plan(shapes, 65536, H100_LIMITS, torch.bfloat16, allow_dense=False).path in ("fused", "tiled")


def test_costs_name_their_unit():
    shapes = tt_shapes((4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8))
    assert tensorpress.ops.choose_plan(shapes, 64).cost_unit == "flop"
    for allow_dense, batch in ((False, 64), (True, 1 << 16)):
        plan = choose_cuda_plan(shapes, batch, H100_LIMITS, torch.float32, allow_dense=allow_dense)
        assert plan.cost_unit == "ps" and plan.cost > 0, plan


def test_benchmark_shape_bf16_large_batch_goes_dense():
    """1024x1024 r16 at batch 4096 in bf16: cuBLAS on the tensor cores beats every TT plan."""
    shapes = tt_shapes((4, 8, 8, 4), (4, 8, 8, 4), (16, 16, 16))
    assert choose_cuda_plan(shapes, 4096, H100_LIMITS, torch.bfloat16).path == "dense"


def test_tensor_cores_lower_the_fused_and_tiled_estimates_only():
    shapes = tt_shapes((8, 8, 8, 8), (8, 8, 8, 8), (16, 16, 16))
    merged, order = tuple(shapes), (0, 1, 2, 3)
    small = tt_shapes((4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8))  # fits the fused kernels
    for dtype in (torch.float32, torch.bfloat16):
        simt = cuda_plan_costs(merged, order, 4096, H100_LIMITS, dtype, tensor_cores=False)
        tc = cuda_plan_costs(merged, order, 4096, H100_LIMITS, dtype, tensor_cores=True)
        assert tc["tiled"] < 0.5 * simt["tiled"], dtype
        assert tc["decode"] == simt["decode"]  # the decode path's split GEMMs stay SIMT
        simt = cuda_plan_costs(tuple(small), order, 256, H100_LIMITS, dtype, tensor_cores=False)
        tc = cuda_plan_costs(tuple(small), order, 256, H100_LIMITS, dtype, tensor_cores=True)
        assert tc["fused"] < simt["fused"], dtype
    fp64 = [cuda_plan_costs(merged, order, 64, H100_LIMITS, torch.float64, tensor_cores=t)["tiled"] for t in (0, 1)]
    assert fp64[0] == fp64[1]


def test_float32_follows_torchs_tf32_setting():
    shapes = tt_shapes((8, 8, 8, 8), (8, 8, 8, 8), (16, 16, 16))
    before = torch.get_float32_matmul_precision()
    try:
        for precision, allowed in (("highest", False), ("high", True)):
            torch.set_float32_matmul_precision(precision)
            assert tensor_cores_for(torch.float32) is allowed
            auto = choose_cuda_plan(shapes, 2048, H100_LIMITS, torch.float32)
            assert auto == choose_cuda_plan(shapes, 2048, H100_LIMITS, torch.float32, tensor_cores=allowed)
    finally:
        torch.set_float32_matmul_precision(before)
    assert tensor_cores_for(torch.bfloat16) and tensor_cores_for(torch.float16) and not tensor_cores_for(torch.float64)


def test_rates_are_parameters_of_the_choice():
    shapes = tt_shapes((8, 8, 8, 8), (8, 8, 8, 8), (8, 8, 8))
    # 4096x4096 r8 at batch 4096 in bf16: the tiled path's float32 intermediates (8x the input
    # per step at rank 8) cross device memory, so even at the tensor cores' peak it stays
    # behind cuBLAS; with the intermediates' traffic free as well, the TT plan (3.6x fewer
    # FLOPs) wins
    peak = CudaRates(tiled_tensor_core_half=H100_RATES.dense_half)
    assert choose_cuda_plan(shapes, 4096, H100_LIMITS, torch.bfloat16).path == "dense"
    assert choose_cuda_plan(shapes, 4096, H100_LIMITS, torch.bfloat16, rates=peak).path == "dense"
    on_chip = CudaRates(tiled_tensor_core_half=H100_RATES.dense_half, bandwidth=1e16)
    assert choose_cuda_plan(shapes, 4096, H100_LIMITS, torch.bfloat16, rates=on_chip).path == "tiled"
    # launches that cost a millisecond each: one fused launch beats a launch per step
    slow_launch = CudaRates(launch_seconds=1e-3)
    small = tt_shapes((4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8))
    assert choose_cuda_plan(small, 16, H100_LIMITS, torch.float32, allow_dense=False, rates=slow_launch).path == "fused"


def test_choice_is_the_cheapest_candidate():
    shapes = tt_shapes((4, 8, 8, 4), (4, 8, 8, 4), (16, 16, 16))
    for batch in (1, 16, 256, 4096):
        plan = choose_cuda_plan(shapes, batch, H100_LIMITS, torch.float32, allow_dense=False)
        assert plan.path in CUDA_PATHS
        costs = cuda_plan_costs(plan.merged_shapes, plan.order, batch, H100_LIMITS)
        chosen = costs[plan.path]
        for groups in _partitions(4):
            merged = tuple(merge_shapes(shapes, g)[0] for g in groups)
            for order in _orders(len(groups)):
                # merging costs are added on top, so compare contraction costs loosely
                assert min(cuda_plan_costs(merged, order, batch, H100_LIMITS).values()) >= 0.5 * chosen or len(
                    groups
                ) < len(plan.groups)


def test_choose_plan_device_cuda_uses_cuda_model():
    shapes = tt_shapes((4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8))
    assert tensorpress.ops.choose_plan(shapes, 64, device="cuda").path in CUDA_PATHS
    assert tensorpress.ops.choose_plan(shapes, 64).path in ("cpu", "dense")


# ----------------------------------------------------------------------------- schedule
def test_schedule_fits_limits_and_rejects_bad_requests():
    shapes = tt_shapes((4, 8, 8, 4), (4, 8, 8, 4), (8, 8, 8))
    order = (0, 1, 2, 3)
    for backward in (False, True):
        for batch in (1, 7, 300, 5000):
            s = cuda_schedule(shapes, order, batch, backward, torch.float32, H100_LIMITS)
            assert s.path == "fused" and 0 < s.smem_bytes <= H100_LIMITS.smem_per_block
            assert 1 <= s.samples <= 32 and s.chunks == math.ceil(batch / s.samples)
            assert 1 <= s.grid <= s.chunks
            t = cuda_schedule(shapes, order, batch, backward, torch.float32, H100_LIMITS, "tiled")
            assert t.path == "tiled" and t.chunks * t.samples >= batch and t.workspace > 0
    big = tt_shapes((8, 8, 8, 8), (8, 8, 8, 8), (32, 32, 32))
    with pytest.raises(ValueError, match="fused"):
        cuda_schedule(big, order, 4, False, torch.float32, H100_LIMITS, "fused")
    with pytest.raises(ValueError, match="path"):
        cuda_schedule(shapes, order, 4, False, torch.float32, H100_LIMITS, "fastest")


# ----------------------------------------------------------------------------- gather tables
def _tables(dims, order):
    """The C++ tables split as the kernels read them (tt_cuda_schedule.h, table_layout)."""
    tab = torch.tensor(_C.tt_cuda_tables(dims, order), dtype=torch.int64)
    steps = plan_info(tuple(dims), tuple(order)).steps
    out, at = [], 0
    for s in steps:
        ro, co = tab[at : at + s.rows], tab[at + s.rows : at + s.rows + s.K]
        out.append((ro, co))
        at += s.rows + s.K
    M = math.prod(dims[1::4])
    return steps, out, tab[at : at + M], tab[at + M : at + 2 * M]


def emulate(x, gy, mats, dims, order):
    """The CUDA kernels' arithmetic with torch ops: gathers through row_off[r] + col_off[k],
    the output permutation through fsrc, grad_y through finv, input gradients scattered
    back through the same offsets."""
    steps, tabs, fsrc, finv = _tables(dims, order)
    B = x.shape[0]
    state, saved = x, []
    for s, (ro, co), mat in zip(steps, tabs, mats):
        idx = ro[:, None] + co[None, :]
        assert torch.equal(idx.flatten().sort().values, torch.arange(s.rows * s.K)), "a bijection"
        saved.append(state)
        state = (state[:, idx] @ mat).reshape(B, -1)
    y = state[:, fsrc]
    g = gy[:, finv]
    grads = [None] * len(steps)
    for t in reversed(range(len(steps))):
        s, (ro, co) = steps[t], tabs[t]
        idx = ro[:, None] + co[None, :]
        g3 = g.reshape(B, s.rows, s.N)
        grads[t] = torch.einsum("brk,brn->kn", saved[t][:, idx], g3)
        gin = torch.empty(B, s.rows * s.K, dtype=x.dtype)
        gin[:, idx.flatten()] = (g3 @ mats[t].T).reshape(B, -1)
        g = gin
    return y, g, grads


PROBLEMS = [
    ((2, 3), (3, 2), (2,)),
    ((3, 5, 2), (2, 7, 3), (4, 5)),
    ((4, 2, 3, 2), (2, 3, 2, 4), (3, 4, 2)),
    ((2, 2, 2, 2, 2), (2, 3, 2, 1, 2), (3, 2, 4, 2)),
]


@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_tables_drive_the_right_contraction(problem):
    gen = torch.Generator().manual_seed(41)
    cores = random_cores(*problem, generator=gen)
    shapes = tuple(tuple(g.shape) for g in cores)
    x = torch.randn(5, math.prod(problem[1]), dtype=torch.float64, generator=gen)
    gy = torch.randn(5, math.prod(problem[0]), dtype=torch.float64, generator=gen)
    ref = tt_matmul_reference(x, cores)
    for groups in _partitions(len(cores)):
        merged = [merge_group(cores, g) for g in groups]
        dims = flat_dims(tuple(m.shape) for m in merged)
        for order in _orders(len(groups)):
            mats = step_matrices(merged, order)
            y, gx, gm = emulate(x, gy, mats, dims, order)
            assert rel_err(y, ref) < 1e-12, (groups, order)
            xr = x.clone().requires_grad_()
            mr = [m.clone().requires_grad_() for m in mats]
            gx_ref, *gm_ref = torch.autograd.grad(tt_contract_torch(xr, mr, dims, list(order)), [xr, *mr], gy)
            assert rel_err(gx, gx_ref) < 1e-12
            assert all(rel_err(a, b) < 1e-12 for a, b in zip(gm, gm_ref))
    assert shapes  # (the cores themselves are not modified)


# ----------------------------------------------------------------------------- build
def test_info_reports_cuda_build_when_nvcc_present():
    info = tensorpress.info()
    built = info["cuda_kernels_built"]
    assert built == hasattr(_C, "tt_cuda_device_limits") == hasattr(_C, "svd_jacobi_cuda")
    if shutil.which("nvcc") and os.environ.get("TENSORPRESS_CUDA", "AUTO").upper() != "OFF":
        assert built, "nvcc is on PATH, so the default build (TENSORPRESS_CUDA=AUTO) compiles the CUDA kernels"
    if built:
        assert info["cuda_archs"] and info["cuda_compiler"].startswith("nvcc")
