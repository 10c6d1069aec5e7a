"""Model averaging over ranks against selecting one rank (issue 29, item 5).

For CP/Tucker/low-rank scalar-on-tensor regression, the prediction error of
`tensorpress.rank.AveragedRegressor`'s rules against a single selected rank, on the data of
benchmarks/rank_selection.py (its `planted` synthetic grid, default settings, and its image
regression task: a real photo as the coefficient matrix), from the same fits:

* select: analytic_cv (select_rank's default), test_error (train error + optimism), cv5 (5-fold CV);
* average: exp (exponential weights on the predicted CV error, T = 2, the AveragedRegressor
  default), exp_T4 (T = 4), exp_te (weights on train error + optimism, T = 2), stacking (simplex
  weights fitted to the 5-fold out-of-fold predictions, the same folds as cv5);
* oracles (not available in practice): the best single candidate, and the best convex
  combination of the candidates' fits (weights fitted to the true B).

The error is exact: X has i.i.d. N(0, 1) entries, so a fit's test error is the noise variance
plus ||B_hat - B||_F^2 (the averaged fit's B_hat is sum_k w_k B_k). Reported: each rule's
test error over the best single candidate's, per setting, and paired wins/losses of averaging
against selection.

    python benchmarks/rank_averaging.py                 # default grid, 5 seeds (2 per image): minutes
    python benchmarks/rank_averaging.py --quick         # smoke test
    python benchmarks/rank_averaging.py --seeds 10

Writes results/rank_averaging.{json,md,png} (``_quick`` with --quick).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tensorpress.rank import select_rank
from tensorpress.rank.averaging import (
    optimism_weights,
    out_of_fold_predictions,
    simplex_least_squares,
)
from tensorpress.rank.regressors import cp_degrees_of_freedom, tucker_degrees_of_freedom

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_parser, cpu_seconds, exit_unless_cpu, other_cpu_share, provenance, stamp_lines  # noqa: E402
from rank_selection import ALS, load_images, planted  # noqa: E402  (the same data and fit settings)

SELECT = ("analytic_cv", "test_error", "cv5")
AVERAGE = ("exp", "exp_T4", "exp_te", "stacking")
ORACLES = ("oracle_single", "oracle_convex")
RULES = SELECT + AVERAGE + ORACLES


def synthetic_settings(quick):
    """rank_selection.py's default synthetic grid (its `synthetic_settings(quick=False, full=False)`)
    plus one low-SNR column (0.5, from its --full grid), where ranks are least certain."""
    if quick:
        return [("cp", (16, 16), 2, [5], [2.0])]
    return [
        ("cp", (16, 16), 3, [2, 5, 10], [0.5, 1.0, 10.0]),
        ("cp", (10, 10, 10), 2, [4, 10], [0.5, 1.0, 10.0]),
        ("tucker", (10, 10, 10), 2, [4, 10], [0.5, 1.0, 10.0]),
    ]


def first_min(values) -> int:
    """Index of the least value (the first, i.e. the smaller rank, on ties); inf/None never chosen."""
    vals = [v if v is not None and math.isfinite(v) else math.inf for v in values]
    return int(np.argmin(vals))


def evaluate(family, X, y, B, noise_var, cands, seed) -> dict:
    """Every rule's weights over `cands` and its exact test error, from one select_rank call
    (one fit per rank on all the data) and one pass of 5-fold out-of-fold predictions."""
    t0 = time.perf_counter()
    sel = select_rank(family, X, y, candidates=cands, cv=5, random_state=seed, **ALS)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    P, fold_errs = out_of_fold_predictions(family, X, y, cands, cv=5, random_state=seed, **ALS)
    cv_s = time.perf_counter() - t0
    K = len(cands)
    Bs = torch.stack([e.coef_.flatten() for e in sel.estimators_], 1)  # (p, K)
    b = B.flatten()
    one_hot = np.eye(K)
    weights = {
        "analytic_cv": one_hot[first_min(sel.column("est_cv_error"))],
        "test_error": one_hot[first_min(sel.column("est_test_error"))],
        "cv5": one_hot[first_min(list(fold_errs.mean(1)))],
        "exp": optimism_weights(sel, "analytic_cv", 2.0),
        "exp_T4": optimism_weights(sel, "analytic_cv", 4.0),
        "exp_te": optimism_weights(sel, "test_error", 2.0),
        "stacking": simplex_least_squares(P, y),
        # the best convex combination of the fits for the true B: min ||Bs w - B||^2 on the simplex
        "oracle_convex": simplex_least_squares(Bs, b),
    }
    per_rank = [float(((Bs[:, k] - b) ** 2).sum()) + noise_var for k in range(K)]
    weights["oracle_single"] = one_hot[int(np.argmin(per_rank))]
    err = {}
    for rule, w in weights.items():
        B_hat = Bs @ torch.as_tensor(np.asarray(w), dtype=torch.float64)
        err[rule] = float(((B_hat - b) ** 2).sum()) + noise_var
    return {
        "candidates": [list(c) if isinstance(c, tuple) else c for c in cands],
        "weights": {k: [float(v) for v in w] for k, w in weights.items()},
        "test_error": err,
        "test_error_by_rank": per_rank,
        "est_test_error": sel.column("est_test_error"),
        "est_cv_error": sel.column("est_cv_error"),
        "cv_error": [float(v) for v in fold_errs.mean(1)],
        "df_eff": sel.column("df_eff"),
        "fit_s": fit_s,
        "cv_s": cv_s,
    }


def run_synthetic(quick, seeds, log, progress):
    trials = []
    for kind, dims, R, mults, snrs in synthetic_settings(quick):
        df = cp_degrees_of_freedom(R, dims) if kind == "cp" else tucker_degrees_of_freedom(R, dims)
        for mult in mults:
            for snr in snrs:
                for seed in range(seeds):
                    n = int(mult * df)
                    X, y, B = planted(kind, dims, R, n, snr, seed)
                    row = evaluate(kind, X, y, B, 1.0 / snr, list(range(1, R + 3)), seed)
                    row.update(part="synthetic", family=kind, dims=list(dims), true_rank=R, n=n, mult=mult, snr=snr)
                    row["seed"] = seed
                    trials.append(row)
                    progress.update(1)
                    log(_line(f"{kind} {dims} R={R} n={n} snr={snr} seed={seed}", row))
    return trials


def run_image(quick, seeds, log, progress):
    """rank_selection.py's image task: a photo (32x32, centred, unit norm) as B, Gaussian X, SNR 2,
    n = one sample per pixel, candidates as there."""
    trials, size, snr = [], 32, 2.0
    cands = list(range(1, 7)) if quick else [1, 2, 3, 4, 6, 8]
    for name, B in load_images(size)[: 1 if quick else None]:
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            n = size * size
            X = torch.randn(n, size, size, generator=g, dtype=torch.float64)
            y = X.flatten(1) @ B.flatten() + torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(snr)
            row = evaluate("lowrank", X, y, B, 1.0 / snr, cands, seed)
            row.update(part="image", family="lowrank", image=name, size=size, n=n, snr=snr, seed=seed)
            trials.append(row)
            progress.update(1)
            log(_line(f"image {name} {size}x{size} seed={seed}", row))
    return trials


def _line(head, row) -> str:
    o = row["test_error"]["oracle_single"]
    parts = ", ".join(f"{r} {row['test_error'][r] / o:.3f}" for r in ("analytic_cv", "cv5", "exp", "stacking"))
    return f"{head}: err/oracle {parts} (fit {row['fit_s']:.1f}s, cv {row['cv_s']:.1f}s)"


# ----------------------------------------------------------------------------- summary
def setting_key(t) -> str:
    if t["part"] == "image":
        return f"image {t['image']}"
    return f"{t['family']} {'x'.join(map(str, t['dims']))} R={t['true_rank']} n={t['mult']:g}df SNR {t['snr']:g}"


def ratios(trials, rule):
    return [t["test_error"][rule] / t["test_error"]["oracle_single"] for t in trials]


def paired(trials, a, b, rel=1e-9) -> tuple[int, int, int]:
    """(a better, tie, a worse) than b in test error, ties within a relative 1e-9."""
    better = worse = 0
    for t in trials:
        ea, eb = t["test_error"][a], t["test_error"][b]
        if ea < eb * (1 - rel):
            better += 1
        elif ea > eb * (1 + rel):
            worse += 1
    return better, len(trials) - better - worse, worse


def summarize(trials) -> dict:
    out = {}
    for part in ("synthetic", "image"):
        sub = [t for t in trials if t["part"] == part]
        if not sub:
            continue
        d = {"trials": len(sub), "mean_ratio": {}, "max_ratio": {}, "paired": {}}
        for rule in RULES:
            r = ratios(sub, rule)
            d["mean_ratio"][rule] = float(np.mean(r))
            d["max_ratio"][rule] = float(np.max(r))
        for a in AVERAGE:
            for b in SELECT:
                d["paired"][f"{a} vs {b}"] = paired(sub, a, b)
        d["fit_s"] = float(sum(t["fit_s"] for t in sub))
        d["cv_s"] = float(sum(t["cv_s"] for t in sub))
        settings = {}
        for t in sub:
            settings.setdefault(setting_key(t), []).append(t)
        d["settings"] = {
            k: {rule: float(np.mean(ratios(v, rule))) for rule in RULES} | {"trials": len(v)}
            for k, v in settings.items()
        }
        out[part] = d
    return out


def write_markdown(path, meta, summary, trials):
    L = ["# Model averaging over ranks vs one selected rank (issue 29, item 5)", ""]
    L += stamp_lines(meta)
    L += [
        f"- torch {meta['torch']}, {meta['threads']} threads; settings: ALS {ALS}, 5 folds, "
        f"{meta['settings']['seeds']} seeds per synthetic setting, {meta['settings']['image_seeds']} per image, "
        f"{meta['elapsed_s']:.0f} s in all",
        f"- images: {', '.join(sorted({t['image'] for t in trials if t['part'] == 'image'})) or 'none'} "
        "(rank_selection.py's `load_images`; its skimage camera needs scikit-image, "
        f"{'not ' if not meta.get('skimage') else ''}installed for this run)",
        "",
        "Error: the exact test error (noise variance + ||B_hat - B||_F^2, X Gaussian) of each rule's "
        "prediction, divided by that of the best single candidate rank (the oracle single rank; < 1 means "
        "better than any one rank). Rules: select = one rank (analytic_cv: select_rank's default; test_error: "
        "train error + optimism; cv5: 5-fold CV); average = AveragedRegressor's weights (exp: exponential "
        "weights on the predicted CV error, T = 2, the default; exp_T4: T = 4; exp_te: on train error + "
        "optimism, T = 2; stacking: simplex weights fitted to the 5-fold out-of-fold predictions); oracle_convex: the "
        "best convex combination of the same fits for the true B (a floor for any weighting of these fits).",
        "",
    ]
    for part, d in summary.items():
        L += [f"## {part} ({d['trials']} trials)", ""]
        L += ["| rule | mean error / oracle single rank | worst trial |", "|---|---:|---:|"]
        for rule in RULES:
            L.append(f"| {rule} | {d['mean_ratio'][rule]:.4f} | {d['max_ratio'][rule]:.3f} |")
        L += ["", "Paired against selection (trials where averaging is better / tied / worse):", ""]
        L += ["| averaging | vs analytic_cv | vs test_error | vs cv5 |", "|---|---:|---:|---:|"]
        for a in AVERAGE:
            cells = [" / ".join(map(str, d["paired"][f"{a} vs {b}"])) for b in SELECT]
            L.append(f"| {a} | " + " | ".join(cells) + " |")
        L += [
            "",
            f"Time: {d['fit_s']:.0f} s for the one fit per rank (+ Stein df) that select and exp use; "
            f"{d['cv_s']:.0f} s more for the 5-fold out-of-fold fits that cv5 and stacking need.",
            "",
            "Per setting (mean error / oracle single rank):",
            "",
            "| setting | trials | " + " | ".join(RULES) + " |",
            "|---|---:|" + "---:|" * len(RULES),
        ]
        for k, v in d["settings"].items():
            L.append(f"| {k} | {v['trials']} | " + " | ".join(f"{v[r]:.3f}" for r in RULES) + " |")
        L.append("")
    L += findings(summary)
    path.write_text("\n".join(L) + "\n")


def findings(summary) -> list[str]:
    """Plain statements read off the summary (no hand-written numbers)."""
    L = ["## Findings", ""]
    for part, d in summary.items():
        m = d["mean_ratio"]
        best_sel = min(SELECT, key=lambda r: m[r])
        best_avg = min(AVERAGE, key=lambda r: m[r])
        w, t, lo = d["paired"]["exp vs analytic_cv"]
        L.append(
            f"- {part}: the default averaging (exp) has mean error {m['exp']:.4f} x the oracle single rank "
            f"against {m['analytic_cv']:.4f} for the default selection (analytic_cv) and {m['cv5']:.4f} for "
            f"5-fold CV; it is better in {w}, tied in {t} and worse in {lo} of {d['trials']} paired trials. "
            f"Best selection rule here: {best_sel} ({m[best_sel]:.4f}); best averaging rule: {best_avg} "
            f"({m[best_avg]:.4f}); stacking {m['stacking']:.4f}; the convex oracle {m['oracle_convex']:.4f}."
        )
        sw, st, sl = d["paired"]["stacking vs analytic_cv"]
        cw, ct, cl = d["paired"]["stacking vs cv5"]
        L.append(
            f"- {part}: stacking against analytic_cv selection: better in {sw}, tied in {st}, worse in {sl}; "
            f"against 5-fold CV selection (the same fits): better in {cw}, tied in {ct}, worse in {cl}; "
            f"it costs the 5-fold fits ({d['cv_s']:.0f} s here against {d['fit_s']:.0f} s for one fit per rank)."
        )
        for rule in ("exp", "stacking"):
            losers = [k for k, v in d["settings"].items() if v[rule] > v["analytic_cv"] * (1 + 1e-3)]
            if losers:
                L.append(
                    f"- {part}: {rule} averaging loses to analytic_cv selection on average (by more than 0.1%) "
                    f"in: {'; '.join(losers)}."
                )
    return L + [""]


def write_plot(path, summary):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = list(summary)
    widths = [max(5, len(summary[p]["settings"])) for p in parts]
    fig, axes = plt.subplots(
        1, len(parts), figsize=(3 + 0.7 * sum(widths), 5.2), squeeze=False, gridspec_kw={"width_ratios": widths}
    )
    rules = SELECT + AVERAGE + ("oracle_convex",)
    for ax, part in zip(axes[0], parts):
        settings = summary[part]["settings"]
        keys = list(settings)
        width = 0.85 / len(rules)
        for j, rule in enumerate(rules):
            vals = [settings[k][rule] for k in keys]
            hatch = "//" if rule in AVERAGE else None
            ax.bar(np.arange(len(keys)) + (j - (len(rules) - 1) / 2) * width, vals, width, label=rule, hatch=hatch)
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set_xticks(range(len(keys)), [k.replace(" SNR", "\nSNR").replace("image ", "") for k in keys], fontsize=6)
        ax.tick_params(axis="x", rotation=60)
        lo = min(min(settings[k][r] for r in rules) for k in keys)
        hi = max(max(settings[k][r] for r in rules) for k in keys)
        ax.set_ylim(max(0.0, lo - 0.02), min(hi + 0.02, 2.0))
        ax.set_ylabel("test error / best single rank (mean over seeds)")
        ax.set_title(f"{part}: averaging (hatched) vs selection", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(rules), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = bench_parser(__doc__, "unused", "unused", "smoke test: one setting, one image, one seed")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 5; 1 with --quick)")
    ap.add_argument("--image-seeds", type=int, default=None, help="seeds per image (default 2; 1 with --quick)")
    ap.add_argument("--parts", default="synthetic,image", help="comma-separated subset of synthetic,image")
    ap.add_argument("--rewrite", type=Path, default=None, help="rewrite the Markdown and plot from a results JSON")
    args = ap.parse_args(argv)
    if args.rewrite is not None:
        data = json.loads(args.rewrite.read_text())
        data["summary"] = summarize(data["trials"])
        data["meta"].setdefault("skimage", False)  # runs before it was recorded: camera absent from their images
        args.rewrite.write_text(json.dumps(data, indent=1, default=str) + "\n")
        write_markdown(args.rewrite.with_suffix(".md"), data["meta"], data["summary"], data["trials"])
        write_plot(args.rewrite.with_suffix(".png"), data["summary"])
        return 0
    exit_unless_cpu(args.device, "rank_averaging.py")
    args.seeds = args.seeds or (1 if args.quick else 5)
    args.image_seeds = args.image_seeds or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    meta = provenance(torch.get_num_threads())
    meta["skimage"] = importlib.util.find_spec("skimage") is not None
    meta["settings"] = {
        "seeds": args.seeds,
        "image_seeds": args.image_seeds,
        "parts": sorted(parts),
        "als": ALS,
        "cv": 5,
        "synthetic": [[k, list(d), R, m, s] for k, d, R, m, s in synthetic_settings(args.quick)],
        "image": {"size": 32, "snr": 2.0, "n": "size^2"},
        "exp_weights": {
            "exp": ["analytic_cv", 2.0],
            "exp_T4": ["analytic_cv", 4.0],
            "exp_te": ["test_error", 2.0],
        },
    }
    busy0, self0, wall0 = *cpu_seconds(), time.perf_counter()
    from tqdm import tqdm

    n_syn = sum(len(m) * len(s) for _, _, _, m, s in synthetic_settings(args.quick)) * args.seeds
    n_img = (1 if args.quick else len(load_images(32))) * args.image_seeds
    total = (n_syn if "synthetic" in parts else 0) + (n_img if "image" in parts else 0)
    with tqdm(total=total, desc="trials", file=sys.stderr) as progress:

        def log(msg):
            progress.write(f"[{time.perf_counter() - wall0:7.1f}s] {msg}")

        trials = run_synthetic(args.quick, args.seeds, log, progress) if "synthetic" in parts else []
        trials += run_image(args.quick, args.image_seeds, log, progress) if "image" in parts else []
    meta["elapsed_s"] = time.perf_counter() - wall0
    meta["load_avg_end"] = os.getloadavg()
    meta["other_cpu_share"] = other_cpu_share(busy0, self0, wall0)
    summary = summarize(trials)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "rank_averaging_quick" if args.quick else "rank_averaging"
    (args.out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "trials": trials}, indent=1, default=str) + "\n"
    )
    write_markdown(args.out / f"{stem}.md", meta, summary, trials)
    write_plot(args.out / f"{stem}.png", summary)
    print(json.dumps({k: v["mean_ratio"] for k, v in summary.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
