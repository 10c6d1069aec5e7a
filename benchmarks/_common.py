"""Helpers shared by the benchmark scripts: machine stamp, CPU-load (noise) measurement,
timing statistics and the stamp lines of the Markdown reports."""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import tensorpress

THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
)  # recorded: they change timings
TP_FLAGS = ("tensorpress", "cpu_kernels", "blas", "blas_core", "cxx_compiler")  # tensorpress.info() keys in the reports


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), for noise checks."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError):
        busy = math.nan
    return busy, ru.ru_utime + ru.ru_stime


def other_cpu_share(busy0: float, self0: float, wall0: float) -> float:
    """Fraction of the machine's CPU time used by other processes since cpu_seconds() gave busy0, self0."""
    busy1, self1 = cpu_seconds()
    return max(0.0, ((busy1 - busy0) - (self1 - self0)) / ((time.perf_counter() - wall0) * os.cpu_count()))


def machine_info(threads: int) -> dict:
    """Date, CPU, core count, load average, torch version and threads, tensorpress.info(), thread env."""
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")) or model
    except Exception:
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": model,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_start": os.getloadavg(),
        "torch": torch.__version__,
        "threads": threads,
        "opt_einsum": torch.backends.opt_einsum.is_available(),
        "tensorpress_info": tensorpress.info(),
        "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
    }


def git_revision() -> str:
    """The repository's commit ('+dirty' when the working tree has changes), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def stamp_lines(meta: dict) -> list[str]:
    """The date and machine lines (load averages and other processes' CPU share included) of a report."""
    return [
        f"- date: {meta['date']}",
        f"- machine: {meta['cpu']} ({meta['machine']}), {meta['cores']} cores; "
        f"load avg at start {', '.join(f'{v:.2f}' for v in meta['load_avg_start'])}, "
        f"at end {', '.join(f'{v:.2f}' for v in meta['load_avg_end'])}; other processes used "
        f"{meta['other_cpu_share']:.0%} of the CPU during the run (noisy if more than a few %)",
    ]


def tensorpress_flags(meta: dict) -> str:
    """The build flags of tensorpress.info() that the reports show, as 'key=value, ...'."""
    info = meta["tensorpress_info"]
    return ", ".join(f"{k}={info[k]}" for k in TP_FLAGS if k in info)


def median_ms(seconds: list[float]) -> float:
    """Median of timings in seconds, in milliseconds."""
    return 1e3 * statistics.median(seconds)


def quartiles_ms(seconds: list[float]) -> list[float]:
    """[first, third] quartile of timings in seconds, in milliseconds ([] for fewer than two)."""
    return [1e3 * q for q in statistics.quantiles(seconds, n=4)[::2]] if len(seconds) > 1 else []


def forced_blas_suffix() -> str:
    """'_<core>' where OPENBLAS_CORETYPE forces OpenBLAS's kernels (this project's machines set
    Haswell), else '': a forced core is a different machine, its results another file."""
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return f"_{forced.lower()}" if forced else ""


def interleaved_orders(n_sides: int, repeats: int, seed: int = 0) -> list[list[int]]:
    """The order in which to run `n_sides` sides at each of `repeats` repeats.

    A side runs slower right after some others (a dense GEMM leaves the caches and the
    clock in a state that costs the next kernel up to 10% on a 2-core machine), so every
    side should follow every other side equally often. Rotating one fixed order does not
    do that: each side then always follows the same neighbour. Instead the repeats walk
    through all orders (shuffled, with a seed; random orders beyond 5 sides).
    """
    rng = random.Random(seed)
    if n_sides <= 5:
        perms = [list(p) for p in itertools.permutations(range(n_sides))]
        rng.shuffle(perms)
        return [perms[r % len(perms)] for r in range(repeats)]
    orders = []
    for _ in range(repeats):
        order = list(range(n_sides))
        rng.shuffle(order)
        orders.append(order)
    return orders


def bench_parser(doc: str, repeats_help: str, warmup_help: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes: --device, --threads, --repeats, --warmup,
    --quick, --out (results/ beside the scripts)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help=repeats_help)
    ap.add_argument("--warmup", type=int, default=None, help=warmup_help)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return ap


def exit_unless_cpu(device: str, script: str) -> None:
    """The CUDA side of the benchmarks comes with the CUDA kernels; say so clearly."""
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"{script}: --device cuda requested but torch sees no GPU; use --device cpu")
        sys.exit(f"{script}: the CUDA benchmark is not implemented yet; use --device cpu")
