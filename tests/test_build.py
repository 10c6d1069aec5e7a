"""The installed build: info() and importing without any GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import tensorpress

EXPECTED_KEYS = {
    "tensorpress",
    "cpu_kernels",
    "cuda_kernels_built",
    "cuda_archs",
    "cuda_compiler",
    "cuda_runtime",
    "cuda_driver_required",
    "cuda_driver",
    "cuda_devices_seen_by_extension",
    "gpu_visible_to_torch",
    "cxx_compiler",
    "blas",
    "blas_core",
    "torch",
    "numpy",
    "python",
    "threads",
}


def test_info_keys_and_values():
    info = tensorpress.info()
    assert EXPECTED_KEYS <= set(info)
    assert info["cpu_kernels"] is True
    assert info["tensorpress"] == tensorpress.__version__
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_kernels_built"], bool)
    assert isinstance(info["gpu_visible_to_torch"], bool)
    assert info["gpu_visible_to_torch"] == torch.cuda.is_available()
    assert isinstance(info["cuda_devices_seen_by_extension"], list)
    assert "OpenBLAS" in info["blas"]
    assert info["threads"] == torch.get_num_threads()
    assert info["cxx_compiler"]
    if not info["cuda_kernels_built"]:
        assert info["cuda_devices_seen_by_extension"] == []
    else:  # the static runtime's driver requirement, e.g. ">= 580.65.06 (CUDA 13.x)" for a 13.0 runtime
        major = info["cuda_runtime"].split(".")[0]
        assert info["cuda_driver_required"].startswith(">= ") and f"CUDA {major}" in info["cuda_driver_required"]
    json.dumps(info)  # plain data, printable by a CLI


def test_info_names_the_openblas_kernels_in_use():
    import scipy_openblas32

    core = tensorpress.info()["blas_core"]
    assert core and core in scipy_openblas32.get_openblas_config()


def test_info_reports_a_forced_openblas_core():
    """OPENBLAS_CORETYPE (set on some machines, e.g. this project's, for old OpenBLAS builds)
    decides the kernels our GEMMs run; the benchmarks record it through info()."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("OpenBLAS's Haswell kernels need AVX2")
    env = dict(os.environ, OPENBLAS_CORETYPE="Haswell")
    out = subprocess.run(
        [sys.executable, "-c", "import tensorpress; print(tensorpress.info()['blas_core'])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == "Haswell"


def test_custom_ops_registered():
    assert hasattr(torch.ops.tensorpress, "tt_contract")
    assert hasattr(torch.ops.tensorpress, "tt_contract_backward")


def test_import_without_cuda_devices():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    code = (
        "import json, torch, tensorpress\n"
        "from tensorpress.nn import TTLinear\n"
        "info = tensorpress.info()\n"
        "assert info['cpu_kernels'] is True\n"
        "assert info['gpu_visible_to_torch'] is False\n"
        "assert info['cuda_devices_seen_by_extension'] == []\n"
        "layer = TTLinear(64, 32, ranks=4)\n"
        "x = torch.randn(3, 64)\n"
        "y = layer(x)\n"
        "assert torch.allclose(y, x @ layer.to_dense().T + layer.bias, atol=1e-5)\n"
        "print(json.dumps(info))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert EXPECTED_KEYS <= set(info)
