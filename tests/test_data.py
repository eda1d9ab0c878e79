"""Training patches, samplers and evaluation pairs of rgt_fast.training.data."""
from __future__ import annotations

import itertools
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rgt_fast import imresize
from rgt_fast.files import read_image
from rgt_fast.training.data import (EvaluationPairs, SampleKey, TrainingPatches, TrainingSampler, augment,
                                    bicubic_lq_window, to_tensor)
from rgt_fast.training.options import OptionError


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 BGR image with structure at several scales (plain noise makes degenerate SR tests)."""
    coarse = rng.integers(0, 256, (max(height // 6, 2), max(width // 6, 2), 3), dtype=np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def write_benchmark_set(folder: Path, scale: int, sizes, seed: int = 0) -> list[str]:
    """``folder/HR/NAME.png`` and ``folder/LR_bicubic/X{scale}/NAMEx{scale}.png`` (MATLAB bicubic, uint8)."""
    rng = np.random.default_rng(seed)
    (folder / "HR").mkdir(parents=True, exist_ok=True)
    lr_folder = folder / "LR_bicubic" / f"X{scale}"
    lr_folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index, (height, width) in enumerate(sizes):
        name = f"img{index:02d}"
        hr = smooth_image(rng, height, width)
        lr = np.clip(imresize(hr.astype(np.float64) / 255, 1 / scale), 0, 1)
        cv2.imwrite(str(folder / "HR" / f"{name}.png"), hr)
        cv2.imwrite(str(lr_folder / f"{name}x{scale}.png"), (lr * 255).round().astype(np.uint8))
        names.append(name)
    return names


def write_position_coded_pairs(folder: Path, scale: int, count: int = 2, lq_size=(20, 24)) -> None:
    """LQ pixels that encode their own (row, column), and a GT that repeats each LQ pixel scale x scale times:
    a GT patch is aligned with its LQ patch exactly when it equals the LQ patch repeated."""
    (folder / "gt").mkdir(parents=True, exist_ok=True)
    (folder / "lq").mkdir(parents=True, exist_ok=True)
    rows, cols = np.meshgrid(np.arange(lq_size[0]), np.arange(lq_size[1]), indexing="ij")
    for index in range(count):
        lq = np.stack([rows * 10, cols * 10, np.full_like(rows, 50 * index)], axis=-1).astype(np.uint8)
        gt = lq.repeat(scale, axis=0).repeat(scale, axis=1)
        cv2.imwrite(str(folder / "gt" / f"p{index}.png"), gt)
        cv2.imwrite(str(folder / "lq" / f"p{index}x{scale}.png"), lq)


def paired_options(folder: Path, scale: int, **overrides):
    return {"type": "PairedImageDataset", "dataroot_gt": str(folder / "gt"), "dataroot_lq": str(folder / "lq"),
            "filename_tmpl": f"{{}}x{scale}", "io_backend": {"type": "disk"}, "gt_size": 8 * scale,
            "use_hflip": False, "use_rot": False, **overrides}


def as_images(sample) -> tuple[np.ndarray, np.ndarray]:
    return sample["gt"].permute(1, 2, 0).numpy(), sample["lq"].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_paired_crops_are_aligned_across_scales(tmp_path, scale):
    write_position_coded_pairs(tmp_path, scale)
    dataset = TrainingPatches.from_options(paired_options(tmp_path, scale), scale)
    corners = set()
    for seed in range(12):
        gt, lq = as_images(dataset[SampleKey(seed % 2, seed)])
        assert lq.shape == (8, 8, 3) and gt.shape == (8 * scale, 8 * scale, 3)
        np.testing.assert_array_equal(gt, lq.repeat(scale, axis=0).repeat(scale, axis=1))
        corners.add((lq[0, 0, 0], lq[0, 0, 1]))  # RGB: the first channel holds the column, the third the row
    assert len(corners) > 3


def test_flips_and_rotations_are_applied_identically(tmp_path):
    write_position_coded_pairs(tmp_path, 2, count=1)
    dataset = TrainingPatches.from_options(paired_options(tmp_path, 2, use_hflip=True, use_rot=True), 2)
    orientations = set()
    for seed in range(64):
        gt, lq = as_images(dataset[SampleKey(0, seed)])
        np.testing.assert_array_equal(gt, lq.repeat(2, axis=0).repeat(2, axis=1))
        rows, cols = lq[..., 2], lq[..., 1]  # B (row) and G (column) in RGB order
        orientations.add((np.sign(rows[1, 0] - rows[0, 0]), np.sign(cols[1, 0] - cols[0, 0]),
                          np.sign(rows[0, 1] - rows[0, 0]), np.sign(cols[0, 1] - cols[0, 0])))
    assert len(orientations) == 8


def test_augment_without_flags_changes_nothing():
    image = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    (out,) = augment([image], False, False, np.random.default_rng(0))
    assert out is image


def whole_image_lq(image: np.ndarray, scale: int) -> np.ndarray:
    """The 8-bit LQ of a whole uint8 image: cropped to whole LQ pixels, MATLAB bicubic, clipped and rounded."""
    image = image[:image.shape[0] // scale * scale, :image.shape[1] // scale * scale]
    return (np.clip(imresize(image.astype(np.float32) / 255, 1 / scale), 0, 1) * 255).round().astype(np.uint8)


def as_uint8_bgr(sample) -> tuple[np.ndarray, np.ndarray]:
    gt, lq = as_images(sample)
    return tuple((image[..., ::-1] * 255).round().astype(np.uint8) for image in (gt, lq))


def write_hr_only_dataset(folder: Path, image: np.ndarray, scale: int, lq_size: int, augment: bool = False):
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), image)
    return TrainingPatches([folder / "a.png"], None, scale, lq_size * scale, use_hflip=augment, use_rot=augment)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_an_lq_window_equals_that_crop_of_the_whole_image_lq(scale):
    # Sizes that are not multiples of the scale; windows at every corner, touching each border or none.
    image = smooth_image(np.random.default_rng(scale), 15 * scale + 1, 14 * scale - 1)
    whole = whole_image_lq(image, scale)
    gt = image[:15 * scale, :13 * scale]
    size = 6
    inside = 0
    for top, left in itertools.product(range(15 - size + 1), range(13 - size + 1)):
        window = bicubic_lq_window(gt, scale, top, left, size)
        np.testing.assert_array_equal(window, whole[top:top + size, left:left + size], err_msg=f"{(top, left)}")
        inside += 2 <= min(top, left) and top + size <= 13 and left + size <= 11
    assert inside > 0


@pytest.mark.parametrize("scale", [2, 3])
def test_hr_only_patches_are_crops_of_the_image_and_of_its_8bit_lq(tmp_path, scale):
    image = smooth_image(np.random.default_rng(1), 61, 50)
    whole = whole_image_lq(image, scale)
    dataset = write_hr_only_dataset(tmp_path / "hr", image, scale, lq_size=12)
    corners = set()
    for seed in range(6):
        gt, lq = as_uint8_bgr(dataset[SampleKey(0, seed)])
        # The GT patch is a crop of the image at a corner on the LQ grid.
        matches = [(top, left) for top in range(61 // scale - 12 + 1) for left in range(50 // scale - 12 + 1)
                   if np.array_equal(image[top * scale:(top + 12) * scale, left * scale:(left + 12) * scale], gt)]
        assert len(matches) == 1
        top, left = matches[0]
        np.testing.assert_array_equal(lq, whole[top:top + 12, left:left + 12])
        corners.add(matches[0])
    assert len(corners) > 2


def test_hr_only_augmentation_turns_gt_and_lq_alike(tmp_path):
    image = smooth_image(np.random.default_rng(2), 40, 40)
    whole = whole_image_lq(image, 2)
    dataset = write_hr_only_dataset(tmp_path / "hr", image, 2, lq_size=8, augment=True)

    def orientations(patch):
        return [np.rot90(patch, turns)[:, ::flip] for turns in range(4) for flip in (1, -1)]

    undone = set()
    for seed in range(8):
        gt, lq = as_uint8_bgr(dataset[SampleKey(0, seed)])
        for orientation, (gt_turned, lq_turned) in enumerate(zip(orientations(gt), orientations(lq))):
            for top, left in itertools.product(range(20 - 8 + 1), repeat=2):
                if np.array_equal(image[2 * top:2 * top + 16, 2 * left:2 * left + 16], gt_turned):
                    np.testing.assert_array_equal(lq_turned, whole[top:top + 8, left:left + 8])
                    undone.add((seed, orientation))
        assert seed in {s for s, _ in undone}
    assert len({orientation for _, orientation in undone}) > 2


def test_samples_are_float32_rgb_chw_in_unit_range(tmp_path):
    (tmp_path / "hr").mkdir()
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0] = 255  # blue in OpenCV's BGR
    cv2.imwrite(str(tmp_path / "hr" / "blue.png"), image)
    tensor = to_tensor(read_image(tmp_path / "hr" / "blue.png").astype(np.float32) / 255)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 8, 8)
    assert tensor[2].eq(1).all() and tensor[:2].eq(0).all()


def test_a_corrupt_image_is_skipped_and_named(tmp_path, caplog):
    write_position_coded_pairs(tmp_path, 2, count=3)
    (tmp_path / "gt" / "p1.png").write_bytes(b"not a png")
    dataset = TrainingPatches.from_options(paired_options(tmp_path, 2), 2)
    with caplog.at_level(logging.WARNING, logger="rgt_fast"):
        for seed in range(6):
            gt, lq = as_images(dataset[SampleKey(1, seed)])
            np.testing.assert_array_equal(gt, lq.repeat(2, axis=0).repeat(2, axis=1))
    warnings = [r.getMessage() for r in caplog.records if "p1.png" in r.getMessage()]
    assert len(warnings) == 1 and "skipping" in warnings[0]


def test_a_set_of_only_bad_images_is_an_error(tmp_path):
    write_position_coded_pairs(tmp_path, 2, count=2)
    for path in (tmp_path / "lq").iterdir():
        path.write_bytes(b"")
    dataset = TrainingPatches.from_options(paired_options(tmp_path, 2), 2)
    with pytest.raises(ValueError, match="none of the 2 training images"):
        dataset[SampleKey(0, 0)]


def test_a_pair_of_the_wrong_scale_is_skipped(tmp_path, caplog):
    write_position_coded_pairs(tmp_path, 2, count=2)
    cv2.imwrite(str(tmp_path / "lq" / "p0x2.png"), np.zeros((7, 7, 3), np.uint8))
    dataset = TrainingPatches.from_options(paired_options(tmp_path, 2), 2)
    with caplog.at_level(logging.WARNING, logger="rgt_fast"):
        dataset[SampleKey(0, 0)]
    assert "p0.png" in caplog.text and "not 1/2" in caplog.text


def test_a_missing_lq_file_is_an_error_naming_it(tmp_path):
    write_position_coded_pairs(tmp_path, 2, count=2)
    (tmp_path / "lq" / "p1x2.png").unlink()
    with pytest.raises(FileNotFoundError, match="p1x2.png"):
        TrainingPatches.from_options(paired_options(tmp_path, 2), 2)


def test_gt_size_must_be_a_multiple_of_the_scale(tmp_path):
    write_position_coded_pairs(tmp_path, 3, count=1)
    with pytest.raises(OptionError, match="multiple"):
        TrainingPatches.from_options(paired_options(tmp_path, 3, gt_size=16), 3)


def test_sampler_is_reproducible_sharded_and_resumable():
    sampler = TrainingSampler(5, enlarge_ratio=3, shuffle=True, seed=7)
    sampler.set_epoch(2)
    epoch = list(sampler)
    assert len(epoch) == 15 and sorted(k.index for k in epoch) == sorted(list(range(5)) * 3)
    assert epoch == list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) != epoch
    sampler.set_epoch(2, skip=4)
    assert list(sampler) == epoch[4:] and len(sampler) == 11

    shards = [TrainingSampler(5, 3, True, 7, num_replicas=2, rank=r) for r in range(2)]
    for shard in shards:
        shard.set_epoch(2)
    rank0, rank1 = list(shards[0]), list(shards[1])
    assert len(rank0) == len(rank1) == 8
    assert rank0 == epoch[0::2] and rank1[:7] == epoch[1::2]
    assert rank1[7].index == epoch[0].index  # padded by wrapping around, as DistributedSampler does


def test_evaluation_pairs_crop_the_gt_to_lq_times_scale(tmp_path):
    write_benchmark_set(tmp_path / "Set", 3, [(30, 42)])
    hr_path = tmp_path / "Set" / "HR" / "img00.png"
    hr = cv2.imread(str(hr_path))
    cv2.imwrite(str(hr_path), np.pad(hr, ((0, 2), (0, 1), (0, 0))))  # a GT that is not a multiple of the scale
    pairs = EvaluationPairs.from_benchmark_folder(tmp_path / "Set", 3)
    lq, gt = pairs.load(0)
    assert lq.shape == (10, 14, 3) and pairs.name == "Set" and pairs.image_name(0) == "img00x3"
    np.testing.assert_array_equal(gt, hr)


def test_an_lq_of_another_scale_is_scored_as_basicsr_does_with_a_warning(tmp_path, caplog):
    write_benchmark_set(tmp_path / "Set", 4, [(32, 40)])
    (tmp_path / "Set" / "LR_bicubic" / "X4" / "img00x4.png").rename(tmp_path / "Set" / "LR_bicubic" / "img00x2.png")
    (tmp_path / "Set" / "LR_bicubic" / "X4").rmdir()
    (tmp_path / "Set" / "LR_bicubic" / "X2").mkdir()
    (tmp_path / "Set" / "LR_bicubic" / "img00x2.png").rename(tmp_path / "Set" / "LR_bicubic" / "X2" / "img00x2.png")
    pairs = EvaluationPairs.from_benchmark_folder(tmp_path / "Set", 2)
    with caplog.at_level(logging.WARNING, logger="rgt_fast"):
        lq, gt = pairs.load(0)
    assert lq.shape == (8, 10, 3) and gt.shape == (16, 20, 3)
    assert "img00.png is 40x32, but its LQ img00x2.png (10x8) times 2 covers only 20x16 of it" in caplog.text
    assert "of another scale" in caplog.text

    caplog.clear()
    write_benchmark_set(tmp_path / "Exact", 2, [(32, 40)])
    hr_path = tmp_path / "Exact" / "HR" / "img00.png"
    cv2.imwrite(str(hr_path), np.pad(cv2.imread(str(hr_path)), ((0, 1), (0, 1), (0, 0))))  # 1 px over LQ x 2
    with caplog.at_level(logging.WARNING, logger="rgt_fast"):
        EvaluationPairs.from_benchmark_folder(tmp_path / "Exact", 2).load(0)
    assert "another scale" not in caplog.text


def test_hr_only_evaluation_pairs_downscale_the_gt(tmp_path):
    write_benchmark_set(tmp_path / "Set", 2, [(33, 40)])
    pairs = EvaluationPairs("hr", [tmp_path / "Set" / "HR" / "img00.png"], None, 2)
    lq, gt = pairs.load(0)
    assert gt.shape == (32, 40, 3) and lq.dtype == np.uint8
    np.testing.assert_array_equal(lq, whole_image_lq(cv2.imread(str(tmp_path / "Set" / "HR" / "img00.png")), 2))
