"""The ``rgt-fast`` command."""
from __future__ import annotations

import argparse
import json
import sys

def _inspect(args: argparse.Namespace) -> int:
    from .checkpoint import architecture_of, read_state_dict
    from .config import preset_name

    kwargs = architecture_of(read_state_dict(args.weights), args.weights)
    print(json.dumps({"preset": preset_name(kwargs), **kwargs}, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training.trainer import run_training

    return run_training(args)


def _eval(args: argparse.Namespace) -> int:
    from .training.evaluate import run_evaluation

    return run_evaluation(args)


def _upscale(args: argparse.Namespace) -> int:
    from .upscale_cli import run_upscale

    return run_upscale(args)


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    from .bench import add_bench_arguments
    from .training.evaluate import add_eval_arguments
    from .training.trainer import add_train_arguments
    from .upscale_cli import add_upscale_arguments

    parser = argparse.ArgumentParser(prog="rgt-fast", description="Fused RGT super-resolution")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="print the architecture stored in a weights file")
    inspect.add_argument("weights", help=".pth/.pt or .safetensors file")
    inspect.set_defaults(handler=_inspect)
    train = sub.add_parser("train", help="train RGT from a BasicSR option file")
    add_train_arguments(train)
    train.set_defaults(handler=_train)
    evaluate = sub.add_parser("eval", help="PSNR/SSIM on benchmark sets (BasicSR test option file or flags)")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=_eval)
    upscale = sub.add_parser("upscale", help="super-resolve image files and folders into PNGs")
    add_upscale_arguments(upscale)
    upscale.set_defaults(handler=_upscale)
    bench = sub.add_parser("bench", help="time the fused model against the reference with the same weights")
    add_bench_arguments(bench)
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (OSError, ValueError) as err:
        print(f"rgt-fast {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
