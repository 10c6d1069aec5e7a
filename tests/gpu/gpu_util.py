"""Shared pieces of the GPU suite (tests/gpu/): the device, the kernels module, the skip
marker and float64 helpers.

The suite runs on a GPU, and without one on the CPU emulation build of the CUDA sources
(scripts/cuda_emu_tests.sh sets TENSORPRESS_CUDA_EMU_MODULE to the built _C_cuda_emu): then
CPU tensors play the GPU, through the same bindings, schedules and Python host code.

No conftest.py here on purpose: a second module named `conftest` would shadow tests/conftest.py
for the test modules that import from it.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import tensorpress
from tensorpress import _cuda_kernels
from tensorpress._ext import _C


def _load_emulation():
    path = os.environ.get("TENSORPRESS_CUDA_EMU_MODULE")
    if not path:
        return None
    module = _cuda_kernels.load_module(path)
    _cuda_kernels.use(_cuda_kernels.CudaKernels(module, device_type="cpu"))
    return module


EMU = _load_emulation()
EMULATED = EMU is not None
DEV = "cpu" if EMULATED else "cuda"
KERNELS = EMU if EMULATED else _C  # the module with the CUDA entry points


def stream() -> int:
    """The stream to pass the raw bindings (the emulation runs launches synchronously)."""
    return 0 if EMULATED else torch.cuda.current_stream().cuda_stream


def sync() -> None:
    if not EMULATED:
        torch.cuda.synchronize()


def _skip_reason() -> str:
    if EMULATED:
        return ""
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if not tensorpress.info()["cuda_kernels_built"]:
        return "tensorpress was built without CUDA kernels (TENSORPRESS_CUDA=OFF or no nvcc)"
    return ""


SKIP_REASON = _skip_reason()
# every module of the suite: `pytestmark = GPU`
GPU = [pytest.mark.gpu, pytest.mark.skipif(bool(SKIP_REASON), reason=SKIP_REASON or "GPU available")]
# tests of what only a real GPU has (streams, CUDA graphs, CUDA autocast, cuSOLVER routing)
REAL_GPU = pytest.mark.skipif(EMULATED, reason="needs a real GPU (not modelled by the CPU emulation)")
# cases too slow for the CPU emulation whose code the emulated run covers at smaller sizes
GPU_SIZE = pytest.mark.skipif(EMULATED, reason="too slow on the CPU emulation (its code is run at smaller sizes)")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F in float64 on the CPU; NaN anywhere in a gives NaN (never passes)."""
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    assert a.shape == b.shape, f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}"
    den = torch.linalg.vector_norm(b).item()
    num = torch.linalg.vector_norm(a - b).item()
    return num / den if den else num


def random_cores(out_factors, in_factors, ranks, generator=None):
    """float64 CPU cores (r_{k-1}, m_k, n_k, r_k) scaled so W's entries have variance ~ 1/N."""
    d = len(out_factors)
    full = (1, *ranks, 1)
    target = 1.0 / math.prod(in_factors)
    cores = []
    for k in range(d):
        std = math.sqrt(target ** (1 / d) / math.sqrt(full[k] * full[k + 1]))
        cores.append(
            torch.randn(full[k], out_factors[k], in_factors[k], full[k + 1], dtype=torch.float64, generator=generator)
            * std
        )
    return cores
