"""Builds the demo model's data from the natural images that ship inside scikit-image's data folder.

    pip install --no-deps scikit-image     # only its image files are used; it is not a runtime dependency
    python train/demo_data.py [--out datasets/demo]

Writes ``train/HR`` (training images) and, for each scale, the held-out set in the benchmark layout ``test/HR``
and ``test/LR_bicubic/X{s}/NAMEx{s}.png`` (MATLAB bicubic, rounded to uint8 like the standard sets). Prints the
bicubic baseline (PSNR/SSIM on the Y channel, crop = scale) that the demo models are compared with.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import cv2
import numpy as np

from rgt_fast import imresize
from rgt_fast.metrics import calculate_psnr, calculate_ssim

TRAIN_IMAGES = ("astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
                "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "brick.png", "grass.png", "gravel.png")
# Held out: never seen in training, used only for the README's table.
TEST_IMAGES = ("chelsea.png", "camera.png", "coins.png", "moon.png")
SCALES = (2, 4)


def skimage_data_folder() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("scikit-image is not installed: pip install --no-deps scikit-image")
    return Path(spec.submodule_search_locations[0]) / "data"


def read_bgr(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        sys.exit(f"cannot read {path}")
    return image


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("datasets/demo"))
    args = parser.parse_args()
    source = skimage_data_folder()
    (args.out / "train" / "HR").mkdir(parents=True, exist_ok=True)
    for name in TRAIN_IMAGES:
        cv2.imwrite(str(args.out / "train" / "HR" / f"{Path(name).stem}.png"), read_bgr(source / name))
    # One HR per test image for every scale: cropped to a multiple of the largest scale.
    hr_dir = args.out / "test" / "HR"
    hr_dir.mkdir(parents=True, exist_ok=True)
    multiple = max(SCALES)
    test_hr = {}
    for name in TEST_IMAGES:
        hr = read_bgr(source / name)
        test_hr[Path(name).stem] = hr[:hr.shape[0] - hr.shape[0] % multiple, :hr.shape[1] - hr.shape[1] % multiple]
        cv2.imwrite(str(hr_dir / f"{Path(name).stem}.png"), test_hr[Path(name).stem])
    print(f"{'scale':>5} {'image':<10} {'bicubic PSNR':>12} {'SSIM':>7}")
    for scale in SCALES:
        lr_dir = args.out / "test" / "LR_bicubic" / f"X{scale}"
        lr_dir.mkdir(parents=True, exist_ok=True)
        scores = []
        for stem, hr in test_hr.items():
            lr = to_uint8(imresize(hr.astype(np.float64) / 255.0, 1 / scale))
            cv2.imwrite(str(lr_dir / f"{stem}x{scale}.png"), lr)
            bicubic = to_uint8(imresize(lr.astype(np.float64) / 255.0, scale))
            psnr = calculate_psnr(bicubic, hr, crop_border=scale, test_y_channel=True)
            ssim = calculate_ssim(bicubic, hr, crop_border=scale, test_y_channel=True)
            scores.append((psnr, ssim))
            print(f"{scale:>5} {stem:<10} {psnr:>12.2f} {ssim:>7.4f}")
        psnr, ssim = np.mean(scores, axis=0)
        print(f"{scale:>5} {'mean':<10} {psnr:>12.2f} {ssim:>7.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
