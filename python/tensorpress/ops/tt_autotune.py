"""Opt-in autotuning of CPU contraction plans: time the few plans the cost model ranks
cheapest on random data of the call's shapes and keep the fastest, per (core shapes, batch,
dtype, thread count, grad mode), for the life of the process.

Why: the cost model (FLOPs plus weighted permute and GEMM traffic, `tt_plan.plan_cost`)
cannot rank plans whose costs differ by a few percent; which permutation is cheaper depends
on the caches. On the 2-core EPYC of benchmarks/results/tt_cpu.md, 1024x1024 rank 8 at batch
256 ran 1.59 ms forward with absorb order (1, 0) against 1.77 ms for the model's (0, 1),
while at rank 16 and at 4096x4096 the model's order was 10-25% faster. Off by default
(`tensorpress.ops.set_autotune(True)` or TENSORPRESS_AUTOTUNE=1): the choice then rests on
timings, and plans round differently, so results may differ in the last bits between
processes.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

from tensorpress.ops.tt_plan import CoreShape, TTPlan, ranked_plans

# plans timed: at most this many, and only those the model puts within this factor of its best
MAX_CANDIDATES = 4
COST_SLACK = 1.3
REPEATS = 5

_AUTOTUNE = {"enabled": os.environ.get("TENSORPRESS_AUTOTUNE", "") == "1"}

# run_plan(x, cores, plan, training): one call of tt_matmul on that plan (forward, and with
# `training` the backward of x and every core). Passed in by ops.tt, which runs the kernels:
# this module then needs nothing of ops.tt and the import graph has no cycle.
RunPlan = Callable[[torch.Tensor, list, TTPlan, bool], None]


def set_autotune(enabled: bool) -> None:
    """Choose CPU plans by timing the few the cost model ranks cheapest, not by the model
    alone. Off by default (TENSORPRESS_AUTOTUNE=1 turns it on at import)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    _AUTOTUNE["enabled"] = enabled


def autotune_enabled() -> bool:
    """Whether CPU plans are chosen by timing (set_autotune) rather than by the cost model alone."""
    return _AUTOTUNE["enabled"]


def candidates(
    shapes: tuple[CoreShape, ...], batch: int, allow_dense: bool, training: bool = False
) -> tuple[TTPlan, ...]:
    """The plans worth timing: the cheapest by the model and those close behind it (in a
    training step, among the plans the model allows there)."""
    ranked = ranked_plans(shapes, batch, allow_dense, training)
    limit = ranked[0].cost * COST_SLACK
    return tuple(p for p in ranked[:MAX_CANDIDATES] if p.cost <= limit)


def autotuned_plan(
    shapes: tuple[CoreShape, ...], batch: int, allow_dense: bool, dtype: torch.dtype, training: bool, run_plan: RunPlan
) -> TTPlan:
    """The fastest candidate, timed once per (shapes, batch, dtype, threads, training) for the
    life of the process. In training (the cores need gradients) plans are timed forward +
    backward (a plan fast forward can be slow backward: one merged core of all of W runs its
    gradient through the fused kernel's per-thread partials); otherwise forward alone."""
    return _autotuned(shapes, batch, allow_dense, dtype, torch.get_num_threads(), training, run_plan)


@functools.lru_cache(maxsize=1024)
def _autotuned(shapes, batch, allow_dense, dtype, threads, training, run_plan) -> TTPlan:
    plans = candidates(shapes, batch, allow_dense, training)
    if len(plans) == 1 or batch == 0:
        return plans[0]
    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    x = torch.randn(batch, math.prod(s[2] for s in shapes), generator=gen, dtype=dtype)
    return min(plans, key=lambda plan: _median_seconds(x, cores, plan, training, run_plan))


def _median_seconds(x, cores, plan, training, run_plan) -> float:
    run_plan(x, cores, plan, training)  # warm-up: workspace, caches
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run_plan(x, cores, plan, training)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
