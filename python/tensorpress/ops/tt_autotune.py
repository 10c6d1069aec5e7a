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
import statistics
import time

import torch

from tensorpress.ops.tt import apply_tt, compute_dtype, prepare_tt, tt_matmul
from tensorpress.ops.tt_plan import CoreShape, TTPlan, ranked_plans

# plans timed: at most this many, and only those the model puts within this factor of its best
MAX_CANDIDATES = 4
COST_SLACK = 1.3
REPEATS = 5


def candidates(shapes: tuple[CoreShape, ...], batch: int, allow_dense: bool) -> tuple[TTPlan, ...]:
    """The plans worth timing: the cheapest by the model and those close behind it."""
    ranked = ranked_plans(shapes, batch, allow_dense)
    limit = ranked[0].cost * COST_SLACK
    return tuple(p for p in ranked[:MAX_CANDIDATES] if p.cost <= limit)


def autotuned_plan(shapes: tuple[CoreShape, ...], batch: int, allow_dense: bool, dtype: torch.dtype) -> TTPlan:
    """With autograd on, plans are timed forward + backward (a plan fast forward can be slow
    backward: one merged core of all of W runs its gradient through the fused kernel's
    per-thread partials); without, forward alone. Each is kept apart."""
    return _autotuned(shapes, batch, allow_dense, compute_dtype(dtype), torch.get_num_threads(),
                      torch.is_grad_enabled())


@functools.lru_cache(maxsize=1024)
def _autotuned(shapes, batch, allow_dense, dtype, threads, training) -> TTPlan:
    plans = candidates(shapes, batch, allow_dense)
    if len(plans) == 1 or batch == 0:
        return plans[0]
    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    x = torch.randn(batch, math.prod(s[2] for s in shapes), generator=gen, dtype=dtype)
    return min(plans, key=lambda plan: _median_seconds(x, cores, plan, training))


def _median_seconds(x, cores, plan, training) -> float:
    if training:
        cores = [g.detach().requires_grad_(True) for g in cores]
        x = x.detach().requires_grad_(True)
        grad_y = torch.ones(x.shape[0], math.prod(g.shape[1] for g in cores), dtype=x.dtype)

        def run():
            torch.autograd.grad(tt_matmul(x, cores, plan), [x, *cores], grad_y)
    else:
        mats = prepare_tt(cores, plan)

        def run():
            with torch.no_grad():
                apply_tt(x, mats, plan)
    run()                                             # warm-up: workspace, caches
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
