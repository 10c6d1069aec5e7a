"""CPU benchmark of tensorpress's fused TT-matrix layer against its peers.

Sides, all holding the *same* weights (one set of TT cores, copied):

* ``tensorpress`` -- ``tensorpress.nn.TTLinear`` (fused kernel, plan chosen by FLOP count);
* ``tltorch``     -- tensorly-torch ``FactorizedLinear`` (blocktt, factorized implementation);
* ``einsum``      -- the naive core-by-core ``torch.einsum`` chain from ``peers.py``;
* ``dense``       -- ``torch.nn.Linear`` holding ``W = layer.to_dense()``.

For every case it checks that the four forward outputs agree, then times forward
(``torch.no_grad``) and forward+backward (``loss = (y * g).sum()``, gradients with respect
to ``x`` and every parameter), taking medians over repeats that rotate among a few
pre-generated inputs and interleave the sides. It also counts the bytes each side saves for
backward (activation memory), and writes ``tt_cpu.json``, ``tt_cpu.md`` and ``tt_cpu.png``.

    python benchmarks/bench_tt.py                 # full run (a few minutes on 2 cores)
    python benchmarks/bench_tt.py --quick         # smoke test, < 30 s, writes tt_cpu_quick.*
    python benchmarks/bench_tt.py --device cuda   # the GPU benchmark (see cuda_main), tt_<gpu>.*
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import tensorpress
from tensorpress.nn import TTLinear
from tensorpress.ops.tt import tt_to_dense
from tensorpress.ops.tt_plan import flat_dims, plan_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    bench_parser,
    cpu_seconds,
    exit_unless_cpu,
    forced_blas_suffix,
    interleaved_orders,  # noqa: E402
    median_ms,
    other_cpu_share,
    provenance,
    quartiles_ms,
    stamp_lines,
    tensorpress_flags,
)
from peers import einsum_chain_tt, tensorly_torch_tt_linear  # noqa: E402

SIDES = ("tensorpress", "tltorch", "einsum", "dense")
PEERS = ("tltorch", "einsum")
N_INPUTS = 4  # inputs rotated among, so no side times a cache-hot input
AGREE_TOL = 1e-4  # max relative error of any side's forward vs a float64 reference
TARGET_FWD, TARGET_FB = 2.0, 1.5  # speedups over the fastest peer demanded by the issue


@dataclass(frozen=True)
class Case:
    name: str
    in_features: int
    out_features: int
    rank: int
    batch: int
    in_factors: tuple[int, ...] | None = None  # None: TTLinear's default factorization
    out_factors: tuple[int, ...] | None = None


CASES = [
    Case("1024x1024 r8", 1024, 1024, 8, 256, (4, 8, 8, 4), (4, 8, 8, 4)),
    Case("1024x1024 r16", 1024, 1024, 16, 256, (4, 8, 8, 4), (4, 8, 8, 4)),
    Case("4096x4096 r8", 4096, 4096, 8, 64, (8, 8, 8, 8), (8, 8, 8, 8)),
    Case("4096x4096 r16", 4096, 4096, 16, 64, (8, 8, 8, 8), (8, 8, 8, 8)),
    Case("768->3072 r16", 768, 3072, 16, 256),
]
QUICK_CASES = CASES[:2]


@dataclass
class Side:
    """A forward function and the parameters it should produce gradients for."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.Tensor] = field(default_factory=list)


# ----------------------------------------------------------------------------- setup
def build_sides(case: Case) -> tuple[TTLinear, list[Side]]:
    """Our TTLinear plus the three peers, all given copies of the same cores and bias."""
    layer = TTLinear(
        case.in_features, case.out_features, case.rank, in_factors=case.in_factors, out_factors=case.out_factors
    )
    cores = [g.detach() for g in layer.cores]
    bias = layer.bias.detach()
    sides = [Side("tensorpress", layer, list(layer.parameters()))]

    tl = tensorly_torch_tt_linear(layer.in_factors, layer.out_factors, case.rank)
    if tl is not None:
        tl_shapes = [tuple(f.shape) for f in tl.weight.factors]
        if tl_shapes != list(layer.core_shapes):
            raise RuntimeError(f"{case.name}: tltorch cores {tl_shapes} != ours {layer.core_shapes}")
        with torch.no_grad():
            for f, g in zip(tl.weight.factors, cores):
                f.copy_(g)
            tl.bias.copy_(bias)
        sides.append(Side("tltorch", tl, list(tl.parameters())))

    ein_cores = [g.clone().requires_grad_() for g in cores]
    ein_bias = bias.clone().requires_grad_()
    sides.append(Side("einsum", lambda x: einsum_chain_tt(x, ein_cores) + ein_bias, ein_cores + [ein_bias]))

    dense = torch.nn.Linear(case.in_features, case.out_features)
    with torch.no_grad():
        dense.weight.copy_(layer.to_dense())
        dense.bias.copy_(bias)
    sides.append(Side("dense", dense, list(dense.parameters())))
    return layer, sides


def check_agreement(layer: TTLinear, sides: list[Side], x: torch.Tensor) -> dict[str, float]:
    """Relative error of every side's forward against x W^T + b computed in float64."""
    with torch.no_grad():
        w64 = tt_to_dense([g.detach().double() for g in layer.cores])
        ref = x.double() @ w64.T + layer.bias.detach().double()
        errs = {s.name: float((s.fn(x).double() - ref).norm() / ref.norm()) for s in sides}
    bad = {k: v for k, v in errs.items() if not v < AGREE_TOL}
    if bad:
        raise RuntimeError(f"forward outputs disagree (rel err >= {AGREE_TOL}): {bad}")
    return errs


# ----------------------------------------------------------------------------- measurements
def run_forward(side: Side, x: torch.Tensor) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        side.fn(x)
        return time.perf_counter() - t0


def run_fwd_bwd(side: Side, x: torch.Tensor, g: torch.Tensor) -> float:
    x.grad = None
    for p in side.params:
        p.grad = None
    t0 = time.perf_counter()
    (side.fn(x) * g).sum().backward()
    return time.perf_counter() - t0


def time_sides(
    sides: list[Side], xs: list[torch.Tensor], g: torch.Tensor, repeats: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Median ms (and first / third quartiles) per side for forward and forward+backward.

    Each repeat uses the next input of `xs` for every side, and runs the sides in an order
    that changes every repeat (`interleaved_orders`): slow drifts of the machine hit all
    sides alike, and every side follows every other side equally often.
    """
    for s in sides:
        for i in range(warmup):
            run_forward(s, xs[i % len(xs)])
            run_fwd_bwd(s, xs[i % len(xs)], g)
    fwd = {s.name: [] for s in sides}
    fb = {s.name: [] for s in sides}
    for r, positions in enumerate(interleaved_orders(len(sides), repeats)):
        x = xs[r % len(xs)]
        order = [sides[i] for i in positions]
        for s in order:
            fwd[s.name].append(run_forward(s, x))
        for s in order:
            fb[s.name].append(run_fwd_bwd(s, x, g))
    return {
        s.name: {
            "fwd_ms": median_ms(fwd[s.name]),
            "fwd_bwd_ms": median_ms(fb[s.name]),
            "fwd_quartiles_ms": quartiles_ms(fwd[s.name]),
            "fwd_bwd_quartiles_ms": quartiles_ms(fb[s.name]),
        }
        for s in sides
    }


def saved_bytes(side: Side, x: torch.Tensor) -> int:
    """Bytes of the distinct storages a forward saves for backward, parameters excluded.

    This is the activation memory the side holds between forward and backward (the input x
    itself is included, for every side).
    """
    params = {p.untyped_storage().data_ptr() for p in side.params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        side.fn(x)
    return sum(seen.values())


def bench_case(case: Case, repeats: int, warmup: int) -> dict:
    busy0, self0, wall0 = *cpu_seconds(), time.perf_counter()
    torch.manual_seed(0)
    layer, sides = build_sides(case)
    xs = [torch.randn(case.batch, case.in_features).requires_grad_() for _ in range(N_INPUTS)]
    g = torch.randn(case.batch, case.out_features)
    errs = check_agreement(layer, sides, xs[0].detach())
    times = time_sides(sides, xs, g, repeats, warmup)
    memory = {s.name: saved_bytes(s, xs[0]) for s in sides}

    plan, plan_train = layer.plan(case.batch), layer.plan(case.batch, training=True)
    dense_flops = 2 * case.batch * case.in_features * case.out_features
    ours = times["tensorpress"]
    peers = [p for p in PEERS if p in times]  # the einsum chain is always there
    best_name = {k: min(peers, key=lambda p: times[p][k]) for k in ("fwd_ms", "fwd_bwd_ms")}
    best = {k: times[p][k] for k, p in best_name.items()}
    gflops = lambda flops, ms: flops / (ms * 1e6)  # noqa: E731
    res = {
        "case": case.name,
        "in_features": case.in_features,
        "out_features": case.out_features,
        "in_factors": list(layer.in_factors),
        "out_factors": list(layer.out_factors),
        "ranks": list(layer.ranks),
        "batch": case.batch,
        "plan": str(plan),
        "plan_flops": plan.flops,
        "plan_train": str(plan_train),
        "plan_train_flops": plan_train.flops,
        "dense_gemm_flops": dense_flops,
        "rel_err": errs,
        "times_ms": times,
        "saved_bytes": memory,
        "gflops": {  # fwd+bwd counted as 3x the forward FLOPs (nominal)
            "tensorpress_fwd": gflops(plan.flops, ours["fwd_ms"]),
            "tensorpress_fwd_bwd": gflops(3 * plan_train.flops, ours["fwd_bwd_ms"]),
            "dense_fwd": gflops(dense_flops, times["dense"]["fwd_ms"]),
            "dense_fwd_bwd": gflops(3 * dense_flops, times["dense"]["fwd_bwd_ms"]),
        },
        "fastest_peer": best_name,
        "speedup_vs_peer": {k: best[k] / ours[k] for k in best},
        "speedup_vs_dense": {k: times["dense"][k] / ours[k] for k in best},
    }
    res["targets"] = targets(res, plan.flops < dense_flops, plan_train.flops < dense_flops)
    res["other_cpu_share"] = other_cpu_share(busy0, self0, wall0)
    return res


def targets(res: dict, fewer_flops: bool, fewer_flops_training: bool | None = None) -> dict[str, str]:
    """PASS/FAIL against the issue's targets (the dense ones n/a unless the plan of that pass,
    inference or training, needs fewer FLOPs)."""
    fewer_flops_training = fewer_flops if fewer_flops_training is None else fewer_flops_training
    mark = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    vp, vd = res["speedup_vs_peer"], res["speedup_vs_dense"]
    return {
        "fwd_vs_peer": mark(vp["fwd_ms"] >= TARGET_FWD),
        "fwd_bwd_vs_peer": mark(vp["fwd_bwd_ms"] >= TARGET_FB),
        "fwd_vs_dense": mark(vd["fwd_ms"] > 1) if fewer_flops else "n/a",
        "fwd_bwd_vs_dense": mark(vd["fwd_bwd_ms"] > 1) if fewer_flops_training else "n/a",
    }


# ----------------------------------------------------------------------------- reporting
def write_markdown(path: Path, meta: dict, results: list[dict], repeats: int, warmup: int) -> None:
    lines = [
        "# TT-matrix layer benchmark (CPU)",
        "",
        *stamp_lines(meta),
        f"- torch {meta['torch']}, {meta['threads']} threads, float32, opt_einsum={meta['opt_einsum']}; "
        f"thread env: {meta['env'] or 'none set'}",
        f"- tensorpress: {tensorpress_flags(meta)}; plans: "
        + (
            "autotuned (`--autotune`: the fastest of the cost model's few cheapest, timed)"
            if meta.get("autotune")
            else "the cost model's"
        ),
        f"- median of {repeats} repeats ({warmup} warmup), rotating among {N_INPUTS} inputs, sides interleaved in an "
        "order that changes every repeat (every side follows every other equally often)",
        "- all four sides hold the same weights (one set of TT cores); forward outputs agree "
        f"with a float64 reference to < {AGREE_TOL:g} relative error before timing",
        "- fwd+bwd: loss = (y * g).sum(), gradients w.r.t. x and all parameters",
        "",
        "## Time (ms, median)",
        "",
        "| case | batch | tensorpress fwd | tltorch fwd | einsum fwd | dense fwd "
        "| tensorpress f+b | tltorch f+b | einsum f+b | dense f+b | other CPU load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cell = lambda r, s, k: f"{r['times_ms'][s][k]:.3f}" if s in r["times_ms"] else "-"  # noqa: E731
    for r in results:
        lines.append(
            f"| {r['case']} | {r['batch']} | "
            + " | ".join(cell(r, s, "fwd_ms") for s in SIDES)
            + " | "
            + " | ".join(cell(r, s, "fwd_bwd_ms") for s in SIDES)
            + f" | {r['other_cpu_share']:.0%} |"
        )
    lines += [
        "",
        "## tensorpress vs targets",
        "",
        f"Targets (from the issue): forward >= {TARGET_FWD:g}x faster than the fastest peer "
        f"(tltorch / einsum chain), forward+backward >= {TARGET_FB:g}x; faster than dense "
        "`nn.Linear` wherever the plan needs fewer FLOPs than the dense GEMM (2·B·M·N), "
        "else n/a. GFLOP/s: plan.flops / time for ours (the training plan's for f+b), 2·B·M·N / time for dense; "
        "fwd+bwd counts a nominal 3x the forward FLOPs.",
        "",
        "| case | plan | GFLOP/s ours fwd / f+b | GFLOP/s dense fwd / f+b "
        "| vs peer fwd | vs peer f+b | vs dense fwd | vs dense f+b |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        gf, vp, vd, t = r["gflops"], r["speedup_vs_peer"], r["speedup_vs_dense"], r["targets"]
        lines.append(
            f"| {r['case']} | {plan_cell(r)} | {gf['tensorpress_fwd']:.1f} / {gf['tensorpress_fwd_bwd']:.1f} "
            f"| {gf['dense_fwd']:.1f} / {gf['dense_fwd_bwd']:.1f} "
            f"| {vp['fwd_ms']:.2f}x ({r['fastest_peer']['fwd_ms']}) {t['fwd_vs_peer']} "
            f"| {vp['fwd_bwd_ms']:.2f}x ({r['fastest_peer']['fwd_bwd_ms']}) {t['fwd_bwd_vs_peer']} "
            f"| {vd['fwd_ms']:.2f}x {t['fwd_vs_dense']} | {vd['fwd_bwd_ms']:.2f}x {t['fwd_bwd_vs_dense']} |"
        )
    lines += needed_rate_lines(results)
    lines += [
        "",
        "## Activation memory saved for backward (MiB; x itself included, parameters excluded)",
        "",
        "tensorpress keeps x and its prepared step matrices (the merged cores: batch-independent, "
        "the size of the compressed weight); everything batch-sized beyond x is recomputed in the "
        "backward. The peers keep every intermediate of their contraction chain.",
        "",
        "| case | input x | " + " | ".join(SIDES) + " |",
        "|---|---:|" + "---:|" * len(SIDES),
    ]
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    for r in results:
        x_bytes = 4 * r["batch"] * r["in_features"]
        lines.append(
            f"| {r['case']} | {mib(x_bytes)} | "
            + " | ".join(mib(r["saved_bytes"][s]) if s in r["saved_bytes"] else "-" for s in SIDES)
            + " |"
        )
    path.write_text("\n".join(lines) + "\n")


def needed_rate_lines(results: list[dict]) -> list[str]:
    """For each failed target against the peers: the FLOP rate our plan would have to run at to
    meet it, beside the best rate a single dense GEMM reached in this run (the machine's
    practical ceiling for these FLOPs)."""
    ceiling = max(r["gflops"]["dense_fwd"] for r in results)
    rows = []
    for r in results:
        executed = {"fwd_ms": r["plan_flops"], "fwd_bwd_ms": executed_fwd_bwd_flops(r)}
        for key, target, label in (("fwd_ms", TARGET_FWD, "fwd"), ("fwd_bwd_ms", TARGET_FB, "f+b")):
            if r["speedup_vs_peer"][key] >= target:
                continue
            allowed_ms = r["times_ms"][r["fastest_peer"][key]][key] / target
            reached = executed[key] / (r["times_ms"]["tensorpress"][key] * 1e6)
            need = executed[key] / (allowed_ms * 1e6)
            rows.append(
                f"| {r['case']} | {label} | {executed[key] / 1e6:.1f} | {allowed_ms:.3f} | {need:.1f} "
                f"| {reached:.1f} | {need / ceiling:.0%} |"
            )
    if not rows:
        return []
    return [
        "",
        "## What the failed targets need",
        "",
        "The FLOPs tensorpress executes (the forward plan's; fwd+bwd: three times the forward plus the "
        "backward's recompute of every step but the last, which is what keeps only x saved) and the rate "
        "they would have to run at to meet each failed target, against the best rate one dense GEMM "
        f"reached in this run ({ceiling:.1f} GFLOP/s). The fused plans are the fewest-FLOP contraction "
        "plans, so above 100% the kernel would have to out-run that GEMM. (That is a ceiling of the "
        "BLAS kernels in use: where OPENBLAS_CORETYPE forces AVX2 kernels on an AVX-512 CPU, "
        "OpenBLAS's own choice runs about twice as fast; see tt_cpu.md.)",
        "",
        "| case | pass | MFLOP executed | time allowed (ms) | GFLOP/s needed | GFLOP/s reached "
        "| needed / dense GEMM's best |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
    ]


def plan_cell(r: dict) -> str:
    """The plan, and the training step's where it differs (older results have one plan)."""
    train = r.get("plan_train", r["plan"])
    return r["plan"] if train == r["plan"] else f"{r['plan']}; training: {train}"


def executed_fwd_bwd_flops(r: dict) -> int:
    """Forward + backward FLOPs of the case's plan: 3x the forward (y, grad x, grad cores), plus the
    backward's recompute of every fused step but the last (nominal 3x for the dense route)."""
    layer = TTLinear(
        r["in_features"],
        r["out_features"],
        r["ranks"],
        in_factors=r["in_factors"],
        out_factors=r["out_factors"],
        bias=False,
    )
    plan = layer.plan(r["batch"], training="plan_train" in r)
    recorded = r.get("plan_train", r["plan"])
    if str(plan) != recorded:
        raise ValueError(f"{r['case']}: the plan chosen now ({plan}) is not the recorded one ({recorded})")
    if plan.dense:
        return 3 * plan.flops
    steps = plan_info(tuple(flat_dims(plan.merged_shapes)), tuple(plan.order)).steps
    return 3 * plan.flops + r["batch"] * sum(s.flops for s in steps[:-1])


def write_plot(path: Path, results: list[dict]) -> None:
    """Grouped bars: forward and forward+backward time per case and side (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    width = 0.8 / len(SIDES)
    for ax, key, title in zip(axes, ("fwd_ms", "fwd_bwd_ms"), ("forward", "forward + backward")):
        for j, side in enumerate(SIDES):
            xs = [i + (j - (len(SIDES) - 1) / 2) * width for i in range(len(results))]
            ax.bar(xs, [r["times_ms"].get(side, {}).get(key, math.nan) for r in results], width, label=side)
        ax.set_xticks(range(len(results)), [f"{r['case']}\nB={r['batch']}" for r in results], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("median time (ms)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = bench_parser(
        __doc__,
        repeats_help="timed repeats (default 48: every order of the four sides twice; 3 with --quick)",
        warmup_help="warmup runs (default 5; 1 with --quick)",
        quick_help="smoke test: two small cases, few repeats",
    )
    ap.add_argument(
        "--rewrite", type=Path, default=None, help="rewrite the Markdown from an existing CPU results JSON (no runs)"
    )
    ap.add_argument(
        "--autotune",
        action="store_true",
        help="CPU plans by timing the cost model's few cheapest (tensorpress.ops.set_autotune); "
        "results go to tt_cpu_autotune.*",
    )
    args = ap.parse_args(argv)

    if args.rewrite is not None:
        data = json.loads(args.rewrite.read_text())
        write_markdown(args.rewrite.with_suffix(".md"), data["meta"], data["results"], data["repeats"], data["warmup"])
        print(f"wrote {args.rewrite.with_suffix('.md')}")
        return 0
    if args.device == "cuda":
        return cuda_main(args)
    exit_unless_cpu(args.device, "bench_tt.py")

    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 48)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    cases = QUICK_CASES if args.quick else CASES
    meta = provenance(torch.get_num_threads())
    meta["autotune"] = args.autotune
    tensorpress.ops.set_autotune(args.autotune)
    busy0, self0, wall0 = *cpu_seconds(), time.perf_counter()
    results = []
    for case in cases:
        t0 = time.perf_counter()
        r = bench_case(case, repeats, warmup)
        results.append(r)
        t = r["times_ms"]
        print(
            f"{case.name:15s} B={case.batch:3d} fwd ms: "
            + " ".join(f"{s}={t[s]['fwd_ms']:.3f}" for s in SIDES if s in t)
            + " | f+b ms: "
            + " ".join(f"{s}={t[s]['fwd_bwd_ms']:.3f}" for s in SIDES if s in t)
            + f" | {r['targets']} ({time.perf_counter() - t0:.1f} s, other CPU load {r['other_cpu_share']:.0%})",
            flush=True,
        )
    meta["load_avg_end"] = os.getloadavg()
    meta["other_cpu_share"] = other_cpu_share(busy0, self0, wall0)
    if meta["other_cpu_share"] > 0.05:
        print(
            f"warning: other processes used {meta['other_cpu_share']:.0%} of the CPU during the run; "
            "timings are noisy, re-run on a quiet machine",
            file=sys.stderr,
        )

    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("tt_cpu_quick" if args.quick else "tt_cpu") + ("_autotune" if args.autotune else "")
    stem += forced_blas_suffix()
    (args.out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "repeats": repeats, "warmup": warmup, "results": results}, indent=2) + "\n"
    )
    write_markdown(args.out / f"{stem}.md", meta, results, repeats, warmup)
    write_plot(args.out / f"{stem}.png", results)
    print(f"wrote {args.out / stem}.{{json,md,png}}")
    return 0


# ----------------------------------------------------------------------------- CUDA
# The GPU cases: (name, in_features, out_features, rank, in_factors, out_factors);
# None factors: TTLinear's default factorization.
CUDA_CASES = [
    ("1024x1024 r8", 1024, 1024, 8, (4, 8, 8, 4), (4, 8, 8, 4)),
    ("1024x1024 r16", 1024, 1024, 16, (4, 8, 8, 4), (4, 8, 8, 4)),
    ("4096x4096 r8", 4096, 4096, 8, (8, 8, 8, 8), (8, 8, 8, 8)),
    ("4096x4096 r16", 4096, 4096, 16, (8, 8, 8, 8), (8, 8, 8, 8)),
    ("4096x4096 r32", 4096, 4096, 32, (8, 8, 8, 8), (8, 8, 8, 8)),
    ("768->3072 r16", 768, 3072, 16, None, None),
    ("4096->11008 r32", 4096, 11008, 32, None, None),
]
CUDA_BATCHES = (1, 16, 256, 4096)
# float32 twice: TF32 off (torch's default), then on (torch.backends.cuda.matmul.allow_tf32:
# cuBLAS and our tensor-core tiled GEMMs both use it)
CUDA_DTYPES = ("float32", "float32-tf32", "bfloat16")
CUDA_AGREE_TOL = {"float32": 1e-4, "float32-tf32": 5e-3, "bfloat16": 3e-2}
CUDA_GRAPH_MAX_BATCH = 16  # small batches are also timed as CUDA-graph replays (launch gaps gone)
CUDA_TARGET_SMALL, CUDA_TARGET_LARGE = 3.0, 2.0  # vs einsum / tltorch at batch <= 64, at 4096
CUDA_TARGET_LATENCY_US = 10.0  # 4096^2 r16 at batch <= 64
CUDA_TARGET_ROOFLINE = 0.5  # large-batch forward vs its roofline floor


def cuda_time_ms(fn, xs, repeats: int, warmup: int) -> list[float]:
    """Per-call times (ms) by CUDA events, rotating among the inputs xs."""
    for i in range(warmup):
        fn(xs[i % len(xs)])
    torch.cuda.synchronize()
    out = []
    for r in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(xs[r % len(xs)])
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def cuda_ceilings() -> dict:
    """The two roofline ceilings measured on this GPU: a large device-to-device copy (bytes
    read + written per second) and a large dense matmul per dtype (FLOP/s)."""
    n = 1 << 28  # 1 GiB of float32
    a, b = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    copy_ms = statistics.median(cuda_time_ms(lambda _: b.copy_(a), [None], 20, 3))
    a = b = None  # 2 GiB freed before the matmuls (not `del`: the lambda above still names them)
    res = {"copy_bytes_per_s": 2 * 4 * n / (copy_ms * 1e-3)}
    for name in CUDA_DTYPES:
        with tf32(name):
            m = torch.randn(8192, 8192, device="cuda").to(torch_dtype(name))
            ms = statistics.median(cuda_time_ms(lambda _, m=m: m @ m, [None], 20, 3))
        res[f"matmul_flops_{name}"] = 2 * 8192**3 / (ms * 1e-3)
    return res


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name.split("-")[0])


@contextlib.contextmanager
def tf32(name: str):
    """TF32 matmuls on for the "-tf32" variants, off otherwise; restored after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = name.endswith("-tf32")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def cuda_graph_ms(fn, xs, repeats: int, warmup: int) -> list[float]:
    """Per-call times (ms) of fn replayed from a captured CUDA graph (one static input)."""
    static_x = xs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 2)):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(static_x)

    def replay(x):
        static_x.copy_(x)
        graph.replay()

    return cuda_time_ms(replay, xs, repeats, warmup)


def fwd_bwd(fn, params):
    """fn's forward + backward on x (and the side's parameters), as training runs it."""

    def step(x):
        xg = x.detach().requires_grad_()
        y = fn(xg)
        torch.autograd.grad(y, [xg, *params], torch.ones_like(y))

    return step


def cuda_case(name, in_f, out_f, rank, in_factors, out_factors, batch, dtype_name, ceilings, repeats, warmup):
    from tensorpress.ops.tt import tt_matmul, tt_matmul_reference
    from tensorpress.ops.tt_plan import choose_plan

    dtype = torch_dtype(dtype_name)
    torch.manual_seed(0)
    layer = TTLinear(in_f, out_f, rank, in_factors=in_factors, out_factors=out_factors)
    cores64 = [g.detach().double() for g in layer.cores]
    cores = [g.to("cuda", dtype) for g in cores64]
    w = tt_to_dense(cores64).to("cuda", dtype)
    xs = [torch.randn(batch, in_f, device="cuda").to(dtype) for _ in range(N_INPUTS)]
    shapes = [tuple(g.shape) for g in cores]
    plan = choose_plan(shapes, batch, device="cuda", dtype=dtype)
    sides = {
        "tensorpress": lambda x: tt_matmul(x, cores, plan=plan),
        "einsum": lambda x: einsum_chain_tt(x, cores),
        "dense": lambda x: x @ w.T,
    }
    params = {"tensorpress": cores, "einsum": cores, "dense": [w]}
    tl = tensorly_torch_tt_linear(layer.in_factors, layer.out_factors, rank)
    if tl is not None:
        with torch.no_grad():
            for f, g in zip(tl.weight.factors, cores64):
                f.copy_(g)
            tl.bias.zero_()
        tl = tl.to("cuda", dtype)
        sides["tltorch"] = tl
        params["tltorch"] = list(tl.parameters())
    ref = tt_matmul_reference(xs[0].double().cpu(), cores64)
    errs = {}
    with torch.no_grad():
        for side, fn in sides.items():
            errs[side] = float((fn(xs[0]).double().cpu() - ref).norm() / ref.norm())
        bad = {k: v for k, v in errs.items() if not v < CUDA_AGREE_TOL[dtype_name]}
        if bad:
            raise RuntimeError(f"{name} B={batch} {dtype_name}: outputs disagree with float64: {bad}")
        times = {side: statistics.median(cuda_time_ms(fn, xs, repeats, warmup)) for side, fn in sides.items()}
        graph_times, graph_errors = {}, {}
        if batch <= CUDA_GRAPH_MAX_BATCH:
            for side, fn in sides.items():
                try:
                    graph_times[side] = statistics.median(cuda_graph_ms(fn, xs, repeats, warmup))
                except Exception as e:  # recorded, not fatal: the other measurements stand
                    graph_errors[side] = f"{type(e).__name__}: {e}"
    for group in params.values():
        for p in group:
            p.requires_grad_(True)
    train_times = {
        side: statistics.median(cuda_time_ms(fwd_bwd(fn, params[side]), xs, repeats, warmup))
        for side, fn in sides.items()
    }
    elem = torch.empty((), dtype=dtype).element_size()
    io_bytes = (batch * (in_f + out_f) + sum(g.numel() for g in cores)) * elem
    peak = ceilings[f"matmul_flops_{dtype_name}"]
    floor_ms = 1e3 * max(plan.flops / peak, io_bytes / ceilings["copy_bytes_per_s"])
    ours = times["tensorpress"]
    peers = {k: v for k, v in times.items() if k in ("einsum", "tltorch")}
    return {
        "case": name,
        "batch": batch,
        "dtype": dtype_name,
        "plan": str(plan),
        "path": plan.path,
        "plan_flops": plan.flops,
        "dense_flops": 2 * batch * in_f * out_f,
        "rel_err": errs,
        "times_ms": times,
        "graph_times_ms": graph_times,
        "graph_errors": graph_errors,
        "fwd_bwd_times_ms": train_times,
        "fwd_bwd_speedup_vs_peers": {
            k: v / train_times["tensorpress"] for k, v in train_times.items() if k in ("einsum", "tltorch")
        },
        "achieved_flops": plan.flops / (ours * 1e-3),
        "achieved_bytes_per_s": io_bytes / (ours * 1e-3),
        "roofline_floor_ms": floor_ms,
        "roofline_fraction": floor_ms / ours,
        "speedup_vs_peers": {k: v / ours for k, v in peers.items()},
        "speedup_vs_dense": times["dense"] / ours,
    }


def cuda_targets(r: dict) -> dict:
    mark = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    need = CUDA_TARGET_SMALL if r["batch"] <= 64 else CUDA_TARGET_LARGE if r["batch"] >= 4096 else None
    t = {}
    if need is not None and r["speedup_vs_peers"]:
        t["vs_peers"] = mark(min(r["speedup_vs_peers"].values()) >= need)
    if 3 * r["plan_flops"] <= r["dense_flops"]:
        t["vs_dense"] = mark(r["speedup_vs_dense"] > 1)
    if r["case"] == "4096x4096 r16" and r["batch"] <= 64:
        t["latency_10us"] = mark(1e3 * r["times_ms"]["tensorpress"] < CUDA_TARGET_LATENCY_US)
    if r["batch"] >= 4096:
        t["roofline_50pct"] = mark(r["roofline_fraction"] >= CUDA_TARGET_ROOFLINE)
    return t


def us_of(times_ms: dict, key: str) -> str:
    return f"{1e3 * times_ms[key]:.1f}" if key in times_ms else "-"


def graph_cell(r: dict) -> str:
    if r["graph_errors"]:
        return ("error: " + "; ".join(f"{k}: {v}" for k, v in r["graph_errors"].items()))[:80]
    if not r["graph_times_ms"]:
        return "-"
    return f"{us_of(r['graph_times_ms'], 'tensorpress')} / {us_of(r['graph_times_ms'], 'dense')}"


def gpu_slug() -> str:
    return "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name().lower()).strip("_")


def cuda_main(args) -> int:
    """Forward times on the GPU (CUDA events, medians, rotating inputs) against the einsum
    chain, tensorly-torch and cuBLAS dense, with achieved FLOP/s, bytes/s and the roofline
    floor from ceilings measured on the same GPU. Writes tt_<gpu>.json and .md."""
    if not torch.cuda.is_available():
        sys.exit("bench_tt.py: --device cuda requested but torch sees no GPU")
    if not tensorpress.info()["cuda_kernels_built"]:
        sys.exit("bench_tt.py: this build of tensorpress has no CUDA kernels (TENSORPRESS_CUDA=ON to build them)")
    repeats = args.repeats or (5 if args.quick else 50)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    cases = CUDA_CASES[:2] if args.quick else CUDA_CASES
    batches = (1, 256) if args.quick else CUDA_BATCHES
    meta = provenance(torch.get_num_threads())
    meta["gpu"] = torch.cuda.get_device_name()
    ceilings = cuda_ceilings()
    print(
        f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e9:.0f} GB/s, "
        + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in ceilings.items() if k.startswith("matmul"))
    )
    results = []
    for case in cases:
        for batch in batches:
            for dt in CUDA_DTYPES:
                with tf32(dt):
                    r = cuda_case(*case, batch, dt, ceilings, repeats, warmup)
                r["targets"] = cuda_targets(r)
                results.append(r)
                print(
                    f"{r['case']:16s} B={batch:5d} {dt:8s} {r['path']:6s} "
                    + " ".join(f"{k}={1e3 * v:.1f}us" for k, v in r["times_ms"].items())
                    + f" roofline {r['roofline_fraction']:.0%} {r['targets']}",
                    flush=True,
                )
    meta["load_avg_end"] = os.getloadavg()
    meta["other_cpu_share"] = 0.0
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"tt_{gpu_slug()}" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {"meta": meta, "ceilings": ceilings, "repeats": repeats, "warmup": warmup, "results": results},
            indent=2,
            default=str,
        )
        + "\n"
    )
    lines = [
        f"# TT-matrix forward on {meta['gpu']}",
        "",
        *stamp_lines(meta),
        f"- torch {meta['torch']}; tensorpress: {tensorpress_flags(meta)}, "
        f"cuda archs {meta['tensorpress_info']['cuda_archs']}",
        f"- CUDA events, median of {repeats} ({warmup} warmup), rotating among {N_INPUTS} inputs; "
        "every side checked against float64 first",
        f"- ceilings: copy {ceilings['copy_bytes_per_s'] / 1e9:.0f} GB/s; "
        + ", ".join(f"{k[13:]} matmul {v / 1e12:.1f} TFLOP/s" for k, v in ceilings.items() if k.startswith("matmul")),
        "",
        "| case | batch | dtype | path | ours µs | einsum µs | tltorch µs | dense µs | TFLOP/s | GB/s "
        "| roofline | targets | graph: ours / dense µs | f+b: ours / tltorch / dense µs |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    us = lambda r, k: us_of(r["times_ms"], k)  # noqa: E731
    for r in results:
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['dtype']} | {r['path']} | {us(r, 'tensorpress')} "
            f"| {us(r, 'einsum')} | {us(r, 'tltorch')} | {us(r, 'dense')} | {r['achieved_flops'] / 1e12:.2f} "
            f"| {r['achieved_bytes_per_s'] / 1e9:.0f} | {r['roofline_fraction']:.0%} "
            f"| {', '.join(f'{k} {v}' for k, v in r['targets'].items())} | {graph_cell(r)} "
            f"| {' / '.join(us_of(r['fwd_bwd_times_ms'], k) for k in ('tensorpress', 'tltorch', 'dense'))} |"
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / stem}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
