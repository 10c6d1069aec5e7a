"""CPU benchmark of tensorpress's factorized convolutions against tensorly-torch.

On ``nn.Conv2d(256, 256, 3, padding=1)`` with a seeded random weight and an input of
8x256x32x32 (float32) it measures:

1. forward time (``torch.no_grad``, median over repeats, sides interleaved, one input) of
   dense ``nn.Conv2d``; ``CPConv2d.from_dense`` (ALS) at the CP ranks; ``TuckerConv2d.from_dense``
   at the Tucker ranks; tensorly-torch ``FactorizedConv`` (CP) with the 'factorized' and the
   'reconstructed' implementation at the same CP ranks, holding *our* CP factors (so every CP
   side at a rank computes the same function; outputs are checked to agree);
2. decomposition time and relative kernel error ||W - W_hat|| / ||W|| of
   ``CPConv2d.from_dense(conv, 64)`` vs ``tltorch.FactorizedConv.from_conv(conv, rank=64,
   factorization='cp')`` (tensorly's parafac with its default iteration cap);
3. forward + backward time (autograd on, gradients of the input and every parameter) of each
   CPConv2d and the tltorch 'factorized' side of the same rank;
4. forward and forward + backward at a few other shapes (batch 1; 64 channels at 56x56; 512 at
   14x14; a 5x5 kernel), randomly initialised CPConv2d against the tltorch side with its factors;
5. the cost of CPConv2d's first call per shape key, which times the stages' routes
   (``tensorpress.nn.conv_paths``: every combination as a whole forward), the routes it chose, and the layer with its
   static routes (GEMM 1x1 stages, fused depthwise; what it ran before the choice) as a baseline;
6. the issue's targets, PASS/FAIL.

Writes ``conv_cpu.{json,md,png}`` (``conv_cpu_quick.*`` with --quick) under ``--out``.

    python benchmarks/bench_conv.py            # full run (a couple of minutes on 2 cores)
    python benchmarks/bench_conv.py --quick    # smoke test, < 20 s (decompositions capped at 3 sweeps)
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from tensorpress.nn import CPConv2d, TuckerConv2d
from tensorpress.nn.cp_conv2d import static_routes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    bench_parser,
    cpu_seconds,
    exit_unless_cpu,
    forced_blas_suffix,
    interleaved_orders,
    median_ms,
    other_cpu_share,
    provenance,
    quartiles_ms,
    stamp_lines,
    tensorpress_flags,
)

CHANNELS, KERNEL, BATCH, SIZE = 256, 3, 8, 32
CP_RANKS, TUCKER_RANKS = (32, 64, 128), ((64, 64), (128, 128))
DECOMP_RANK = 64
# (batch, channels, size, rank, kernel) of the other shapes (padding kernel // 2)
OTHER_SHAPES = ((1, 256, 32, 64, 3), (32, 64, 56, 32, 3), (8, 512, 14, 128, 3), (8, 128, 28, 64, 5))
AGREE_TOL = 1e-4  # max relative difference between the CP sides holding the same factors
TARGET_DECOMP = 5.0  # from_dense must be this many times faster than tltorch's from_conv


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def rel_err(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||W - W_hat|| / ||W|| computed in float64."""
    w, w_hat = w.detach().double(), w_hat.detach().double()
    return float((w - w_hat).norm() / w.norm())


def tltorch_default_implementation() -> str:
    """The ``implementation`` that ``tltorch.FactorizedConv.from_conv`` uses when none is given."""
    import tltorch

    return inspect.signature(tltorch.FactorizedConv.from_conv).parameters["implementation"].default


def tltorch_cp_conv(ours: CPConv2d, implementation: str) -> nn.Module:
    """A tltorch CP FactorizedConv with the geometry, bias and CP factors of ``ours``."""
    import tltorch

    layer = tltorch.FactorizedConv(
        ours.in_channels,
        ours.out_channels,
        ours.kernel_size,
        stride=ours.stride,
        padding=ours.padding,
        dilation=ours.dilation,
        bias=True,
        factorization="cp",
        rank=ours.rank,
        implementation=implementation,
    )
    factors = (
        ours.pointwise_out[:, :, 0, 0],
        ours.pointwise_in[:, :, 0, 0].T,
        ours.depthwise_h[:, 0, :, 0].T,
        ours.depthwise_w[:, 0, 0, :].T,
    )
    with torch.no_grad():
        layer.weight.weights.fill_(1.0)
        for dst, src in zip(layer.weight.factors, factors):
            dst.copy_(src)
        layer.bias.copy_(ours.bias)
    return layer


class StaticRoutes(nn.Module):
    """A CPConv2d run on its static routes (no measured choice): the baseline of the choice."""

    def __init__(self, layer: CPConv2d) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.forward_routes(x, static_routes(self.layer.kernel_size))


def cp_rank(name: str) -> int | None:
    """The CP rank in a side's name ("CPConv2d r64 static routes" -> 64), None for other sides."""
    m = re.search(r"CP.* r(\d+)", name)
    return int(m.group(1)) if m else None


def timed(fn):
    """(result of fn(), seconds it took)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- measurements
def build_sides(
    conv: nn.Conv2d, cp_ranks, tucker_ranks, n_iter: int | None, built: dict[int, tuple[CPConv2d, float]]
) -> tuple[dict, dict]:
    """Forward sides {name: module} and, per factorized side, its build info (time, error).
    ``built`` maps CP ranks already decomposed to (layer, seconds); they are reused."""
    kw = {} if n_iter is None else {"n_iter_max": n_iter}
    w = conv.weight.detach()
    sides, info = {"dense": conv}, {}
    for r in cp_ranks:
        layer, t = built.get(r) or timed(lambda r=r: CPConv2d.from_dense(conv, r, method="als", **kw))
        sides[f"CPConv2d r{r}"] = layer
        sides[f"CPConv2d r{r} static routes"] = StaticRoutes(layer)
        info[f"CPConv2d r{r}"] = {"build_s": t, "rel_err": rel_err(w, layer.to_dense())}
        for impl in ("factorized", "reconstructed"):
            sides[f"tltorch CP {impl} r{r}"] = tltorch_cp_conv(layer, impl)
    for rk in tucker_ranks:
        layer, t = timed(lambda rk=rk: TuckerConv2d.from_dense(conv, ranks=rk))
        name = f"TuckerConv2d ({rk[0]},{rk[1]})"
        sides[name] = layer
        info[name] = {"build_s": t, "rel_err": rel_err(w, layer.to_dense())}
    return sides, info


def first_calls(sides: dict, x: torch.Tensor, cp_ranks) -> dict[str, dict]:
    """Per CPConv2d: its first call without and with autograd (each times the routes of its
    shape key once) and the routes chosen, read from the cache."""
    out = {}
    for r in cp_ranks:
        layer = sides[f"CPConv2d r{r}"]
        with torch.no_grad():
            _, t_inf = timed(lambda layer=layer: layer(x))
        xg = x.detach().requires_grad_()
        _, t_train = timed(lambda layer=layer, xg=xg: torch.autograd.grad(layer(xg).sum(), [xg, *layer.parameters()]))
        out[f"CPConv2d r{r}"] = {
            "first_fwd_ms": 1e3 * t_inf,
            "first_fwd_bwd_ms": 1e3 * t_train,
            "routes": chosen_routes(layer, x),
        }
    return out


def chosen_routes(layer: CPConv2d, x: torch.Tensor) -> dict[str, list[str]]:
    """The routes the layer's calls on x took, without and with autograd (cached: nothing is timed)."""
    with torch.no_grad():
        no_grad = layer.routes(x)
    return {"no_grad": list(no_grad), "grad": list(layer.routes(x))}


def other_shapes(shapes, repeats: int, warmup: int) -> list[dict]:
    """Forward and forward + backward of a CPConv2d, its static routes and tltorch's factorized
    CP conv with the same factors, at each (batch, channels, size, rank, kernel)."""
    out = []
    for n, c, size, r, k in shapes:
        torch.manual_seed(0)
        ours = CPConv2d(c, c, k, r, padding=k // 2)
        sides = {
            "CPConv2d": ours,
            "CPConv2d static routes": StaticRoutes(ours),
            "tltorch CP factorized": tltorch_cp_conv(ours, "factorized"),
        }
        x = torch.randn(n, c, size, size)
        out.append(
            {
                "shape": f"{n}x{c}x{size}x{size} r{r} k{k}",
                "forward": time_forward(sides, x, repeats, warmup),
                "forward_backward": time_forward_backward(sides, x, repeats, warmup),
                "routes": chosen_routes(ours, x),
            }
        )
    return out


def time_forward_backward(sides: dict, x: torch.Tensor, repeats: int, warmup: int) -> dict[str, dict]:
    """Median forward + backward ms (gradients of the input and every parameter, the output's
    gradient fixed), sides interleaved as in `time_forward`."""
    names = list(sides)
    xg = x.detach().requires_grad_()
    grad_y = torch.randn_like(sides[names[0]](x.detach()).detach())

    def step(module):
        torch.autograd.grad(module(xg), [xg, *module.parameters()], grad_y)

    for _ in range(warmup):
        for n in names:
            step(sides[n])
    ts = {n: [] for n in names}
    for positions in interleaved_orders(len(names), repeats):
        for n in (names[i] for i in positions):
            t0 = time.perf_counter()
            step(sides[n])
            ts[n].append(time.perf_counter() - t0)
    return {n: {"fwd_bwd_ms": median_ms(ts[n]), "fwd_bwd_quartiles_ms": quartiles_ms(ts[n])} for n in names}


def check_agreement(sides: dict, x: torch.Tensor, cp_ranks) -> dict[str, float]:
    """Relative output difference of each tltorch CP side vs the CPConv2d with the same factors."""
    errs = {}
    with torch.no_grad():
        for r in cp_ranks:
            ref = sides[f"CPConv2d r{r}"](x).double()
            for impl in ("factorized", "reconstructed"):
                name = f"tltorch CP {impl} r{r}"
                errs[name] = float((sides[name](x).double() - ref).norm() / ref.norm())
    bad = {k: v for k, v in errs.items() if not v < AGREE_TOL}
    if bad:
        raise RuntimeError(f"tltorch and CPConv2d outputs disagree (rel diff >= {AGREE_TOL}): {bad}")
    return errs


def time_forward(sides: dict, x: torch.Tensor, repeats: int, warmup: int) -> dict[str, dict]:
    """Median forward ms (and quartiles) per side; the sides' order changes every repeat
    (`interleaved_orders`: every side follows every other equally often)."""
    names = list(sides)
    with torch.no_grad():
        for _ in range(warmup):
            for n in names:
                sides[n](x)
        ts = {n: [] for n in names}
        for positions in interleaved_orders(len(names), repeats):
            for n in (names[i] for i in positions):
                t0 = time.perf_counter()
                sides[n](x)
                ts[n].append(time.perf_counter() - t0)
    return {n: {"fwd_ms": median_ms(ts[n]), "fwd_quartiles_ms": quartiles_ms(ts[n])} for n in names}


def decomposition(conv: nn.Conv2d, rank: int, n_iter: int | None) -> tuple[dict[str, dict], CPConv2d, float]:
    """Time and relative kernel error of our from_dense and tltorch's from_conv (one run each,
    after both ran once on a tiny conv so that neither pays first-call costs); also our layer
    and its build time."""
    import tltorch

    kw = {} if n_iter is None else {"n_iter_max": n_iter}
    tiny = nn.Conv2d(8, 8, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CPConv2d.from_dense(tiny, 2, n_iter_max=2)
        tltorch.FactorizedConv.from_conv(tiny, rank=2, factorization="cp", decomposition_kwargs={"n_iter_max": 2})
    w = conv.weight.detach()
    ours, t_ours = timed(lambda: CPConv2d.from_dense(conv, rank, method="als", **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensorly warns that rank > min(3, ...) for the kernel modes
        peer, t_peer = timed(
            lambda: tltorch.FactorizedConv.from_conv(
                conv, rank=rank, factorization="cp", implementation="factorized", decomposition_kwargs=kw
            )
        )
    return (
        {
            "CPConv2d.from_dense (als)": {
                "seconds": t_ours,
                "rel_err": rel_err(w, ours.to_dense()),
                "n_iter": ours.decomposition.n_iter,
            },
            "tltorch from_conv (parafac)": {"seconds": t_peer, "rel_err": rel_err(w, peer.weight.to_tensor())},
        },
        ours,
        t_ours,
    )


def targets(times: dict, train: dict, decomp: dict, cp_ranks, others: list[dict]) -> dict[str, str]:
    """PASS/FAIL for the issues' targets."""
    mark = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    out = {
        f"fwd r{r}: CPConv2d <= tltorch factorized": mark(
            times[f"CPConv2d r{r}"]["fwd_ms"] <= times[f"tltorch CP factorized r{r}"]["fwd_ms"]
        )
        for r in cp_ranks
    }
    out.update(
        {
            f"fwd+bwd r{r}: CPConv2d <= tltorch factorized": mark(
                train[f"CPConv2d r{r}"]["fwd_bwd_ms"] <= train[f"tltorch CP factorized r{r}"]["fwd_bwd_ms"]
            )
            for r in cp_ranks
        }
    )
    for o in others:
        for kind, unit in (("forward", "fwd_ms"), ("forward_backward", "fwd_bwd_ms")):
            t = o[kind]
            out[f"{o['shape']} {'fwd' if unit == 'fwd_ms' else 'fwd+bwd'}: CPConv2d <= tltorch factorized"] = mark(
                t["CPConv2d"][unit] <= t["tltorch CP factorized"][unit]
            )
    ours, peer = decomp["CPConv2d.from_dense (als)"], decomp["tltorch from_conv (parafac)"]
    out[f"from_dense r{DECOMP_RANK}: >= {TARGET_DECOMP:g}x faster at <= error"] = mark(
        peer["seconds"] / ours["seconds"] >= TARGET_DECOMP and ours["rel_err"] <= peer["rel_err"]
    )
    return out


# ----------------------------------------------------------------------------- reporting
def write_markdown(path: Path, res: dict) -> None:
    meta, times, dense_ms = res["meta"], res["forward"], res["forward"]["dense"]["fwd_ms"]
    lines = [
        "# Factorized Conv2d benchmark (CPU)",
        "",
        *stamp_lines(meta),
        f"- OpenBLAS env: {meta['blas_env'] or 'none set'}",
        f"- torch {meta['torch']}, {meta['threads']} threads, float32; tltorch {res['tltorch_version']}; "
        f"thread env: {meta['env'] or 'none set'}",
        f"- tensorpress: {tensorpress_flags(meta)}",
        f"- layer nn.Conv2d({CHANNELS}, {CHANNELS}, {KERNEL}, padding=1), seeded random (default-init) "
        f"weight; input {BATCH}x{CHANNELS}x{SIZE}x{SIZE}",
        f"- forward: torch.no_grad, median of {res['repeats']} repeats ({res['warmup']} warmup), "
        "one input, sides interleaved (in an order that changes every repeat)",
        "- the tltorch CP sides hold the CPConv2d factors of the same rank (outputs agree to "
        f"< {AGREE_TOL:g} relative difference); tltorch's `from_conv` default implementation is "
        f"**'{res['tltorch_default_implementation']}'** (the FactorizedConv constructor's is 'factorized')",
    ]
    if res["n_iter_max"] is not None:
        lines.append(f"- QUICK run: every decomposition capped at {res['n_iter_max']} sweeps")
    lines += [
        "",
        "## Forward time",
        "",
        "| layer | params | kernel rel. error | fwd ms (median) | IQR ms | speed-up vs dense "
        "| time vs tltorch factorized |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in times.items():
        rank = cp_rank(name)
        err = res["build"].get(f"CPConv2d r{rank}" if rank else name, {}).get("rel_err")
        peer = times[f"tltorch CP factorized r{rank}"]["fwd_ms"] if rank else None
        q = t["fwd_quartiles_ms"]
        vs_peer = "-" if peer is None else f"{t['fwd_ms'] / peer:.3f}x"
        lines.append(
            f"| {name} | {res['params'][name]:,} | {'-' if err is None else f'{err:.4f}'} "
            f"| {t['fwd_ms']:.2f} | {f'{q[0]:.2f}-{q[1]:.2f}' if q else '-'} "
            f"| {dense_ms / t['fwd_ms']:.2f}x | {vs_peer} |"
        )
    lines += [
        "",
        "## Forward + backward time (autograd on: gradients of the input and every parameter)",
        "",
        "| layer | fwd+bwd ms (median) | IQR ms | vs tltorch factorized |",
        "|---|---:|---:|---:|",
    ]
    for name, t in res["forward_backward"].items():
        peer = res["forward_backward"][f"tltorch CP factorized r{cp_rank(name)}"]["fwd_bwd_ms"]
        q = t["fwd_bwd_quartiles_ms"]
        lines.append(
            f"| {name} | {t['fwd_bwd_ms']:.2f} | {f'{q[0]:.2f}-{q[1]:.2f}' if q else '-'} "
            f"| {t['fwd_bwd_ms'] / peer:.3f}x |"
        )
    lines += [
        "",
        "## Other shapes (random CPConv2d, padding k // 2; tltorch holds its factors)",
        "",
        "| input, rank, kernel | fwd ms: CPConv2d / static routes / tltorch | ratio | "
        "fwd+bwd ms: CPConv2d / static / tltorch | ratio | routes no_grad | routes grad |",
        "|---|---|---:|---|---:|---|---|",
    ]
    for o in res["other_shapes"]:
        f, b = o["forward"], o["forward_backward"]
        fs = [f[n]["fwd_ms"] for n in ("CPConv2d", "CPConv2d static routes", "tltorch CP factorized")]
        bs = [b[n]["fwd_bwd_ms"] for n in ("CPConv2d", "CPConv2d static routes", "tltorch CP factorized")]
        lines.append(
            f"| {o['shape']} | {' / '.join(f'{v:.2f}' for v in fs)} | {fs[0] / fs[2]:.3f}x "
            f"| {' / '.join(f'{v:.2f}' for v in bs)} | {bs[0] / bs[2]:.3f}x "
            f"| {', '.join(o['routes']['no_grad'])} | {', '.join(o['routes']['grad'])} |"
        )
    lines += [
        "",
        "## CPConv2d's route choice (first call per shape key)",
        "",
        "The first call of each shape key (no_grad / grad) times every combination of the stages' "
        "routes as whole forwards (`tensorpress.nn.conv_paths`: 1x1 stages as OpenBLAS GEMMs or "
        "torch's conv, depthwise fused or two 1-D convs; least time of 3 runs after a warm-up) and "
        'keeps the fastest; "static routes" is the layer without the choice (GEMM, fused, GEMM), '
        "the routes it ran before. The static side shares the layer's parameters: its rows are the "
        "same process and input.",
        "",
        "| layer | first call ms, no_grad | first fwd+bwd ms | routes no_grad (in, depthwise, out) | routes grad |",
        "|---|---:|---:|---|---|",
    ]
    for name, f in res["first_calls"].items():
        rt = f["routes"]
        lines.append(
            f"| {name} | {f['first_fwd_ms']:.1f} | {f['first_fwd_bwd_ms']:.1f} "
            f"| {', '.join(rt.get('no_grad', ['-']))} | {', '.join(rt.get('grad', ['-']))} |"
        )
    lines += [
        "",
        f"## Decomposition at CP rank {DECOMP_RANK} (one run each)",
        "",
        "| method | seconds | kernel rel. error |",
        "|---|---:|---:|",
    ]
    for name, d in res["decomposition"].items():
        lines.append(f"| {name} | {d['seconds']:.2f} | {d['rel_err']:.4f} |")
    ours, peer = res["decomposition"].values()
    lines += [
        "",
        f"from_dense is {peer['seconds'] / ours['seconds']:.2f}x the speed of tltorch's from_conv.",
        "",
        "## Targets (from the issue)",
        "",
        "| target | result |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in res["targets"].items()]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, res: dict) -> None:
    """Left: forward ms per side (log scale). Right: decomposition seconds at rank 64."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a0, a1) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1]})
    names = list(res["forward"])

    def color(n: str) -> str:
        if n == "dense":
            return "gray"
        if n.startswith("CP"):
            return "tab:blue"
        if n.startswith("Tucker"):
            return "tab:green"
        return "tab:orange" if "factorized" in n else "tab:red"

    a0.bar(range(len(names)), [res["forward"][n]["fwd_ms"] for n in names], color=[color(n) for n in names])
    a0.set_xticks(
        range(len(names)), [n.replace("tltorch CP ", "tl ") for n in names], rotation=45, ha="right", fontsize=8
    )
    a0.set_yscale("log")
    a0.set_ylabel("forward median (ms)")
    a0.set_title(f"forward, {BATCH}x{CHANNELS}x{SIZE}x{SIZE}, {res['meta']['threads']} threads")
    a0.grid(axis="y", which="both", alpha=0.3)
    dec = res["decomposition"]
    a1.bar(range(len(dec)), [d["seconds"] for d in dec.values()], color=["tab:blue", "tab:orange"])
    a1.set_xticks(range(len(dec)), [f"{k.split(' ')[0]}\nerr {d['rel_err']:.3f}" for k, d in dec.items()], fontsize=8)
    a1.set_ylabel("seconds")
    a1.set_title(f"CP decomposition, rank {DECOMP_RANK}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = bench_parser(
        __doc__,
        repeats_help="timed repeats (default 20; 3 with --quick)",
        warmup_help="warmup runs (default 3; 1 with --quick)",
        quick_help="smoke test: one CP and one Tucker rank, 3 ALS sweeps",
    )
    args = ap.parse_args(argv)
    exit_unless_cpu(args.device, "bench_conv.py")
    import tltorch

    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    cp_ranks = (DECOMP_RANK,) if args.quick else CP_RANKS
    tucker_ranks = TUCKER_RANKS[:1] if args.quick else TUCKER_RANKS
    n_iter = 3 if args.quick else None
    meta = provenance(torch.get_num_threads())
    meta["blas_env"] = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    busy0, self0, wall0 = *cpu_seconds(), time.perf_counter()

    torch.manual_seed(0)
    conv = nn.Conv2d(CHANNELS, CHANNELS, KERNEL, padding=1)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE)
    decomp, layer64, t64 = decomposition(conv, DECOMP_RANK, n_iter)
    print("decomposition:", {k: f"{v['seconds']:.2f} s, err {v['rel_err']:.4f}" for k, v in decomp.items()}, flush=True)
    sides, build = build_sides(conv, cp_ranks, tucker_ranks, n_iter, {DECOMP_RANK: (layer64, t64)})
    firsts = first_calls(sides, x, cp_ranks)
    print(
        "first calls:",
        {k: f"{v['first_fwd_ms']:.1f} / {v['first_fwd_bwd_ms']:.1f} ms, {v['routes']}" for k, v in firsts.items()},
        flush=True,
    )
    agree = check_agreement(sides, x, cp_ranks)
    times = time_forward(sides, x, repeats, warmup)
    for n, t in times.items():
        print(
            f"{n:32s} {t['fwd_ms']:9.2f} ms  {times['dense']['fwd_ms'] / t['fwd_ms']:6.2f}x  "
            f"{n_params(sides[n]):>9,} params",
            flush=True,
        )
    train_sides = {
        n: sides[n]
        for r in cp_ranks
        for n in (f"CPConv2d r{r}", f"CPConv2d r{r} static routes", f"tltorch CP factorized r{r}")
    }
    train = time_forward_backward(train_sides, x, repeats, warmup)
    for n, t in train.items():
        print(f"{n:32s} {t['fwd_bwd_ms']:9.2f} ms fwd+bwd", flush=True)
    others = other_shapes(OTHER_SHAPES[:1] if args.quick else OTHER_SHAPES, repeats, warmup)
    for o in others:
        print(
            o["shape"],
            {
                n: f"{o['forward'][n]['fwd_ms']:.2f} / {o['forward_backward'][n]['fwd_bwd_ms']:.2f} ms"
                for n in o["forward"]
            },
            o["routes"],
            flush=True,
        )

    meta["load_avg_end"] = os.getloadavg()
    meta["other_cpu_share"] = other_cpu_share(busy0, self0, wall0)
    if meta["other_cpu_share"] > 0.05:
        print(
            f"warning: other processes used {meta['other_cpu_share']:.0%} of the CPU during the run; timings are noisy",
            file=sys.stderr,
        )
    res = {
        "meta": meta,
        "tltorch_version": tltorch.__version__,
        "tltorch_default_implementation": tltorch_default_implementation(),
        "repeats": repeats,
        "warmup": warmup,
        "n_iter_max": n_iter,
        "forward": times,
        "forward_backward": train,
        "first_calls": firsts,
        "other_shapes": others,
        "params": {n: n_params(m) for n, m in sides.items()},
        "build": build,
        "agreement": agree,
        "decomposition": decomp,
        "targets": targets(times, train, decomp, cp_ranks, others),
    }
    for k, v in res["targets"].items():
        print(f"{v}  {k}")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("conv_cpu_quick" if args.quick else "conv_cpu") + forced_blas_suffix()
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(args.out / f"{stem}.md", res)
    write_plot(args.out / f"{stem}.png", res)
    print(f"wrote {args.out / stem}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
