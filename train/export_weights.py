"""Writes the weights of a training checkpoint as a compact .safetensors file (how the demo models were made).

    python train/export_weights.py experiments/demo_RGT_x2/models/net_g_4000.pth rgt_fast/weights/demo_RGT_x2.safetensors

Takes ``params`` by default (``--key params_ema`` for the EMA weights) and leaves out the buffers that the
architecture determines (shift masks, position indices), which ``rgt_fast.load_model`` rebuilds.
"""
import argparse
import sys

import torch

from rgt_fast import load_model, save_state_dict
from rgt_fast.checkpoint import DERIVED_BUFFERS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("output")
    parser.add_argument("--key", default="params", choices=["params", "params_ema"])
    args = parser.parse_args()
    weights = torch.load(args.checkpoint, map_location="cpu", weights_only=True)[args.key]
    save_state_dict({k: v for k, v in weights.items() if not k.endswith(DERIVED_BUFFERS)}, args.output)
    model = load_model(args.output, fused=False)
    print(f"wrote {args.output}: x{model.upscale}, {sum(p.numel() for p in model.parameters()):,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
