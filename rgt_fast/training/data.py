"""Training patches and validation pairs in BasicSR's conventions.

Images are read with OpenCV (BGR uint8) and reach the model as float32 RGB CHW in [0, 1], as BasicSR's
``img2tensor(bgr2rgb=True)`` gives them. Training pairs come from paired GT/LQ folders (``PairedImageDataset``) or
from GT alone (``SingleHRDataset``, or no ``dataroot_lq``), in which case the LQ patch is cut from the MATLAB-bicubic
downscale of the whole GT image, rounded to 8 bits as the benchmarks' LR image files are.

Every random choice of a training sample (crop corner, flips, a replacement for an unusable image) comes from a
generator seeded by the sampler for that sample alone, so a batch depends only on (seed, epoch, position): the
same with any number of loader workers, and the same after a resume that skips the samples already consumed.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..files import UnusableImage, read_image
from ..matlab_resize import imresize
from .options import OptionError, require_choice

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DATASET_TYPES = ("PairedImageDataset", "SingleHRDataset")
# BasicSR's set of LQ images alone, which the authors' test_single_x*.yml super-resolve: a test set with nothing to
# score, so not one for training or validation.
LQ_ONLY_DATASET = "SingleImageDataset"


class SampleKey(NamedTuple):
    """What the training sampler hands the dataset: an image index and the seed of that sample's choices."""

    index: int
    seed: int


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return paths


def lq_path_for(gt_path: Path, lq_folder: str | Path, filename_tmpl: str) -> Path:
    """The LQ file paired with ``gt_path``: ``filename_tmpl`` applied to the GT stem, the GT's extension."""
    return Path(lq_folder) / f"{filename_tmpl.format(gt_path.stem)}{gt_path.suffix}"


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) BGR float32 in [0, 1] -> (3, H, W) RGB float32."""
    return torch.from_numpy(np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1)))


def as_unit_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


def bicubic_lq(gt: np.ndarray, scale: int) -> np.ndarray:
    """The MATLAB-bicubic LQ of a uint8 GT as an 8-bit image file stores it: clipped and rounded to uint8."""
    return (np.clip(imresize(as_unit_float(gt), 1 / scale), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def bicubic_lq_window(gt: np.ndarray, scale: int, top: int, left: int, size: int) -> np.ndarray:
    """``bicubic_lq(gt, scale)[top:top + size, left:left + size]`` computed from the GT around that window only.

    ``gt``'s height and width must be multiples of ``scale``. The antialiased cubic kernel reads GT pixels less than
    2 * scale from an LQ pixel's centre, so a margin of 2 LQ pixels gives every LQ pixel of the window the GT it
    reads in the whole image; where the margin reaches past the image, the window's edge is the image's, and the
    resize mirrors it as it mirrors the image's.
    """
    margin = 2
    lq_height, lq_width = gt.shape[0] // scale, gt.shape[1] // scale
    first_row, first_col = max(top - margin, 0), max(left - margin, 0)
    last_row, last_col = min(top + size + margin, lq_height), min(left + size + margin, lq_width)
    context = gt[first_row * scale:last_row * scale, first_col * scale:last_col * scale]
    return bicubic_lq(context, scale)[top - first_row:top - first_row + size, left - first_col:left - first_col + size]


def random_corner(lq_height: int, lq_width: int, lq_size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of an ``lq_size`` patch on the LQ grid; the GT patch sits at the corner times the scale."""
    return int(rng.integers(lq_height - lq_size + 1)), int(rng.integers(lq_width - lq_size + 1))


def augment(images: Sequence[np.ndarray], hflip: bool, rotation: bool, rng: np.random.Generator) -> list[np.ndarray]:
    """The same random horizontal flip, vertical flip and transpose (which with the flips gives every 90-degree
    rotation) applied to all ``images``, each with probability 1/2 when enabled."""
    flip_columns = hflip and rng.random() < 0.5
    flip_rows = rotation and rng.random() < 0.5
    transpose = rotation and rng.random() < 0.5

    def apply(image: np.ndarray) -> np.ndarray:
        if flip_columns:
            image = image[:, ::-1]
        if flip_rows:
            image = image[::-1]
        if transpose:
            image = image.transpose(1, 0, 2)
        return image

    return [apply(image) for image in images]


def _is_hr_only(dataset_options: Mapping[str, Any], dotted: str) -> bool:
    kind = require_choice(dataset_options["type"], f"{dotted}.type", DATASET_TYPES)
    return kind == "SingleHRDataset" or dataset_options["dataroot_lq"] is None


def _check_io_backend(dataset_options: Mapping[str, Any], dotted: str) -> None:
    require_choice(dataset_options["io_backend"]["type"], f"{dotted}.io_backend.type", ["disk"])


def _gt_and_lq_paths(dataset_options: Mapping[str, Any], dotted: str) -> tuple[list[Path], list[Path] | None]:
    """The GT images of a dataset and their LQ pairs by ``filename_tmpl`` (None for an HR-only dataset)."""
    _check_io_backend(dataset_options, dotted)
    gt_paths = list_images(dataset_options["dataroot_gt"])
    if _is_hr_only(dataset_options, dotted):
        return gt_paths, None
    return gt_paths, [lq_path_for(p, dataset_options["dataroot_lq"], dataset_options["filename_tmpl"])
                      for p in gt_paths]


class TrainingPatches(Dataset):
    """Aligned (GT, LQ) training patches; ``dataset[SampleKey(index, seed)]`` -> {"lq", "gt"} tensors.

    ``lq_paths`` None selects the HR-only mode. An unusable image is logged by name once per process and another
    image is drawn in its place; when no image is usable the error says so.
    """

    def __init__(self, gt_paths: Sequence[Path], lq_paths: Sequence[Path] | None, scale: int, gt_size: int,
                 use_hflip: bool = False, use_rot: bool = False):
        if gt_size % scale:
            raise OptionError(f"gt_size {gt_size} is not a multiple of the scale {scale}")
        self.gt_paths = list(gt_paths)
        self.lq_paths = None if lq_paths is None else list(lq_paths)
        self.scale = scale
        self.gt_size = gt_size
        self.lq_size = gt_size // scale
        self.use_hflip = use_hflip
        self.use_rot = use_rot
        self._unusable: set[int] = set()

    @classmethod
    def from_options(cls, dataset_options: Mapping[str, Any], scale: int,
                     dotted: str = "datasets.train") -> "TrainingPatches":
        gt_paths, lq_paths = _gt_and_lq_paths(dataset_options, dotted)
        if lq_paths is not None:
            missing = [p for p in lq_paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} of {len(lq_paths)} LQ images are missing, e.g. {missing[0]} (the pair of "
                    f"{gt_paths[lq_paths.index(missing[0])].name}); check {dotted}.dataroot_lq and filename_tmpl")
        return cls(gt_paths, lq_paths, scale, dataset_options["gt_size"], dataset_options["use_hflip"],
                   dataset_options["use_rot"])

    def __len__(self) -> int:
        return len(self.gt_paths)

    def _too_small(self, path: Path, height: int, width: int) -> UnusableImage:
        return UnusableImage(path, f"its LQ ({width}x{height}) is smaller than the {self.lq_size} px patch "
                                   f"(gt_size {self.gt_size} / scale {self.scale})")

    def _paired_patch(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        gt_path, lq_path = self.gt_paths[index], self.lq_paths[index]
        gt, lq = read_image(gt_path), read_image(lq_path)
        lq_height, lq_width = lq.shape[:2]
        if gt.shape[:2] != (lq_height * self.scale, lq_width * self.scale):
            raise UnusableImage(gt_path, f"it is {gt.shape[1]}x{gt.shape[0]} but its LQ {lq_path.name} is "
                                         f"{lq_width}x{lq_height}, not 1/{self.scale} of it")
        if min(lq_height, lq_width) < self.lq_size:
            raise self._too_small(gt_path, lq_height, lq_width)
        top, left = random_corner(lq_height, lq_width, self.lq_size, rng)
        s = self.scale
        gt = gt[top * s:(top + self.lq_size) * s, left * s:(left + self.lq_size) * s]
        lq = lq[top:top + self.lq_size, left:left + self.lq_size]
        return as_unit_float(gt), as_unit_float(lq)

    def _hr_only_patch(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        gt_path = self.gt_paths[index]
        gt = read_image(gt_path)
        s = self.scale
        lq_height, lq_width = gt.shape[0] // s, gt.shape[1] // s
        if min(lq_height, lq_width) < self.lq_size:
            raise self._too_small(gt_path, lq_height, lq_width)
        top, left = random_corner(lq_height, lq_width, self.lq_size, rng)
        # The LQ of the GT cropped to whole LQ pixels, as the benchmarks' LR images are made.
        lq = bicubic_lq_window(gt[:lq_height * s, :lq_width * s], s, top, left, self.lq_size)
        gt = gt[top * s:top * s + self.gt_size, left * s:left * s + self.gt_size]
        return as_unit_float(gt), as_unit_float(lq)

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor]:
        index, seed = key
        rng = np.random.default_rng(seed)
        patch = self._paired_patch if self.lq_paths is not None else self._hr_only_patch
        while True:
            if index not in self._unusable:
                try:
                    gt, lq = patch(index, rng)
                    break
                except UnusableImage as err:
                    self._unusable.add(index)
                    logger.warning("skipping training image %s: %s", err.path, err.reason)
                    if len(self._unusable) == len(self.gt_paths):
                        raise ValueError(f"none of the {len(self.gt_paths)} training images in "
                                         f"{self.gt_paths[0].parent} can be used (see the warnings)") from err
            index = int(rng.integers(len(self.gt_paths)))
        gt, lq = augment([gt, lq], self.use_hflip, self.use_rot, rng)
        return {"lq": to_tensor(lq), "gt": to_tensor(gt)}


class TrainingSampler(Sampler[SampleKey]):
    """Each epoch: the images repeated ``enlarge_ratio`` times, shuffled by (seed, epoch), padded to a multiple of
    ``num_replicas`` and dealt out by rank (what DistributedSampler does), each with a seed for its own choices.

    ``set_epoch(epoch, skip)`` starts that epoch after ``skip`` of this rank's samples, which is how a resumed run
    continues the epoch it was interrupted in.
    """

    def __init__(self, num_images: int, enlarge_ratio: int = 1, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        if enlarge_ratio < 1:
            raise OptionError(f"dataset_enlarge_ratio must be at least 1, got {enlarge_ratio}")
        self.num_images = num_images
        self.enlarge_ratio = enlarge_ratio
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.samples_per_replica = math.ceil(num_images * enlarge_ratio / num_replicas)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip

    def __len__(self) -> int:
        return max(self.samples_per_replica - self.skip, 0)

    def __iter__(self) -> Iterator[SampleKey]:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.samples_per_replica * self.num_replicas
        enlarged = self.num_images * self.enlarge_ratio
        order = rng.permutation(enlarged) if self.shuffle else np.arange(enlarged)
        order = np.resize(order, total) % self.num_images
        seeds = rng.integers(2 ** 63, size=total)
        positions = range(self.rank + self.skip * self.num_replicas, total, self.num_replicas)
        return (SampleKey(int(order[p]), int(seeds[p])) for p in positions)


def build_training_loader(dataset_options: Mapping[str, Any], scale: int, seed: int, *, num_replicas: int = 1,
                          rank: int = 0, pin_memory: bool = False) -> tuple[DataLoader, TrainingSampler]:
    dataset = TrainingPatches.from_options(dataset_options, scale)
    sampler = TrainingSampler(len(dataset), dataset_options["dataset_enlarge_ratio"], dataset_options["use_shuffle"],
                              seed, num_replicas, rank)
    batch_size = dataset_options["batch_size_per_gpu"]
    if sampler.samples_per_replica < batch_size:
        raise OptionError(f"the training set gives {sampler.samples_per_replica} samples per process per epoch, "
                          f"fewer than batch_size_per_gpu {batch_size}; raise dataset_enlarge_ratio")
    workers = dataset_options["num_worker_per_gpu"]
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
        pin_memory=pin_memory, persistent_workers=workers > 0,
        # The loader draws its workers' base seed from this generator rather than the global torch RNG, whose
        # stream (drop path) must not depend on when an epoch's iterator happens to be created.
        generator=torch.Generator().manual_seed(seed))
    return loader, sampler


class EvaluationPairs:
    """Whole (LQ, GT) image pairs of one validation/test set, as uint8 BGR arrays.

    The GT is cropped to LQ x scale. Without LQ files (``lq_paths`` None) the GT is cropped to a multiple of the
    scale and the LQ is its ``bicubic_lq``, like the benchmark files. Without GT files (``gt_paths`` None, a
    ``SingleImageDataset``) there is only the LQ, to super-resolve: ``load`` gives None for the GT.
    """

    def __init__(self, name: str, gt_paths: Sequence[Path] | None, lq_paths: Sequence[Path] | None, scale: int):
        if gt_paths is None and lq_paths is None:
            raise ValueError(f"set {name}: give its GT images, its LQ images or both")
        self.name = name
        self.gt_paths = None if gt_paths is None else list(gt_paths)
        self.lq_paths = None if lq_paths is None else list(lq_paths)
        self.scale = scale

    @classmethod
    def from_options(cls, dataset_options: Mapping[str, Any], scale: int, dotted: str) -> "EvaluationPairs":
        gt_paths, lq_paths = _gt_and_lq_paths(dataset_options, dotted)
        return cls(dataset_options["name"], gt_paths, lq_paths, scale)

    @classmethod
    def from_test_options(cls, dataset_options: Mapping[str, Any], scale: int, dotted: str) -> "EvaluationPairs":
        """A set of a test option file: as :meth:`from_options` reads it, or a ``SingleImageDataset`` of the LQ
        images in ``dataroot_lq`` alone."""
        kind = require_choice(dataset_options["type"], f"{dotted}.type", (*DATASET_TYPES, LQ_ONLY_DATASET))
        if kind != LQ_ONLY_DATASET:
            if dataset_options["dataroot_gt"] is None:
                raise OptionError(f"missing required option {dotted}.dataroot_gt; to super-resolve LQ images "
                                  f"without GT, set {dotted}.type: {LQ_ONLY_DATASET} and its dataroot_lq")
            return cls.from_options(dataset_options, scale, dotted)
        if dataset_options["dataroot_lq"] is None:
            raise OptionError(f"missing required option {dotted}.dataroot_lq (the folder of LQ images a "
                              f"{LQ_ONLY_DATASET} super-resolves)")
        if dataset_options["dataroot_gt"] is not None:
            logger.warning("%s: ignoring dataroot_gt: a %s is LQ images alone, super-resolved and not scored; use "
                           "type PairedImageDataset to score them", dotted, LQ_ONLY_DATASET)
        _check_io_backend(dataset_options, dotted)
        return cls(dataset_options["name"], None, list_images(dataset_options["dataroot_lq"]), scale)

    @classmethod
    def from_benchmark_folder(cls, folder: str | Path, scale: int) -> "EvaluationPairs":
        """A set in the standard ``HR/`` + ``LR_bicubic/X{s}/NAMEx{s}.png`` layout, named after its folder."""
        folder = Path(folder)
        gt_paths = list_images(folder / "HR")
        lq_folder = folder / "LR_bicubic" / f"X{scale}"
        lq_paths = [lq_path_for(p, lq_folder, f"{{}}x{scale}") for p in gt_paths]
        if lq_folder.is_dir() and gt_paths and not any(p.is_file() for p in lq_paths):
            # A whole set named otherwise (Manga109's NAME_LRBI_x4.png): one error before any work, not one per image.
            found = sorted(p.name for p in lq_folder.iterdir())[:3]
            raise ValueError(f"{folder.name}: none of its LR files is named as --data expects ({lq_paths[0].name} "
                             f"in {lq_folder}; the folder holds {found or 'nothing'}); for other names, evaluate "
                             f"with a test option file (-opt) whose dataset sets filename_tmpl")
        return cls(folder.name, gt_paths, lq_paths, scale)

    @property
    def has_gt(self) -> bool:
        return self.gt_paths is not None

    def __len__(self) -> int:
        return len(self.gt_paths if self.has_gt else self.lq_paths)

    def image_name(self, index: int) -> str:
        """The name results are reported and saved under: the LQ file's stem, as in BasicSR."""
        return (self.gt_paths if self.lq_paths is None else self.lq_paths)[index].stem

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(lq, gt) of image ``index`` (gt None for a set without GT); raises UnusableImage naming the file at
        fault."""
        if not self.has_gt:
            return read_image(self.lq_paths[index]), None
        gt_path = self.gt_paths[index]
        gt = read_image(gt_path)
        s = self.scale
        if self.lq_paths is None:
            gt = gt[:gt.shape[0] - gt.shape[0] % s, :gt.shape[1] - gt.shape[1] % s]
            if gt.size == 0:
                raise UnusableImage(gt_path, f"it is smaller than the scale {s}")
            return bicubic_lq(gt, s), gt
        lq_path = self.lq_paths[index]
        if not lq_path.is_file():
            raise UnusableImage(lq_path, f"file not found (the LQ of {gt_path.name})")
        lq = read_image(lq_path)
        height, width = lq.shape[0] * s, lq.shape[1] * s
        if gt.shape[0] < height or gt.shape[1] < width:
            raise UnusableImage(gt_path, f"it is {gt.shape[1]}x{gt.shape[0]}, smaller than its LQ {lq_path.name} "
                                         f"({lq.shape[1]}x{lq.shape[0]}) times {s}")
        if gt.shape[0] - height >= s or gt.shape[1] - width >= s:
            # BasicSR crops as well, but an LQ made by x-s bicubic leaves under s px: this one is of another scale.
            logger.warning("%s is %dx%d, but its LQ %s (%dx%d) times %d covers only %dx%d of it: is the LQ of another "
                           "scale? Scoring the top-left %dx%d, as BasicSR does", gt_path, gt.shape[1], gt.shape[0],
                           lq_path.name, lq.shape[1], lq.shape[0], s, width, height, width, height)
        return lq, gt[:height, :width]
