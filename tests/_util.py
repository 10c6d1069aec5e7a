"""Helpers of the tensorpress test suite, imported as a module (`from _util import rel_err`):
pytest puts tests/ on sys.path (pyproject.toml [tool.pytest.ini_options] pythonpath). Fixtures and
the suite's settings stay in conftest.py."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import torch

from tensorpress.ops.tt_plan import TTPlan, dense_flops, merge_shapes, plan_cost
from tensorpress.tt_format import core_stds

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def import_benchmark(name: str):
    """A script of benchmarks/ imported as a module (benchmarks/ is on sys.path only meanwhile,
    so its helper modules, _common and the like, resolve)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F computed in float64 (0 when both are empty or zero)."""
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    assert a.shape == b.shape, f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}"
    num = torch.linalg.vector_norm(a - b).item()
    den = torch.linalg.vector_norm(b).item()
    if den == 0.0:
        return num
    return num / den


def random_cores(out_factors, in_factors, ranks, dtype=torch.float64, generator=None, requires_grad=False):
    """TT cores (r_{k-1}, m_k, n_k, r_k) scaled so that W's entries have variance ~ 1/N."""
    full = (1, *ranks, 1)
    cores = []
    for k, std in enumerate(core_stds(ranks, 1.0 / math.prod(in_factors))):
        shape = (full[k], out_factors[k], in_factors[k], full[k + 1])
        g = torch.randn(shape, dtype=torch.float64, generator=generator) * std
        g = g.to(dtype)
        if requires_grad:
            g.requires_grad_(True)
        cores.append(g)
    return cores


def planted_matrix(p, R, n, snr, seed):
    """Scalar-on-matrix data y = <B, X> + eps: B (p x p) of rank R with ||B||_F = 1, X with
    i.i.d. N(0, 1) entries, Var(eps) = 1/snr."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(p, R, generator=g, dtype=torch.float64) @ torch.randn(R, p, generator=g, dtype=torch.float64)
    B /= B.norm()
    X = torch.randn(n, p, p, generator=g, dtype=torch.float64)
    y = X.flatten(1) @ B.flatten() + torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(snr)
    return X, y


def make_plan(shapes, groups, order, batch: int = 1, dense: bool = False) -> TTPlan:
    """A TTPlan for the given merge partition and absorb order (bypassing the search)."""
    shapes = tuple(tuple(int(v) for v in s) for s in shapes)
    if dense:
        everything = tuple(range(len(shapes)))
        cost = dense_flops(shapes, batch)
        return TTPlan((everything,), (0,), True, batch, cost, cost, (merge_shapes(shapes, everything)[0],))
    merged, merge_cost = zip(*(merge_shapes(shapes, tuple(g)) for g in groups))
    cost = sum(merge_cost) + plan_cost(tuple(merged), tuple(order), batch)
    return TTPlan(
        tuple(tuple(g) for g in groups), tuple(order), False, batch, cost, dense_flops(shapes, batch), tuple(merged)
    )


def tt_flops(shapes, order) -> int:
    """Per-sample multiply-add FLOPs of absorbing the cores `shapes` one by one in `order`,
    counted from first principles (independent of the package's plan geometry).

    Absorbing core k contracts n_k and the bonds it shares with absorbed neighbours; the
    state holds the unabsorbed n's, the absorbed m's and the open bonds. The step costs
    2 * (state size before) * (sizes produced: m_k and any newly opened bond).
    """
    d = len(shapes)
    absorbed = [False] * d
    n_left = math.prod(s[2] for s in shapes)
    m_done = 1
    open_bonds = {}  # bond index k (between core k and k+1) -> size
    total = 0
    for k in order:
        r_left, m, n, r_right = shapes[k]
        state = n_left * m_done * math.prod(open_bonds.values())
        produced = m
        if k > 0:
            if absorbed[k - 1]:
                del open_bonds[k - 1]
            else:
                open_bonds[k - 1] = r_left
                produced *= r_left
        if k + 1 < d:
            if absorbed[k + 1]:
                del open_bonds[k]
            else:
                open_bonds[k] = r_right
                produced *= r_right
        total += 2 * state * produced
        n_left //= n
        m_done *= m
        absorbed[k] = True
    return total
