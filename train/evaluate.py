"""PSNR/SSIM of RGT weights on benchmark sets (same as ``rgt-fast eval``).

    python train/evaluate.py -opt train/options/test_RGT_x2.yml
    python train/evaluate.py --weights RGT_x2.pth --data datasets/benchmark/Set5 --scale 2 --json scores.json
"""
import sys

from rgt_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
