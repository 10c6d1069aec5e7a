"""Shared pieces of the GPU suite (tests/gpu/): the skip marker and float64 helpers.

No conftest.py here on purpose: a second module named `conftest` would shadow tests/conftest.py
for the test modules that import from it.
"""
from __future__ import annotations

import math

import pytest
import torch

import tensorpress


def _skip_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if not tensorpress.info()["cuda_kernels_built"]:
        return "tensorpress was built without CUDA kernels (TENSORPRESS_CUDA=OFF or no nvcc)"
    return ""


SKIP_REASON = _skip_reason()
# every module of the suite: `pytestmark = GPU`
GPU = [pytest.mark.gpu, pytest.mark.skipif(bool(SKIP_REASON), reason=SKIP_REASON or "GPU available")]


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
        cores.append(torch.randn(full[k], out_factors[k], in_factors[k], full[k + 1], dtype=torch.float64,
                                 generator=generator) * std)
    return cores
