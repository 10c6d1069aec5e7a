"""How well the CPU cost model ranks the fused TT plans, and its weights refitted from timings.

For each case every fused plan (merge partition x absorb order) is timed, forward and
forward+backward, on the same inputs with the plans interleaved. The cost model of
tensorpress.ops.tt_plan (FLOPs + GEMM traffic + permuted elements by how the kernel moves
them) is then judged by the plan it picks: its time against the fastest plan's (the regret).
Its weights are refitted to the forward times by non-negative least squares, and the refit is
judged the same way, in sample and leaving each case out of its own fit.

    python benchmarks/tt_cost_model.py            # all cases, 2 threads
    python benchmarks/tt_cost_model.py --quick    # two cases, few repeats
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls

from tensorpress.nn import TTLinear
from tensorpress.ops import tt_plan
from tensorpress.ops.tt import apply_tt, prepare_tt
from tensorpress.ops.tt_plan import flat_dims, plan_info, ranked_plans

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    bench_parser,
    cpu_seconds,
    exit_unless_cpu,
    forced_blas_suffix,
    median_ms,
    other_cpu_share,
    provenance,  # noqa: E402
    stamp_lines,
    tensorpress_flags,
)
from bench_tt import CASES as BENCH_CASES  # noqa: E402
from bench_tt import Case

PERMUTE_KINDS = ("copy", "short_runs", "transpose")
FEATURES = ("flops", "traffic") + PERMUTE_KINDS
N_INPUTS = 4  # inputs rotated among, so no plan times a cache-hot input


# bench_tt's cases, then other geometries (3 and 5 cores, small and large batches) so the
# fit sees more than one kind of chain.
CASES = [
    *BENCH_CASES,
    Case("1024x1024 d3 r16", 1024, 1024, 16, 256, (8, 16, 8), (8, 16, 8)),
    Case("1024x1024 d5 r8", 1024, 1024, 8, 256, (4, 4, 4, 4, 4), (4, 4, 4, 4, 4)),
    Case("512->2048 d3 r32 b64", 512, 2048, 32, 64, (8, 8, 8), (8, 16, 16)),
    Case("256x256 r4 b4096", 256, 256, 4, 4096, (4, 4, 4, 4), (4, 4, 4, 4)),
]
QUICK_CASES = CASES[:2]


def features(plan) -> dict[str, float]:
    """What the cost model weighs, for the whole batch (merging excluded: plans are prepared,
    as a TTLinear's are in inference; the dense route's W likewise)."""
    info = plan_info(tuple(flat_dims(plan.merged_shapes)), tuple(plan.order))
    b = plan.batch
    f = {
        "flops": b * info.flops_per_sample,
        "traffic": b * sum(s.rows * (s.K + s.N) for s in info.steps),
    }
    f.update({k: b * getattr(info.permute_elements, k) for k in PERMUTE_KINDS})
    return f


def merge_flops(plan) -> int:
    """The batch-independent FLOPs of a plan (merging cores; for the dense route, rebuilding
    W): not in the timings (plans are prepared) but charged by the plan search, as here."""
    info = plan_info(tuple(flat_dims(plan.merged_shapes)), tuple(plan.order))
    return plan.flops - plan.batch * info.flops_per_sample


def model_cost(feat: dict[str, float], weights: dict[str, float]) -> float:
    return sum(weights[k] * feat[k] for k in FEATURES)


def current_weights() -> dict[str, float]:
    w = {"flops": 1.0, "traffic": float(tt_plan.GEMM_TRAFFIC_FLOPS)}
    w.update({k: float(tt_plan.PERMUTE_FLOPS[k]) for k in PERMUTE_KINDS})
    w["dense_speed_advantage"] = float(tt_plan.dense_speed_advantage())
    return w


def time_plans(case: Case, repeats: int, warmup: int) -> tuple[list[dict], dict]:
    """Median forward and forward+backward time of every fused plan and of the dense route
    (W rebuilt, one GEMM), plans interleaved."""
    layer = case_layer(case)
    shapes = tuple(tuple(g.shape) for g in layer.cores)
    plans = list(ranked_plans(shapes, case.batch, allow_dense=True))
    cores = [g.detach() for g in layer.cores]
    prepared = [[m.detach().requires_grad_() for m in prepare_tt(cores, p)] for p in plans]
    xs = [torch.randn(case.batch, case.in_features).requires_grad_() for _ in range(N_INPUTS)]
    g = torch.randn(case.batch, case.out_features)
    ref = xs[0].detach().double() @ layer.to_dense().detach().double().T
    for plan, mats in zip(plans, prepared):
        with torch.no_grad():
            err = (apply_tt(xs[0].detach(), [m.detach() for m in mats], plan).double() - ref).norm() / ref.norm()
        if err > 1e-4:
            raise RuntimeError(f"{case.name}: plan {plan} disagrees with the dense reference ({err:.1e})")

    def fwd(plan, mats, x):
        with torch.no_grad():
            apply_tt(x, mats, plan)

    def fwd_bwd(plan, mats, x):
        (apply_tt(x, mats, plan) * g).sum().backward()

    rows = [
        {
            "plan": str(p),
            "groups": p.groups,
            "order": p.order,
            "dense": p.dense,
            "merge_flops": merge_flops(p),
            "features": {"flops": 2 * case.batch * case.in_features * case.out_features} if p.dense else features(p),
            "fwd_s": [],
            "fwd_bwd_s": [],
        }
        for p in plans
    ]
    for rep in range(warmup + repeats):
        for key, fn in (("fwd_s", fwd), ("fwd_bwd_s", fwd_bwd)):
            for i, (plan, mats) in enumerate(zip(plans, prepared)):
                x = xs[(rep + i) % N_INPUTS]
                t0 = time.perf_counter()
                fn(plan, mats, x)
                if rep >= warmup:
                    rows[i][key].append(time.perf_counter() - t0)
    for r in rows:
        r["fwd_ms"], r["fwd_bwd_ms"] = median_ms(r.pop("fwd_s")), median_ms(r.pop("fwd_bwd_s"))
    dense = next(r for r in rows if r["dense"])
    return [r for r in rows if not r["dense"]], dense


def fit_weights(cases: list[dict], leave_out: str | None = None) -> dict[str, float]:
    """Non-negative least squares of forward time on the features, every fused plan of every
    case (but `leave_out`) weighted by 1/time so each counts by its relative error; returned
    in FLOP-equivalents (the FLOPs weight is 1). The dense route's advantage: how many times
    faster per FLOP its one GEMM ran than the fitted model's FLOP-equivalent (median over
    the cases)."""
    A, y, kept = [], [], [c for c in cases if c["name"] != leave_out]
    for c in kept:
        for r in c["plans"]:
            A.append([r["features"][k] / r["fwd_ms"] for k in FEATURES])
            y.append(1.0)
    coef, _ = nnls(np.array(A), np.array(y))
    if coef[0] <= 0:
        raise RuntimeError("the fit gave FLOPs no weight; time more repeats")
    w = {k: float(v / coef[0]) for k, v in zip(FEATURES, coef)}
    ms_per_flop_equivalent = coef[0]
    w["dense_speed_advantage"] = statistics.median(
        ms_per_flop_equivalent * c["dense"]["features"]["flops"] / c["dense"]["fwd_ms"] for c in kept
    )
    return w


def search_cost(row: dict, weights: dict[str, float]) -> float:
    """What the plan search charges: the model's per-batch cost plus the merging FLOPs; the
    dense route's FLOPs (W's rebuild included) over its advantage."""
    if row["dense"]:
        return (row["features"]["flops"] + row["merge_flops"]) / weights["dense_speed_advantage"]
    return model_cost(row["features"], weights) + row["merge_flops"]


def pick(case: dict, weights: dict[str, float]) -> dict:
    """The plan the search would choose with these weights (ties to the dense route)."""
    return min(case["plans"] + [case["dense"]], key=lambda r: (search_cost(r, weights), not r["dense"]))


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 2 else float("nan")


def judge(cases: list[dict], weights: dict[str, float], loco: bool = False) -> list[dict]:
    """Per case: the picked plan's forward and forward+backward time against the fastest."""
    out = []
    for c in cases:
        w = fit_weights(cases, leave_out=c["name"]) if loco else weights
        p = pick(c, w)
        best_f = min(r["fwd_ms"] for r in c["plans"] + [c["dense"]])
        best_fb = min(r["fwd_bwd_ms"] for r in c["plans"] + [c["dense"]])
        out.append(
            {
                "case": c["name"],
                "plan": p["plan"],
                "fwd_ms": p["fwd_ms"],
                "fwd_regret": p["fwd_ms"] / best_f - 1,
                "fwd_bwd_ms": p["fwd_bwd_ms"],
                "fwd_bwd_regret": p["fwd_bwd_ms"] / best_fb - 1,
                "spearman": spearman(
                    [model_cost(r["features"], w) for r in c["plans"]], [r["fwd_ms"] for r in c["plans"]]
                ),
            }
        )
    return out


def write_markdown(path: Path, meta: dict, cases: list[dict], weights: dict, verdicts: dict, repeats: int) -> None:
    L = ["# The CPU cost model of the fused TT plans against timings", ""]
    L += stamp_lines(meta)
    L += [
        f"- every fused plan of each case (partition x order), median of {repeats} repeats, plans interleaved, "
        f"{N_INPUTS} inputs rotated; forward under no_grad, forward+backward: loss (y * g).sum(), gradients "
        "w.r.t. x and the prepared step matrices",
        "",
        "## Weights (FLOP-equivalents per unit)",
        "",
        "| weight | " + " | ".join(FEATURES) + " | dense speed advantage |",
        "|---|" + "---:|" * (len(FEATURES) + 1),
    ]
    for name, w in weights.items():
        L.append(
            f"| {name} | " + " | ".join(f"{w[k]:.2f}" for k in FEATURES) + f" | {w['dense_speed_advantage']:.2f} |"
        )
    L += [
        "",
        "flops: arithmetic FLOPs; traffic: elements each GEMM reads and writes (rows x (K + N)); the rest: "
        "elements permuted between GEMMs, by how the kernel moves them (memcpy runs, runs of < 16, "
        "blocked 2-D transposes). The fit: non-negative least squares of the forward "
        "times over every fused plan of every case, each plan weighted by 1/time. The dense route (W rebuilt, "
        "one GEMM) costs its FLOPs divided by the dense speed advantage; refitted as the median over the "
        "cases of how much faster per FLOP it ran than the fitted model's FLOP-equivalent.",
        "",
        "## The plan each model picks (regret: its time over the fastest plan's, minus 1)",
        "",
        "| case | plans | fastest fwd (ms) | fastest f+b (ms) | model | pick | fwd (ms) | fwd regret | "
        "f+b (ms) | f+b regret | rank corr. |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for i, c in enumerate(cases):
        best_f = min(r["fwd_ms"] for r in c["plans"] + [c["dense"]])
        best_fb = min(r["fwd_bwd_ms"] for r in c["plans"] + [c["dense"]])
        for name, v in verdicts.items():
            j = v[i]
            L.append(
                f"| {c['name']} | {len(c['plans'])} + dense | {best_f:.3f} | {best_fb:.3f} | {name} | {j['plan']} | "
                f"{j['fwd_ms']:.3f} | {j['fwd_regret']:.1%} | {j['fwd_bwd_ms']:.3f} | {j['fwd_bwd_regret']:.1%} | "
                f"{j['spearman']:.2f} |"
            )
    L += [
        "",
        "Mean regret (forward, forward+backward): "
        + "; ".join(
            f"{name} {statistics.mean(j['fwd_regret'] for j in v):.1%}, "
            f"{statistics.mean(j['fwd_bwd_regret'] for j in v):.1%}"
            for name, v in verdicts.items()
        )
        + ". rank corr.: Spearman correlation of model cost and forward time over "
        "the case's plans. 'refit, case left out': each case judged with weights fitted to the other cases only.",
    ]
    path.write_text("\n".join(L) + "\n")


def write_plot(path: Path, cases: list[dict], weights: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(weights), figsize=(5.5 * len(weights), 4.5))
    for ax, (name, w) in zip(np.atleast_1d(axes), weights.items()):
        for c in cases:
            cost = [model_cost(r["features"], w) / 1e6 for r in c["plans"]]
            dots = ax.scatter(cost, [r["fwd_ms"] for r in c["plans"]], s=12, label=c["name"])
            ax.scatter(
                [c["dense"]["features"]["flops"] / w["dense_speed_advantage"] / 1e6],
                [c["dense"]["fwd_ms"]],
                s=40,
                marker="x",
                color=dots.get_facecolor()[0],
            )
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("model cost (M FLOP-equivalents)"), ax.set_ylabel("forward time (ms)")
        ax.set_title(f"{name} weights (x: the dense route)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def case_layer(case: Case) -> TTLinear:
    torch.manual_seed(0)
    return TTLinear(
        case.in_features, case.out_features, case.rank, in_factors=case.in_factors, out_factors=case.out_factors
    )


def fill_merge_flops(cases: list[dict]) -> None:
    """Rows of a results file written before merge_flops was recorded get it from the case."""
    by_name = {c.name: c for c in CASES}
    for c in cases:
        if all("merge_flops" in r for r in c["plans"] + [c["dense"]]):
            continue
        case = by_name[c["name"]]
        shapes = tuple(tuple(g.shape) for g in case_layer(case).cores)
        merges = {str(p): merge_flops(p) for p in ranked_plans(shapes, case.batch, allow_dense=True)}
        for r in c["plans"] + [c["dense"]]:
            r["merge_flops"] = merges[r["plan"]]


def report(out: Path, stem: str, meta: dict, cases: list[dict], current: dict, repeats: int, warmup: int) -> None:
    """Judge the given weights and a refit on the timings; write JSON, Markdown and PNG."""
    weights = {"current": current, "refit": fit_weights(cases)}
    verdicts = {"current": judge(cases, weights["current"]), "refit": judge(cases, weights["refit"])}
    if len(cases) > 2:
        verdicts["refit, case left out"] = judge(cases, weights["refit"], loco=True)
    for name, v in verdicts.items():
        print(
            f"{name:22s} mean regret fwd {statistics.mean(j['fwd_regret'] for j in v):.1%}, "
            f"f+b {statistics.mean(j['fwd_bwd_regret'] for j in v):.1%}"
        )
    print("refit weights:", {k: round(v, 2) for k, v in weights["refit"].items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "repeats": repeats,
                "warmup": warmup,
                "weights": weights,
                "verdicts": verdicts,
                "cases": cases,
            },
            indent=2,
            default=list,
        )
        + "\n"
    )
    write_markdown(out / f"{stem}.md", meta, cases, weights, verdicts, repeats)
    write_plot(out / f"{stem}.png", cases, weights)
    print(f"wrote {out / stem}.{{json,md,png}}  ({tensorpress_flags(meta)})")


def main(argv=None) -> int:
    ap = bench_parser(
        __doc__,
        repeats_help="timed repeats per plan (default 15; 3 with --quick)",
        warmup_help="warmup runs (default 3; 1 with --quick)",
        quick_help="smoke test: two cases, few repeats",
    )
    ap.add_argument(
        "--rewrite",
        type=Path,
        default=None,
        help="judge the weights stored in an existing results JSON again (no timing runs)",
    )
    args = ap.parse_args(argv)
    if args.rewrite is not None:
        data = json.loads(args.rewrite.read_text())
        fill_merge_flops(data["cases"])
        report(
            args.rewrite.parent,
            args.rewrite.stem,
            data["meta"],
            data["cases"],
            data["weights"]["current"],
            data["repeats"],
            data["warmup"],
        )
        return 0
    exit_unless_cpu(args.device, "tt_cost_model.py")
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    meta = provenance(torch.get_num_threads())
    busy0, self0, wall0 = *cpu_seconds(), time.perf_counter()
    cases = []
    for case in QUICK_CASES if args.quick else CASES:
        t0 = time.perf_counter()
        plans, dense = time_plans(case, repeats, warmup)
        cases.append({"name": case.name, "plans": plans, "dense": dense})
        print(
            f"{case.name:22s} {len(cases[-1]['plans']):3d} plans timed ({time.perf_counter() - t0:.1f} s)", flush=True
        )
    meta["load_avg_end"] = os.getloadavg()
    meta["other_cpu_share"] = other_cpu_share(busy0, self0, wall0)
    stem = "tt_cost_model_quick" if args.quick else "tt_cost_model"
    report(args.out, stem + forced_blas_suffix(), meta, cases, current_weights(), repeats, warmup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
