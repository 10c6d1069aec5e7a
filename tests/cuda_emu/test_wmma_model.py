"""The emulator's model of the warp matrix API (csrc/testing/cuda_emu_include/mma.h), checked
against float64 on the self-test kernel of csrc/testing/emu_selftest.cu: D = A B + C per warp
with every operand and memory layout, fp16 / bf16 operands at m16n16k16 and tf32 at m16n16k8
(converted with __float_to_tf32, and fed raw, which the tensor cores truncate), and the misuses
the model refuses (a misaligned pointer, lanes passing different pointers, an ldm that is not
a multiple of 16 bytes, a warp of fewer than 32 threads).

Run by scripts/cuda_emu_tests.sh; tests/conftest.py leaves this directory out of the plain run.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tensorpress._cuda_kernels import load_module

EMU = load_module(os.environ["TENSORPRESS_CUDA_EMU_MODULE"])


def _unpack(out: list[float], warps: int, k: int) -> list[tuple[torch.Tensor, ...]]:
    o = torch.tensor(out, dtype=torch.float64).reshape(warps, 32 * k + 512)
    return [
        (w[: 16 * k].reshape(16, k), w[16 * k : 32 * k].reshape(k, 16), w[32 * k : 32 * k + 256].reshape(16, 16),
         w[32 * k + 256 :].reshape(16, 16))
        for w in o
    ]  # fmt: skip


def _tf32_round(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero, to 10 mantissa bits (PTX cvt.rna.tf32.f32)."""
    bits = x.to(torch.float32).numpy().view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x1000) & 0xFFFFE000).astype(np.uint32)
    return torch.from_numpy(bits.view(np.float32).copy()).double()


def _tf32_truncate(x: torch.Tensor) -> torch.Tensor:
    bits = x.to(torch.float32).numpy().view(np.uint32) & np.uint32(0xFFFFE000)
    return torch.from_numpy(bits.view(np.float32).copy()).double()


def _check_product(a, b, c, d, k):
    """D is A B + C up to float accumulation: products are exact, each of the k additions
    rounds once (relative 2^-24), so |D - ref| <= (k + 1) 2^-24 (|A| |B| + |C|)."""
    ref = a @ b + c
    bound = (k + 1) * 2.0**-24 * (a.abs() @ b.abs() + c.abs())
    assert torch.all((d - ref).abs() <= bound), float(((d - ref).abs() / bound).max())
    assert not torch.equal(d, c), "the product was not added"


@pytest.mark.parametrize("name, dtype", [("wmma_f16", torch.float16), ("wmma_bf16", torch.bfloat16)])
@pytest.mark.parametrize("warps", [1, 4])
def test_half_operands_multiply_exactly_and_accumulate_in_float(name, dtype, warps):
    for a, b, c, d in _unpack(EMU.emu_selftest(name, 32 * warps, 1), warps, 16):
        # the operands are values of the half type (as the kernel stored them)
        assert torch.equal(a.to(dtype).double(), a) and torch.equal(b.to(dtype).double(), b)
        _check_product(a, b, c, d, 16)


def test_tf32_operands_converted_with_float_to_tf32():
    for a, b, c, d in _unpack(EMU.emu_selftest("wmma_tf32", 64, 1), 2, 8):
        assert not torch.equal(_tf32_round(a), a), "the raw inputs should have more than tf32's bits"
        _check_product(_tf32_round(a), _tf32_round(b), c, d, 8)


def test_raw_fp32_operands_are_truncated_to_tf32_as_the_hardware_reads_them():
    for a, b, c, d in _unpack(EMU.emu_selftest("wmma_tf32_raw", 32, 1), 1, 8):
        _check_product(_tf32_truncate(a), _tf32_truncate(b), c, d, 8)
        # and that differs from the rounded operands' product beyond float accumulation
        assert not torch.allclose(d, _tf32_round(a) @ _tf32_round(b) + c, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "name, threads, message",
    [
        ("wmma_misaligned", 32, r"load_matrix_sync at line \d+: the pointer is not 32-byte aligned"),
        ("wmma_divergent_pointer", 64, r"load_matrix_sync at line \d+: the lanes of a warp passed different pointers"),
        ("wmma_bad_ldm", 32, r"ldm 17 is not a multiple of 16 bytes"),
        ("wmma_f16", 48, r"load_matrix_sync in a warp of 16 threads \(needs all 32\)"),
    ],
)
def test_misuses_fail_the_launch(name, threads, message):
    with pytest.raises(RuntimeError, match=message):
        EMU.emu_selftest(name, threads)
    assert EMU.emu_selftest("block_sum", 64, 1) == [sum(range(64))]
