"""The ``rgt-fast`` command."""
from __future__ import annotations

import argparse
import json
import sys

PLANNED = {
    "upscale": "upscale images with an RGT model",
    "bench": "benchmark the fused model against the reference",
}


def _inspect(args: argparse.Namespace) -> int:
    from .checkpoint import read_state_dict
    from .config import infer_hyperparameters, preset_name

    kwargs = infer_hyperparameters(read_state_dict(args.weights))
    print(json.dumps({"preset": preset_name(kwargs), **kwargs}, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training.trainer import run_training

    return run_training(args)


def _eval(args: argparse.Namespace) -> int:
    from .training.evaluate import run_evaluation

    return run_evaluation(args)


def build_parser() -> argparse.ArgumentParser:
    from .training.evaluate import add_eval_arguments
    from .training.trainer import add_train_arguments

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
    for name, help_text in PLANNED.items():
        sub.add_parser(name, help=f"{help_text} (not yet available)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        print(f"rgt-fast {args.command}: not yet available in this version", file=sys.stderr)
        return 2
    if unknown:
        parser.error(f"unrecognized arguments for {args.command}: {' '.join(unknown)}")
    try:
        return handler(args)
    except (OSError, ValueError) as err:
        print(f"rgt-fast {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
