"""What TTLinear's no-grad inference cache costs for never serving stale weights.

The cache keeps the merged step matrices between no-grad CPU calls. It is valid while the
cores are the same tensors with the same storage, dtype, device, version and bytes; the byte
comparison (memcmp) is there because writes through ``.data`` change no version. This times
a no-grad forward with that check against the same forward with the key check alone (the
earlier, unsafe cache), both sides in one process on the same layer and input, in changing
orders, and reports medians and their ratio. A third side prepares every call (no cache).

    python benchmarks/bench_tt_cache.py [--repeats 40] [--threads 2]
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from _common import (
    bench_parser,
    cpu_seconds,
    forced_blas_suffix,
    interleaved_orders,
    other_cpu_share,
    provenance,
    stamp_lines,
    tensorpress_flags,
)
from tensorpress.nn import TTLinear, tt_linear

CASES = [(1024, 8, 1), (1024, 8, 32), (4096, 16, 1), (4096, 16, 32)]  # (features, rank, batch)
CALLS = 200  # forwards per timed sample


def _keys_only(self, plan, cores):
    """The cache check without the byte comparison (stale after writes through .data)."""
    return (
        plan == self.plan
        and len(cores) == len(self.cores)
        and all(a is b for a, b in zip(cores, self.cores))
        and tt_linear._storage_keys(cores) == self.keys
    )


def _time(layer, x, check, prepare_every_call=False) -> float:
    tt_linear._InferenceCache.valid_for = check
    if prepare_every_call:
        layer.__dict__.pop("_inference_cache", None)
        tt_linear._InferenceCache.valid_for = lambda *a: False
    layer(x)
    t = time.perf_counter()
    for _ in range(CALLS):
        layer(x)
    return (time.perf_counter() - t) / CALLS


def main() -> None:
    ap = bench_parser(__doc__, "timed samples per side (default 40)", "unused", "two cases, 8 samples")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (8 if args.quick else 40)
    meta = provenance(args.threads)
    busy0, self0 = cpu_seconds()
    wall0 = time.perf_counter()
    safe = tt_linear._InferenceCache.valid_for
    sides = {"bytes checked": (safe, False), "keys only": (_keys_only, False), "no cache": (safe, True)}
    rows = []
    for n, r, b in CASES[:2] if args.quick else CASES:
        torch.manual_seed(0)
        layer, x = TTLinear(n, n, ranks=r), torch.randn(b, n)
        times = {name: [] for name in sides}
        with torch.no_grad():
            for order in interleaved_orders(len(sides), repeats):
                for i in order:
                    name = list(sides)[i]
                    check, every = sides[name]
                    times[name].append(_time(layer, x, check, every))
                    if every:  # the next side starts from a warm cache again
                        tt_linear._InferenceCache.valid_for = safe
                        layer(x)
        tt_linear._InferenceCache.valid_for = safe
        med = {name: 1e6 * statistics.median(v) for name, v in times.items()}
        rows.append(
            {
                "features": n,
                "rank": r,
                "batch": b,
                "median_us": med,
                "check_cost": med["bytes checked"] / med["keys only"],
                "cache_gain": med["no cache"] / med["bytes checked"],
            }
        )
    meta.update(load_avg_end=__import__("os").getloadavg(), other_cpu_share=other_cpu_share(busy0, self0, wall0))
    stem = "tt_cache_cpu" + ("_quick" if args.quick else "") + forced_blas_suffix()
    record = {
        "git": meta["git"],
        "command": meta["command"],
        "repeats": repeats,
        "calls_per_sample": CALLS,
        "machine": meta,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    lines = [
        "# TTLinear no-grad inference cache: the cost of the byte check",
        "",
        *stamp_lines(meta),
        f"- tensorpress: {tensorpress_flags(meta)}",
        f"- settings: {args.threads} threads, {repeats} samples of {CALLS} no-grad forwards per side, "
        "sides in changing orders; medians",
        "",
        "| layer | batch | bytes checked (us) | keys only (us) | no cache (us) | check costs | cache gains |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        m = row["median_us"]
        lines.append(
            f"| {row['features']}² rank {row['rank']} | {row['batch']} | {m['bytes checked']:.1f} | "
            f"{m['keys only']:.1f} | {m['no cache']:.1f} | {row['check_cost']:.3f}x | "
            f"{row['cache_gain']:.2f}x |"
        )
    lines += [
        "",
        "'keys only' is the unsafe check (stale after `p.data.mul_`); 'check costs' = bytes checked / "
        "keys only; 'cache gains' = no cache / bytes checked.",
    ]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
