"""Choosing how to contract x with a TT-matrix: which adjacent cores to pre-merge, in which
order to absorb the (merged) cores, or whether to rebuild W and run one dense GEMM; on CUDA
also which kernel runs the plan (fused in shared memory, or tiled through global memory).

The geometry of every step comes from the C++ plan (csrc/tt/tt_plan.h), and the CUDA
schedule from csrc/tt/tt_cuda_schedule.h, so the cost model and the kernels can never
disagree about shapes.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tensorpress._ext import _C

# The CPU cost of a fused plan, in FLOP-equivalents: its GEMMs' FLOPs, plus every element the
# permutations between them move, weighted by how the kernel moves it (csrc/tt/tt_plan.h,
# PermuteKind: memcpy runs, runs of < 16 elements, 2-D blocked transposes), plus every
# element a GEMM reads or writes. Fitted to the forward times of every fused plan of nine
# chains (benchmarks/tt_cost_model.py, results/tt_cost_model.md, 2-core EPYC): a moved element
# costs as much as 36-44 FLOPs, and the GEMM traffic term gets no weight once the moves are
# counted. The chosen plan's time over the fastest plan's, averaged over the chains: forward
# 11%, forward+backward 1% (the old weights, 4 / 8 / 16 and 1: 17% and 9%).
PERMUTE_FLOPS = {"copy": 36, "short_runs": 44, "transpose": 37}
GEMM_TRAFFIC_FLOPS = 0
# The dense route (W rebuilt, one GEMM through torch's BLAS) costs its FLOPs divided by
# `dense_speed_advantage()`. Where our OpenBLAS runs its AVX2 kernels (results/
# tt_cost_model_haswell.md) its forward alone ran at 0.68x the fused plans' rate per
# FLOP-equivalent, but in training its backward is leaner than the fused plans' (which
# recompute the forward and, in a layer, backpropagate through the merging); 1.0 makes the
# dense route win its tie with the single merged core (the same GEMM) and keeps it where the
# fused plans need as many FLOPs. With OpenBLAS's AVX-512 kernels on an AMD CPU, torch's MKL
# (AVX2 there) runs its GEMM at 0.42x the fused plans' rate (a first timing run on a Zen 5:
# mean regret 24% forward, 9% forward+backward with 1.0; results/tt_cost_model.md, a second
# run with 0.42: 4.5% and 8.6%).
DENSE_SPEED_ADVANTAGE = {"avx2": 1.0, "avx512_on_amd": 0.42}
AVX512_OPENBLAS_CORES = ("SkylakeX", "Cooperlake", "SapphireRapids")

# ---- CUDA cost model (seconds).
CUDA_PATHS = ("fused", "tiled", "decode", "dense")
# mirrors csrc/tt/tt_cuda_schedule.h: the tiled GEMM tile and the decode path's split limit
CUDA_TILE_M, CUDA_TILE_N, CUDA_TILE_K = 64, 64, 16
CUDA_DECODE_MAX_SPLITS = 32


@dataclass(frozen=True)
class CudaRates:
    """The rates of the CUDA cost model, FLOP/s and bytes/s. Defaults: an H100 SXM. The dense
    bf16 rate and the bandwidth are the workplace's measurements on one (an 8192^3 bf16 matmul at
    798 TFLOP/s, a device-to-device copy at 3.0 TB/s, .library/device/KINDS.md, 2026-11-13);
    the rest are first guesses, unmeasured until benchmarks/gpu_check.sh runs on a GPU, from
    the datasheet scaled by what each kernel leaves on the table: the fused and SIMT tiled
    kernels run FP32 FMAs on the CUDA cores out of shared memory (about 60 TFLOP/s peak); the
    tensor-core tiled GEMM gathers its operands with scalar loads, far from the wmma peak."""

    fused: float = 8e12
    # the fused kernels' in-block GEMMs on the tensor cores: their operands are gathered from
    # shared memory element by element, so far below the tiled kernel's rates (a guess)
    fused_tensor_core_half: float = 24e12
    fused_tensor_core_tf32: float = 16e12
    tiled_simt: float = 10e12
    tiled_tensor_core_half: float = 120e12  # fp16 / bf16 operands, float accumulation
    tiled_tensor_core_tf32: float = 60e12
    dense_fp32: float = 40e12  # cuBLAS SGEMM with TF32 off
    dense_tf32: float = 300e12
    dense_half: float = 798e12
    dense_fp64: float = 50e12
    bandwidth: float = 3.0e12
    launch_seconds: float = 4e-6  # per kernel launch (latency floor of small calls)

    def fused_rate(self, dtype_name: str, tensor_cores: bool) -> float:
        if tensor_cores and dtype_name in ("float16", "bfloat16"):
            return self.fused_tensor_core_half
        if tensor_cores and dtype_name == "float32":
            return self.fused_tensor_core_tf32
        return self.fused

    def tiled(self, dtype_name: str, tensor_cores: bool) -> float:
        if tensor_cores and dtype_name in ("float16", "bfloat16"):
            return self.tiled_tensor_core_half
        if tensor_cores and dtype_name == "float32":
            return self.tiled_tensor_core_tf32
        return self.tiled_simt

    def dense(self, dtype_name: str, tensor_cores: bool) -> float:
        if dtype_name in ("float16", "bfloat16"):
            return self.dense_half
        if dtype_name == "float64":
            return self.dense_fp64
        return self.dense_tf32 if tensor_cores else self.dense_fp32


H100_RATES = CudaRates()


def tensor_cores_for(dtype: torch.dtype) -> bool:
    """Whether the CUDA kernels' tiled GEMMs run on the tensor cores for inputs of `dtype`:
    always for float16 / bfloat16 (float accumulation, as torch's matmul), for float32 exactly
    when torch's own float32 matmul may use TF32 (torch.backends.cuda.matmul.allow_tf32, which
    torch.set_float32_matmul_precision("high" / "medium") turns on), never for float64."""
    if dtype in (torch.float16, torch.bfloat16):
        return True
    return dtype == torch.float32 and bool(torch.backends.cuda.matmul.allow_tf32)


CoreShape = tuple[int, int, int, int]


@dataclass(frozen=True)
class CudaLimits:
    """What the CUDA cost model needs to know about a device (see `cuda_limits`)."""

    smem_per_block: int
    smem_per_sm: int
    sm_count: int


# An H100 SXM: used by the cost model where no device can be asked (tests, CPU-only hosts).
H100_LIMITS = CudaLimits(smem_per_block=232448, smem_per_sm=233472, sm_count=132)


@dataclass(frozen=True)
class TTPlan:
    """A contraction plan for one batch size.

    groups: the partition of the cores into runs merged before the contraction.
    order:  the order in which the merged groups are absorbed (a growing interval).
    dense:  rebuild W once and run a single GEMM instead.
    flops:  arithmetic FLOPs of the whole call at this batch (merging included);
    dense_flops: what the dense route costs, for comparison.
    cost:   what the plan search minimized, in `cost_unit`: on the CPU "flop" (FLOPs plus
            memory-traffic terms in FLOP-equivalents), on CUDA "ps" (estimated picoseconds).
    """

    groups: tuple[tuple[int, ...], ...]
    order: tuple[int, ...]
    dense: bool
    batch: int
    flops: int
    dense_flops: int
    merged_shapes: tuple[CoreShape, ...]
    cost: int = 0
    # which kernel runs it: "cpu" (the CPU fused kernel), "dense", or on CUDA "fused" / "tiled"
    path: str = "cpu"
    cost_unit: str = "flop"  # the CPU model's FLOP-equivalents, or "ps" (the CUDA model's time)

    def __str__(self) -> str:
        if self.dense:
            return f"dense (rebuild W, one GEMM): {self.flops / 1e6:.1f} MFLOP at batch {self.batch}"
        groups = " ".join("[" + ",".join(map(str, g)) + "]" for g in self.groups)
        kernel = "fused TT" if self.path == "cpu" else f"CUDA {self.path} TT"
        return (
            f"{kernel}: groups {groups}, order {list(self.order)}: {self.flops / 1e6:.1f} MFLOP "
            f"at batch {self.batch} (dense {self.dense_flops / 1e6:.1f})"
        )


def _partitions(d: int):
    """All ways to cut 0..d-1 into contiguous runs."""
    for cuts in itertools.product((False, True), repeat=d - 1):
        groups, start = [], 0
        for k, cut in enumerate(cuts, start=1):
            if cut:
                groups.append(tuple(range(start, k)))
                start = k
        groups.append(tuple(range(start, d)))
        yield tuple(groups)


def _orders(d: int):
    """All absorb orders of d cores that grow one contiguous interval."""
    for start in range(d):
        n_left = start
        for left_positions in itertools.combinations(range(d - 1), n_left):
            order, lo, hi = [start], start, start
            for t in range(d - 1):
                if t in left_positions:
                    lo -= 1
                    order.append(lo)
                else:
                    hi += 1
                    order.append(hi)
            yield tuple(order)


def merge_shapes(shapes: tuple[CoreShape, ...], group: tuple[int, ...]) -> tuple[CoreShape, int]:
    """Shape of the merged core of a group, and the FLOPs of merging it left to right."""
    r0, m, n, r = shapes[group[0]]
    flops = 0
    for k in group[1:]:
        _, mk, nk, rk = shapes[k]
        flops += 2 * r0 * m * n * r * mk * nk * rk
        m, n, r = m * mk, n * nk, rk
    return (r0, m, n, r), flops


def dense_flops(shapes: tuple[CoreShape, ...], batch: int) -> int:
    (_, M, N, _), merge = merge_shapes(shapes, tuple(range(len(shapes))))
    return merge + 2 * batch * M * N


def dense_route_cost(shapes: tuple[CoreShape, ...], batch: int) -> int:
    """What the plan search charges for rebuilding W and running one GEMM."""
    return int(dense_flops(shapes, batch) / dense_speed_advantage())


@functools.cache
def dense_speed_advantage() -> float:
    """How fast torch's dense GEMM runs per FLOP against the fused kernel's FLOP-equivalent,
    by which kernels our OpenBLAS runs (fixed when it loads) and the CPU's vendor."""
    from tensorpress._ext import cpu_vendor, openblas_core

    return DENSE_SPEED_ADVANTAGE[gemm_family(openblas_core(), cpu_vendor())]


def gemm_family(openblas_core: str, cpu_vendor: str) -> str:
    """The key of DENSE_SPEED_ADVANTAGE: MKL (torch's BLAS) runs AVX-512 on Intel only."""
    if openblas_core in AVX512_OPENBLAS_CORES and cpu_vendor == "AuthenticAMD":
        return "avx512_on_amd"
    return "avx2"


def flat_dims(shapes) -> list[int]:
    return [int(v) for s in shapes for v in s]


class Permutation(NamedTuple):
    """A permutation of each sample's state: view it as `dims`, permute the axes by `perm`."""

    dims: tuple[int, ...]
    perm: tuple[int, ...]
    identity: bool


class PlanStep(NamedTuple):
    """One absorbed core: permute the state (`before`), then a (rows x K) @ (K x N) GEMM per
    sample with the core laid out as `core_perm` of its axes, reshaped (K, N)."""

    core: int
    before: Permutation
    rows: int
    K: int
    N: int
    core_perm: tuple[int, ...]
    flops: int


class PermutedElements(NamedTuple):
    """Elements a sample's permutations move, by how the kernel moves them."""

    copy: int
    short_runs: int
    transpose: int


class PlanGeometry(NamedTuple):
    """The C++ plan's geometry for merged cores and an absorb order (csrc/tt/tt_plan.h)."""

    steps: tuple[PlanStep, ...]
    final: Permutation
    in_features: int
    out_features: int
    flops_per_sample: int
    permute_elements: PermutedElements
    max_state: int


def _permutation(d: dict) -> Permutation:
    return Permutation(tuple(d["dims"]), tuple(d["perm"]), bool(d["identity"]))


@torch.compiler.assume_constant_result  # a pure function of static shapes
def plan_info(core_dims: tuple[int, ...], order: tuple[int, ...]) -> PlanGeometry:
    """The C++ plan's geometry (steps, permutations, GEMM shapes) for merged core dims."""
    return _plan_info(tuple(core_dims), tuple(order))


@functools.lru_cache(maxsize=4096)
def _plan_info(core_dims: tuple[int, ...], order: tuple[int, ...]) -> PlanGeometry:
    # the one place the extension's dict is read: everything else sees typed fields
    d = _C.tt_plan_info(list(core_dims), list(order))
    steps = tuple(
        PlanStep(
            int(s["core"]),
            _permutation(s["before"]),
            int(s["rows"]),
            int(s["K"]),
            int(s["N"]),
            tuple(s["core_perm"]),
            int(s["flops"]),
        )
        for s in d["steps"]
    )
    moved = d["permute_elements"]
    return PlanGeometry(
        steps,
        _permutation(d["final"]),
        int(d["in_features"]),
        int(d["out_features"]),
        int(d["flops_per_sample"]),
        PermutedElements(int(moved["copy"]), int(moved["short_runs"]), int(moved["transpose"])),
        int(d["max_state"]),
    )


def plan_cost(merged: tuple[CoreShape, ...], order: tuple[int, ...], batch: int) -> int:
    """Estimated cost, in FLOP-equivalents, of contracting a batch with already merged cores."""
    info = plan_info(tuple(flat_dims(merged)), tuple(order))
    per_sample = info.flops_per_sample
    per_sample += sum(PERMUTE_FLOPS[kind] * n for kind, n in info.permute_elements._asdict().items())
    per_sample += GEMM_TRAFFIC_FLOPS * sum(s.rows * (s.K + s.N) for s in info.steps)
    return batch * per_sample


@functools.lru_cache(maxsize=4096)
def ranked_plans(
    shapes: tuple[CoreShape, ...], batch: int, allow_dense: bool = True, training: bool = False
) -> tuple[TTPlan, ...]:
    """Every fused plan (merge partition x absorb order), and the dense route when allowed,
    cheapest first by the cost model; the first is what `choose_plan` returns on CPU.

    training: the cores need gradients. Then the single merged core (all cores in one group)
    is left out where the dense route is allowed: it is the dense route's GEMM, but its
    backward runs the generic merge chain over W-sized tensors (a 1024^2 rank-16 layer,
    batch 256: 15.3 ms a step against the dense route's 10), where the dense route
    differentiates through W's two halves (`tt_dense.py`).
    """
    plans, dense = [], dense_flops(shapes, batch)
    for groups in _partitions(len(shapes)):
        if training and allow_dense and len(groups) == 1:
            continue
        merged, merge_cost = zip(*(merge_shapes(shapes, g) for g in groups))
        merge_flops = sum(merge_cost)
        for order in _orders(len(groups)):
            cost = merge_flops + plan_cost(merged, order, batch)
            flops = merge_flops + batch * plan_info(tuple(flat_dims(merged)), tuple(order)).flops_per_sample
            plans.append(TTPlan(groups, order, False, batch, flops, dense, tuple(merged), cost))
    if allow_dense:
        plans.append(_dense_plan(shapes, batch, dense_route_cost(shapes, batch)))
    # ties go to the dense route (one big GEMM runs faster), then to the plan found first
    plans.sort(key=lambda p: (p.cost, not p.dense))
    return tuple(plans)


def _dense_plan(shapes: tuple[CoreShape, ...], batch: int, cost: int, cost_unit: str = "flop") -> TTPlan:
    everything = tuple(range(len(shapes)))
    flops = dense_flops(shapes, batch)
    return TTPlan(
        (everything,),
        (0,),
        True,
        batch,
        flops,
        flops,
        (merge_shapes(shapes, everything)[0],),
        cost,
        path="dense",
        cost_unit=cost_unit,
    )


@torch.compiler.assume_constant_result  # pure function of static shapes: torch.compile folds it
def choose_plan(
    shapes,
    batch: int,
    allow_dense: bool = True,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    training: bool = False,
) -> TTPlan:
    """The cheapest plan for cores of the given shapes at this batch size, by the cost model
    alone (a pure function of its arguments; `ops.tt.select_plan` adds the opt-in autotune).

    CPU (default): by FLOP count plus traffic terms; searches every contiguous merge partition
    and every absorb order (2^(d-1) x 2^(d'-1) candidates, cached), and the dense route when
    `allow_dense`; `training` (the cores need gradients) leaves out plans whose backward is
    known to lose (see `ranked_plans`). device="cuda": by the CUDA cost model
    (`choose_cuda_plan`) for the current CUDA device (or an H100's limits where none can be
    asked); `dtype` is the input's dtype.
    """
    shapes = tuple(tuple(int(v) for v in s) for s in shapes)
    if str(device).startswith("cuda"):
        return choose_cuda_plan(shapes, batch, cuda_limits(device), dtype, allow_dense)
    return ranked_plans(shapes, int(batch), bool(allow_dense), bool(training))[0]


# ----------------------------------------------------------------------------- CUDA
def cuda_limits(device="cuda") -> CudaLimits:
    """The device's shared-memory and SM limits, or an H100's where the build has no CUDA
    kernels or no GPU is visible."""
    if not hasattr(_C, "tt_cuda_device_limits") or not torch.cuda.is_available():
        return H100_LIMITS
    dev = torch.device(device)
    return _device_limits(torch.cuda.current_device() if dev.index is None else dev.index)


@functools.cache
def _device_limits(index: int) -> CudaLimits:
    return CudaLimits(**_C.tt_cuda_device_limits(index))


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def cuda_schedule(
    merged: tuple[CoreShape, ...],
    order: tuple[int, ...],
    batch: int,
    backward: bool,
    dtype,
    limits: CudaLimits,
    path: str = "auto",
    tensor_cores: bool = False,
) -> CudaSchedule:
    """The C++ schedule of one CUDA call: path, samples per block, grid, shared memory and
    workspace (elements of the accumulation type: float64 for float64 inputs, else float32).
    `tensor_cores`: the call's GEMMs run on them (the fused kernels then reserve shared memory
    to stage their operand tiles)."""
    return _cuda_schedule(
        tuple(flat_dims(merged)),
        tuple(order),
        int(batch),
        bool(backward),
        8 if _dtype_name(dtype) == "float64" else 4,
        limits,
        path,
        bool(tensor_cores),
    )


class CudaSchedule(NamedTuple):
    """How one CUDA call runs (csrc/tt/tt_cuda_schedule.h): the path ("fused", "tiled" or
    "decode"), whether the fused kernel fits, samples per block, chunks of samples, grid,
    shared memory per block (bytes), split blocks of the tiled backward, workspace (accumulator
    elements), and the blocks each decode step aims for."""

    path: str
    fits_fused: bool
    samples: int
    chunks: int
    grid: int
    smem_bytes: int
    splits: int
    workspace: int
    target_blocks: int


def decode_split(rows: int, K: int, N: int, target: int) -> tuple[int, int]:
    """(splits, slice length) of one decode step's K range: the C++ decode_split, for the
    cost model (a test checks the two agree through the workspace they size)."""
    tiles = math.ceil(rows / CUDA_TILE_M) * math.ceil(N / CUDA_TILE_N)
    most = max(1, min(CUDA_DECODE_MAX_SPLITS, math.ceil(K / CUDA_TILE_K)))
    want = max(1, min(most, math.ceil(target / max(1, tiles))))
    per = math.ceil(math.ceil(K / want) / CUDA_TILE_K) * CUDA_TILE_K
    return math.ceil(K / per), per


@functools.lru_cache(maxsize=8192)
def _cuda_schedule(core_dims, order, batch, backward, acc_bytes, limits, path, tensor_cores) -> CudaSchedule:
    return CudaSchedule(
        **_C.tt_cuda_schedule(
            list(core_dims),
            list(order),
            batch,
            backward,
            acc_bytes,
            limits.smem_per_block,
            limits.smem_per_sm,
            limits.sm_count,
            path,
            tensor_cores,
        )
    )


def cuda_plan_costs(
    merged: tuple[CoreShape, ...],
    order: tuple[int, ...],
    batch: int,
    limits: CudaLimits,
    dtype=torch.float32,
    tensor_cores: bool = False,
    rates: CudaRates = H100_RATES,
) -> dict[str, float]:
    """Estimated seconds of the forward of one plan by each CUDA kernel that can run it:
    {"fused": s, "tiled": s, "decode": s} ("fused" only where one sample's intermediates fit
    in shared memory). `tensor_cores`: the tiled GEMMs run on them (`tensor_cores_for`; the
    decode path's split GEMMs are SIMT)."""
    info = plan_info(tuple(flat_dims(merged)), tuple(order))
    elem = torch.empty((), dtype=dtype).element_size()
    acc = 8 if elem == 8 else 4
    flops = batch * info.flops_per_sample
    io_bytes = batch * (info.in_features + info.out_features) * elem
    costs = {}
    fused = cuda_schedule(merged, order, batch, False, dtype, limits, tensor_cores=tensor_cores)
    if fused.fits_fused:
        # blocks of `samples` samples: fewer blocks than SMs leave SMs idle
        busy = min(1.0, max(fused.chunks, 1) / limits.sm_count)
        fused_rate = rates.fused_rate(_dtype_name(dtype), tensor_cores)
        costs["fused"] = rates.launch_seconds + flops / (fused_rate * busy) + io_bytes / rates.bandwidth
    # tiled: one GEMM launch per step (and the output permutation) per chunk of the batch,
    # each filling only as many SMs as it has 64 x 64 output tiles
    tiled = cuda_schedule(merged, order, batch, False, dtype, limits, "tiled")
    chunks = max(tiled.chunks, 1)
    seconds = chunks * rates.launch_seconds
    tiled_rate = rates.tiled(_dtype_name(dtype), tensor_cores)
    for s in info.steps:
        rows = tiled.samples * s.rows
        tiles = math.ceil(rows / 64) * math.ceil(s.N / 64)
        busy = min(1.0, tiles / limits.sm_count)
        step_flops = 2 * rows * s.K * s.N
        step_bytes = rows * (s.K + s.N) * acc
        seconds += chunks * (rates.launch_seconds + step_flops / (tiled_rate * busy) + step_bytes / rates.bandwidth)
    costs["tiled"] = seconds + io_bytes / rates.bandwidth
    # decode: the SIMT tiled GEMMs with each step's K range split until the step's launch has
    # about two blocks per SM; the partial products cross L2 / device memory once more (written
    # by a step, summed by the next one's reads)
    decode = cuda_schedule(merged, order, batch, False, dtype, limits, "decode")
    chunks = max(decode.chunks, 1)
    seconds = chunks * rates.launch_seconds  # the final permutation, summing the last partials
    prev_splits = 1
    for s in info.steps:
        rows = decode.samples * s.rows
        splits, _ = decode_split(rows, s.K, s.N, decode.target_blocks)
        tiles = math.ceil(rows / CUDA_TILE_M) * math.ceil(s.N / CUDA_TILE_N)
        busy = min(1.0, tiles * splits / limits.sm_count)
        step_flops = 2 * rows * s.K * s.N
        step_bytes = (rows * s.K * prev_splits + rows * s.N * splits + s.K * s.N) * acc
        seconds += chunks * (
            rates.launch_seconds + step_flops / (rates.tiled_simt * busy) + step_bytes / rates.bandwidth
        )
        prev_splits = splits
    costs["decode"] = seconds + io_bytes / rates.bandwidth
    return costs


def cuda_dense_cost(
    shapes: tuple[CoreShape, ...],
    batch: int,
    dtype=torch.float32,
    tensor_cores: bool = False,
    rates: CudaRates = H100_RATES,
) -> float:
    """Estimated seconds of rebuilding W (einsum merges) and one cuBLAS GEMM."""
    (_, M, N, _), merge = merge_shapes(shapes, tuple(range(len(shapes))))
    elem = torch.empty((), dtype=dtype).element_size()
    rate = rates.dense(_dtype_name(dtype), tensor_cores)
    traffic = (M * N * 3 + batch * (M + N)) * elem  # W written by the merge, cast, read by the GEMM
    return len(shapes) * rates.launch_seconds + (merge + 2 * batch * M * N) / rate + traffic / rates.bandwidth


def choose_cuda_plan(
    shapes,
    batch: int,
    limits: CudaLimits = H100_LIMITS,
    dtype=torch.float32,
    allow_dense: bool = True,
    tensor_cores: bool | None = None,
    rates: CudaRates = H100_RATES,
) -> TTPlan:
    """The fastest CUDA route by the cost model above: the best (partition, order, kernel) of
    the fused and tiled kernels, or the dense route. Pure host logic (runs without a GPU);
    the choice is `plan.path`. `tensor_cores`: whether the tiled GEMMs (and, for float32,
    cuBLAS) use the tensor cores; None: as a call would now (`tensor_cores_for(dtype)`)."""
    shapes = tuple(tuple(int(v) for v in s) for s in shapes)
    tc = tensor_cores_for(dtype) if tensor_cores is None else bool(tensor_cores)
    return _choose_cuda(shapes, int(batch), limits, _dtype_name(dtype), bool(allow_dense), tc, rates)


@functools.lru_cache(maxsize=4096)
def _choose_cuda(shapes, batch, limits, dtype_name, allow_dense, tensor_cores, rates) -> TTPlan:
    dtype = getattr(torch, dtype_name)
    d = len(shapes)
    best = None
    for groups in _partitions(d):
        merged, merge_cost = zip(*(merge_shapes(shapes, g) for g in groups))
        merge_seconds = sum(merge_cost) / rates.dense_fp32 + (len(shapes) - len(groups)) * rates.launch_seconds
        for order in _orders(len(groups)):
            costs = cuda_plan_costs(tuple(merged), order, batch, limits, dtype, tensor_cores, rates)
            for path, seconds in costs.items():
                total = merge_seconds + seconds
                if best is None or total < best[0]:
                    best = (total, groups, order, tuple(merged), path)
    assert best is not None  # every chain has at least one partition and order
    seconds, groups, order, merged, path = best
    if allow_dense:
        dense_seconds = cuda_dense_cost(shapes, batch, dtype, tensor_cores, rates)
        if dense_seconds <= seconds:
            return _dense_plan(shapes, batch, int(dense_seconds * 1e12), "ps")
    merge_flops = sum(merge_shapes(shapes, g)[1] for g in groups)
    flops = merge_flops + batch * plan_info(tuple(flat_dims(merged)), tuple(order)).flops_per_sample
    return TTPlan(
        groups,
        order,
        False,
        batch,
        flops,
        dense_flops(shapes, batch),
        merged,
        int(seconds * 1e12),
        path=path,
        cost_unit="ps",
    )
