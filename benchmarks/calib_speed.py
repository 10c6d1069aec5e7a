"""Calibration speed of compress(method="activation") on a synthetic audio CNN (issue 28 item 2).

The model is CREPE-"tiny"-shaped and built synthetically (random weights, seeded): one-channel
frames of 1,024 samples as (N, 1, 1024, 1); conv1 1 -> 128 with a 512x1 kernel (stride 4), then
five convs with 64x1 kernels (128 -> 16: 8,192-feature patches, 16 -> 16, 16 -> 16, 16 -> 32,
32 -> 64), each followed by BatchNorm, ReLU and 2x1 max-pooling, and a Linear 256 -> 360:
0.49M parameters. Calibration: --frames frames of a synthetic signal (sums of sines with random
pitch and noise) in batches of --batch.

Sides, timed in the same process one after the other (the order alternates per repeat):

* ``new``: compress() as it is (memory plan, statistics of the conv patches accumulated a chunk
  of samples at a time, the cross and reference sides kept only through the layer's weight);
* ``old`` (with --old): the exact float64 path as it was before issue 28 item 2: the whole
  batch's patches unfolded at once and the three (in, in) Grams X^T X, X~^T X~, X~^T X kept for
  every conv (selected here by switching the conv projection and the chunking off).

Both give Tucker-2 at 50% (structure="tucker") with the same ranks; the relative output
error of the compressed models on held-out frames is reported for each side.

    python benchmarks/calib_speed.py --old          # new and old (about 5 minutes here)
    python benchmarks/calib_speed.py --quick        # smoke test: 64 frames, new only
    python benchmarks/calib_speed.py --memory       # peak RSS of the 1,024-channel 64x1 model

Writes calib_speed.{json,md} (calib_speed_quick.* with --quick) under --out.

With --memory (issue 28 item 1) it measures instead the peak resident memory of compress(
method="activation", structure="tucker") under the default budget (max_memory=None: half of
MemAvailable) on a synthetic model whose first conv has 1,024 input channels and 64x1 kernels
(65,536-feature patches: an exact float64 Gram would be 34 GB): Conv2d(1024, 8, (64, 1),
padding="same"), ReLU, MaxPool (2, 1), Conv2d(8, 8, (64, 1), padding="same"), on --frames
frames of 1,024 channels x 64 positions (default 32). The peak is ru_maxrss of the process and
its increase over the resident memory just before compress() (after a warm-up call on a small
conv, so library pages first touched are not counted). Writes compress_memory.{json,md}.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

import tensorpress as tp
from tensorpress.compress import calibrate, memory, sequential

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_parser, cpu_seconds, other_cpu_share, provenance, stamp_lines  # noqa: E402


def crepe_tiny(seed: int = 0) -> nn.Module:
    """The synthetic CREPE-tiny-shaped CNN of the module docstring (eval mode)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [
        nn.Conv2d(1, 128, (512, 1), stride=(4, 1), padding=(254, 0)),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.MaxPool2d((2, 1)),
    ]
    chans = [128, 16, 16, 16, 32, 64]
    for cin, cout in zip(chans[:-1], chans[1:]):
        layers += [nn.Conv2d(cin, cout, (64, 1), padding="same"), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d((2, 1))]
    layers += [nn.Flatten(), nn.Linear(64 * 4, 360)]
    model = nn.Sequential(*layers)
    with torch.no_grad():  # give the BatchNorms running statistics of their own
        model.train()
        for _ in range(4):
            model(frames(64, seed + 100))
    return model.eval()


def frames(n: int, seed: int) -> torch.Tensor:
    """n frames (n, 1, 1024, 1) of sines with random pitch, two harmonics and noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(1024, dtype=torch.float32) / 16000.0
    f0 = 50.0 * 2.0 ** (6.0 * torch.rand(n, 1, generator=g))
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    x = torch.sin(2 * math.pi * f0 * t + phase) + 0.5 * torch.sin(4 * math.pi * f0 * t + phase)
    x = x + 0.1 * torch.randn(n, 1024, generator=g)
    return x.reshape(n, 1, 1024, 1)


@contextmanager
def old_exact_path():
    """The pre-item-2 statistics: whole-batch unfolds, three full Grams per conv."""
    saved = (sequential.narrows, sequential.layer_row_chunks)

    def narrows_linear_only(layer):
        return isinstance(layer, nn.Linear) and memory.narrows(layer)

    def whole(layer, x, mask, max_rows):
        yield calibrate.layer_rows(layer, x, mask)

    sequential.narrows, sequential.layer_row_chunks = narrows_linear_only, whole
    try:
        yield
    finally:
        sequential.narrows, sequential.layer_row_chunks = saved


def run_side(side: str, model, calib, held_out, args) -> dict:
    ctx = old_exact_path() if side == "old" else _nothing()
    with ctx:
        t0 = time.perf_counter()
        small, report = tp.compress(
            model,
            calib,
            structure="tucker",
            method="activation",
            budget=0.5,
            progress=False,
            max_memory=args.max_memory,
        )
        seconds = time.perf_counter() - t0
    with torch.no_grad():
        y, y_hat = model(held_out), small(held_out)
    fits = sum(r.seconds for r in report.layers)
    return {
        "side": side,
        "seconds": seconds,
        "fit_seconds": fits,
        "calibration_seconds": seconds - fits,
        "held_out_rel_error": float((y - y_hat).norm() / y.norm()),
        "kept_fraction": report.kept_fraction,
        "layers": [
            {
                "name": r.name,
                "shape": list(r.shape),
                "rank": list(r.rank) if isinstance(r.rank, tuple) else r.rank,
                "statistics": r.statistics,
                "rows": r.rows,
                "rel_error": r.rel_error,
                "fit_seconds": r.seconds,
            }
            for r in report.layers
        ],
        "memory_plan": report.memory_lines,
    }


@contextmanager
def _nothing():
    yield


def memory_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1024, 8, (64, 1), padding="same"),
        nn.ReLU(),
        nn.MaxPool2d((2, 1)),
        nn.Conv2d(8, 8, (64, 1), padding="same"),
    ).eval()


def _rss() -> int:
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_memory(args) -> None:
    import gc
    import resource

    n_frames = args.frames if args.frames != 512 else 32
    model = memory_model()
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(1024, 48, generator=g) / 48**0.5
    x = torch.einsum("cr,nrhw->nchw", mix, torch.randn(n_frames, 48, 64, 1, generator=g))
    calib = list((x + 0.1 * torch.randn(x.shape, generator=g)).split(args.batch))
    held = torch.einsum("cr,nrhw->nchw", mix, torch.randn(16, 48, 64, 1, generator=g))
    warm = nn.Sequential(nn.Conv2d(16, 4, (8, 1))).eval()
    tp.compress(warm, [torch.randn(4, 16, 20, 1)], structure="tucker", max_memory="256K", progress=False)
    meta = provenance(args.threads)
    busy0, self0 = cpu_seconds()
    wall0 = time.perf_counter()
    gc.collect()
    before = _rss()
    t0 = time.perf_counter()
    small, report = tp.compress(model, calib, structure="tucker", method="activation", progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        err = float((model(held) - small(held)).norm() / model(held).norm())
    svd_small, _ = tp.compress(model, calib, structure="tucker", method="svd", progress=False)
    with torch.no_grad():
        err_svd = float((model(held) - svd_small(held)).norm() / model(held).norm())
    meta["load_avg_end"] = os.getloadavg()
    meta["other_cpu_share"] = other_cpu_share(busy0, self0, wall0)
    mib = 1 << 20
    exact0 = report.memory["layers"]["0"]["exact_bytes"]
    out = {
        "meta": meta,
        "git": meta["git"],
        "command": meta["command"],
        "settings": {
            "model": "Conv2d(1024, 8, (64, 1), same), ReLU, MaxPool(2, 1), Conv2d(8, 8, (64, 1), same)",
            "frames": n_frames,
            "batch": args.batch,
            "input": [n_frames, 1024, 64, 1],
            "structure": "tucker",
            "method": "activation",
            "budget": 0.5,
            "max_memory": None,
            "threads": args.threads,
        },
        "seconds": seconds,
        "rss_before_compress_bytes": before,
        "peak_rss_bytes": peak,
        "peak_increase_bytes": peak - before,
        "memory_plan": report.memory,
        "memory_lines": report.memory_lines,
        "layers": [{"name": r.name, "statistics": r.statistics, "rel_error": r.rel_error} for r in report.layers],
        "held_out_rel_error": {"activation": err, "svd": err_svd},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compress_memory.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Peak memory of compress() on a 1,024-channel conv with 64x1 kernels",
        "",
        *stamp_lines(meta),
        f"- torch {meta['torch']}, {args.threads} threads",
        f"- model: {out['settings']['model']}; {n_frames} calibration frames (1,024 channels x 64 positions) in "
        f"batches of {args.batch}; structure='tucker', method='activation', budget=0.5, max_memory=None (default)",
        "",
        f"- time: {seconds:.1f} s",
        f"- peak RSS of the process: {peak / mib:,.0f} MiB; resident just before compress(): {before / mib:,.0f} MiB; "
        f"increase during compress(): {(peak - before) / mib:,.0f} MiB",
        *[f"- {ln}" for ln in report.memory_lines],
        f"- the exact float64 statistics of layer '0' would need {exact0 / mib:,.0f} MiB",
        f"- held-out relative output error: activation {err:.4f}, weights-only (svd) {err_svd:.4f}",
        "",
        "| layer | statistics | rel. output error (calibration, estimated) |",
        "|---|---|---:|",
        *[f"| {r.name} | {r.statistics} | {r.rel_error:.4f} |" for r in report.layers],
        "",
    ]
    (args.out / "compress_memory.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = bench_parser(__doc__, "repeats of each side (default 1)", "unused", "64 frames, new side only")
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--old", action="store_true", help="also time the old exact float64 path")
    ap.add_argument("--max-memory", default=None, help="compress(max_memory=...) (default: the default budget)")
    ap.add_argument("--memory", action="store_true", help="peak RSS of the 1,024-channel 64x1 model instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        run_memory(args)
        return
    n_frames = 64 if args.quick else args.frames
    model = crepe_tiny()
    params = sum(p.numel() for p in model.parameters())
    calib = list(frames(n_frames, 1).split(args.batch))
    held_out = frames(128, 2)
    sides = ["new"] + (["old"] if args.old and not args.quick else [])
    repeats = args.repeats or 1
    meta = provenance(args.threads)
    busy0, self0 = cpu_seconds()
    wall0 = time.perf_counter()
    runs = []
    for r in range(repeats):
        order = sides if r % 2 == 0 else sides[::-1]
        for side in order:
            res = run_side(side, model, calib, held_out, args)
            res["repeat"] = r
            runs.append(res)
            print(
                f"{side}: {res['seconds']:.1f} s (fits {res['fit_seconds']:.1f} s), held-out rel error "
                f"{res['held_out_rel_error']:.4f}",
                flush=True,
            )
    meta["load_avg_end"] = os.getloadavg()
    meta["other_cpu_share"] = other_cpu_share(busy0, self0, wall0)
    out = {
        "meta": meta,
        "git": meta["git"],
        "command": meta["command"],
        "settings": {
            "model": "synthetic CREPE-tiny-shaped CNN (see the script's docstring)",
            "params": params,
            "frames": n_frames,
            "batch": args.batch,
            "structure": "tucker",
            "method": "activation",
            "budget": 0.5,
            "max_memory": args.max_memory,
            "threads": args.threads,
        },
        "runs": runs,
    }
    stem = "calib_speed_quick" if args.quick else "calib_speed"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Calibration speed of compress(method='activation') on a 0.49M-parameter audio CNN",
        "",
        *stamp_lines(meta),
        f"- torch {meta['torch']}, {args.threads} threads",
        f"- model: synthetic CREPE-tiny-shaped CNN, {params:,} parameters; conv '4' (128 -> 16, 64x1) has "
        f"8,192-feature patches; {n_frames} calibration frames in batches of {args.batch}; "
        "structure='tucker', budget=0.5",
        "",
        "| side | total s | fits s | calibration s | held-out rel. output error |",
        "|---|---:|---:|---:|---:|",
    ]
    for res in runs:
        lines.append(
            f"| {res['side']} | {res['seconds']:.1f} | {res['fit_seconds']:.1f} | {res['calibration_seconds']:.1f} | "
            f"{res['held_out_rel_error']:.4f} |"
        )
    lines += ["", "Per layer (new side, first run):", "", "| layer | shape | rank | statistics | rows | fit s |"]
    lines.append("|---|---|---|---|---:|---:|")
    for lay in runs[0]["layers"]:
        lines.append(
            f"| {lay['name']} | {lay['shape'][0]}x{lay['shape'][1]} | {lay['rank']} | {lay['statistics']} | "
            f"{lay['rows']:,} | {lay['fit_seconds']:.1f} |"
        )
    lines += ["", *[f"- {ln}" for ln in runs[0]["memory_plan"]], ""]
    (args.out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
