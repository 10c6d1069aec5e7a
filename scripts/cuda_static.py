#!/usr/bin/env python3
"""Static checks of the CUDA sources (issue 23, item 5), one command:

    python scripts/cuda_static.py            # checks, then writes benchmarks/results/cuda_static.md

Every .cu file under csrc/ is compiled with nvcc (`-c`, objects in a temporary folder, at most
`--jobs` compiles at a time) for every architecture of TENSORPRESS_CUDA_ARCHS' default in
CMakeLists.txt, with the build's flags plus `-Werror all-warnings`, `-Xptxas
-warn-spills,-warn-lmem-usage` and `-Xptxas -v`. It fails (exit status 1, one line per finding
naming the kernel and the architecture) on any compiler warning, any register spill and any
local memory (stack frame) of a function that is not in ALLOWED_LOCAL_MEMORY below.

From ptxas's resource report it tabulates, per kernel and architecture: registers, static
shared memory, the launch configuration (threads per block, dynamic shared memory of a stated
representative call) and the theoretical occupancy that follows on an A100 (sm_80) and an H100
(sm_90), by the rules of CUDA's occupancy calculator (`occupancy` below). The report is
written even when a check fails (its result line says so); the exit status is what CI reads.

Python standard library only; needs nvcc on PATH (c++filt, from binutils, to demangle names).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "results" / "cuda_static.md"

# Kernels (or non-inlined device functions) allowed to spill or to use local memory, by their
# short name as the report prints it ("fused_backward_kernel<f64,f64>"; fnmatch patterns, or
# "name@sm_90" for one architecture only), each with the reason.
_SM80_TC_BACKWARD = (
    "sm_80's ptxas keeps the fp16/bf16 tensor-core fused backward (two inlined block_gemm_tc: the "
    "core gradient and the input gradient) at 80 registers with a 40-byte frame and about 120 bytes of "
    "spill loads per thread; sm_90 compiles it without. A __noinline__ block_gemm_tc was tried: it put a "
    "64-208 byte frame in every tensor-core fused kernel. Cost unmeasured until a GPU run."
)
ALLOWED_LOCAL_MEMORY: dict[str, str] = {
    "fused_backward_kernel<f16,f32,true>@sm_80": _SM80_TC_BACKWARD,
    "fused_backward_kernel<bf16,f32,true>@sm_80": _SM80_TC_BACKWARD,
}

# The build's flags for the .cu files (CMakeLists.txt, Release): -O3 -DNDEBUG, C++17, -lineinfo,
# position-independent host code, include dir csrc, TENSORPRESS_WITH_CUDA=1. The host side gets
# the -Wall -Wextra that CMake gives the C++ sources.
BUILD_FLAGS = ["-std=c++17", "-O3", "-DNDEBUG", "-lineinfo", "-Xcompiler=-fPIC", "-DTENSORPRESS_WITH_CUDA=1"]
CHECK_FLAGS = [
    "-Werror",
    "all-warnings",
    "-Xcompiler=-Wall,-Wextra",
    "-Xptxas",
    "-warn-spills,-warn-lmem-usage",
    "-Xptxas",
    "-v",
]


# ----------------------------------------------------------------------------- occupancy
@dataclasses.dataclass(frozen=True)
class Device:
    """What the occupancy rules need to know about one GPU (CUDA programming guide, table of
    technical specifications per compute capability; cuda_occupancy.h)."""

    name: str
    regs_per_sm: int = 65536
    regs_per_block: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers are allocated per warp, in units of 256
    sub_partitions: int = 4  # warps' registers come from 4 SM sub-partitions
    max_threads_per_block: int = 1024
    max_warps_per_sm: int = 64  # 2048 threads
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 0  # shared memory of an SM at the largest carveout
    smem_per_block: int = 0  # opt-in maximum per block (static + dynamic)
    smem_reserved_per_block: int = 1024  # taken by CUDA from every block since sm_80
    smem_alloc_unit: int = 128


DEVICES = {
    "80": Device("A100", smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    "90": Device("H100", smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}


@dataclasses.dataclass(frozen=True)
class Occupancy:
    blocks: int  # resident blocks per SM
    warps: int  # resident warps per SM
    fraction: float  # warps / max warps per SM
    limiter: str  # which limit gives `blocks` ("registers", "shared memory", "warps", "blocks"; ties joined)


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(threads: int, regs: int, smem_static: int, smem_dynamic: int, dev: Device) -> Occupancy:
    """Theoretical occupancy of a kernel launched with `threads` per block, by the rules of
    CUDA's occupancy calculator (cuda_occupancy.h, cudaOccMaxActiveBlocksPerMultiprocessor):

      warps per block  W = ceil(threads / 32)
      registers:       each warp gets R = roundup(regs * 32, 256) registers, drawn from one of
                       4 sub-partitions of regs_per_sm / 4 each, so an SM holds
                       4 * floor(regs_per_sm / 4 / R) warps: floor(that / W) blocks (a block
                       must also pass the per-block check R * roundup(W, 4) <= regs_per_block);
      shared memory:   a block takes roundup(static + dynamic + 1 KB reserved, 128) bytes:
                       floor(smem_per_sm / that) blocks (none if static + dynamic exceeds the
                       per-block maximum);
      warps, blocks:   floor(max_warps_per_sm / W) and max_blocks_per_sm.

    The resident blocks are the least of the four; occupancy = blocks * W / max_warps_per_sm.
    """
    if threads <= 0 or threads > dev.max_threads_per_block or regs > dev.max_regs_per_thread:
        return Occupancy(0, 0, 0.0, "launch fails")
    w = -(-threads // 32)
    limits = {"warps": dev.max_warps_per_sm // w, "blocks": dev.max_blocks_per_sm}
    if regs > 0:
        per_warp = _round_up(regs * 32, dev.reg_alloc_unit)
        if per_warp * _round_up(w, dev.sub_partitions) > dev.regs_per_block:
            limits["registers"] = 0
        else:
            limits["registers"] = dev.sub_partitions * (dev.regs_per_sm // dev.sub_partitions // per_warp) // w
    user = smem_static + smem_dynamic
    if user > dev.smem_per_block:
        limits["shared memory"] = 0
    elif user > 0:
        limits["shared memory"] = dev.smem_per_sm // _round_up(user + dev.smem_reserved_per_block, dev.smem_alloc_unit)
    blocks = min(limits.values())
    limiter = "+".join(k for k in ("registers", "shared memory", "warps", "blocks") if limits.get(k) == blocks)
    return Occupancy(blocks, blocks * w, blocks * w / dev.max_warps_per_sm, limiter)


def max_dynamic_smem(threads: int, regs: int, smem_static: int, dev: Device) -> int:
    """The most dynamic shared memory per block (bytes) at which shared memory does not lower the
    occupancy below what registers, warps and the block limit allow."""
    blocks = occupancy(threads, regs, 0, 0, dev).blocks
    if blocks == 0:
        return 0
    per_block = (dev.smem_per_sm // blocks) // dev.smem_alloc_unit * dev.smem_alloc_unit
    return max(0, min(per_block - dev.smem_reserved_per_block, dev.smem_per_block) - smem_static)


# ----------------------------------------------------------------------------- ptxas output
@dataclasses.dataclass
class Function:
    """ptxas's report of one function for one architecture."""

    mangled: str
    entry: bool = False
    regs: int = 0
    barriers: int = 0
    smem: int = 0  # static shared memory (bytes)
    stack: int = 0  # stack frame (bytes): local memory
    spill_stores: int = 0
    spill_loads: int = 0
    cumulative_stack: int = 0
    lmem_warned: bool = False
    spill_warned: bool = False


_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"ptxas info\s*: Function properties for (\S+)")
_FRAME = re.compile(r"^\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers")
_LMEM = re.compile(r"ptxas (?:warning|error)\s*: Local memory used for function '([^']+)', size of stack frame: (\d+)")
_SPILL = re.compile(
    r"ptxas (?:warning|error)\s*: Registers are spilled to local memory in function '([^']+)', "
    r"(\d+) bytes spill stores, (\d+) bytes spill loads"
)
# "f.cu(1): error #177-D: ...", "f.cu:2:15: warning: ...", "nvcc warning : ...", "cc1plus: fatal error: ..."
_DIAG = re.compile(r"\b(warning|error)\s*(#[\w-]+\s*)?:", re.IGNORECASE)
_SUMMARY = re.compile(r"errors? detected in the compilation of")


def _field(pattern: str, line: str) -> int:
    m = re.search(pattern, line)
    return int(m.group(1)) if m else 0


def parse_ptxas(text: str) -> tuple[dict[str, Function], list[str]]:
    """The functions of one compile's output (by mangled name) and its diagnostics that are not
    ptxas's spill / local-memory reports (compiler warnings and errors, as printed)."""
    funcs: dict[str, Function] = {}
    diagnostics: list[str] = []
    entry = props = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            entry = funcs.setdefault(m.group(1), Function(m.group(1)))
            entry.entry = True
        elif m := _PROPS.search(line):
            props = funcs.setdefault(m.group(1), Function(m.group(1)))
        elif (m := _FRAME.search(line)) and props is not None:
            props.stack, props.spill_stores, props.spill_loads = map(int, m.groups())
            props = None
        elif _USED.search(line) and entry is not None:
            entry.regs = _field(r"Used (\d+) registers", line)
            entry.barriers = _field(r"used (\d+) barriers", line)
            entry.smem = _field(r"(\d+) bytes smem", line)
            entry.cumulative_stack = _field(r"(\d+) bytes cumulative stack size", line)
        elif m := _LMEM.search(line):
            f = funcs.setdefault(m.group(1), Function(m.group(1)))
            f.lmem_warned, f.stack = True, max(f.stack, int(m.group(2)))
        elif m := _SPILL.search(line):
            f = funcs.setdefault(m.group(1), Function(m.group(1)))
            f.spill_warned = True
            f.spill_stores, f.spill_loads = max(f.spill_stores, int(m.group(2))), max(f.spill_loads, int(m.group(3)))
        elif _DIAG.search(line) and not _SUMMARY.search(line) and not line.startswith("ptxas info"):
            diagnostics.append(line.strip())
    return funcs, diagnostics


_TYPES = {"float": "f32", "double": "f64", "__half": "f16", "__nv_bfloat16": "bf16"}


def short_name(demangled: str) -> str:
    """'void ns::(anonymous namespace)::k<float, __half>(ns::Args<float>)' -> 'k<f32,f16>': no
    return type, namespaces or parameters; the element types as f32 / f64 / f16 / bf16."""
    s = demangled.strip()
    if s.endswith(")"):  # drop the parameter list (the last balanced parentheses)
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(s[i], 0)
            if depth == 0:
                s = s[:i]
                break
    s = re.sub(r"^void\s+", "", s)
    s = s.replace("(anonymous namespace)::", "")
    s = re.sub(r"\b[A-Za-z_]\w*::", "", s)
    s = re.sub(r"\b(" + "|".join(_TYPES) + r")\b", lambda m: _TYPES[m.group(1)], s)
    return s.replace(", ", ",")


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled, through c++filt (or cu++filt); names unchanged without one."""
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not names or tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    return {n: (d if len(lines) == len(names) else n) for n, d in zip(names, lines)}


# ----------------------------------------------------------------------------- configuration
def default_archs(root: Path = ROOT) -> list[str]:
    """TENSORPRESS_CUDA_ARCHS' default in CMakeLists.txt ("80;90" -> ["80", "90"])."""
    text = (root / "CMakeLists.txt").read_text()
    m = re.search(r'set\(TENSORPRESS_CUDA_ARCHS\s+"([^"]+)"', text)
    if not m:
        raise SystemExit("cuda_static: TENSORPRESS_CUDA_ARCHS' default not found in CMakeLists.txt")
    return [a.strip() for a in m.group(1).split(";") if a.strip()]


def cuda_sources(root: Path = ROOT) -> list[str]:
    """The .cu files the CUDA build compiles (CMakeLists.txt's `list(APPEND TP_SOURCES ...)` of .cu
    files), so test-only sources (csrc/testing/, built for the CPU emulation) stay out."""
    text = (root / "CMakeLists.txt").read_text()
    files = [
        f
        for m in re.finditer(r"list\(APPEND\s+TP_SOURCES\s+([^)]*)\)", text)
        for f in m.group(1).split()
        if f.endswith(".cu")
    ]
    if not files:
        raise SystemExit("cuda_static: no .cu files appended to TP_SOURCES in CMakeLists.txt")
    return sorted(set(files))


def source_constant(path: Path, name: str) -> int:
    """The value of `constexpr int name = N;` in a source file."""
    m = re.search(r"constexpr\s+int\s+(?:\w+\s*=\s*\d+\s*,\s*)*" + name + r"\s*=\s*(\d+)", path.read_text())
    if not m:
        raise SystemExit(f"cuda_static: `constexpr int {name}` not found in {path}")
    return int(m.group(1))


@dataclasses.dataclass(frozen=True)
class Launch:
    threads: int
    dynamic_smem: int
    config: str  # key of the configuration legend


# A100 / H100 limits the TT schedule sees (tt_cuda_schedule.h CudaLimits: opt-in smem per
# block, smem per SM, SMs) and the representative calls whose dynamic shared memory the report
# uses. The numbers come from the C++ schedule (_C.tt_cuda_schedule, _C.svd_jacobi_cuda_smem_bytes);
# tests/test_cuda_static.py recomputes them, so they cannot drift from the code.
SCHEDULE_LIMITS = {"80": (166912, 167936, 108), "90": (232448, 233472, 132)}
TT_CALL = dict(core_dims=[1, 4, 4, 8, 8, 4, 4, 8, 8, 4, 4, 8, 8, 4, 4, 1], order=[0, 1, 2, 3], batch=256)
FUSED_SMEM = {  # (kernel, accumulator bytes) -> {arch: dynamic shared memory of TT_CALL, bytes}
    ("fused_forward_kernel", 4): {"80": 42384, "90": 26000},
    ("fused_forward_kernel", 8): {"80": 84768, "90": 52000},
    ("fused_backward_kernel", 4): {"80": 93584, "90": 51600},
    ("fused_backward_kernel", 8): {"80": 103200, "90": 103200},
}
JACOBI_CALL = (64, 64)  # m x n: the widest block the CUDA Jacobi takes (JACOBI_MAX_COLUMNS_CUDA)
JACOBI_SMEM = 66816  # jacobi_cuda_smem_bytes(64, 64)

CONFIG_LEGEND = {
    "T": "threads = kCudaThreads (tt_cuda_schedule.h); no dynamic shared memory (tiled GEMMs, SIMT and tensor-core; "
    "gather, reduce)",
    "F": "fused TT at its scheduled dynamic shared memory for TT 256x256, cores (1,4,4,8) (8,4,4,8) (8,4,4,8) "
    "(8,4,4,1) (rank 8), one step per core in order, batch 256 (the path and plan the CUDA cost model picks "
    "for float32 on both GPUs): tt_cuda_schedule.h with the GPU's limits packs 1 (H100) or 2 (A100) samples "
    "per block (backward float64 on A100: 1)",
    "J": "Jacobi SVD at its worst-case block, 32 * min(kMaxWarps, (k + 1) / 2) threads, here k = 64: "
    "one 64 x 64 matrix per block (jacobi_cuda_smem_bytes(64, 64) bytes of dynamic shared memory)",
}


def launch_of(name: str, arch: str, tt_threads: int, jacobi_threads: int) -> Launch | None:
    """The launch configuration the report assumes for a kernel (short name), or None."""
    base = name.split("<", 1)[0]
    args = name[len(base) + 1 : -1].split(",") if "<" in name else []
    if base in ("tiled_gemm_kernel", "tiled_gemm_tc_kernel", "gather_rows_kernel", "reduce_partials_kernel"):
        return Launch(tt_threads, 0, "T")
    if base in ("fused_forward_kernel", "fused_backward_kernel"):
        acc = 8 if args[-1:] == ["f64"] else 4
        smem = FUSED_SMEM.get((base, acc), {}).get(arch)
        return Launch(tt_threads, smem, "F") if smem is not None else None
    if base == "jacobi_kernel":
        return Launch(jacobi_threads, JACOBI_SMEM, "J")
    return None


# ----------------------------------------------------------------------------- compiling
@dataclasses.dataclass
class Job:
    source: str  # relative to the source root
    arch: str
    command: list[str]
    returncode: int = 0
    output: str = ""
    seconds: float = 0.0


def run_job(job: Job, cwd: Path) -> Job:
    t0 = time.perf_counter()
    p = subprocess.run(job.command, cwd=cwd, capture_output=True, text=True)
    job.returncode, job.output, job.seconds = p.returncode, p.stdout + p.stderr, time.perf_counter() - t0
    return job


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [\d.]+, V[\d.]+", out)
    return m.group(0) if m else out.strip().splitlines()[-1]


def allowed(name: str, arch: str) -> str | None:
    """The allow-list's reason for `name` on sm_`arch`, or None."""
    for pattern, reason in ALLOWED_LOCAL_MEMORY.items():
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(f"{name}@sm_{arch}", pattern):
            return reason
    return None


@dataclasses.dataclass
class Row:
    source: str
    arch: str
    name: str
    f: Function


def check(jobs: list[Job]) -> tuple[list[Row], list[str]]:
    """Rows of every function compiled, and the findings (one line each) that fail the check."""
    parsed = [(job, *parse_ptxas(job.output)) for job in jobs]
    names = demangle(sorted({m for _, funcs, _ in parsed for m in funcs}))
    rows, findings = [], []
    for job, funcs, diagnostics in parsed:
        where = f"sm_{job.arch} {job.source}"
        for d in diagnostics:
            findings.append(f"{where}: {d}")
        for f in funcs.values():
            name = short_name(names[f.mangled])
            rows.append(Row(job.source, job.arch, name, f))
            issues = []
            if f.stack or f.lmem_warned or f.cumulative_stack:
                issues.append(f"{max(f.stack, f.cumulative_stack)} bytes of local memory (stack frame)")
            if f.spill_stores or f.spill_loads or f.spill_warned:
                issues.append(f"{f.spill_stores} bytes spill stores, {f.spill_loads} bytes spill loads")
            if issues and allowed(name, job.arch) is None:
                kind = "kernel" if f.entry else "device function"
                findings.append(f"{where}: {kind} {name}: {'; '.join(issues)} (not in ALLOWED_LOCAL_MEMORY)")
        # under -Werror, ptxas's spill / local-memory reports fail the compile: already accounted
        # for above (a finding, or allowed)
        explained = not diagnostics and any(f.lmem_warned or f.spill_warned for f in funcs.values())
        if job.returncode != 0 and not explained:
            tail = "\n    ".join(job.output.strip().splitlines()[-15:])
            findings.append(f"{where}: nvcc exited with status {job.returncode}:\n    {tail}")
    rows.sort(key=lambda r: (r.arch, r.source, r.name.split("<")[0], r.name))
    return rows, findings


# ----------------------------------------------------------------------------- report
def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def revision(source_rev: str | None) -> str:
    """The commit whose sources were compiled; for the working tree, with a note when csrc/ or
    CMakeLists.txt differ from it (the rest of the tree does not change what is compiled)."""
    if source_rev:
        return git("rev-parse", "--short", source_rev) or source_rev
    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "csrc", "CMakeLists.txt")
    return rev + (" + uncommitted changes in csrc/ or CMakeLists.txt" if dirty else "")


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n else "0"


# ----------------------------------------------------------------------------- tensor cores in the PTX
# The kernels that must run on the tensor cores (issue 24): in csrc/tt/tt_cuda.cu's PTX, every
# instantiation of these entries holds warp matrix instructions, one instantiation per operand
# type named (mangled fragments of the template arguments).
TENSOR_CORE_SOURCE = "csrc/tt/tt_cuda.cu"
# kernel -> {operand type: what its instantiation's mangled name holds}. The fused kernels have
# a tensor-core instantiation (template flag true, mangled Lb1E) for every element type but
# float64 (their float one runs tf32) beside the SIMT one (Lb0E), which is not counted.
TENSOR_CORE_KERNELS = {
    "tiled_gemm_tc_kernel": {"fp16": "6__half", "bf16": "13__nv_bfloat16", "tf32": "4Tf32"},
    "fused_forward_kernel": {
        "fp16": "kernelI6__halffLb1E",
        "bf16": "kernelI13__nv_bfloat16fLb1E",
        "tf32": "kernelIffLb1E",
    },
    "fused_backward_kernel": {
        "fp16": "kernelI6__halffLb1E",
        "bf16": "kernelI13__nv_bfloat16fLb1E",
        "tf32": "kernelIffLb1E",
    },
}
SIMT_ONLY = "Lb0E"  # the fused kernels' SIMT instantiations
MMA_INSTRUCTION = re.compile(r"^\s*(?:wmma\.mma|mma)\.sync\S*", re.M)


def ptx_entries(ptx: str) -> dict[str, str]:
    """The body of every `.entry` (kernel) of a PTX file, by mangled name."""
    parts = re.split(r"^\s*(?:\.(?:visible|weak)\s+)?\.entry\s+", ptx, flags=re.M)
    out = {}
    for part in parts[1:]:
        name = re.match(r"[\w$]+", part).group(0)
        out[name] = part
    return out


def tensor_core_check(ptx: str, arch: str) -> tuple[dict[str, int], list[str]]:
    """mma instructions per tensor-core kernel entry, and the findings: an entry without any,
    or an operand type with no instantiation."""
    counts = {
        name: len(MMA_INSTRUCTION.findall(body))
        for name, body in ptx_entries(ptx).items()
        if any(kernel in name for kernel in TENSOR_CORE_KERNELS) and SIMT_ONLY not in name
    }
    findings = [
        f"sm_{arch} {TENSOR_CORE_SOURCE}: {name} has no mma instruction" for name, n in counts.items() if n == 0
    ]
    for kernel, operands in TENSOR_CORE_KERNELS.items():
        for op, fragment in operands.items():
            if not any(kernel in name and fragment in name for name in counts):
                findings.append(f"sm_{arch} {TENSOR_CORE_SOURCE}: no {kernel} for {op} operands in the PTX")
    return counts, findings


def report(rows: list[Row], findings: list[str], meta: dict) -> str:
    lines = [
        "# CUDA static checks: registers, spills, shared memory, occupancy",
        "",
        "Generated by `scripts/cuda_static.py` (do not edit by hand; rerun the command below).",
        "",
        f"- revision: {meta['revision']} (sources: {meta['sources']})",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- nvcc: {meta['nvcc']}",
        f"- flags: `nvcc {' '.join(meta['flags'])} -gencode arch=compute_XX,code=sm_XX -c FILE.cu`",
        f"- architectures: {', '.join('sm_' + a for a in meta['archs'])} ({meta['archs_from']})",
        f"- files: {', '.join(meta['files'])} (the .cu files of the CUDA build, CMakeLists.txt)",
        f"- compile time: {meta['seconds']:.1f} s wall, {meta['jobs']} jobs at a time",
        "- allow-list (spills / local memory): "
        + (", ".join(f"`{k}`: {v}" for k, v in ALLOWED_LOCAL_MEMORY.items()) or "empty"),
        "- result: "
        + (
            "PASS: no warnings, no register spills, no local memory"
            if not findings
            else f"FAIL: {len(findings)} finding(s), listed at the end"
        ),
        "",
        "Occupancy: resident warps per SM over the SM's maximum (64), by the rules of CUDA's occupancy "
        "calculator (`occupancy()` in the script): per-warp register allocation in units of 256 from 4 "
        "sub-partitions, each block's shared memory plus 1 KB reserved rounded to 128 bytes, at most 32 blocks "
        "and 2048 threads per SM. A100: 64K registers, 164 KB shared memory per SM, 163 KB per block; H100: 64K "
        "registers, 228 KB per SM, 227 KB per block. `limit` names what bounds the blocks per SM; `dyn smem "
        "headroom` is the most dynamic shared memory a block can take before shared memory lowers the occupancy "
        "below the `limit` of registers/warps/blocks alone.",
        "",
    ]
    tt_threads, jacobi_threads = meta["tt_threads"], meta["jacobi_threads"]
    for arch in meta["archs"]:
        dev = DEVICES.get(arch)
        lines += [f"## sm_{arch}" + (f" ({dev.name})" if dev else " (no device table: occupancy not computed)"), ""]
        lines += [
            "| file | kernel | regs | static smem | stack / spills | threads | dyn smem | config | blocks/SM "
            "| limit | occupancy | dyn smem headroom |",
            "|---|---|---:|---:|---|---:|---:|:---:|---:|---|---:|---:|",
        ]
        for r in (r for r in rows if r.arch == arch and r.f.entry):
            f = r.f
            spills = (
                "0"
                if not (f.stack or f.spill_stores or f.spill_loads)
                else f"{f.stack} B stack, {f.spill_stores}/{f.spill_loads} B spill st/ld"
            )
            launch = launch_of(r.name, arch, tt_threads, jacobi_threads)
            cells = [Path(r.source).name, f"`{r.name}`", str(f.regs), f"{f.smem} B", spills]
            if launch is None or dev is None:
                cells += [
                    str(launch.threads) if launch else "?",
                    "?",
                    launch.config if launch else "-",
                    "-",
                    "-",
                    "-",
                    "-",
                ]
            else:
                occ = occupancy(launch.threads, f.regs, f.smem, launch.dynamic_smem, dev)
                head = max_dynamic_smem(launch.threads, f.regs, f.smem, dev)
                cells += [
                    str(launch.threads),
                    _kb(launch.dynamic_smem),
                    launch.config,
                    str(occ.blocks),
                    occ.limiter,
                    f"{occ.fraction:.1%} ({occ.warps}/{dev.max_warps_per_sm} warps)",
                    _kb(head),
                ]
            lines.append("| " + " | ".join(cells) + " |")
        device_functions = [r for r in rows if r.arch == arch and not r.f.entry]
        if device_functions:
            lines += [
                "",
                "Non-inlined device functions: "
                + ", ".join(
                    f"`{r.name}` ({r.f.stack} B stack, {r.f.spill_stores}/{r.f.spill_loads} B spill st/ld)"
                    for r in device_functions
                ),
            ]
        lines.append("")
    lines += ["## Launch configurations assumed", ""]
    lines += [f"- {k}: {v}" for k, v in CONFIG_LEGEND.items()]
    lines += [
        "",
        f"Threads per block as the sources set them: kCudaThreads = {tt_threads}, Jacobi at most "
        f"32 * kMaxWarps = {jacobi_threads}.",
    ]
    tensor_cores = meta.get("tensor_cores", {})
    if tensor_cores:
        lines += [
            "",
            "## Tensor-core instructions in the PTX",
            "",
            f"`nvcc -arch=compute_XX -ptx {TENSOR_CORE_SOURCE}`: warp matrix instructions (`wmma.mma.sync` / "
            f"`mma.sync`) per instantiation of {', '.join(f'`{k}`' for k in TENSOR_CORE_KERNELS)} (each must "
            "have some; the fused kernels' float64 instantiations run SIMT).",
            "",
            "| architecture | kernel | mma instructions |",
            "|---|---|---:|",
        ]
        for arch, counts in tensor_cores.items():
            lines += [f"| compute_{arch} | `{short_name(name)}` | {n} |" for name, n in sorted(counts.items())]
    if findings:
        lines += ["", "## Findings", ""] + [f"- {f}" for f in findings]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default=None, help="';'- or ','-separated, e.g. 90 (default: CMakeLists.txt's)")
    ap.add_argument("--jobs", type=int, default=2, help="compiles at a time (default 2)")
    ap.add_argument("--out", type=Path, default=REPORT, help="the markdown report (default: %(default)s)")
    ap.add_argument("--no-report", action="store_true", help="check only, write nothing")
    ap.add_argument(
        "--rev",
        default=None,
        help="compile csrc/ as committed at this revision (git archive) instead of the working tree",
    )
    ap.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"))
    argv_used = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv_used)

    nvcc = shutil.which(args.nvcc)
    if nvcc is None:
        print(f"cuda_static: {args.nvcc} not found on PATH", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cuda_static_") as tmp:
        src_root = ROOT
        if args.rev:
            src_root = Path(tmp) / "src"
            src_root.mkdir()
            archive = subprocess.run(
                ["git", "archive", args.rev, "csrc", "CMakeLists.txt"], cwd=ROOT, capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(src_root)], input=archive, check=True)
        archs = (
            [a.strip() for a in re.split(r"[;,]", args.archs) if a.strip()] if args.archs else default_archs(src_root)
        )
        files = cuda_sources(src_root)
        flags = BUILD_FLAGS + ["-I", "csrc"] + CHECK_FLAGS
        jobs = []
        for source in files:
            for arch in archs:
                obj = Path(tmp) / f"{source.replace('/', '_')}.sm_{arch}.o"
                jobs.append(
                    Job(
                        source,
                        arch,
                        [nvcc, *flags, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", source, "-o", str(obj)],
                    )
                )
        ptx_jobs = [
            Job(
                TENSOR_CORE_SOURCE,
                arch,
                [
                    nvcc,
                    *BUILD_FLAGS,
                    "-I",
                    "csrc",
                    f"-arch=compute_{arch}",
                    "-ptx",
                    TENSOR_CORE_SOURCE,
                    "-o",
                    str(Path(tmp) / f"tt_cuda.compute_{arch}.ptx"),
                ],
            )  # fmt: skip
            for arch in archs
        ]
        # the largest files first, so two workers finish together
        order = sorted(jobs, key=lambda j: -(src_root / j.source).stat().st_size) + ptx_jobs
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(lambda j: run_job(j, src_root), order))
        seconds = time.perf_counter() - t0
        tensor_cores: dict[str, dict[str, int]] = {}
        ptx_findings: list[str] = []
        for job in ptx_jobs:
            if job.returncode != 0:
                ptx_findings.append(f"sm_{job.arch} {job.source}: nvcc -ptx exited with status {job.returncode}")
                continue
            counts, found = tensor_core_check((Path(tmp) / f"tt_cuda.compute_{job.arch}.ptx").read_text(), job.arch)
            tensor_cores[job.arch] = counts
            ptx_findings += found
        tt_threads = source_constant(src_root / "csrc/tt/tt_cuda_schedule.h", "kCudaThreads")
        jacobi_threads = 32 * source_constant(src_root / "csrc/svd/jacobi_cuda.cu", "kMaxWarps")

    rows, findings = check(jobs)
    findings += ptx_findings
    kernels = {(r.arch, r.name) for r in rows if r.f.entry}
    for job in jobs:
        print(f"  {job.source} sm_{job.arch}: {job.seconds:.1f} s, status {job.returncode}")
    for arch, name in sorted(kernels):
        if launch_of(name, arch, tt_threads, jacobi_threads) is None:
            print(f"  note: no launch configuration known for {name} (sm_{arch}): add it to launch_of()")
    if not args.no_report:
        meta = {
            "revision": revision(args.rev),
            "sources": f"git archive {args.rev}" if args.rev else "working tree",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["python scripts/cuda_static.py", *map(shlex.quote, map(str, argv_used))]),
            "nvcc": nvcc_version(nvcc),
            "flags": flags,
            "archs": archs,
            "files": files,
            "seconds": seconds,
            "archs_from": "--archs" if args.archs else "TENSORPRESS_CUDA_ARCHS default in CMakeLists.txt",
            "jobs": max(1, args.jobs),
            "tt_threads": tt_threads,
            "jacobi_threads": jacobi_threads,
            "tensor_cores": {
                a: {demangle(list(c)).get(n, n): k for n, k in c.items()} for a, c in tensor_cores.items()
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report(rows, findings, meta))
        print(f"cuda_static: wrote {args.out}")
    if findings:
        print(f"cuda_static: FAIL ({len(findings)} finding(s)):", file=sys.stderr)
        for f in findings:
            print(f"  {f}", file=sys.stderr)
        return 1
    print(
        f"cuda_static: PASS: {len(files)} files x {len(archs)} architectures ({', '.join(archs)}), "
        f"{len(kernels)} kernels, no warnings, no spills, no local memory ({seconds:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
