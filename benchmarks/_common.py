"""Helpers shared by the benchmark scripts: provenance (code, command, machine), CPU-load (noise) measurement,
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
import shlex
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


def _lscpu() -> dict[str, str]:
    """lscpu's "key: value" lines ({} where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except Exception:
        return {}
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines()) if v}


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout


def git_state() -> tuple[str, bool]:
    """(short commit, whether tracked files differ from it); ('unknown', False) outside a checkout."""
    try:
        return _git("rev-parse", "--short", "HEAD").strip(), bool(_git("status", "--porcelain", "--untracked-files=no"))
    except Exception:
        return "unknown", False


def git_revision() -> str:
    """The repository's commit, '+dirty' appended when tracked files have changes, or 'unknown'."""
    rev, dirty = git_state()
    return rev + ("+dirty" if dirty else "")


def command_line(argv: list[str] | None = None) -> str:
    """How to rerun this process from the repository root: 'python benchmarks/x.py --flag ...'."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve() if argv else None
    root = Path(__file__).resolve().parent.parent
    if script is not None and script.is_relative_to(root):
        head = f"python {script.relative_to(root)}"
    else:
        head = "python " + (argv[0] if argv else "")
    return " ".join([head, *(shlex.quote(a) for a in argv[1:])]).strip()


def provenance(threads: int) -> dict:
    """Everything a results file records about how it was made: the code (git commit and dirty
    flag), the command, the date, the machine (CPU model, family and model number: Zen 4 and
    Zen 5 differ 1.5x under one marketing name), core count, load average, torch and Python
    versions, thread count and thread environment, tensorpress.info(). Every benchmark script
    puts this dict in its JSON as "meta" and renders it with stamp_lines."""
    cpu = _lscpu()
    rev, dirty = git_state()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": rev + ("+dirty" if dirty else ""),
        "git_commit": rev,
        "git_dirty": dirty,
        "command": command_line(),
        "argv": list(sys.argv),
        "cpu": cpu.get("Model name") or platform.processor(),
        "cpu_family": cpu.get("CPU family"),
        "cpu_model_number": cpu.get("Model"),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "opt_einsum": torch.backends.opt_einsum.is_available(),
        "tensorpress_info": tensorpress.info(),
        "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
    }


def stamp_lines(meta: dict) -> list[str]:
    """The provenance lines of a report: date, code and command, machine (load averages and
    other processes' CPU share included)."""
    family = f"family {meta['cpu_family']} model {meta['cpu_model_number']}, " if meta.get("cpu_family") else ""
    return [
        f"- date: {meta['date']}",
        f"- code: git {meta.get('git', 'not recorded')}; command: `{meta.get('command', 'not recorded')}`",
        f"- machine: {meta['cpu']} ({family}{meta['machine']}), {meta['cores']} cores; "
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
