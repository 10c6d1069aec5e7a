"""Choosing how to contract x with a TT-matrix: which adjacent cores to pre-merge, in which
order to absorb the (merged) cores, or whether to rebuild W and run one dense GEMM.

The geometry of every step comes from the C++ plan (csrc/tt/tt_plan.h), so the cost model
and the kernel can never disagree about shapes.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from tensorpress._ext import _C

# Moving one element in a permutation between GEMMs costs about this many FLOPs' worth of
# time per unit of the kernel's permute cost (x1 memcpy runs .. x4 element-wise gathers;
# GEMMs run at ~100 GFLOP/s per core); and every element a GEMM reads or writes about one
# more (small-K GEMMs are bound by memory, not FLOPs).
PERMUTE_COST_FLOPS = 4
# One large dense GEMM (torch's BLAS) runs faster per FLOP than a fused plan's smaller GEMMs
# beyond what the traffic terms above capture, so the dense route's cost is its FLOPs divided
# by this. Measured on the 2-core EPYC (benchmarks/results/tt_cpu.md): dense won at a
# dense-FLOPs / fused-cost ratio of 1.06 (1024x1024 r16, batch 256: 3.0 vs 3.6 ms) and lost at
# 1.16 (768->3072 r16, batch 256: 7.0 vs 6.0 ms); 1.1 separates them.
DENSE_SPEED_ADVANTAGE = 1.1
GEMM_TRAFFIC_FLOPS = 1

CoreShape = tuple[int, int, int, int]


@dataclass(frozen=True)
class TTPlan:
    """A contraction plan for one batch size.

    groups: the partition of the cores into runs merged before the contraction.
    order:  the order in which the merged groups are absorbed (a growing interval).
    dense:  rebuild W once and run a single GEMM instead.
    flops:  arithmetic FLOPs of the whole call at this batch (merging included);
    dense_flops: what the dense route costs, for comparison.
    cost:   what the plan search minimized: FLOPs plus memory-traffic terms.
    """

    groups: tuple[tuple[int, ...], ...]
    order: tuple[int, ...]
    dense: bool
    batch: int
    flops: int
    dense_flops: int
    merged_shapes: tuple[CoreShape, ...]
    cost: int = 0

    def __str__(self) -> str:
        if self.dense:
            return f"dense (rebuild W, one GEMM): {self.flops / 1e6:.1f} MFLOP at batch {self.batch}"
        groups = " ".join("[" + ",".join(map(str, g)) + "]" for g in self.groups)
        return (f"fused TT: groups {groups}, order {list(self.order)}: {self.flops / 1e6:.1f} MFLOP "
                f"at batch {self.batch} (dense {self.dense_flops / 1e6:.1f})")


def _partitions(d: int):
    """All ways to cut 0..d-1 into contiguous runs."""
    for cuts in itertools.product((False, True), repeat=d - 1):
        groups, start = [], 0
        for k, cut in enumerate(cuts, start=1):
            if cut:
                groups.append(tuple(range(start, k)))
                start = k
        groups.append(tuple(range(start, d)))
        yield tuple(groups)


def _orders(d: int):
    """All absorb orders of d cores that grow one contiguous interval."""
    for start in range(d):
        n_left = start
        for left_positions in itertools.combinations(range(d - 1), n_left):
            order, lo, hi = [start], start, start
            for t in range(d - 1):
                if t in left_positions:
                    lo -= 1
                    order.append(lo)
                else:
                    hi += 1
                    order.append(hi)
            yield tuple(order)


def merge_shapes(shapes: tuple[CoreShape, ...], group: tuple[int, ...]) -> tuple[CoreShape, int]:
    """Shape of the merged core of a group, and the FLOPs of merging it left to right."""
    r0, m, n, r = shapes[group[0]]
    flops = 0
    for k in group[1:]:
        _, mk, nk, rk = shapes[k]
        flops += 2 * r0 * m * n * r * mk * nk * rk
        m, n, r = m * mk, n * nk, rk
    return (r0, m, n, r), flops


def dense_flops(shapes: tuple[CoreShape, ...], batch: int) -> int:
    (_, M, N, _), merge = merge_shapes(shapes, tuple(range(len(shapes))))
    return merge + 2 * batch * M * N


def dense_route_cost(shapes: tuple[CoreShape, ...], batch: int) -> int:
    """What the plan search charges for rebuilding W and running one GEMM."""
    return int(dense_flops(shapes, batch) / DENSE_SPEED_ADVANTAGE)


def flat_dims(shapes) -> list[int]:
    return [int(v) for s in shapes for v in s]


@torch.compiler.assume_constant_result  # a pure function of static shapes
def plan_info(core_dims: tuple[int, ...], order: tuple[int, ...]) -> dict:
    """The C++ plan's geometry (steps, permutations, GEMM shapes) for merged core dims."""
    return _plan_info(tuple(core_dims), tuple(order))


@functools.lru_cache(maxsize=4096)
def _plan_info(core_dims: tuple[int, ...], order: tuple[int, ...]) -> dict:
    return _C.tt_plan_info(list(core_dims), list(order))


def plan_cost(merged: tuple[CoreShape, ...], order: tuple[int, ...], batch: int) -> int:
    """Estimated cost, in FLOP-equivalents, of contracting a batch with already merged cores."""
    info = plan_info(tuple(flat_dims(merged)), tuple(order))
    per_sample = info["flops_per_sample"] + PERMUTE_COST_FLOPS * info["permute_cost_per_sample"]
    per_sample += GEMM_TRAFFIC_FLOPS * sum(s["rows"] * (s["K"] + s["N"]) for s in info["steps"])
    return batch * per_sample


@functools.lru_cache(maxsize=4096)
def _choose(shapes: tuple[CoreShape, ...], batch: int, allow_dense: bool) -> TTPlan:
    d = len(shapes)
    dense_cost = dense_route_cost(shapes, batch)
    best = None
    for groups in _partitions(d):
        merged, merge_cost = zip(*(merge_shapes(shapes, g) for g in groups))
        for order in _orders(len(groups)):
            cost = sum(merge_cost) + plan_cost(merged, order, batch)
            if best is None or cost < best[0]:
                best = (cost, groups, order, merged)
    cost, groups, order, merged = best
    if allow_dense and dense_cost <= cost:  # ties: one big GEMM runs faster
        everything = tuple(range(d))
        flops = dense_flops(shapes, batch)
        return TTPlan((everything,), (0,), True, batch, flops, flops,
                      (merge_shapes(shapes, everything)[0],), dense_cost)
    merge_flops = sum(merge_shapes(shapes, g)[1] for g in groups)
    flops = merge_flops + batch * plan_info(tuple(flat_dims(merged)), tuple(order))["flops_per_sample"]
    return TTPlan(groups, order, False, batch, flops, dense_flops(shapes, batch), tuple(merged), cost)


@torch.compiler.assume_constant_result  # pure function of static shapes: torch.compile folds it
def choose_plan(shapes, batch: int, allow_dense: bool = True) -> TTPlan:
    """The cheapest plan by FLOP count for cores of the given shapes at this batch size.

    Searches every contiguous merge partition and every absorb order (2^(d-1) x 2^(d'-1)
    candidates, cached), and the dense route when `allow_dense`.
    """
    shapes = tuple(tuple(int(v) for v in s) for s in shapes)
    return _choose(shapes, int(batch), bool(allow_dense))
