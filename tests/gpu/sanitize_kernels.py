"""Runs every CUDA kernel of tensorpress once on small inputs, for compute-sanitizer
(memcheck, racecheck) in benchmarks/gpu_check.sh:

    compute-sanitizer --tool memcheck  python tests/gpu/sanitize_kernels.py
    compute-sanitizer --tool racecheck python tests/gpu/sanitize_kernels.py

Exits non-zero if a result is wrong, so a kernel that the sanitizer lets through but that
computes garbage still fails. Small sizes: racecheck slows kernels down by orders of magnitude.
"""

from __future__ import annotations

import math
import sys

import torch

import tensorpress  # noqa: F401
from tensorpress._ext import _C
from tensorpress.linalg.svd import JACOBI_MAX_SWEEPS, JACOBI_TOL
from tensorpress.ops import tt as T
from tensorpress.ops.tt import merge_group, step_matrices, tt_contract_torch
from tensorpress.ops.tt_plan import cuda_limits, cuda_schedule, flat_dims


def tt_case(out_f, in_f, ranks, groups, order, batch, dtype, path, tensor_cores=False) -> float:
    gen = torch.Generator().manual_seed(0)
    full = (1, *ranks, 1)
    cores = [
        torch.randn(full[k], out_f[k], in_f[k], full[k + 1], dtype=torch.float64, generator=gen) * 0.3
        for k in range(len(out_f))
    ]
    merged = [merge_group(cores, g) for g in groups]
    mats64 = step_matrices(merged, order)
    dims = flat_dims(tuple(m.shape) for m in merged)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mats = [m.to("cuda", acc) for m in mats64]
    x = torch.randn(batch, math.prod(in_f), generator=gen).to("cuda", dtype)
    gy = torch.randn(batch, math.prod(out_f), generator=gen).to("cuda", dtype)
    stream = torch.cuda.current_stream().cuda_stream
    tables = T._tables(dims, list(order), x.device)
    merged_t = tuple(tuple(dims[i : i + 4]) for i in range(0, len(dims), 4))
    lim = cuda_limits("cuda")
    tc = tensor_cores
    s = cuda_schedule(merged_t, tuple(order), batch, False, dtype, lim, path, tensor_cores=tc)
    y = torch.empty(batch, math.prod(out_f), dtype=dtype, device="cuda")
    ws = torch.empty(max(s.workspace, 1), dtype=acc, device="cuda")
    _C.tt_forward(x, mats, dims, list(order), y, ws, 1, tables=tables, path=path, stream=stream, tensor_cores=tc)
    s = cuda_schedule(merged_t, tuple(order), batch, True, dtype, lim, path, tensor_cores=tc)  # decode: tiled
    gx = torch.empty_like(x)
    gm = [torch.empty_like(m) for m in mats]
    ws = torch.empty(max(s.workspace, 1), dtype=acc, device="cuda")
    _C.tt_backward(
        x, mats, dims, list(order), gy, gx, gm, ws, 1, tables=tables, path=path, stream=stream, tensor_cores=tc
    )
    torch.cuda.synchronize()
    x64 = x.double().cpu().requires_grad_()
    m64 = [m.clone().requires_grad_() for m in mats64]
    y64 = tt_contract_torch(x64, m64, dims, list(order))
    gx64, *gm64 = torch.autograd.grad(y64, [x64, *m64], gy.double().cpu())
    err = lambda a, b: float((a.double().cpu() - b).norm() / b.norm())  # noqa: E731
    return max([err(y, y64.detach()), err(gx, gx64)] + [err(a, b) for a, b in zip(gm, gm64)])


def svd_case(batch, m, n, dtype) -> float:
    a = torch.randn(batch, m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    k = min(m, n)
    ac = a.to("cuda", dtype)
    U = torch.empty(batch, m, k, dtype=dtype, device="cuda")
    S = torch.empty(batch, k, dtype=dtype, device="cuda")
    Vh = torch.empty(batch, k, n, dtype=dtype, device="cuda")
    _C.svd_jacobi_cuda(ac, U, S, Vh, JACOBI_TOL[dtype], JACOBI_MAX_SWEEPS, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    rec = (U.double() * S.double()[:, None, :]) @ Vh.double()
    return float((rec.cpu() - ac.double().cpu()).norm() / ac.double().norm())


def main() -> int:
    worst = {}
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float64, 1e-11)):
        for path in ("fused", "tiled"):
            worst[f"tt {path} {dtype}"] = (
                tt_case((3, 5, 2), (2, 7, 3), (4, 5), ((0,), (1,), (2,)), (1, 2, 0), 9, dtype, path),
                tol,
            )
            worst[f"tt {path} merged {dtype}"] = (
                tt_case((4, 2, 3), (2, 3, 4), (3, 2), ((0, 1), (2,)), (1, 0), 5, dtype, path),
                tol,
            )
        # the decode path's split steps (both steps of this plan are split)
        worst[f"tt decode {dtype}"] = (
            tt_case((4, 6), (24, 5), (6,), ((0,), (1,)), (0, 1), 3, dtype, "decode"),
            tol,
        )
    # the fused and tiled GEMMs on the tensor cores (tf32 for float32)
    for dtype, tol in ((torch.float32, 5e-3), (torch.bfloat16, 3e-2)):
        for path in ("fused", "tiled"):
            worst[f"tt {path} tensor cores {dtype}"] = (
                tt_case((3, 5, 2), (2, 7, 3), (4, 5), ((0,), (1,), (2,)), (1, 2, 0), 9, dtype, path, True),
                tol,
            )
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        worst[f"svd 16x16 {dtype}"] = (svd_case(4, 16, 16, dtype), tol)
        worst[f"svd 20x7 {dtype}"] = (svd_case(3, 20, 7, dtype), tol)
        worst[f"svd 7x20 rank-deficient-free {dtype}"] = (svd_case(3, 7, 20, dtype), tol)
    bad = {k: v for k, v in worst.items() if not v[0] < v[1]}
    for k, (e, tol) in worst.items():
        print(f"{k:40s} rel err {e:.2e} (tol {tol:g})")
    if bad:
        print(f"FAILED: {sorted(bad)}")
        return 1
    print("all kernels ran and matched the float64 reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
