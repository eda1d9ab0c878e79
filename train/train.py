"""Train RGT from a BasicSR option file (same as ``rgt-fast train``).

    python train/train.py -opt train/options/train_RGT_x2.yml [--auto_resume] [--force_yml key=value ...]
    torchrun --nproc_per_node 4 train/train.py -opt train/options/train_RGT_x2.yml --launcher pytorch
"""
import sys

from rgt_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
