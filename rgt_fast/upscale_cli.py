"""``rgt-fast upscale``: super-resolve image files and folders into PNGs.

Everything that can be checked without running the model (the inputs, their output names, the output folder, the
weights and their scale) is checked before the first image, so a mistake on the command line costs no compute and
writes nothing. Then each image is handled on its own: one that cannot be read, super-resolved or written, or whose
output already exists, is reported by name and the others still go through; the exit status says whether any
failed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import load_model
from .cpu_allocator import retain_freed_cpu_memory
from .files import UnusableImage, encode_png, read_upright_image, write_atomically
from .inference import DTYPES, default_device, parse_device, tile_flags_problem, upscale
from .kernels._common import triton_runs_on_device
from .model import BACKENDS
from .training.data import list_images

SUPPORTED_SAMPLE_TYPES = (np.uint8, np.uint16, np.float32)


class UsageError(Exception):
    """A command line that cannot run as given; exits with status 2, as argparse's own errors do."""


DEMO_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEMO_DEFAULT_SCALE = 4


def default_weights(scale: int | None) -> Path:
    """The built-in demo model for ``scale`` (x4 when None), used when --weights is not given."""
    scale = DEMO_DEFAULT_SCALE if scale is None else scale
    path = DEMO_WEIGHTS_DIR / f"demo_RGT_x{scale}.safetensors"
    if not path.is_file():
        built_in = ", ".join(sorted("x" + p.stem.rsplit("_x", 1)[1]
                                    for p in DEMO_WEIGHTS_DIR.glob("demo_RGT_x*.safetensors"))) or "none"
        raise UsageError(f"no built-in demo model for x{scale} (built in: {built_in}); pass an RGT checkpoint "
                         f"(.pth or .safetensors) with --weights")
    print(f"rgt-fast upscale: using the built-in demo model (x{scale}, a compact RGT trained on a few natural "
          f"images); for the paper's quality pass the official weights with --weights RGT_x{scale}.pth",
          file=sys.stderr)
    return path


def add_upscale_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files and/or folders (a folder: the images directly inside it)")
    parser.add_argument("-o", "--output-dir", required=True, type=Path, metavar="OUTDIR",
                        help="where <input name>.png is written (created if missing)")
    parser.add_argument("--weights", help="weights file (.pth/.safetensors); the architecture is read from it")
    parser.add_argument("--scale", type=int, help="upscaling factor; refused unless it is the one of the weights")
    parser.add_argument("--tile", type=int, help="run the model on overlapping tiles of this many input pixels "
                                                 "(default: whole images, tiles only when the GPU runs out)")
    parser.add_argument("--tile-overlap", type=int, default=32, help="overlap of neighbouring tiles in input pixels")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="inference precision")
    parser.add_argument("--device", type=parse_device, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="attention kernels: triton on CUDA with auto, plain PyTorch elsewhere")
    parser.add_argument("--self-ensemble", action="store_true", help="average the 8 flips/transposes (8x slower)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    parser.add_argument("--allow-input-dir", action="store_true",
                        help="allow OUTDIR to be the folder of an input")


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """The image files named or held by ``inputs``, each once even when named twice (say, alone and by its folder)."""
    images: dict[Path, Path] = {}
    for given in map(Path, inputs):
        if given.is_dir():
            try:
                found = list_images(given)
            except FileNotFoundError as err:
                raise UsageError(str(err)) from err
        elif given.is_file():
            found = [given]
        else:
            raise UsageError(f"input not found: {given}")
        for image in found:
            images.setdefault(image.resolve(), image)
    return list(images.values())


def plan_outputs(images: Sequence[Path], output_dir: Path, allow_input_dir: bool) -> list[tuple[Path, Path]]:
    """(input, output PNG) pairs, refused when two inputs would share an output or OUTDIR holds an input."""
    # Case-folded, because on case-insensitive file systems "A.png" and "a.png" are one file.
    sources_by_output: dict[str, list[Path]] = {}
    for image in images:
        sources_by_output.setdefault(f"{image.stem}.png".casefold(), []).append(image)
    clashes = [sources for sources in sources_by_output.values() if len(sources) > 1]
    if clashes:
        described = "; ".join(" and ".join(map(str, sources)) + f" -> {sources[0].stem}.png" for sources in clashes)
        raise UsageError(f"inputs with the same name would be written to the same output: {described}; "
                         f"upscale them in separate runs with different -o folders")
    if not allow_input_dir:
        target = output_dir.resolve()
        for image in images:
            if image.parent.resolve() == target:
                raise UsageError(f"-o {output_dir} is the folder of the input {image}; choose another folder, or "
                                 f"pass --allow-input-dir to write there")
    return [(image, output_dir / f"{image.stem}.png") for image in images]


def load_checked_model(weights: str | Path, scale: int | None, backend: str, device: torch.device) -> nn.Module:
    model = load_model(weights, backend=backend, device=device)
    if scale is not None and model.upscale != scale:
        raise UsageError(f"weights in {weights} are a x{model.upscale} model, but --scale {scale} was asked")
    return model


def super_resolve(model: nn.Module, image: np.ndarray, **upscale_options: Any) -> np.ndarray:
    """``image`` (as :func:`read_upright_image` reads it) super-resolved, in the same layout and sample type.

    A grayscale image goes through a colour model as three equal channels and comes back as one; the alpha plane
    of a BGRA image is upscaled bicubically beside the super-resolved colour, since RGT was never trained on it.
    """
    if image.dtype not in SUPPORTED_SAMPLE_TYPES:
        raise ValueError(f"has {image.dtype} samples; only 8-bit, 16-bit and float32 images are supported")
    colour_model = int(model.in_chans) == 3
    if image.ndim == 2:
        if colour_model:
            colour = upscale(model, cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), **upscale_options)
            return cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
        return upscale(model, image[..., None], **upscale_options)[..., 0]
    if image.shape[2] == 4 and colour_model:
        colour = upscale(model, np.ascontiguousarray(image[..., :3]), **upscale_options)
        alpha = cv2.resize(image[..., 3], colour.shape[1::-1], interpolation=cv2.INTER_CUBIC)
        if image.dtype == np.float32:
            alpha = np.clip(alpha, 0.0, 1.0)  # bicubic overshoots; integer types saturate by themselves
        return np.dstack([colour, alpha])
    return upscale(model, image, **upscale_options)


def upscale_file(model: nn.Module, source: Path, destination: Path, overwrite: bool,
                 **upscale_options: Any) -> str | None:
    """Super-resolve ``source`` into ``destination``; None when written, else why not."""
    if destination.exists() and not overwrite:
        return f"{source}: skipped, {destination} already exists (pass --overwrite to replace it)"
    try:
        image = read_upright_image(source)
        write_atomically(encode_png(super_resolve(model, image, **upscale_options)), destination)
    except UnusableImage as err:  # names the source itself
        return str(err)
    except (ValueError, MemoryError, OSError, RuntimeError) as err:  # RuntimeError: PyTorch's, for this image only
        return f"{source}: {err}"
    return None


def _prepare(args: argparse.Namespace) -> tuple[nn.Module, list[tuple[Path, Path]]]:
    problem = tile_flags_problem(args.tile, args.tile_overlap)
    if problem:
        raise UsageError(problem)
    jobs = plan_outputs(collect_images(args.inputs), args.output_dir, args.allow_input_dir)
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise UsageError(f"-o {args.output_dir} is a file; pass a folder (it is created if missing)")
    device = args.device or default_device()
    if args.backend == "triton" and not triton_runs_on_device(device):
        raise UsageError(f"--backend triton runs on CUDA devices, not on {device}; use --backend auto or torch, or "
                         f"--device cuda")
    weights = args.weights or default_weights(args.scale)
    return load_checked_model(weights, args.scale, args.backend, device), jobs


def run_upscale(args: argparse.Namespace) -> int:
    """``rgt-fast upscale``: 0 when every input was written, 1 when any failed or was skipped, 2 on usage errors."""
    try:
        model, jobs = _prepare(args)
    except UsageError as err:
        print(f"rgt-fast upscale: error: {err}", file=sys.stderr)
        return 2
    if next(model.parameters()).device.type == "cpu":
        retain_freed_cpu_memory()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    options = dict(tile=args.tile, tile_overlap=args.tile_overlap, dtype=args.dtype,
                   self_ensemble=args.self_ensemble)
    failures = []
    with torch.inference_mode():
        for source, destination in tqdm(jobs, desc="upscale", unit="image", file=sys.stderr, disable=None):
            failure = upscale_file(model, source, destination, args.overwrite, **options)
            if failure is not None:
                failures.append(failure)
                tqdm.write(f"rgt-fast upscale: {failure}", file=sys.stderr)
    print(f"{len(jobs) - len(failures)} written, {len(failures)} failed or skipped (output in {args.output_dir})")
    return 1 if failures else 0
