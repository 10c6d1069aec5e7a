"""scripts/cuda_static.py (issue 23, item 5): the occupancy rules, the parsing of ptxas's report
and the verdicts on captured compiler output run without nvcc; the representative launch
configurations are checked against the C++ schedule; one test runs the whole script (nvcc)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cuda_static.py"


def _load():
    spec = importlib.util.spec_from_file_location("cuda_static", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cuda_static"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


cs = _load()
A100, H100 = cs.DEVICES["80"], cs.DEVICES["90"]

# nvcc 13.0 -Xptxas -v of jacobi_cuda.cu for sm_80 (captured, compile-time lines kept)
JACOBI_SM80 = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN11tensorpress3svd47_GLOBAL__N__32ff2d00_14_jacobi_cuda_cu_f21bd33f13jacobi_kernelIfEEvPKT_PS3_S6_S6_iidi' for 'sm_80'
ptxas info    : Function properties for _ZN11tensorpress3svd47_GLOBAL__N__32ff2d00_14_jacobi_cuda_cu_f21bd33f13jacobi_kernelIfEEvPKT_PS3_S6_S6_iidi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, used 1 barriers, 16 bytes smem, 404 bytes cmem[0], 16 bytes cmem[2]
ptxas info    : Compile time = 232.837 ms
ptxas info    : Compiling entry function '_ZN11tensorpress3svd47_GLOBAL__N__32ff2d00_14_jacobi_cuda_cu_f21bd33f13jacobi_kernelIdEEvPKT_PS3_S6_S6_iidi' for 'sm_80'
ptxas info    : Function properties for _ZN11tensorpress3svd47_GLOBAL__N__32ff2d00_14_jacobi_cuda_cu_f21bd33f13jacobi_kernelIdEEvPKT_PS3_S6_S6_iidi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, used 1 barriers, 16 bytes smem, 404 bytes cmem[0], 16 bytes cmem[2]
ptxas info    : Compile time = 212.984 ms
"""

# a kernel that spills and one with a local array, compiled with -Xptxas -warn-spills,-warn-lmem-usage
# -Xptxas -v (without -Werror: "warning"; with -Werror all-warnings the same lines say "error")
SPILLING = """\
ptxas warning : Local memory used for function '_Z3bigILi64EEvPfPKfi', size of stack frame: 832 bytes
ptxas warning : Registers are spilled to local memory in function '_Z3bigILi64EEvPfPKfi', 832 bytes spill stores, 960 bytes spill loads
ptxas warning : Local memory used for function '_Z4lmemPfi', size of stack frame: 256 bytes
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3bigILi64EEvPfPKfi' for 'sm_80'
ptxas info    : Function properties for _Z3bigILi64EEvPfPKfi
    832 bytes stack frame, 832 bytes spill stores, 960 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 832 bytes cumulative stack size, 372 bytes cmem[0]
ptxas info    : Compile time = 32.515 ms
ptxas info    : Compiling entry function '_Z4lmemPfi' for 'sm_80'
ptxas info    : Function properties for _Z4lmemPfi
    256 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 34 registers, used 0 barriers, 256 bytes cumulative stack size, 364 bytes cmem[0]
ptxas info    : Compile time = 2.537 ms
"""

# the front end under -Werror all-warnings: the compile stops before ptxas
FRONT_END_ERROR = """\
fe.cu(1): error #177-D: variable "unused" was declared but never referenced
  __attribute__((global)) void k(float* o) { int unused; o[threadIdx.x] = 1.f; }
                                                 ^

Remark: The warnings can be suppressed with "-diag-suppress <warning-number>"

1 error detected in the compilation of "fe.cu".
"""

DEMANGLED = {
    "_Z3bigILi64EEvPfPKfi": "void big<64>(float*, float const*, int)",
    "_Z4lmemPfi": "lmem(float*, int)",
}


# ----------------------------------------------------------------------------- occupancy
def test_occupancy_known_cases():
    # 256 threads, 32 registers: 8 warps per block, 1024 registers per warp -> 64 warps fit
    occ = cs.occupancy(256, 32, 0, 0, A100)
    assert (occ.blocks, occ.warps, occ.fraction) == (8, 64, 1.0)
    # 128 registers: 4096 per warp, 4 warps per sub-partition -> 16 warps = 2 blocks
    occ = cs.occupancy(256, 128, 0, 0, H100)
    assert (occ.blocks, occ.fraction, occ.limiter) == (2, 0.25, "registers")
    # 79 registers round up to 80 (2560 per warp): 6 warps per sub-partition -> 24 warps = 3 blocks
    assert cs.occupancy(256, 79, 0, 0, H100).fraction == 0.375
    # 1024 threads at 64 registers just fit (64K per block); at 65 the launch fails
    assert cs.occupancy(1024, 64, 0, 0, A100).fraction == 0.5
    assert cs.occupancy(1024, 65, 0, 0, A100).blocks == 0
    occ = cs.occupancy(32, 16, 0, 0, A100)  # one-warp blocks: at most 32 blocks per SM
    assert (occ.fraction, occ.limiter) == (0.5, "blocks")


def test_occupancy_shared_memory():
    # 100 KB dynamic + 1 KB reserved: one block on an A100 (164 KB), two on an H100 (228 KB)
    occ = cs.occupancy(256, 32, 0, 100 * 1024, A100)
    assert (occ.blocks, occ.fraction, occ.limiter) == (1, 0.125, "shared memory")
    assert cs.occupancy(256, 32, 0, 100 * 1024, H100).blocks == 2
    # the reserved KB counts: 4 blocks of exactly 41 KB fill an A100, one byte more leaves 3
    assert cs.occupancy(256, 16, 0, 40 * 1024, A100).blocks == 4
    assert cs.occupancy(256, 16, 1, 40 * 1024, A100).blocks == 3
    # over the per-block maximum: no launch
    assert cs.occupancy(256, 32, 1024, 163 * 1024, A100).blocks == 0
    assert cs.occupancy(256, 32, 0, 163 * 1024, A100).blocks == 1


def test_max_dynamic_smem_keeps_register_occupancy():
    for dev, regs, static in ((H100, 48, 0), (A100, 64, 8896), (H100, 78, 17152)):
        head = cs.max_dynamic_smem(256, regs, static, dev)
        blocks = cs.occupancy(256, regs, 0, 0, dev).blocks
        assert cs.occupancy(256, regs, static, head, dev).blocks == blocks
        assert cs.occupancy(256, regs, static, head + dev.smem_alloc_unit, dev).blocks < blocks
    assert cs.max_dynamic_smem(256, 48, 0, H100) == 45568  # 5 blocks: 228 KB / 5 - 1 KB, in 128 B units


# ----------------------------------------------------------------------------- parsing
def test_parse_ptxas_resources():
    funcs, diagnostics = cs.parse_ptxas(JACOBI_SM80)
    assert diagnostics == []
    assert len(funcs) == 2
    for f in funcs.values():
        assert f.entry and (f.regs, f.barriers, f.smem, f.stack, f.spill_stores, f.spill_loads) == (56, 1, 16, 0, 0, 0)


def test_parse_ptxas_spills_and_local_memory():
    for text in (SPILLING, SPILLING.replace("ptxas warning :", "ptxas error   :")):
        funcs, diagnostics = cs.parse_ptxas(text)
        assert diagnostics == []
        big, lmem = funcs["_Z3bigILi64EEvPfPKfi"], funcs["_Z4lmemPfi"]
        assert (big.regs, big.stack, big.spill_stores, big.spill_loads) == (32, 832, 832, 960)
        assert big.spill_warned and big.lmem_warned and big.cumulative_stack == 832
        assert (lmem.stack, lmem.spill_stores, lmem.lmem_warned, lmem.spill_warned) == (256, 0, True, False)


def test_parse_ptxas_compiler_diagnostics():
    funcs, diagnostics = cs.parse_ptxas(FRONT_END_ERROR + "x.cu:2:15: warning: unused parameter 'a'\n")
    assert funcs == {}
    assert diagnostics == [
        'fe.cu(1): error #177-D: variable "unused" was declared but never referenced',
        "x.cu:2:15: warning: unused parameter 'a'",
    ]


def test_short_names():
    assert (
        cs.short_name(
            "void tensorpress::tt::(anonymous namespace)::tiled_gemm_kernel<float, float, __nv_bfloat16, "
            "float>(tensorpress::tt::(anonymous namespace)::TiledGemm<float, float, __nv_bfloat16>)"
        )
        == "tiled_gemm_kernel<f32,f32,bf16,f32>"
    )
    assert (
        cs.short_name(
            "void tensorpress::svd::(anonymous namespace)::jacobi_kernel<double>(double const*, double*, "
            "double*, double*, int, int, double, int)"
        )
        == "jacobi_kernel<f64>"
    )
    assert cs.short_name("void k<__half, float>(Args<__half, float>)") == "k<f16,f32>"
    assert cs.short_name("lmem(float*, int)") == "lmem"


# ----------------------------------------------------------------------------- verdicts
def _job(output: str, returncode: int = 0) -> object:
    return cs.Job("csrc/x.cu", "80", ["nvcc"], returncode, output)


@pytest.fixture
def fake_demangle(monkeypatch):
    monkeypatch.setattr(cs, "demangle", lambda names: {n: DEMANGLED.get(n, n) for n in names})


def test_check_passes_clean_output(fake_demangle):
    rows, findings = cs.check([_job(JACOBI_SM80)])
    assert findings == [] and len(rows) == 2


def test_check_names_kernel_and_arch_of_each_spill(fake_demangle):
    _, findings = cs.check([_job(SPILLING.replace("ptxas warning :", "ptxas error   :"), 255)])
    assert len(findings) == 2
    assert findings[0].startswith("sm_80 csrc/x.cu: kernel big<64>: 832 bytes of local memory")
    assert "832 bytes spill stores, 960 bytes spill loads" in findings[0]
    assert findings[1].startswith("sm_80 csrc/x.cu: kernel lmem: 256 bytes of local memory")


def test_check_allow_list(fake_demangle, monkeypatch):
    errors = SPILLING.replace("ptxas warning :", "ptxas error   :")
    monkeypatch.setattr(cs, "ALLOWED_LOCAL_MEMORY", {"big<*>": "test", "lmem@sm_80": "test"})
    assert cs.check([_job(errors, 255)])[1] == []  # -Werror's failure is explained by allowed kernels only
    monkeypatch.setattr(cs, "ALLOWED_LOCAL_MEMORY", {"big<*>": "test", "lmem@sm_90": "test"})
    _, findings = cs.check([_job(errors, 255)])
    assert len(findings) == 1 and findings[0].startswith("sm_80 csrc/x.cu: kernel lmem: 256 bytes of local memory")
    _, findings = cs.check([_job("", 1)])  # a failure with nothing to explain it
    assert findings == ["sm_80 csrc/x.cu: nvcc exited with status 1:\n    "]


def test_check_fails_on_compiler_errors(fake_demangle):
    _, findings = cs.check([_job(FRONT_END_ERROR, 1)])
    assert findings[0] == 'sm_80 csrc/x.cu: fe.cu(1): error #177-D: variable "unused" was declared but never referenced'
    assert "nvcc exited with status 1" in findings[1]


# ----------------------------------------------------------------------------- configuration
def test_configuration_read_from_the_sources():
    assert cs.default_archs() == ["80", "90"]
    text = (ROOT / "pyproject.toml").read_text()  # the pip build's default must be the same list
    assert re.search(r'TENSORPRESS_CUDA_ARCHS = \{[^}]*default = "80;90"', text)
    assert cs.cuda_sources() == ["csrc/core/cuda_info.cu", "csrc/svd/jacobi_cuda.cu", "csrc/tt/tt_cuda.cu"]
    assert cs.source_constant(ROOT / "csrc/tt/tt_cuda_schedule.h", "kCudaThreads") == 256
    assert cs.source_constant(ROOT / "csrc/tt/tt_cuda_schedule.h", "kCudaTileN") == 64
    assert cs.source_constant(ROOT / "csrc/svd/jacobi_cuda.cu", "kMaxWarps") == 8
    # the one allowance: sm_80's fp16/bf16 tensor-core fused backward (see its reason)
    assert set(cs.ALLOWED_LOCAL_MEMORY) == {
        "fused_backward_kernel<f16,f32,true>@sm_80",
        "fused_backward_kernel<bf16,f32,true>@sm_80",
    }


def test_representative_launches_match_the_schedule():
    """The dynamic shared memory the report assumes is what the C++ schedule gives those calls,
    and the plan is the one the CUDA cost model picks."""
    torch = pytest.importorskip("torch")
    from tensorpress._ext import _C
    from tensorpress.linalg.svd import JACOBI_MAX_COLUMNS_CUDA
    from tensorpress.ops.tt_plan import H100_LIMITS, CudaLimits, choose_cuda_plan

    assert cs.SCHEDULE_LIMITS["90"] == (H100_LIMITS.smem_per_block, H100_LIMITS.smem_per_sm, H100_LIMITS.sm_count)
    for arch, (per_block, per_sm, sms) in cs.SCHEDULE_LIMITS.items():
        assert (per_block, per_sm) == (cs.DEVICES[arch].smem_per_block, cs.DEVICES[arch].smem_per_sm)
        call = cs.TT_CALL
        dims = call["core_dims"]
        shapes = tuple(tuple(dims[i : i + 4]) for i in range(0, len(dims), 4))
        plan = choose_cuda_plan(
            shapes, call["batch"], CudaLimits(per_block, per_sm, sms), torch.float32, allow_dense=False
        )
        assert (plan.path, plan.groups, list(plan.order)) == ("fused", tuple((i,) for i in range(4)), call["order"])
        for (kernel, acc), smem in cs.FUSED_SMEM.items():
            s = _C.tt_cuda_schedule(
                dims,
                call["order"],
                call["batch"],
                kernel == "fused_backward_kernel",
                acc,
                per_block,
                per_sm,
                sms,
                "auto",
            )
            assert (s["path"], s["smem_bytes"]) == ("fused", smem[arch]), (kernel, acc, arch)
    m, n = cs.JACOBI_CALL
    assert n == JACOBI_MAX_COLUMNS_CUDA and _C.svd_jacobi_cuda_smem_bytes(m, n) == cs.JACOBI_SMEM


# ----------------------------------------------------------------------------- tensor cores in the PTX
# the shape of nvcc 13.0's PTX (abridged): two tensor-core entries, one SIMT entry
PTX = """\
.visible .entry _ZN11tensorpress2tt20tiled_gemm_tc_kernelIffffNS0_4Tf32EEEvNS0_9TiledGemmIT_T0_T1_EE(
\t.param .align 8 .b8 p[136]
)
{
\twmma.mma.sync.aligned.row.row.m16n16k8.f32.tf32.tf32.f32 {%f1, %f2}, {%r1}, {%r2}, {%f3};
\twmma.mma.sync.aligned.row.row.m16n16k8.f32.tf32.tf32.f32 {%f1, %f2}, {%r1}, {%r2}, {%f3};
}
.visible .entry _ZN11tensorpress2tt20tiled_gemm_tc_kernelIfff6__halfEEvNS0_9TiledGemmIT_T0_T1_EE(
)
{
\tret;
}
.visible .entry _ZN11tensorpress2tt17tiled_gemm_kernelIffffEEvNS0_9TiledGemmIT_T0_T1_EE(
)
{
\tfma.rn.f32 %f1, %f2, %f3, %f4;
}
"""


def test_tensor_core_check_counts_mma_per_kernel_and_flags_what_is_missing():
    counts, findings = cs.tensor_core_check(PTX, "90")
    assert sorted(counts.values()) == [0, 2] and len(counts) == 2  # the SIMT kernel is not counted
    assert any("6__half" in f and "has no mma instruction" in f for f in findings)
    assert any("no tiled_gemm_tc_kernel for bf16 operands" in f for f in findings)
    assert not any("tiled_gemm_tc_kernel for tf32" in f for f in findings)
    assert any("no fused_forward_kernel for bf16 operands" in f for f in findings)  # absent from this PTX


def test_fused_kernels_need_mma_except_in_float64():
    ptx = """\
.visible .entry _ZN11tensorpress2tt19fused_forward_kernelIffLb1EEEvNS0_9FusedArgsIT_T0_EE(
)
{
\twmma.mma.sync.aligned.row.row.m16n16k8.f32.tf32.tf32.f32 {%f1, %f2}, {%r1}, {%r2}, {%f3};
}
.visible .entry _ZN11tensorpress2tt19fused_forward_kernelIddLb0EEEvNS0_9FusedArgsIT_T0_EE(
)
{
\tfma.rn.f64 %fd1, %fd2, %fd3, %fd4;
}
.visible .entry _ZN11tensorpress2tt19fused_forward_kernelI6__halffLb1EEEvNS0_9FusedArgsIT_T0_EE(
)
{
\tfma.rn.f32 %f1, %f2, %f3, %f4;
}
"""
    counts, findings = cs.tensor_core_check(ptx, "80")
    assert len(counts) == 2  # the SIMT (float64) instantiation is not counted
    assert any("fused_forward_kernelI6__half" in f and "has no mma instruction" in f for f in findings)
    assert not any("fused_forward_kernel for tf32" in f for f in findings)


# ----------------------------------------------------------------------------- the whole script
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the CUDA static checks need it")
def test_full_run_passes(tmp_path):
    """Every .cu file for every default architecture (12 s wall on 2 idle cores, 20 s CPU); no warnings, spills
    or local memory; every kernel in the report with its launch configuration."""
    out = tmp_path / "cuda_static.md"
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout + p.stderr
    md = out.read_text()
    assert "- result: PASS" in md
    for arch in ("80", "90"):
        section = md.split(f"## sm_{arch}", 1)[1].split("\n## ", 1)[0]
        for kernel in (
            "jacobi_kernel<f32>",
            "fused_forward_kernel<f32,f32,false>",
            "fused_forward_kernel<f32,f32,true>",
            "fused_backward_kernel<bf16,f32,true>",
            "fused_backward_kernel<f64,f64,false>",
            "tiled_gemm_kernel<f64,f64,f64,f64>",
            "gather_rows_kernel<f16,f32>",
            "reduce_partials_kernel<f64>",
        ):
            row = next((line for line in section.splitlines() if f"`{kernel}`" in line), None)
            assert row is not None, f"{kernel} missing from the sm_{arch} table"
            assert "| ? |" not in row and re.search(r"\| \d+\.\d% \(\d+/64 warps\) \|", row), row  # launch, occupancy
    tensor_cores = md.split("## Tensor-core instructions in the PTX", 1)[1]
    for arch in ("80", "90"):
        for op in ("f16", "bf16", "Tf32"):
            assert re.search(
                rf"\| compute_{arch} \| `tiled_gemm_tc_kernel<[^`]*,{op}>` \| [1-9]\d* \|", tensor_cores
            ), (
                arch,
                op,
            )
        for kernel in ("fused_forward_kernel", "fused_backward_kernel"):
            for t in ("f32", "f16", "bf16"):
                assert re.search(rf"\| compute_{arch} \| `{kernel}<{t},f32,true>` \| [1-9]\d* \|", tensor_cores), (
                    arch,
                    kernel,
                    t,
                )
    print(f"cuda_static full run: {time.perf_counter() - t0:.1f} s")
