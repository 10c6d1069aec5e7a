"""A synthetic check of Zhang & Saab's recovery theory (arXiv:2502.02766, Section 4): planted
low-rank teacher layers, noise, and a growing number m of calibration rows.

Model: inputs X (m × d, a decaying spectrum), a planted rank-r layer M* (N1 × d) with bias b*, so
the planted pre-activations are Q* = X M*ᵀ + 1b*ᵀ; the layer being compressed has weight
W = M* + Δ (Δ small, full rank: the "approximately low-rank" part) and its pre-activations also
carry noise the compressed layer cannot see (Δ = N R⁻¹ for inputs X = G Rᵀ: small in the
outputs, large in weight norm along weak input directions): P = X Wᵀ + 1b*ᵀ + σE (E independent standard
normal, fed to the fits as extra inputs that are zero in X̃). Errors are measured on held-out
rows against the planted Q* (pre-activation RMSE / RMS(Q*)) and against ReLU(Q*) (post-ReLU
relative error), and against the original layer's held-out outputs ReLU(P) (what compression
is judged by; its noise is unpredictable, so no method reaches 0). m is the paper's m (rows);
N1 = outputs.

Reference curves: the basic-inequality bound behind Theorem 4.4 (both Q̂ and Q* lie in the
constraint set): ‖Q̂ − Q*‖_F² ≤ 2 ‖Π Z‖_op ‖Q̂ − Q*‖_* ≤ 4 ‖Π Z‖_op α √(r m N1), Π the
projection on the range of [X, 1] and Z = P − Q*; it bounds the calibration-row error of the
untruncated solution for α ≥ max |Q*| and decays like m^(-1/4) in RMSE; and the
degrees-of-freedom rate σ √(r (d + N1) / (m N1)) of rank-constrained least squares (m^(-1/2)).

    python benchmarks/zhang_saab_theory.py      # -> results/zhang_saab_theory.{md,json,png}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _common import cpu_seconds, other_cpu_share, provenance, stamp_lines  # noqa: E402
from tensorpress.compress.convex import PreactBasis, fit_convex  # noqa: E402
from tensorpress.compress.relu import fit_relu  # noqa: E402

F64 = torch.float64


def teacher(g, d, n1, r, sigma_rel, delta_rel):
    spec = torch.logspace(0, -2, d, dtype=F64)
    R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0] * spec
    U = torch.linalg.qr(torch.randn(n1, r, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=F64))[0]
    M = 3.0 * (U * torch.linspace(1.0, 0.5, r, dtype=F64)) @ V.T
    draw = lambda k: torch.randn(k, d, generator=g, dtype=F64) @ R.T  # noqa: E731
    Q = draw(4000) @ M.T
    b = -Q.mean(0) - 0.3 * Q.std(0)  # about 40% of the units active
    scale = float((Q + b).pow(2).mean().sqrt())
    # Δ = N R⁻¹: its output X Δᵀ is white, but in weight norm it is large along the weak input
    # directions (where a weight-only SVD spends rank and a data-aware fit does not)
    Delta = torch.linalg.solve(R.T, torch.randn(d, n1, generator=g, dtype=F64)).T
    Delta *= delta_rel * scale / float((draw(4000) @ Delta.T).pow(2).mean().sqrt())
    return draw, M, b, Delta, sigma_rel * scale, scale


def run_one(g, d, n1, r, m, sigma_rel, delta_rel, n_test):
    draw, M, b, Delta, sigma, scale = teacher(g, d, n1, r, sigma_rel, delta_rel)
    W = M + Delta
    X, E = draw(m), torch.randn(m, n1, generator=g, dtype=F64)
    Xt, Et = draw(n_test), torch.randn(n_test, n1, generator=g, dtype=F64)
    W_big = torch.cat([W, sigma * torch.eye(n1, dtype=F64)], dim=1)  # noise enters as hidden inputs
    X_ref, X_in = torch.cat([X, E], 1), torch.cat([X, torch.zeros_like(E)], 1)
    Q_star, Q_star_t = X @ M.T + b, Xt @ M.T + b
    Y_t = Q_star_t.clamp_min(0)
    Y_orig = (Xt @ W.T + b + sigma * Et).clamp_min(0)  # the original layer's held-out outputs
    fits = {}
    # activation-aware closed form (rank-constrained least squares in the X̃ metric)
    P = X_ref @ W_big.T + b
    basis = PreactBasis(X_in, 1e-6)
    c0 = P.mean(0)
    first, second = basis.factors((P - c0).T @ basis.A, r)
    Wa = second @ first
    fits["activation"] = (Wa, c0 - Wa @ basis.mu)
    Us, Ss, Vs = torch.linalg.svd(W_big)
    Wsvd = (Us[:, :r] * Ss[:r]) @ Vs[:r]
    fits["svd"] = (Wsvd, b)
    alpha_star = float(Q_star.abs().max())
    opts = {
        "convex": dict(kind="convex"),
        "convex, oracle α": dict(kind="convex", alpha=alpha_star),
        "relu (Thm 4.9, no polish)": dict(kind="relu", n_iter=30, polish_iter=0),
        "relu (default: + polish)": dict(kind="relu"),
        "relu, σ heuristic": dict(kind="relu", sigma="heuristic"),
    }
    info = {}
    for name, o in opts.items():
        o = dict(o)
        kind = o.pop("kind")
        f = fit_convex(W_big, b, X_ref, X_in, r, **o) if kind == "convex" else fit_relu(W_big, b, X_ref, X_in, r, **o)
        fits[name] = (f.weight(), f.bias)
        info[name] = {k: v for k, v in f.info.items() if isinstance(v, (int, float, str, bool))}
    Xt_in = torch.cat([Xt, torch.zeros_like(Et)], 1)
    out = {}
    for name, (Wh, bh) in fits.items():
        Qh = Xt_in @ Wh.T + bh
        out[name] = {
            "preact_rmse": float((Qh - Q_star_t).pow(2).mean().sqrt()) / scale,
            "post_relu_error": float(torch.linalg.vector_norm(Qh.clamp_min(0) - Y_t) / torch.linalg.vector_norm(Y_t)),
            "post_relu_vs_original": float(
                torch.linalg.vector_norm(Qh.clamp_min(0) - Y_orig) / torch.linalg.vector_norm(Y_orig)
            ),
        }
    # reference curves on the calibration rows
    Z = P - Q_star
    B = torch.linalg.qr(torch.cat([X, torch.ones(m, 1, dtype=F64)], 1))[0]
    pz = float(torch.linalg.matrix_norm(B @ (B.T @ Z), ord=2))
    bound = math.sqrt(4.0 * pz * alpha_star * math.sqrt(r * m * n1) / (m * n1)) / scale
    dof = sigma * math.sqrt(r * (d + n1) / (m * n1)) / scale
    return out, {"bound_rmse": bound, "dof_rate": dof, "sigma": sigma, "alpha_star": alpha_star}, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=30)
    ap.add_argument("--n1", type=int, default=40)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 6, 12])
    ap.add_argument("--rows", type=int, nargs="+", default=[60, 120, 240, 480, 960, 1920])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--sigma", type=float, default=0.3, help="noise std relative to RMS(Q*)")
    ap.add_argument("--delta", type=float, default=0.1, help="full-rank weight part, relative to RMS(Q*)")
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    meta = provenance(1)
    busy0, self0, wall0 = *cpu_seconds(), time.perf_counter()
    records = []
    jobs = [(r, m, s) for r in args.ranks for m in args.rows for s in range(args.seeds)]
    for r, m, s in tqdm(jobs, desc="planted layers"):
        g = torch.Generator().manual_seed(1000 * s + 7 * r)
        res, ref, info = run_one(g, args.d, args.n1, r, m, args.sigma, args.delta, args.test)
        records.append({"rank": r, "rows": m, "seed": s, "errors": res, "reference": ref, "info": info})
    meta.update(load_avg_end=list(os.getloadavg()), other_cpu_share=other_cpu_share(busy0, self0, wall0))
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "zhang_saab_theory.json").write_text(
        json.dumps({"meta": meta, "settings": settings, "records": records}, indent=2)
    )
    methods = list(records[0]["errors"])

    def mean(r, m, key, name=None):
        vals = [
            (x["errors"][name][key] if name else x["reference"][key])
            for x in records
            if x["rank"] == r and x["rows"] == m
        ]
        return sum(vals) / len(vals)

    lines = [
        "# Zhang & Saab's recovery theory on planted low-rank ReLU layers",
        "",
        *stamp_lines(meta),
        f"- settings: {settings}",
        "- model (see the script's docstring): Q* = X M*ᵀ + b* planted rank r; the compressed layer sees "
        "W = M* + Δ (Δ large in weight norm along weak input directions, small in the outputs) "
        "and P = X Wᵀ + b* + σE; errors on held-out rows against Q* (pre-activation RMSE / RMS(Q*)) "
        "and ReLU(Q*) (post-ReLU relative error); means over seeds",
        "- bound: the basic-inequality bound of the Theorem 4.4 argument for the untruncated convex "
        "solution with α = max|Q*| (calibration rows); dof: σ√(r(d+N1)/(mN1)) / RMS(Q*)",
        "",
    ]
    for key, title in (
        ("preact_rmse", "pre-activation RMSE / RMS(Q*)"),
        ("post_relu_error", "post-ReLU error against ReLU(Q*)"),
        ("post_relu_vs_original", "post-ReLU error against the original layer's outputs (noise included)"),
    ):
        for r in args.ranks:
            lines += [f"## {title}, rank {r}", "", "| m | " + " | ".join(methods) + " | bound | dof rate |"]
            lines.append("|---:|" + "---:|" * (len(methods) + 2))
            for m in args.rows:
                cells = [f"{mean(r, m, key, n):.4f}" for n in methods]
                lines.append(
                    f"| {m} | "
                    + " | ".join(cells)
                    + f" | {mean(r, m, 'bound_rmse'):.3f} | {mean(r, m, 'dof_rate'):.4f} |"
                )
            lines.append("")
    (args.out / "zhang_saab_theory.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(2, len(args.ranks), figsize=(6 * len(args.ranks), 9), squeeze=False)
    for j, r in enumerate(args.ranks):
        for i, (key, title) in enumerate(
            (("preact_rmse", "held-out pre-activation RMSE / RMS(Q*)"), ("post_relu_error", "held-out post-ReLU error"))
        ):
            ax = axes[i][j]
            for n in methods:
                ax.loglog(args.rows, [mean(r, m, key, n) for m in args.rows], "o-", label=n, ms=3)
            if key == "preact_rmse":
                ax.loglog(args.rows, [mean(r, m, "bound_rmse") for m in args.rows], "k--", label="Thm 4.4-type bound")
                ax.loglog(args.rows, [mean(r, m, "dof_rate") for m in args.rows], "k:", label="dof rate m^-1/2")
            ax.set(xlabel="calibration rows m", ylabel=title, title=f"rank {r}, d={args.d}, N1={args.n1}")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "zhang_saab_theory.png", dpi=120)
    print(f"wrote {args.out / 'zhang_saab_theory'}.md")


if __name__ == "__main__":
    main()
