"""The resampling check of the analytic optimism (issue 6): Stein's closed-form df against the
parametric-bootstrap covariance penalty, on planted CP/Tucker regressions.

For each trial (the data of benchmarks/rank_selection.py: X Gaussian, B of true rank R, n a
multiple of the true model's df, SNR = 1/noise variance) and each candidate rank 1..R+2: the
manifold df, Stein's df (`tensorpress.rank.stein`, what the default rule charges), the bootstrap
df (`tensorpress.rank.resampling`, n_boot refits of the whole ALS procedure) with its Monte
Carlo standard error, the estimated test error with each, 5-fold CV and the exact test error
(noise variance + ||B_hat - B||^2). Reported: how far the two df are apart at, below and above
the true rank, how often the ranks they pick agree (with each other, CV5, the oracle), and the
time of each.

    python benchmarks/optimism_resampling.py            # 3 settings x 2 n x 2 SNR x 3 seeds
    python benchmarks/optimism_resampling.py --quick    # one trial (smoke test)
    python benchmarks/optimism_resampling.py --rewrite benchmarks/results/optimism_resampling.json
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tensorpress.rank import select_rank
from tensorpress.rank.regressors import cp_degrees_of_freedom, tucker_degrees_of_freedom

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    bench_parser,
    cpu_seconds,
    exit_unless_cpu,
    other_cpu_share,
    provenance,  # noqa: E402
    stamp_lines,
    tensorpress_flags,
)
from rank_selection import ALS, planted  # noqa: E402


def settings(quick: bool) -> list[tuple]:
    """(family, dims, true rank, n/df multiples, SNRs, seeds)."""
    if quick:
        return [("cp", (8, 8), 2, [5], [5.0], 1)]
    return [
        ("cp", (16, 16), 2, [2, 10], [1.0, 10.0], 3),
        ("cp", (10, 10, 10), 2, [2, 10], [1.0, 10.0], 3),
        ("tucker", (10, 10, 10), 2, [2, 10], [1.0, 10.0], 3),
    ]


def pick(sel, column) -> int:
    vals = [v if v is not None and math.isfinite(v) else math.inf for v in sel.column(column)]
    return sel.candidates[int(np.argmin(vals))]


def run_trial(kind, dims, R, mult, snr, seed, n_boot) -> dict:
    df_true = cp_degrees_of_freedom(R, dims) if kind == "cp" else tucker_degrees_of_freedom(R, dims)
    n = int(mult * df_true)
    X, y, B = planted(kind, dims, R, n, snr, seed)
    cands = list(range(1, R + 3))
    stein = select_rank(kind, X, y, cands, with_cv=True, cv=5, random_state=seed, **ALS)
    boot = select_rank(kind, X, y, cands, df_rule="bootstrap", n_boot=n_boot, random_state=seed, **ALS)
    exact = [1.0 / snr + float(((e.coef_ - B) ** 2).sum()) for e in stein.estimators_]
    return {
        "family": kind,
        "dims": list(dims),
        "true_rank": R,
        "n": n,
        "mult": mult,
        "snr": snr,
        "seed": seed,
        "n_boot": n_boot,
        "candidates": cands,
        "df": stein.column("df"),
        "df_stein": stein.column("df_eff"),
        "df_boot": boot.column("df_eff"),
        "est_stein": stein.column("est_test_error"),
        "est_boot": boot.column("est_test_error"),
        "cv5": stein.column("cv_error"),
        "exact": exact,
        "picks": {
            "stein": pick(stein, "est_test_error"),
            "bootstrap": pick(boot, "est_test_error"),
            "cv5": pick(stein, "cv_error"),
            "oracle": cands[int(np.argmin(exact))],
        },
        "time_s": {
            "fit": sum(stein.column("fit_time")),
            "stein": sum(stein.column("df_time")),
            "bootstrap": sum(boot.column("df_time")),
            "cv5": sum(stein.column("cv_time")),
        },
    }


def summarize(trials: list[dict]) -> dict:
    """Relative df difference |boot - stein| / boot by position against the true rank; agreement
    of the picks; total times."""
    rel = {"below": [], "at": [], "above": []}
    for t in trials:
        for r, s, b, d in zip(t["candidates"], t["df_stein"], t["df_boot"], t["df"]):
            if d < t["n"] - 1 and b > 0 and s < t["n"] - 1 and b < t["n"] - 1:  # both finite-valued
                where = "below" if r < t["true_rank"] else ("at" if r == t["true_rank"] else "above")
                rel[where].append(abs(b - s) / b)
    agree = lambda a, b: float(np.mean([t["picks"][a] == t["picks"][b] for t in trials]))  # noqa: E731
    tot = lambda k: sum(t["time_s"][k] for t in trials)  # noqa: E731
    return {
        "trials": len(trials),
        "median_rel_df_diff": {k: (float(np.median(v)) if v else None) for k, v in rel.items()},
        "cells": {k: len(v) for k, v in rel.items()},
        "agree_stein_bootstrap": agree("stein", "bootstrap"),
        "agree_stein_cv5": agree("stein", "cv5"),
        "agree_bootstrap_cv5": agree("bootstrap", "cv5"),
        "true_rank_rate": {
            k: float(np.mean([t["picks"][k] == t["true_rank"] for t in trials]))
            for k in ("stein", "bootstrap", "cv5", "oracle")
        },
        "oracle_rate": {k: agree(k, "oracle") for k in ("stein", "bootstrap", "cv5")},
        "time_ratio_bootstrap_vs_rule": tot("bootstrap") / (tot("fit") + tot("stein")),
        "time_ratio_cv5_vs_rule": tot("cv5") / (tot("fit") + tot("stein")),
    }


def write_markdown(path: Path, meta: dict, summary: dict, trials: list[dict]) -> None:
    s = summary
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    L = [
        "# Optimism: Stein's closed-form df against the parametric-bootstrap covariance penalty",
        "",
        *stamp_lines(meta),
        f"- torch {meta['torch']}, {meta['threads']} threads; tensorpress: {tensorpress_flags(meta)}; repository at "
        f"{meta['git']}",
        f"- {s['trials']} trials, candidates 1..R+2, {trials[0]['n_boot'] if trials else '-'} bootstrap refits per "
        f"candidate; ALS {ALS}; `{meta['command']}`",
        "",
        "## Summary",
        "",
        "| | below the true rank | at it | above it |",
        "|---|---:|---:|---:|",
        "| median abs(df_boot - df_stein) / df_boot | "
        + " | ".join(pct(s["median_rel_df_diff"][k]) for k in ("below", "at", "above"))
        + " |",
        "| candidates compared | " + " | ".join(str(s["cells"][k]) for k in ("below", "at", "above")) + " |",
        "",
        "| rule (train error + optimism with ...) | picks the true rank | picks the oracle's rank |",
        "|---|---:|---:|",
    ]
    for k, name in (("stein", "Stein df (the default)"), ("bootstrap", "bootstrap df"), ("cv5", "5-fold CV")):
        L.append(f"| {name} | {pct(s['true_rank_rate'][k])} | {pct(s['oracle_rate'][k])} |")
    L += [
        "",
        f"The two df rules pick the same rank in {pct(s['agree_stein_bootstrap'])} of trials (Stein vs CV5: "
        f"{pct(s['agree_stein_cv5'])}, bootstrap vs CV5: {pct(s['agree_bootstrap_cv5'])}). Time: the bootstrap "
        f"df costs {s['time_ratio_bootstrap_vs_rule']:.1f}x the analytic rule (fits + Stein df), 5-fold CV "
        f"{s['time_ratio_cv5_vs_rule']:.1f}x.",
        "",
        "## Trials",
        "",
        "| family | dims | R | n | SNR | seed | rank | df | Stein df | bootstrap df | est. test error (Stein / "
        "bootstrap) | CV5 | exact |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    f = lambda v: "inf" if v is None or not math.isfinite(v) else f"{v:.3g}"  # noqa: E731
    for t in trials:
        for i, r in enumerate(t["candidates"]):
            mark = " (true)" if r == t["true_rank"] else ""
            L.append(
                f"| {t['family']} | {'x'.join(map(str, t['dims']))} | {t['true_rank']} | {t['n']} | {t['snr']:g} "
                f"| {t['seed']} | {r}{mark} | {t['df'][i]} | {t['df_stein'][i]:.1f} | {boot_cell(t, i)} "
                f"| {f(t['est_stein'][i])} / {f(t['est_boot'][i])} | {f(t['cv5'][i])} | {f(t['exact'][i])} |"
            )
    path.write_text("\n".join(L) + "\n")


def boot_cell(t: dict, i: int) -> str:
    """The bootstrap df of candidate i; select_rank skips the refits where the manifold df is >= n - 1
    (no finite optimism there) and reports the manifold df."""
    return "- (df >= n - 1)" if t["df"][i] >= t["n"] - 1 else f"{t['df_boot'][i]:.1f}"


def write_plot(path: Path, trials: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    for where, color in (("below", "tab:blue"), ("at", "tab:green"), ("above", "tab:red")):
        xs, ys = [], []
        for t in trials:
            for r, s, b, d in zip(t["candidates"], t["df_stein"], t["df_boot"], t["df"]):
                if d >= t["n"] - 1:
                    continue
                pos = "below" if r < t["true_rank"] else ("at" if r == t["true_rank"] else "above")
                if pos == where:
                    xs.append(b / t["n"])
                    ys.append(s / t["n"])
        ax.scatter(xs, ys, s=14, color=color, alpha=0.7, label=f"rank {where} the true rank")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("bootstrap covariance-penalty df / n")
    ax.set_ylabel("Stein df / n")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.05)
    ax.set_title("effective df: closed form vs resampling")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = bench_parser(__doc__, repeats_help="unused", warmup_help="unused", quick_help="one trial (smoke test)")
    ap.add_argument("--n-boot", type=int, default=20, help="bootstrap refits per candidate")
    ap.add_argument("--stem", default=None, help="results file name (default optimism_resampling)")
    ap.add_argument(
        "--rewrite",
        type=Path,
        default=None,
        help="rewrite the summary, Markdown and plot from an existing results JSON (no runs)",
    )
    args = ap.parse_args(argv)
    if args.rewrite is not None:
        data = json.loads(args.rewrite.read_text())
        data["summary"] = summarize(data["trials"])
        args.rewrite.write_text(json.dumps(data, indent=1, default=str) + "\n")
        write_markdown(args.rewrite.with_suffix(".md"), data["meta"], data["summary"], data["trials"])
        write_plot(args.rewrite.with_name(args.rewrite.stem + "_df.png"), data["trials"])
        return 0
    exit_unless_cpu(args.device, "optimism_resampling.py")
    torch.set_num_threads(args.threads)
    meta = provenance(torch.get_num_threads())
    meta["command"] = "python benchmarks/optimism_resampling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    busy0, self0, wall0 = *cpu_seconds(), time.perf_counter()
    trials = []
    for kind, dims, R, mults, snrs, seeds in settings(args.quick):
        for mult in mults:
            for snr in snrs:
                for seed in range(seeds):
                    t = run_trial(kind, dims, R, mult, snr, seed, args.n_boot)
                    trials.append(t)
                    print(
                        f"[{time.perf_counter() - wall0:7.1f}s] {kind} {dims} R={R} n={t['n']} snr={snr} "
                        f"seed={seed}: picks {t['picks']}; df stein "
                        f"{[round(v) for v in t['df_stein']]} boot {[round(v) for v in t['df_boot']]}",
                        flush=True,
                    )
    meta["elapsed_s"] = time.perf_counter() - wall0
    meta["load_avg_end"] = os.getloadavg()
    meta["other_cpu_share"] = other_cpu_share(busy0, self0, wall0)
    summary = summarize(trials)
    stem = args.stem or ("optimism_resampling_quick" if args.quick else "optimism_resampling")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "trials": trials}, indent=1, default=str) + "\n"
    )
    write_markdown(args.out / f"{stem}.md", meta, summary, trials)
    write_plot(args.out / f"{stem}_df.png", trials)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out / stem}.{{json,md}} and {stem}_df.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
