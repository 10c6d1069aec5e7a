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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tensorpress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built (cpu/cuda, archs, compiler) and what is visible").set_defaults(run=_info)
    plan = sub.add_parser("plan", help="show the TT contraction plan a TTLinear picks per batch size")
    plan.add_argument("in_features", type=int)
    plan.add_argument("out_features", type=int)
    plan.add_argument("--ranks", type=int, default=16)
    plan.add_argument("--batch", type=int, nargs="+", default=[1, 64, 4096])
    plan.set_defaults(run=_plan)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
