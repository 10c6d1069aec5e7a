"""Over-parameterized CP by gradient descent vs its lazy variant vs CP-ALS from random starts.

Planted tensors T = sum_r a_r o b_r o c_r (...), unit-norm components with random (Gaussian)
or orthogonal directions and weights 1; success = relative error <= 1e-3. For each
(order, dim, rank, kind) and width m: the success rate over seeds and the median time of
cp_overparam (small start, re-randomization), the lazy variant (large start, none) and
cp_als from a random start; TensorLy's parafac (random init) on the same tensors for fit and
time. Writes benchmarks/results/cp_overparam.{json,md,png}.

Small by default (2 threads, a few minutes); --seeds 20 --full for the issue's full grid.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from tensorpress.decompose import cp_als, cp_overparam, cp_to_tensor

RESULTS = Path(__file__).resolve().parent / "results"


def planted(order, dim, rank, kind, seed):
    gen = torch.Generator().manual_seed(10_000 + seed)
    factors = []
    for _ in range(order):
        f = torch.randn(dim, rank, generator=gen, dtype=torch.float64)
        f = torch.linalg.qr(f)[0] if kind == "orthogonal" else f / f.norm(dim=0)
        factors.append(f)
    return cp_to_tensor(None, factors)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--full", action="store_true", help="the issue's grid: l in {3,4}, d in {10,20,40}, r in {2,3,5}")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.full:
        cases = [(l, d, r) for l in (3, 4) for d in (10, 20, 40) for r in (2, 3, 5) if l == 3 or d <= 20]
    else:
        cases = [(3, 10, 5), (3, 20, 5), (4, 10, 3)]
    try:
        import tensorly as tl
        from tensorly.decomposition import parafac
        tl.set_backend("pytorch")
    except ImportError:  # optional peer
        parafac = None
    rows = []
    for order, dim, rank in cases:
        for kind in ("random", "orthogonal"):
            tensors = [planted(order, dim, rank, kind, s) for s in range(args.seeds)]
            base = {"order": order, "dim": dim, "rank": rank, "kind": kind}
            als = [timed(lambda t=t, s=s: cp_als(t, rank, n_iter_max=1000, tol=1e-12, init="random", random_state=s))
                   for s, t in enumerate(tensors)]
            rows.append({**base, "method": "cp_als (random init)", "width": rank,
                         "success": sum(r.rel_error <= 1e-3 for r, _ in als) / len(als),
                         "median_time_s": statistics.median(t for _, t in als),
                         "median_rel_error": statistics.median(r.rel_error for r, _ in als)})
            if parafac is not None:
                res = []
                for s, t in enumerate(tensors):
                    (cp, t_s) = timed(lambda t=t, s=s: parafac(t, rank, n_iter_max=1000, tol=1e-12, init="random",
                                                               random_state=s))
                    err = ((tl.cp_to_tensor(cp) - t).norm() / t.norm()).item()
                    res.append((err, t_s))
                rows.append({**base, "method": "tensorly parafac (random init)", "width": rank,
                             "success": sum(e <= 1e-3 for e, _ in res) / len(res),
                             "median_time_s": statistics.median(t for _, t in res),
                             "median_rel_error": statistics.median(e for e, _ in res)})
            for width in (rank, 2 * rank, 4 * rank):
                for name, lazy in (("cp_overparam", False), ("cp_overparam lazy", True)):
                    out = [timed(lambda t=t, s=s: cp_overparam(t, rank, width=width, lazy=lazy, random_state=s))
                           for s, t in enumerate(tensors)]
                    rows.append({**base, "method": name, "width": width,
                                 "success": sum(r.rel_error <= 1e-3 for r, _ in out) / len(out),
                                 "median_time_s": statistics.median(t for _, t in out),
                                 "median_rel_error": statistics.median(r.rel_error for r, _ in out),
                                 "median_gd_steps": statistics.median(r.n_steps for r, _ in out)})
            for row in rows[-8:]:
                print(row, flush=True)
    stamp = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
             "device": platform.processor() or platform.machine(), "threads": args.threads, "seeds": args.seeds,
             "success_threshold": 1e-3}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cp_overparam.json").write_text(json.dumps({"stamp": stamp, "rows": rows}, indent=1))
    lines = [f"# Over-parameterized CP vs lazy vs ALS ({stamp['date']}, torch {stamp['torch']}, "
             f"{args.threads} threads, {args.seeds} seeds, success = rel. error <= 1e-3)", "",
             "| order | dim | rank | kind | method | width m | success | median time (s) | median rel. error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['order']} | {r['dim']} | {r['rank']} | {r['kind']} | {r['method']} | {r['width']} | "
                     f"{r['success']:.2f} | {r['median_time_s']:.3f} | {r['median_rel_error']:.1e} |")
    (RESULTS / "cp_overparam.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = sorted({(r["order"], r["dim"], r["rank"], r["kind"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3), sharey=True)
    for ax, g in zip(axes, groups):
        sel = [r for r in rows if (r["order"], r["dim"], r["rank"], r["kind"]) == g]
        for name, style in (("cp_overparam", "o-"), ("cp_overparam lazy", "s--")):
            pts = sorted((r["width"], r["success"]) for r in sel if r["method"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        for r in sel:
            if r["method"].startswith("cp_als"):
                ax.axhline(r["success"], color="gray", ls=":", label="cp_als random init")
        ax.set_title(f"l={g[0]} d={g[1]} r={g[2]} {g[3][:5]}", fontsize=8)
        ax.set_xlabel("width m")
    axes[0].set_ylabel("success rate")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / "cp_overparam.png", dpi=120)


if __name__ == "__main__":
    main()
