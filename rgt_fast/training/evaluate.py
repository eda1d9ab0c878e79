"""PSNR/SSIM of an RGT on benchmark sets, from a BasicSR test option file or from command-line flags.

Scores follow BasicSR (``rgt_fast.metrics``: crop ``crop_border`` pixels, Y channel); the model runs through
``rgt_fast.upscale`` on whole images unless tiling is asked for, or, for an option file's ``val.use_chop``, in the
authors' parts (``upscale_in_parts``). A set without GT (``SingleImageDataset``) is super-resolved and saved, not
scored. An image that cannot be read, scored or fitted in memory is reported by name and the rest of the set is
still evaluated; the exit status says whether anything failed.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoint import load_model
from ..cpu_allocator import retain_freed_cpu_memory
from ..inference import DTYPES, default_device, parse_device, tile_flags_problem, upscale, upscale_in_parts
from ..files import encode_png, write_atomically
from ..metrics import calculate_psnr, calculate_ssim
from .checkpoints import archive_existing
from .data import EvaluationPairs
from .logs import configure_console_logging
from .options import OptionError, load_test_options, require_choice

logger = logging.getLogger(__name__)

Metric = Callable[[np.ndarray, np.ndarray], float]
METRIC_FUNCTIONS = {"calculate_psnr": calculate_psnr, "calculate_ssim": calculate_ssim}
DEFAULT_SUFFIX = "RGT"


def build_metrics(metrics_options: Mapping[str, Mapping[str, Any]], dotted: str = "val.metrics") -> dict[str, Metric]:
    """Named metric functions from BasicSR's ``metrics`` section (type calculate_psnr / calculate_ssim)."""
    metrics = {}
    for name, spec in metrics_options.items():
        kind = require_choice(spec["type"], f"{dotted}.{name}.type", METRIC_FUNCTIONS)
        metrics[name] = functools.partial(METRIC_FUNCTIONS[kind], crop_border=int(spec["crop_border"]),
                                          test_y_channel=bool(spec["test_y_channel"]))
    return metrics


def benchmark_metrics(scale: int) -> dict[str, Metric]:
    """PSNR and SSIM as SR papers report them: Y channel, ``scale`` pixels cropped from each edge."""
    return {name: functools.partial(function, crop_border=scale, test_y_channel=True)
            for name, function in (("psnr", calculate_psnr), ("ssim", calculate_ssim))}


@dataclass
class SetScores:
    """Per-image scores of a set; a set without GT (``scored`` False) lists its images with no metrics."""

    name: str
    metric_names: list[str]
    images: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    scored: bool = True

    def averages(self) -> dict[str, float]:
        """Mean of each metric over the scored images; NaN for a set where nothing could be scored."""
        return {m: float(np.mean([scores[m] for _, scores in self.images])) if self.images else math.nan
                for m in self.metric_names}

    def as_dict(self) -> dict[str, Any]:
        averages = self.averages() if self.scored else None
        return {"name": self.name, "scored": self.scored, "average": averages,
                "images": [{"name": name, **scores} for name, scores in self.images],
                "failed": [{"name": name, "error": error} for name, error in self.failures]}


def evaluate_set(model: nn.Module, pairs: EvaluationPairs, metrics: Mapping[str, Metric], *, tile: int | None = None,
                 tile_overlap: int = 32, use_chop: bool = False, self_ensemble: bool = False,
                 dtype: str | None = None, save_dir: Path | None = None,
                 image_suffix: str = DEFAULT_SUFFIX) -> SetScores:
    """Scores of every image of ``pairs`` (none for a set without GT); SR images saved as
    ``save_dir/<name>_<image_suffix>.png`` if asked. ``use_chop`` runs the authors' split (``upscale_in_parts``)
    instead of whole images or ``tile``s."""
    if use_chop and tile is not None:
        raise ValueError("use_chop splits images its own way; give tile or use_chop, not both")
    if not pairs.has_gt:
        metrics = {}
    result = SetScores(pairs.name, list(metrics), scored=pairs.has_gt)
    for index in range(len(pairs)):
        name = pairs.image_name(index)
        try:
            lq, gt = pairs.load(index)
            if use_chop:
                sr = upscale_in_parts(model, lq, dtype=dtype, self_ensemble=self_ensemble)
            else:
                sr = upscale(model, lq, tile=tile, tile_overlap=tile_overlap, dtype=dtype,
                             self_ensemble=self_ensemble)
            scores = {metric: float(function(sr, gt)) for metric, function in metrics.items()}
        # An UnusableImage, an image the model cannot take, or one too large for memory even in upscale()'s tiles.
        except (ValueError, MemoryError, torch.OutOfMemoryError) as err:
            logger.warning("%s: cannot evaluate %s: %s", pairs.name, name, err)
            result.failures.append((name, str(err)))
            continue
        result.images.append((name, scores))
        if save_dir is not None:
            write_atomically(encode_png(sr), save_dir / f"{name}_{image_suffix}.png")
    return result


def format_table(sets: Sequence[SetScores]) -> str:
    lines = []
    for scores in sets:
        width = max([len("average"), *(len(name) for name, _ in scores.images),
                     *(len(name) for name, _ in scores.failures)])
        header = "  ".join(f"{m:>9}" for m in scores.metric_names)
        title = scores.name if scores.scored else f"{scores.name}: no GT, super-resolved without scores"
        lines += [f"== {title} ==", f"{'image':<{width}}  {header}".rstrip()]
        lines += [(f"{name:<{width}}  " + "  ".join(f"{values[m]:9.4f}" for m in scores.metric_names)).rstrip()
                  for name, values in scores.images]
        lines += [f"{name:<{width}}  FAILED: {error}" for name, error in scores.failures]
        if scores.scored:
            averages = scores.averages()
            lines.append(f"{'average':<{width}}  " + "  ".join(f"{averages[m]:9.4f}" for m in scores.metric_names))
        lines.append("")
    return "\n".join(lines)


def _strict_json(value: Any) -> Any:
    """``value`` with infinite floats as "inf" / "-inf" and NaN as null: a PSNR of an exact match is infinite, and
    strict JSON readers refuse the Infinity and NaN that json.dumps writes."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value


def write_json(path: Path, sets: Sequence[SetScores], info: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = _strict_json({**info, "sets": [s.as_dict() for s in sets]})
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, sets: Sequence[SetScores]) -> None:
    """One row per image and one per scored set's average (image "(average)"); failed images have an error
    column."""
    metric_names = list(dict.fromkeys(m for s in sets for m in s.metric_names))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["set", "image", *metric_names, "error"])
        for scores in sets:
            for name, values in scores.images:
                writer.writerow([scores.name, name, *(values.get(m, "") for m in metric_names), ""])
            for name, error in scores.failures:
                writer.writerow([scores.name, name, *([""] * len(metric_names)), error])
            if scores.scored:
                averages = scores.averages()
                writer.writerow([scores.name, "(average)", *(averages.get(m, "") for m in metric_names), ""])


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-opt", metavar="FILE", help="a BasicSR test option file (datasets test_1, test_2, ...)")
    parser.add_argument("--force_yml", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override options of -opt, e.g. path.pretrain_network_g=W.pth")
    parser.add_argument("--weights", help="weights file (.pth/.safetensors); the architecture is read from it")
    parser.add_argument("--data", nargs="+", action="extend", metavar="DIR",
                        help="benchmark set folder(s) with HR/ and LR_bicubic/X{scale}/NAMEx{scale}.png")
    parser.add_argument("--scale", type=int, help="upscaling factor (default: the one of the weights); refused unless "
                                                  "it is the one of the weights")
    parser.add_argument("--tile", type=int, help="run the model on overlapping tiles of this many LQ pixels")
    parser.add_argument("--tile-overlap", type=int, default=32, help="overlap of neighbouring tiles in LQ pixels")
    parser.add_argument("--save-img", action="store_true", help="save the SR images as PNG")
    parser.add_argument("--out", help="save the SR images in this folder (--save-img alone: results/<weights name>)")
    parser.add_argument("--self-ensemble", action="store_true", help="average the 8 flips/transposes")
    parser.add_argument("--json", type=Path, help="write per-image and per-set scores as JSON")
    parser.add_argument("--csv", type=Path, help="write per-image and per-set scores as CSV")
    parser.add_argument("--device", type=parse_device, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="inference precision")


_FLAG_ONLY = ("weights", "data", "scale", "tile", "save_img", "out")  # -opt sets these (tile: use_chop)


def _load_checked_model(weights: str | Path, scale: int | None, device: torch.device, strict: bool = True,
                        param_key: str | None = None) -> nn.Module:
    """The model ``weights`` hold, refused when ``scale`` is given and is not its scale."""
    model = load_model(weights, device=device, strict=strict, param_key=param_key)
    if scale is not None and model.upscale != scale:
        raise ValueError(f"{weights} holds an x{model.upscale} model, but scale {scale} was asked for")
    return model


def run_evaluation(args: argparse.Namespace) -> int:
    """``rgt-fast eval``: 0 when every image was scored, 1 when any failed."""
    configure_console_logging()
    device = args.device or default_device()
    if device.type == "cpu":
        retain_freed_cpu_memory()
    tile_problem = tile_flags_problem(args.tile, args.tile_overlap)
    if tile_problem:
        raise OptionError(tile_problem)
    if args.opt:
        given = [f"--{name.replace('_', '-')}" for name in _FLAG_ONLY if getattr(args, name) not in (None, False)]
        if given:
            raise OptionError(f"{', '.join(given)} cannot be combined with -opt; the option file sets them")
        options = load_test_options(args.opt, args.force_yml)
        scale, weights = options["scale"], options["path"]["pretrain_network_g"]
        sets = [EvaluationPairs.from_test_options(spec, scale, f"datasets.{key}")
                for key, spec in sorted(options["datasets"].items())]
        without_gt = [pairs.name for pairs in sets if not pairs.has_gt]
        # A set without GT has only its SR images to give; not saving them would spend the run on nothing.
        if without_gt and not options["val"]["save_img"]:
            raise OptionError(f"{', '.join(without_gt)}: no GT to score, so with val.save_img false nothing "
                              f"would be produced for it; set val.save_img: true")
        model = _load_checked_model(weights, scale, device, options["path"]["strict_load_g"],
                                    options["path"]["param_key_g"])
        metrics = build_metrics(options["val"]["metrics"])
        tile, use_chop = None, bool(options["val"]["use_chop"])
        save_root = None
        if options["val"]["save_img"]:
            results_root = Path("results") / options["name"]
            archived = archive_existing(results_root)  # as BasicSR's test.py: no mix of two runs' images
            if archived is not None:
                logger.info("moved the previous results %s to %s", results_root, archived)
            save_root = results_root / "visualization"
        # As BasicSR: the suffix, else the experiment name.
        suffix = options["val"]["suffix"] or options["name"]
    else:
        missing = [flag for flag, value in (("--weights", args.weights), ("--data", args.data)) if not value]
        if missing:
            raise OptionError(f"give -opt FILE, or {', '.join(missing)}")
        if args.force_yml:
            raise OptionError("--force_yml changes an option file; it needs -opt")
        weights = args.weights
        model = _load_checked_model(weights, args.scale, device)
        scale = int(model.upscale)
        sets = [EvaluationPairs.from_benchmark_folder(folder, scale) for folder in args.data]
        metrics = benchmark_metrics(scale)
        tile, use_chop = args.tile, False
        save_root = Path(args.out or Path("results") / Path(weights).stem) if args.save_img or args.out else None
        suffix = DEFAULT_SUFFIX

    results = []
    for pairs in sets:
        save_dir = save_root / pairs.name if save_root is not None else None
        results.append(evaluate_set(model, pairs, metrics, tile=tile, tile_overlap=args.tile_overlap,
                                    use_chop=use_chop, self_ensemble=args.self_ensemble, dtype=args.dtype,
                                    save_dir=save_dir, image_suffix=suffix))
        if not pairs.has_gt:
            logger.info("%s: %d SR image(s) saved in %s", pairs.name, len(results[-1].images), save_dir)
    print(format_table(results))
    info = {"weights": str(weights), "scale": scale, "self_ensemble": args.self_ensemble, "tile": tile,
            "tile_overlap": args.tile_overlap if tile else None, "use_chop": use_chop, "dtype": args.dtype}
    if args.json:
        write_json(args.json, results, info)
    if args.csv:
        write_csv(args.csv, results)
    failed = sum(len(r.failures) for r in results)
    if failed:
        logger.error("%d image(s) could not be evaluated: %s", failed,
                     ", ".join(f"{r.name}/{name}" for r in results for name, _ in r.failures))
    return 1 if failed else 0
