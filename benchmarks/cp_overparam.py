"""Over-parameterized CP by gradient descent vs its lazy variant vs CP-ALS from random starts.

Planted tensors T = sum_r a_r o b_r o c_r (...), unit-norm components with random (Gaussian)
or orthogonal directions and weights 1; success = relative error <= 1e-3. For each
(order, dim, rank, kind) and width m: the success rate over seeds and the median time of
cp_overparam (small start, re-randomization), the lazy variant (large start, none) and
cp_als from a random start; TensorLy's parafac (random init) on the same tensors for fit and
time. Tucker on the same tensors: tensorpress.decompose.tucker (HOSVD + HOOI) vs TensorLy's
tucker (SVD init + HOOI) at multilinear rank r (exact for these tensors) and r - 1 (a truncated
fit), relative error and time. Every timed function is called once untimed first (warm-up).
Writes benchmarks/results/cp_overparam.{json,md,png}.

Small by default (2 threads, a few minutes); --seeds 20 --full for the issue's full grid.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from tensorpress.decompose import cp_als, cp_overparam, cp_to_tensor, tucker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, git_revision, machine_info, other_cpu_share, stamp_lines  # noqa: E402

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


def tucker_rows(base: dict, tensors: list, rank: int, tl_tucker) -> list[dict]:
    """Ours vs TensorLy's Tucker at multilinear rank ``rank`` and ``rank - 1`` on the same tensors."""
    import tensorly as tl

    rows = []
    for tr in (rank, rank - 1):
        if tr < 1:
            continue
        ranks = [tr] * tensors[0].dim()
        tucker(tensors[0], ranks)  # warm-up
        tl_tucker(tensors[0], rank=ranks, n_iter_max=50, tol=1e-10)
        ours = [timed(lambda t=t, ranks=ranks: tucker(t, ranks, n_iter_max=50, tol=1e-10)) for t in tensors]
        peer = [timed(lambda t=t, ranks=ranks: tl_tucker(t, rank=ranks, n_iter_max=50, tol=1e-10)) for t in tensors]
        # both errors from the explicit reconstruction: TuckerResult.rel_error uses
        # sqrt(||T||^2 - ||core||^2), which cancels down to ~1e-8 on exact fits
        ours_err = [((r.to_tensor() - t).norm() / t.norm()).item() for (r, _), t in zip(ours, tensors)]
        peer_err = [((tl.tucker_to_tensor(r) - t).norm() / t.norm()).item() for (r, _), t in zip(peer, tensors)]
        common = {**base, "tucker_rank": tr, "exact": tr == rank}
        rows.append(
            {
                **common,
                "method": "tensorpress tucker (HOSVD+HOOI)",
                "median_time_s": statistics.median(t for _, t in ours),
                "median_rel_error": statistics.median(ours_err),
                "share_fit_le_peer": sum(a <= b + 1e-9 for a, b in zip(ours_err, peer_err)) / len(tensors),
            }
        )
        rows.append(
            {
                **common,
                "method": "tensorly tucker (SVD+HOOI)",
                "median_time_s": statistics.median(t for _, t in peer),
                "median_rel_error": statistics.median(peer_err),
            }
        )
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--full", action="store_true", help="the issue's grid: l in {3,4}, d in {10,20,40}, r in {2,3,5}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    ap.add_argument(
        "--tucker-only",
        action="store_true",
        help="re-measure only the Tucker comparison and merge it into --out's existing cp_overparam.json",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.full:
        cases = [(order, d, r) for order in (3, 4) for d in (10, 20, 40) for r in (2, 3, 5) if order == 3 or d <= 20]
    else:
        cases = [(3, 10, 5), (3, 20, 5), (4, 10, 3)]
    try:
        import tensorly as tl
        from tensorly.decomposition import parafac
        from tensorly.decomposition import tucker as tl_tucker

        tl.set_backend("pytorch")
    except ImportError:  # optional peer
        parafac = tl_tucker = None
    meta = machine_info(torch.get_num_threads())
    meta.update(
        seeds=args.seeds,
        success_threshold=1e-3,
        revision=git_revision(),
        tensorly=getattr(tl, "__version__", None) if parafac is not None else None,
    )
    busy0, self0, wall0 = *cpu_seconds(), time.perf_counter()
    if args.tucker_only:
        return tucker_only(args, cases, meta, busy0, self0, wall0, tl_tucker)
    rows, trows = [], []
    for order, dim, rank in cases:
        for kind in ("random", "orthogonal"):
            tensors = [planted(order, dim, rank, kind, s) for s in range(args.seeds)]
            base = {"order": order, "dim": dim, "rank": rank, "kind": kind}
            # warm-up: the first call of each method pays one-time costs (library loading, threads)
            cp_als(tensors[0], rank, n_iter_max=5, init="random", random_state=0)
            cp_overparam(tensors[0], rank, n_steps=5, n_iter_max=5, random_state=0)
            if parafac is not None:
                parafac(tensors[0], rank, n_iter_max=5, init="random", random_state=0)
            als = [
                timed(
                    lambda t=t, s=s, rank=rank: cp_als(
                        t, rank, n_iter_max=1000, tol=1e-12, init="random", random_state=s
                    )
                )
                for s, t in enumerate(tensors)
            ]
            rows.append(
                {
                    **base,
                    "method": "cp_als (random init)",
                    "width": rank,
                    "success": sum(r.rel_error <= 1e-3 for r, _ in als) / len(als),
                    "median_time_s": statistics.median(t for _, t in als),
                    "median_rel_error": statistics.median(r.rel_error for r, _ in als),
                }
            )
            if parafac is not None:
                res, crashed = [], 0
                for s, t in enumerate(tensors):
                    t0 = time.perf_counter()
                    try:
                        cp = parafac(t, rank, n_iter_max=1000, tol=1e-12, init="random", random_state=s)
                        err = ((tl.cp_to_tensor(cp) - t).norm() / t.norm()).item()
                    except RuntimeError:  # its ALS solve can hit a singular Gram matrix: a failed run
                        err, crashed = float("inf"), crashed + 1
                    res.append((err, time.perf_counter() - t0))
                rows.append(
                    {
                        **base,
                        "method": "tensorly parafac (random init)",
                        "width": rank,
                        "success": sum(e <= 1e-3 for e, _ in res) / len(res),
                        "median_time_s": statistics.median(t for _, t in res),
                        "median_rel_error": statistics.median(e for e, _ in res),
                        "crashed": crashed,
                    }
                )
            for width in (rank, 2 * rank, 4 * rank):
                for name, lazy in (("cp_overparam", False), ("cp_overparam lazy", True)):
                    out = [
                        timed(
                            lambda t=t, s=s, rank=rank, width=width, lazy=lazy: cp_overparam(
                                t, rank, width=width, lazy=lazy, random_state=s
                            )
                        )
                        for s, t in enumerate(tensors)
                    ]
                    rows.append(
                        {
                            **base,
                            "method": name,
                            "width": width,
                            "success": sum(r.rel_error <= 1e-3 for r, _ in out) / len(out),
                            "median_time_s": statistics.median(t for _, t in out),
                            "median_rel_error": statistics.median(r.rel_error for r, _ in out),
                            "median_gd_steps": statistics.median(r.n_steps for r, _ in out),
                        }
                    )
            for row in rows[-8:]:
                print(row, flush=True)
            if tl_tucker is not None:
                trows += tucker_rows(base, tensors, rank, tl_tucker)
                for row in trows[-4:]:
                    print(row, flush=True)
    meta["load_avg_end"] = os.getloadavg()
    meta["other_cpu_share"] = other_cpu_share(busy0, self0, wall0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cp_overparam.json").write_text(json.dumps({"stamp": meta, "rows": rows, "tucker": trows}, indent=1))
    write_markdown(args.out / "cp_overparam.md", meta, rows, trows)
    write_plot(args.out / "cp_overparam.png", rows)


def tucker_only(args, cases, meta, busy0, self0, wall0, tl_tucker) -> None:
    if tl_tucker is None:
        raise SystemExit("--tucker-only: tensorly is not installed")
    saved = json.loads((args.out / "cp_overparam.json").read_text())
    trows = []
    for order, dim, rank in cases:
        for kind in ("random", "orthogonal"):
            tensors = [planted(order, dim, rank, kind, s) for s in range(args.seeds)]
            trows += tucker_rows({"order": order, "dim": dim, "rank": rank, "kind": kind}, tensors, rank, tl_tucker)
    meta["load_avg_end"] = os.getloadavg()
    meta["other_cpu_share"] = other_cpu_share(busy0, self0, wall0)
    saved["tucker"], saved["tucker_stamp"] = trows, meta
    (args.out / "cp_overparam.json").write_text(json.dumps(saved, indent=1))
    write_markdown(args.out / "cp_overparam.md", saved["stamp"], saved["rows"], trows, meta)


def summary_lines(rows: list[dict]) -> list[str]:
    """Mean success rate over the (order, dim, rank) cases, per kind, method and width multiple m / r."""
    out = ["| kind | method | width m | cases | mean success |", "|---|---|---|---|---|"]
    for kind in ("random", "orthogonal"):
        sel = [r for r in rows if r["kind"] == kind]
        keys = sorted(
            {(r["method"], r["width"] // r["rank"]) for r in sel},
            key=lambda k: (not k[0].startswith(("cp_als", "tensorly")), k[0], k[1]),
        )
        for method, mult in keys:
            rs = [r for r in sel if r["method"] == method and r["width"] // r["rank"] == mult]
            width = "r" if mult == 1 else f"{mult}r"
            out.append(f"| {kind} | {method} | {width} | {len(rs)} | {statistics.mean(r['success'] for r in rs):.2f} |")
    return out


def write_markdown(path: Path, meta: dict, rows: list[dict], trows: list[dict], tmeta: dict | None = None) -> None:
    lines = [
        f"# Over-parameterized CP vs lazy vs ALS ({meta['seeds']} seeds, success = rel. error <= 1e-3)",
        "",
        *stamp_lines(meta),
        f"- torch {meta['torch']}, {meta['threads']} threads, float64 tensors; tensorly {meta['tensorly']} "
        f"(pytorch backend); revision {meta['revision']}",
        "- planted tensors: sum of `rank` unit-norm rank-one terms, random Gaussian or orthogonal directions; "
        "every method was called once untimed first (warm-up); times are medians over the seeds",
        "",
        "## Summary: mean success rate over the cases",
        "",
        *summary_lines(rows),
        "",
        "## CP: success rate against the width",
        "",
        "| order | dim | rank | kind | method | width m | success | median time (s) | median rel. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = f" ({r['crashed']} raised a singular-matrix error)" if r.get("crashed") else ""
        lines.append(
            f"| {r['order']} | {r['dim']} | {r['rank']} | {r['kind']} | {r['method']}{note} | {r['width']} | "
            f"{r['success']:.2f} | {r['median_time_s']:.3f} | {r['median_rel_error']:.1e} |"
        )
    if trows:
        lines += [
            "",
            "## Tucker on the same tensors: tensorpress vs TensorLy",
            "",
            "Multilinear rank r is exact for these tensors; r - 1 is a truncated fit (both run HOOI "
            "to 50 sweeps or a change of fit below 1e-10). 'fit <= TensorLy' = share of seeds where our "
            "relative error is at most TensorLy's + 1e-9 (both errors from the explicit reconstruction).",
            "",
            *(
                [f"Measured separately (`--tucker-only`), {tmeta['threads']} threads:", *stamp_lines(tmeta), ""]
                if tmeta
                else []
            ),
            "| order | dim | rank | kind | Tucker rank | method | median time (s) | median rel. error "
            "| fit <= TensorLy |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in trows:
            share = f"{r['share_fit_le_peer']:.2f}" if "share_fit_le_peer" in r else "-"
            lines.append(
                f"| {r['order']} | {r['dim']} | {r['rank']} | {r['kind']} | {r['tucker_rank']} "
                f"| {r['method']} | {r['median_time_s']:.4f} | {r['median_rel_error']:.1e} | {share} |"
            )
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, rows: list[dict]) -> None:
    """Success rate against the width, one panel per (order, dim, rank, kind); ALS and parafac as lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = sorted({(r["order"], r["dim"], r["rank"], r["kind"]) for r in rows})
    ncols = min(len(groups), 6)
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.8 * ncols, 2.6 * nrows), sharey=True, squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, g in zip(axes.flat, groups):
        sel = [r for r in rows if (r["order"], r["dim"], r["rank"], r["kind"]) == g]
        for name, style in (("cp_overparam", "o-"), ("cp_overparam lazy", "s--")):
            pts = sorted((r["width"], r["success"]) for r in sel if r["method"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        for r in sel:
            if r["method"].startswith("cp_als"):
                ax.axhline(r["success"], color="gray", ls=":", label="cp_als random init")
            elif r["method"].startswith("tensorly"):
                ax.axhline(r["success"], color="tab:red", ls="-.", lw=0.8, label="tensorly parafac")
        ax.set_title(f"l={g[0]} d={g[1]} r={g[2]} {g[3][:5]}", fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("width m", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("success rate", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
