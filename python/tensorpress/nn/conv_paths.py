"""Per-shape choice between equivalent routes of a factorized conv's stages, measured once
per process on the CPU it runs on.

Why: CPConv2d's 1x1 stages can run as batched GEMMs on the extension's OpenBLAS or as torch's
1x1 conv (oneDNN), and its two depthwise stages as one fused kh x kw conv or two 1-D ones.
Which is faster depends on the CPU, its BLAS kernels, the thread count and the shape: on one
machine the GEMMs were 1.2-2x faster than oneDNN's NCHW 1x1 conv, on the 2-core EPYC of
benchmarks/results/conv_cpu.md they left the layer 2-10% behind tensorly-torch's four torch
convs, and issue 28 measured 5.34 vs 4.40 ms on a Zen 4. So the first call of each shape key
times every combination of routes as a whole forward on the call's own tensors (forward +
backward when it builds a graph) and keeps the fastest: about 4 forwards per combination
(one warm-up, REPEATS timed, and a run-off among near-ties), 8 combinations for kernels up to
7x7, once per key.

On by default for plain eager CPU calls (`set_autotune(False)` or TENSORPRESS_CONV_AUTOTUNE=0
at import turn it off; the layer then takes its static routes). Nothing is measured while
torch records or transforms the computation (compile, export, jit.trace, torch.func), under
CPU autocast or on other devices: those take the static routes. Routes round differently, so
outputs may differ in the last bits between processes; within a process a key always takes
the same route.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar, cast, overload

import torch
from torch import Tensor

from tensorpress._eager import plain_eager

REPEATS = 3  # timed runs per route (after one warm-up), interleaved across routes
# routes within RUNOFF_MARGIN of the best after those runs are near-ties, which one busy
# moment decides: they get RUNOFF_REPEATS more runs each (a 0.4% loss to tensorly-torch's
# route at r32 in benchmarks/results/conv_cpu.md came from such a pick)
RUNOFF_MARGIN = 0.10
RUNOFF_REPEATS = 4
MAX_KEYS = 1024  # cached keys kept; the oldest is dropped past this

# read at call time, so that tests can replace it with a scripted clock
clock: Callable[[], float] = time.perf_counter

_ENABLED = {"on": os.environ.get("TENSORPRESS_CONV_AUTOTUNE", "") != "0"}
_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()
_T = TypeVar("_T")
_K = TypeVar("_K", bound=Hashable)


def set_autotune(enabled: bool) -> None:
    """Choose each stage's route by timing them on the first call of each shape key (default
    on; TENSORPRESS_CONV_AUTOTUNE=0 turns it off at import). Off: the static routes."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    _ENABLED["on"] = enabled


def autotune_enabled() -> bool:
    return _ENABLED["on"]


def may_measure(x: Tensor, *params: Tensor | None) -> bool:
    """Whether this call may time routes: autotuning on, a non-empty batch of plain eager CPU
    tensors that nothing records, CPU autocast off (it would time autocast's dtype)."""
    # plain_eager first: under jit.trace the batch size is a traced value
    return autotune_enabled() and plain_eager(x, *params) and not torch.is_autocast_enabled("cpu") and x.shape[0] > 0


def autograd_wanted(x: Tensor, *params: Tensor | None) -> bool:
    """Whether this call builds a graph: its routes are then timed forward + backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))


def batch_bucket(n: int) -> int:
    """Batches in [2^(k-1), 2^k) share a key: a ragged last batch does not measure again."""
    return int(n).bit_length()


def call_key(x: Tensor, training: bool) -> tuple:
    """The part of a key every layer shares: input shape but batch, batch bucket, dtype,
    layout, thread count and grad mode."""
    return (tuple(x.shape[1:]), batch_bucket(x.shape[0]), x.dtype, x.is_contiguous(), torch.get_num_threads(), training)


def cached_choice(key: tuple, measure: Callable[[], _T]) -> _T:
    """The value cached for `key`, measuring it (once, under a lock: concurrent first calls
    agree) when absent."""
    got = _CACHE.get(key)
    if got is not None:
        return cast(_T, got)
    with _LOCK:
        got = _CACHE.get(key)
        if got is None:
            got = measure()
            if len(_CACHE) >= MAX_KEYS:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = got
    return cast(_T, got)  # a key's value is what its measure returned


def cached() -> dict[tuple, object]:
    """A copy of the cache: key -> choice."""
    return dict(_CACHE)


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def runner(forward: Callable[[], Tensor], wrt: tuple[Tensor, ...], training: bool) -> Callable[[], None]:
    """A call of `forward` as the layer will make it: without autograd, or with its backward
    to the leaves in `wrt` that want gradients (ones as the output's gradient)."""
    if not training:

        def run() -> None:
            with torch.no_grad():
                forward()

        return run
    leaves = [t for t in wrt if t.requires_grad]
    if not leaves:  # nothing of this stage wants a gradient: forward only
        return runner(forward, wrt, False)

    def run_with_backward() -> None:
        with torch.enable_grad():
            y = forward()
            torch.autograd.grad(y, leaves, torch.ones_like(y))

    return run_with_backward


@overload
def leaf(t: Tensor, requires_grad: bool) -> Tensor: ...
@overload
def leaf(t: None, requires_grad: bool) -> None: ...
@overload
def leaf(t: Tensor | None, requires_grad: bool) -> Tensor | None: ...
def leaf(t: Tensor | None, requires_grad: bool) -> Tensor | None:
    """A detached copy of the call's tensor (same storage) for timing: nothing reaches the
    caller's graph, hooks or .grad."""
    return None if t is None else t.detach().requires_grad_(requires_grad)


def fastest(routes: Mapping[_K, Callable[[], None]]) -> _K:
    """The route with the smallest time of its runs; ties go to the first listed. One warm-up
    each, then REPEATS rounds, the order rotated every round (no route always runs first),
    then RUNOFF_REPEATS more rounds among the routes within RUNOFF_MARGIN of the best. The
    minimum, not the median: another process only adds time; with the median of three, one
    run on a shared 2-core machine kept a forward + backward route 1.8x slower than the static
    one (8x256x32x32 r64)."""
    names = list(routes)
    if len(names) == 1:
        return names[0]
    for name in names:
        routes[name]()
    samples: dict[_K, list[float]] = {n: [] for n in names}

    def rounds(among: list[_K], count: int) -> None:
        for i in range(count):
            for name in among[i % len(among) :] + among[: i % len(among)]:
                start = clock()
                routes[name]()
                samples[name].append(clock() - start)

    rounds(names, REPEATS)
    best = min(min(samples[n]) for n in names)
    close = [n for n in names if min(samples[n]) <= (1.0 + RUNOFF_MARGIN) * best]
    if len(close) > 1:
        rounds(close, RUNOFF_REPEATS)
    return min(names, key=lambda n: min(samples[n]))
