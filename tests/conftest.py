"""Fixtures and settings of the tensorpress test suite; its helper functions are in _util.py."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "tensorpress",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
settings.load_profile("tensorpress")


# tests/cuda_emu/ needs the CUDA emulation build: scripts/cuda_emu_tests.sh (run by
# run_tests.sh) builds it, points TENSORPRESS_CUDA_EMU_MODULE at it and runs that directory
collect_ignore = [] if os.environ.get("TENSORPRESS_CUDA_EMU_MODULE") else ["cuda_emu"]


@pytest.fixture(autouse=True, scope="session")
def avx2_dense_route_price():
    """The plan choices the tests assert are those priced for OpenBLAS's AVX2 kernels (CI's
    machines force them). With its AVX-512 kernels on an AMD CPU the plan search prices the
    dense route 2.4x higher (tt_plan.gemm_family); the tests of that pin it themselves."""
    from tensorpress.ops import tt_plan

    patch = pytest.MonkeyPatch()
    tt_plan.ranked_plans.cache_clear()
    patch.setattr(tt_plan, "dense_speed_advantage", lambda: tt_plan.DENSE_SPEED_ADVANTAGE["avx2"])
    yield
    patch.undo()
    tt_plan.ranked_plans.cache_clear()


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield n
    torch.set_num_threads(n)
