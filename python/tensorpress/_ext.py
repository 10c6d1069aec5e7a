"""Loads the native extension and reports what was built."""

from __future__ import annotations

import platform

# The extension links the OpenBLAS shipped by scipy-openblas32; importing that package
# loads the shared library so the dynamic loader finds it whatever the install layout.
import scipy_openblas32

# torch first: it loads its libgomp.so.1, and the extension's OpenMP then binds to that same
# runtime (one team of threads for torch's ops and ours; see csrc/core/thread_pool.h).
import torch  # noqa: F401


def cpu_vendor() -> str:
    """The CPU's vendor id ("AuthenticAMD", "GenuineIntel", ...; "" where /proc/cpuinfo is not)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def openblas_core() -> str:
    """The kernels OpenBLAS runs for the extension ("SkylakeX", "Haswell", ...): chosen by
    OpenBLAS for the CPU at load time, or forced by the OPENBLAS_CORETYPE variable."""
    import ctypes

    corename = scipy_openblas32.dll.scipy_openblas_get_corename
    corename.restype = ctypes.c_char_p
    return corename().decode()


try:
    from tensorpress import _C
except ImportError as err:  # pragma: no cover - only on a broken install
    raise ImportError(
        "tensorpress._C (the native extension) could not be imported. Reinstall with "
        "`pip install --no-build-isolation .` from the source tree; the underlying error was: "
        f"{err}"
    ) from err


def info() -> dict:
    """What this build of tensorpress contains and what it can see at run time."""
    import numpy

    built = dict(_C.build_info())
    return {
        "tensorpress": __import__("tensorpress").__version__,
        "cpu_kernels": True,
        "cuda_kernels_built": built.pop("cuda"),
        "cuda_archs": built.pop("cuda_archs"),
        "cuda_compiler": built.pop("cuda_compiler"),
        "cuda_runtime": built.pop("cuda_runtime"),
        # the runtime is linked statically: it needs this driver (or newer) at run time
        "cuda_driver_required": built.pop("cuda_driver_required"),
        "cuda_driver": built.pop("cuda_driver"),
        "cuda_devices_seen_by_extension": built.pop("cuda_devices"),
        "gpu_visible_to_torch": torch.cuda.is_available(),
        "cxx_compiler": built.pop("cxx_compiler"),
        "blas": built.pop("blas"),
        "blas_core": openblas_core(),
        "jacobi_svd_isa": built.pop("jacobi_isa"),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
