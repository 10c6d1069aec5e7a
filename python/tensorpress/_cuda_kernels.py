"""Where CUDA tensors go: the native module holding the CUDA entry points, and the stream to
launch on.

One seam, so the test suite can run the same host code (plan and schedule choice, workspace
sizing, argument packing) on the CPU emulation build of the CUDA sources (`_C_cuda_emu`, see
csrc/testing/cuda_emu.h and tests/cuda_emu/), where CPU tensors play the GPU.
"""

from __future__ import annotations

import importlib.util

import torch

from tensorpress._ext import _C


class CudaKernels:
    """The CUDA entry points of `module`, taking tensors of `device_type`."""

    def __init__(self, module, device_type: str = "cuda"):
        self.module = module
        self.device_type = device_type
        self.tt = hasattr(module, "tt_cuda_device_limits")  # the TT kernels are in this build
        self.jacobi = hasattr(module, "svd_jacobi_cuda")  # the batched Jacobi SVD kernel is

    @property
    def emulated(self) -> bool:
        return self.device_type != "cuda"

    def takes(self, t: torch.Tensor) -> bool:
        """Whether `t` lives where these kernels run."""
        return t.device.type == self.device_type

    def stream(self, device) -> int:
        """The caller's current stream (the emulation runs every launch synchronously)."""
        return 0 if self.emulated else torch.cuda.current_stream(device).cuda_stream


_active = CudaKernels(_C)


def active() -> CudaKernels:
    return _active


def use(kernels: CudaKernels) -> None:
    """From now on, tensors go to `kernels` (the emulated GPU suite sets this once per process)."""
    global _active
    _active = kernels


def load_module(path: str):
    """The extension module at `path` (the emulation build, _C_cuda_emu; tests only)."""
    spec = importlib.util.spec_from_file_location("_C_cuda_emu", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"path: no loadable extension module at {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
