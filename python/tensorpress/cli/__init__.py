"""The `tensorpress` command line (also `python -m tensorpress`)."""

from __future__ import annotations

import argparse
import json
import sys


def _info(_args) -> int:
    import tensorpress

    print(json.dumps(tensorpress.info(), indent=2))
    return 0


def _plan(args) -> int:
    from tensorpress.nn import TTLinear

    layer = TTLinear(args.in_features, args.out_features, args.ranks, bias=False)
    print(layer.extra_repr())
    for batch in args.batch:
        print(f"batch {batch:>6}: {layer.plan(batch)}")
    return 0


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip()) if text else ()


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip()) if text else ()


def _memory(text: str) -> int:
    from tensorpress.compress.memory import parse_memory

    try:
        return parse_memory(text, "--max-memory")
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _compress(args) -> int:
    from tensorpress.cli.compress_job import JobConfig, init_distributed, run_job

    started = init_distributed()  # under torchrun: split the work across the processes

    cfg = JobConfig(
        model=args.model,
        budget=args.budget,
        structure=args.structure,
        method=args.method,
        rank_rule=None if args.rank_rule == "uniform" else args.rank_rule,
        n_calib=args.calib,
        n_eval=args.eval,
        sweep=_floats(args.sweep),
        compare=_names(args.compare),
        out=args.out,
        progress=not args.quiet,
        threads=args.threads,
        residual_feedback=not args.no_residual_feedback,
        fold_batchnorm=args.fold_batchnorm,
        max_memory=args.max_memory,
    )
    try:
        run_job(cfg)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _bench(args) -> int:
    import pathlib
    import subprocess

    # the benchmarks live in the source checkout, not in the installed package
    candidates = [pathlib.Path.cwd() / "benchmarks", pathlib.Path(__file__).resolve().parents[2] / "benchmarks"]
    root = next((c for c in candidates if (c / "_common.py").is_file()), None)
    if root is None:
        print(
            "tensorpress bench: run it from a source checkout (the benchmarks/ folder is not installed with the "
            "package)",
            file=sys.stderr,
        )
        return 2
    scripts = [root / f"{name}.py" for name in args.which]
    for script in scripts:
        if not script.is_file():
            print(f"tensorpress bench: no benchmark {script.name} in {root}", file=sys.stderr)
            return 2
    for script in scripts:
        print(f"== {script.name}", flush=True)
        code = subprocess.call([sys.executable, str(script)] + (["--quick"] if args.quick else []), cwd=root)
        if code:
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tensorpress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built (cpu/cuda, archs, compiler) and what is visible").set_defaults(
        run=_info
    )
    plan = sub.add_parser("plan", help="show the TT contraction plan a TTLinear picks per batch size")
    plan.add_argument("in_features", type=int)
    plan.add_argument("out_features", type=int)
    plan.add_argument("--ranks", type=int, default=16)
    plan.add_argument("--batch", type=int, nargs="+", default=[1, 64, 4096])
    plan.set_defaults(run=_plan)
    comp = sub.add_parser(
        "compress",
        help="compress a real model end to end (default: MiniLM-L6), with a report, plots and the compressed weights",
    )
    comp.add_argument(
        "--model",
        default="minilm",
        help="minilm (default), mnist-cnn (the pretrained MNIST CNN of "
        "ccexam), fashion-cnn (ours, trained once and cached) or "
        "a local BERT-like transformers folder",
    )
    comp.add_argument("--budget", type=float, default=0.5, help="fraction of the compressed layers' parameters kept")
    comp.add_argument(
        "--structure",
        default="lowrank",
        choices=["lowrank", "tt", "tucker", "cp"],
        help="lowrank/tt replace nn.Linear, tucker/cp replace nn.Conv2d",
    )
    comp.add_argument("--method", default="activation", choices=["activation", "whitened", "svd"])
    comp.add_argument(
        "--rank-rule",
        default="auto",
        choices=["auto", "optimism", "cv", "energy", "uniform"],
        help="how the budget is split across layers (uniform: the same fraction everywhere; cv: "
        "like optimism with 5-fold cross-validated layer errors, 5x the fits; auto: optimism "
        "for lowrank, uniform for the tensor structures)",
    )
    comp.add_argument("--calib", type=int, default=1000, help="calibration sentences (or images)")
    comp.add_argument("--eval", type=int, default=1000, help="held-out evaluation sentences (or images)")
    comp.add_argument("--sweep", default="0.3,0.5,0.7,0.9", help="budgets of the method comparison ('' skips it)")
    comp.add_argument("--compare", default="svd,whitened,activation", help="methods compared in the sweep")
    comp.add_argument("--out", default="tensorpress-out", help="output folder")
    comp.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    comp.add_argument("--quiet", action="store_true", help="no progress bars")
    comp.add_argument(
        "--no-residual-feedback",
        action="store_true",
        help="fit every layer to its own original output only (see compress(residual_feedback=))",
    )
    comp.add_argument(
        "--fold-batchnorm",
        action="store_true",
        help="fold each eval-mode BatchNorm2d that directly follows a conv to compress into that "
        "conv before the fit (see compress(fold_batchnorm=)); the report lists them",
    )
    comp.add_argument(
        "--max-memory",
        type=_memory,
        default=None,
        help="memory budget of the calibration statistics and fits, e.g. 8G or 512M (default: half the "
        "available memory); layers whose exact statistics do not fit get an approximation the report "
        "names (see compress(max_memory=))",
    )
    comp.set_defaults(run=_compress)
    bench = sub.add_parser("bench", help="run the kernel benchmarks (from a source checkout)")
    bench.add_argument("which", nargs="*", default=["bench_tt", "bench_svd", "bench_conv"])
    bench.add_argument("--quick", action="store_true", help="small sizes, a quick look")
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
