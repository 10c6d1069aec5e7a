"""The CUDA emulator itself (csrc/testing/cuda_emu.h): a kernel using every intrinsic gives
the right answer, the deliberately broken kernels of csrc/testing/emu_selftest.cu are caught
(by the emulator, or by the sanitizer the build runs under), and the half / bfloat16
conversions round bit for bit as CUDA's.

Run by scripts/cuda_emu_tests.sh (which builds _C_cuda_emu and sets TENSORPRESS_CUDA_EMU_MODULE);
tests/conftest.py leaves this directory out of the plain run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tensorpress._cuda_kernels import load_module

MODULE = os.environ["TENSORPRESS_CUDA_EMU_MODULE"]
SANITIZER = os.environ.get("TENSORPRESS_CUDA_EMU_SANITIZER", "plain")


EMU = load_module(MODULE)


@pytest.mark.parametrize("threads, blocks", [(32, 1), (64, 3), (256, 2), (1024, 1)])
def test_shuffles_barriers_and_shared_memory_compute_the_block_sums(threads, blocks):
    got = EMU.emu_selftest("block_sum", threads, blocks)
    want = [sum(b * threads + t for t in range(threads)) for b in range(blocks)]
    assert got == want


@pytest.mark.parametrize(
    "name, message",
    [
        ("divergent_barrier", r"__syncthreads at line \d+ reached by 32 of 64 threads: the others returned"),
        ("two_barriers", r"__syncthreads reached at different places"),
        ("partial_mask", r"mask 0x0000ffff is not the warp's full mask"),
        ("smem_over_default", r"65536 bytes of dynamic shared memory, the kernel allows 49152"),
    ],
)
def test_broken_kernels_fail_at_their_launch(name, message):
    with pytest.raises(RuntimeError, match=message):
        EMU.emu_selftest(name, 64)
    # the error was consumed: the next launch runs
    assert EMU.emu_selftest("block_sum", 64, 1) == [sum(range(64))]


def test_launch_configuration_is_validated():
    with pytest.raises(RuntimeError, match=r"invalid configuration argument.*block \(2048, 1, 1\)"):
        EMU.emu_selftest("block_sum", 2048, 1)
    # a full-warp mask where the last warp has fewer lanes is undefined on a GPU: refused
    with pytest.raises(RuntimeError, match="full mask 0x000000ff"):
        EMU.emu_selftest("block_sum", 40, 1)


@pytest.mark.skipif(SANITIZER == "tsan", reason="under ThreadSanitizer the race aborts the process: see the tsan test")
def test_a_missing_barrier_reads_the_poison():
    """Without the barrier every thread reads its neighbour's slot before the neighbour wrote
    it: dynamic shared memory starts as NaN, so the read is visible, every time."""
    out = torch.tensor(EMU.emu_selftest("missing_barrier", 64))
    assert torch.isnan(out[:-1]).all()


def _run_selftest_in_subprocess(name: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; from tensorpress._cuda_kernels import load_module; "
        "load_module(sys.argv[1]).emu_selftest(sys.argv[2], 64)"
    )
    # start_new_session: a plain fork, not vfork (a vforked child under the sanitizer's
    # preloaded runtime corrupts the parent, which then aborts at its exit)
    return subprocess.run(
        [sys.executable, "-c", code, MODULE, name],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
        start_new_session=True,
    )


@pytest.mark.skipif(SANITIZER != "tsan", reason="needs the ThreadSanitizer build (scripts/cuda_emu_tests.sh tsan)")
@pytest.mark.tsan
def test_threadsanitizer_reports_a_missing_barrier():
    run = _run_selftest_in_subprocess("missing_barrier")
    assert run.returncode != 0 and "WARNING: ThreadSanitizer: data race" in run.stderr, run.stderr[-2000:]
    assert "missing_barrier_kernel" in run.stderr


@pytest.mark.skipif(SANITIZER != "asan", reason="needs the AddressSanitizer build (scripts/cuda_emu_tests.sh asan)")
def test_addresssanitizer_reports_a_shared_memory_overrun():
    run = _run_selftest_in_subprocess("smem_overrun")
    assert run.returncode != 0 and "heap-buffer-overflow" in run.stderr, run.stderr[-2000:]
    assert "smem_overrun_kernel" in run.stderr


def _specials() -> torch.Tensor:
    f32 = torch.float32
    edges = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        65519.99,
        65520.0,
        65536.0,
        1e-8,
        5.960464477539063e-08,
        2.9802322387695312e-08,
        2.98023259e-08,
        6.103515625e-05,
        6.1035e-05,
        3.4e38,
        -3.4e38,
        1e-40,
        float("inf"),
        float("-inf"),
        float("nan"),
    ]
    # exact halfway cases between neighbouring half / bfloat16 values, both parities
    halves = torch.arange(0, 2048, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    mid = (halves[:-1].double() + halves[1:].double()) / 2
    bf = (torch.arange(16000, 16400, dtype=torch.int32) << 16).view(f32)
    bmid = (bf[:-1].double() + bf[1:].double()) / 2
    rand = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scaled = rand * torch.logspace(-30, 30, 20000, dtype=torch.float64)
    return torch.cat([torch.tensor(edges, dtype=torch.float64), mid, bmid, rand, scaled]).to(f32)


@pytest.mark.parametrize("bf16", [False, True], ids=["half", "bfloat16"])
def test_half_conversions_round_as_cuda_does(bf16):
    """Round to nearest even, overflow to inf, subnormals kept (torch's CPU conversions round
    the same way); NaN becomes the canonical 0x7fff, as CUDA's __float2half_rn gives."""
    x = _specials()
    dtype = torch.bfloat16 if bf16 else torch.float16
    got = torch.tensor(EMU.emu_float_to_half(x.tolist(), bf16), dtype=torch.int32)
    want = x.to(dtype).view(torch.int16).int() & 0xFFFF
    nan = torch.isnan(x)
    assert torch.equal(got[~nan], want[~nan])
    assert (got[nan] == 0x7FFF).all()
    back = torch.tensor(EMU.emu_half_to_float(got.tolist(), bf16), dtype=torch.float32)
    assert torch.equal(back[~nan], x[~nan].to(dtype).float()) and torch.isnan(back[nan]).all()
