"""The CUDA batched Jacobi SVD against float64 LAPACK and against the CPU Jacobi (same
conventions: sorted, sign-normalized, completed bases), on chosen spectra."""

from __future__ import annotations

import zlib

import pytest
import torch
from gpu_util import DEV, EMULATED, GPU, KERNELS, rel_err, stream, sync

from tensorpress.linalg import truncated_svd
from tensorpress.linalg.svd import JACOBI_MAX_SWEEPS, JACOBI_TOL, _jacobi, svd_method

pytestmark = GPU

SHAPES = [(16, 16), (32, 32), (64, 64), (40, 17), (17, 40), (64, 8), (5, 64), (1, 1), (3, 1)]
SPECTRA = ("gaussian", "decaying", "clustered", "rank_deficient", "ill_conditioned", "zero")
ACC = {torch.float32: 2e-6, torch.float64: 1e-13}  # relative to S_max / orthogonality
# matrices per batch: one block each; the CPU emulation runs blocks one after another, so it
# takes a few (every block runs the same code on its own matrix)
BATCH = 4 if EMULATED else 20


def make_batch(batch, m, n, spectrum, gen):
    """float64 CPU matrices with the given kind of spectrum."""
    k = min(m, n)
    if spectrum == "gaussian":
        return torch.randn(batch, m, n, dtype=torch.float64, generator=gen)
    if spectrum == "zero":
        return torch.zeros(batch, m, n, dtype=torch.float64)
    qa, _ = torch.linalg.qr(torch.randn(batch, m, k, dtype=torch.float64, generator=gen))
    qb, _ = torch.linalg.qr(torch.randn(batch, n, k, dtype=torch.float64, generator=gen))
    i = torch.arange(k, dtype=torch.float64)
    s = {
        "decaying": 0.5**i,
        "clustered": 1.0 + 1e-3 * (i % 3),
        "rank_deficient": (i < max(k // 2, 1)).double() * (1.0 + i),
        "ill_conditioned": torch.logspace(0, -6, k, dtype=torch.float64),
    }[spectrum]
    return (qa * s) @ qb.transpose(-1, -2)


def run_kernel(a):
    """The binding called directly on NaN-poisoned outputs."""
    b, m, n = a.shape
    k = min(m, n)
    nan = float("nan")
    U = torch.full((b, m, k), nan, dtype=a.dtype, device=DEV)
    S = torch.full((b, k), nan, dtype=a.dtype, device=DEV)
    Vh = torch.full((b, k, n), nan, dtype=a.dtype, device=DEV)
    KERNELS.svd_jacobi_cuda(a, U, S, Vh, JACOBI_TOL[a.dtype], JACOBI_MAX_SWEEPS, stream())
    sync()
    return U.cpu().double(), S.cpu().double(), Vh.cpu().double()


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_against_lapack(shape, spectrum, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape}{spectrum}".encode()))
    a64 = make_batch(BATCH, *shape, spectrum, gen)
    a = a64.to(dtype)
    U, S, Vh = run_kernel(a.to(DEV))
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    k = min(shape)
    s_ref = torch.linalg.svdvals(a.double())
    scale = s_ref[:, :1].clamp_min(1e-300)
    assert ((S - s_ref).abs() / scale).max() <= 10 * ACC[dtype] + (0 if spectrum != "zero" else 0)
    assert (S[:, :-1] >= S[:, 1:]).all(), "sorted descending"
    eye = torch.eye(k, dtype=torch.float64)
    assert (U.transpose(-1, -2) @ U - eye).abs().max() <= 100 * ACC[dtype]
    assert (Vh @ Vh.transpose(-1, -2) - eye).abs().max() <= 100 * ACC[dtype]
    if spectrum != "zero":
        assert rel_err(U * S[:, None, :] @ Vh, a.double()) <= 10 * ACC[dtype]
    # signs: the largest-magnitude entry of every left singular vector is positive
    idx = U.abs().argmax(dim=-2, keepdim=True)
    assert (torch.gather(U, -2, idx) > 0).all()


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((16, 16), marks=pytest.mark.tsan),
        (64, 64),
        (40, 17),
        pytest.param((17, 40), marks=pytest.mark.tsan),
    ],
    ids=str,
)
def test_matches_cpu_jacobi(shape):
    """Distinct singular values: the GPU and CPU drivers give the same triplets."""
    gen = torch.Generator().manual_seed(23)
    a = make_batch(BATCH, *shape, "decaying", gen)
    Ug, Sg, Vg = run_kernel(a.to(DEV))
    Uc, Sc, Vc = _jacobi(a)
    keep = Sc > 1e-10 * Sc[:, :1]  # directions above rounding are determined
    assert rel_err(Sg, Sc) < 1e-12
    assert ((Ug - Uc).abs() * keep[:, None, :]).max() < 1e-8
    assert ((Vg - Vc).abs() * keep[:, :, None]).max() < 1e-8


def test_truncated_svd_routes_to_kernel():
    gen = torch.Generator().manual_seed(29)
    a = make_batch(BATCH, 64, 64, "decaying", gen)
    assert svd_method(a.shape, 8, "auto", DEV) == "jacobi"
    U, S, Vh = truncated_svd(a.to(DEV).float(), rank=8)
    assert U.shape == (BATCH, 64, 8) and U.device.type == DEV
    s_ref = torch.linalg.svdvals(a)[:, :8]
    assert rel_err(S, s_ref) < 1e-5
    # too large for shared memory: torch's solver, same conventions
    big = torch.randn(2, 4096, 64, generator=gen).to(DEV)
    U, S, Vh = truncated_svd(big, rank=4, method="jacobi")
    assert rel_err(S, torch.linalg.svdvals(big.double().cpu())[:, :4]) < 1e-5


@pytest.mark.tsan
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e300], ids=["nan", "inf", "overflow"])
@pytest.mark.parametrize("shape", [(16, 16), (40, 17), (17, 40)], ids=str)
def test_non_finite_input_gives_nan_and_stays_in_bounds(shape, bad):
    """The raw kernel (truncated_svd refuses such input before): a matrix with NaN or Inf, or
    whose squared norms overflow, comes back as NaN everywhere, and its neighbours in the batch
    are untouched. (The counting sort used to leave `order` slots unset on NaN norms and write
    through them: out of bounds.)"""
    gen = torch.Generator().manual_seed(31)
    a = make_batch(3, *shape, "gaussian", gen)
    a[1, 2, 3] = bad
    U, S, Vh = run_kernel(a.to(DEV))
    assert torch.isnan(S[1]).all() and torch.isnan(U[1]).all() and torch.isnan(Vh[1]).all()
    for i in (0, 2):
        assert rel_err(U[i] * S[i] @ Vh[i], a[i]) < 1e-12


def test_randomized_method_runs_its_small_svds_on_the_kernel():
    """The randomized range finder's Rayleigh-Ritz step: its (l x l) SVDs go to the Jacobi
    kernel on the device (l = rank + oversample <= 64)."""
    from tensorpress.linalg import svd as svd_module

    gen = torch.Generator().manual_seed(37)
    a = make_batch(2, 160, 96, "decaying", gen)
    calls = []
    original = svd_module._jacobi
    svd_module._jacobi = lambda x: calls.append(tuple(x.shape)) or original(x)
    try:
        U, S, Vh = truncated_svd(a.to(DEV), rank=6, method="randomized", n_iter=6, generator=gen)
    finally:
        svd_module._jacobi = original
    assert calls and all(max(c[-2:]) <= 64 for c in calls)
    assert U.device.type == DEV and rel_err(S, torch.linalg.svdvals(a)[:, :6]) < 1e-10
    assert (
        rel_err(
            U @ torch.diag_embed(S) @ Vh,
            (torch.linalg.svd(a, full_matrices=False)[0][..., :6] * torch.linalg.svdvals(a)[:, None, :6])
            @ torch.linalg.svd(a, full_matrices=False)[2][..., :6, :],
        )
        < 1e-8
    )
