"""Whole-image and tiled super-resolution with any RGT-structured model."""
from __future__ import annotations

import argparse
import contextlib
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .reference.rgt import MIN_EVAL_SIZE, recursion_count

Image = Union[np.ndarray, torch.Tensor]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# How far float inputs may stray outside [0, 1] (resampling and sharpening overshoot a little) before they are
# refused as data on another scale.
FLOAT_RANGE_SLACK = 0.5
# What a grayscale (2-D) array should become for a model of that many channels.
_GRAYSCALE_ADVICE = {1: "pass a grayscale image as img[..., None]",
                     3: "convert a grayscale image with cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)"}


def default_device() -> torch.device:
    """Where the command-line tools run when no ``--device`` is given: the current GPU if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(text: str) -> torch.device:
    """A ``--device`` argument checked against this machine, so a typo or a missing GPU is a usage error and not a
    traceback from deep inside model loading."""
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; use cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        available = torch.cuda.device_count()
        if available == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= available:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {available} CUDA device(s), "
                                             f"cuda:0 to cuda:{available - 1}")
    return device


def tile_flags_problem(tile: int | None, tile_overlap: int) -> str | None:
    """What is wrong with the ``--tile`` and ``--tile-overlap`` of a command line, or None: checked before any work,
    where upscale() would only find it image by image."""
    if tile_overlap < 0:
        return f"--tile-overlap must be at least 0, got {tile_overlap}"
    if tile is not None and not (tile >= MIN_EVAL_SIZE and tile_overlap < tile):
        return f"--tile must be at least {MIN_EVAL_SIZE} and --tile-overlap in [0, tile), got {tile} and {tile_overlap}"
    return None


def _model_properties(model: nn.Module) -> tuple[int, int, torch.device]:
    try:
        scale, channels = int(model.upscale), int(model.in_chans)
    except AttributeError as err:
        raise TypeError(f"upscale() needs an RGT-structured model with 'upscale' and 'in_chans' attributes, got "
                        f"{type(model).__name__}") from err
    return scale, channels, next(model.parameters()).device


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, *DTYPES.values()):
            raise ValueError(f"dtype must be one of {list(DTYPES)} (or the torch dtypes), got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _numpy_to_tensor(image: np.ndarray, channels: int) -> tuple[torch.Tensor, np.dtype]:
    if image.ndim != 3:
        advice = f"; {_GRAYSCALE_ADVICE[channels]}" if image.ndim == 2 and channels in _GRAYSCALE_ADVICE else ""
        raise ValueError(f"expected an HWC image (as cv2.imread returns) with {channels} channels, got an array of "
                         f"shape {image.shape}{advice}")
    if image.shape[2] != channels:
        raise ValueError(f"the model takes {channels}-channel images, got {image.shape[2]} channels "
                         f"(shape {image.shape})")
    if not image.dtype.isnative:  # big-endian samples, as some TIFF readers give them
        image = image.astype(image.dtype.newbyteorder("="))
    if image.dtype == np.uint8:
        array = image.astype(np.float32) / 255.0
    elif image.dtype == np.uint16:
        array = image.astype(np.float32) / 65535.0
    elif np.issubdtype(image.dtype, np.floating):
        array = image.astype(np.float32)
    else:
        raise TypeError(f"unsupported image dtype {image.dtype}; use uint8, uint16 or float in [0, 1]")
    if channels == 3:
        array = array[..., ::-1]  # OpenCV's BGR to the RGB the official models were trained on
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None], image.dtype


def _tensor_to_numpy(output: torch.Tensor, dtype: np.dtype, channels: int) -> np.ndarray:
    array = output[0].float().clamp_(0, 1).permute(1, 2, 0).cpu().numpy()
    if channels == 3:
        array = array[..., ::-1]
    if dtype == np.uint8:
        return np.ascontiguousarray((array * 255.0).round().astype(np.uint8))
    if dtype == np.uint16:
        return np.ascontiguousarray((array * 65535.0).round().astype(np.uint16))
    return np.ascontiguousarray(array.astype(dtype))


def _reflect_to_minimum(x: torch.Tensor, minimum: int) -> torch.Tensor:
    """Reflect-pads bottom/right until H, W >= minimum (repeatedly: one reflection adds at most size - 1)."""
    while x.shape[-2] < minimum or x.shape[-1] < minimum:
        pad_h = min(max(minimum - x.shape[-2], 0), x.shape[-2] - 1)
        pad_w = min(max(minimum - x.shape[-1], 0), x.shape[-1] - 1)
        if pad_h == 0 and pad_w == 0:  # a 1-pixel side cannot reflect
            x = F.pad(x, (0, max(minimum - x.shape[-1], 0), 0, max(minimum - x.shape[-2], 0)), mode="replicate")
        else:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    return x


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _runs_whole(H: int, W: int) -> bool:
    """Whether RG-SA can reduce an H x W map (H, W >= 16) as many times as its recursion rule asks."""
    steps = recursion_count(H, W, training=False)
    return H // 4 ** steps > 0 and W // 4 ** steps > 0


def _largest_runnable_tile(H: int, W: int) -> int:
    """The largest square tile whose tiles of an H x W image (H, W >= 16) all run. A square tile always runs (the
    rule reduces it no more often than its side allows), so the search ends by the short side at the latest."""
    return next(tile for tile in range(max(H, W), MIN_EVAL_SIZE - 1, -1) if _runs_whole(min(tile, H), min(tile, W)))


def _blend_ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1-D blending weights of a tile: on a side that meets another tile, the outer quarter of the overlap gets
    weight 0 (those pixels lack context beyond the tile), the next half a linear rise, the rest 1. Neighbouring
    ramps sum to 1, so a model whose receptive field is under a quarter overlap is reproduced exactly."""
    position = torch.arange(length, dtype=torch.float32) + 0.5
    weight = torch.ones(length)
    if overlap > 0:
        if not at_start:
            weight = torch.minimum(weight, ((position - overlap / 4) / (overlap / 2)).clamp(0, 1))
        if not at_end:
            weight = torch.minimum(weight, ((length - position - overlap / 4) / (overlap / 2)).clamp(0, 1))
    return weight


def _run_tiled(forward, x: torch.Tensor, scale: int, tile: int, overlap: int) -> torch.Tensor:
    B, C, H, W = x.shape
    out = torch.zeros(B, C, H * scale, W * scale, device=x.device)
    weight = torch.zeros(1, 1, H * scale, W * scale, device=x.device)
    rows, cols = _tile_starts(H, tile, overlap), _tile_starts(W, tile, overlap)
    for top in rows:
        for left in cols:
            patch = x[..., top:top + tile, left:left + tile]
            result = forward(patch).float()
            th, tw = patch.shape[-2] * scale, patch.shape[-1] * scale
            wy = _blend_ramp(th, overlap * scale, top == rows[0], top == rows[-1]).to(x.device)
            wx = _blend_ramp(tw, overlap * scale, left == cols[0], left == cols[-1]).to(x.device)
            w = (wy[:, None] * wx[None, :])[None, None]
            out[..., top * scale:top * scale + th, left * scale:left * scale + tw] += result * w
            weight[..., top * scale:top * scale + th, left * scale:left * scale + tw] += w
    return out / weight


def _dihedral(x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    """The k-th of the 8 flips/transposes of the image plane (or its inverse)."""
    flip_h, flip_w, transpose = k & 1, k & 2, k & 4
    if inverse and transpose:
        x = x.transpose(-2, -1)
    if flip_h:
        x = x.flip(-2)
    if flip_w:
        x = x.flip(-1)
    if not inverse and transpose:
        x = x.transpose(-2, -1)
    return x


# How an allocation failure reads: CUDA's caching allocator, and PyTorch's CPU allocator when the operating system
# refuses the memory.
_OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def _is_out_of_memory(err: BaseException) -> bool:
    message = str(err).lower()
    return isinstance(err, torch.cuda.OutOfMemoryError) or any(text in message for text in _OUT_OF_MEMORY_MESSAGES)


@torch.no_grad()
def upscale(model: nn.Module, image: Image, *, tile: int | None = None, tile_overlap: int = 32,
            dtype: torch.dtype | str | None = None, self_ensemble: bool = False) -> Image:
    """Super-resolve ``image`` with ``model`` (put in eval mode).

    ``image``: a numpy HWC array as OpenCV reads it (BGR for 3 channels; uint8, uint16 or float in [0, 1]),
    returned in the same layout and dtype, clipped to the dtype's range ([0, 1] for floats); or a tensor (C, H, W) /
    (B, C, H, W) in [0, 1], RGB, returned as a float tensor of the same rank, unclipped as BasicSR's models return
    it (clamp it before saving). Float values more than ``FLOAT_RANGE_SLACK`` outside [0, 1] are refused (they
    are usually 8-bit data not divided by 255). Whole image by default; ``tile`` processes tiles of that size,
    overlapping by ``tile_overlap`` px and blended linearly (RG-SA attends over the whole image, so tiled results
    differ slightly from whole-image ones); tiles that run out of memory raise MemoryError. A whole image that runs
    out of memory (GPU, or CPU where the allocation is refused) is retried in tiles of 512, then 256, 128 px.
    Images under 16 px (which the official model cannot run in eval mode) are reflect-padded and cropped. Images so
    elongated that RG-SA's recursion rule, set by the long side, would reduce the short side to nothing (16x1024 px,
    64x4096 px; the official model cannot run them either) go in the largest square tiles that run, instead of whole;
    so does such an image with a ``tile`` whose tiles would be too elongated to run. Tiles that upscale chooses
    itself overlap by at most a quarter of their size.
    ``dtype`` "bf16"/"fp16" runs the model under autocast. ``self_ensemble`` averages the 8 flips/transposes.
    On a Linux CPU, call :func:`rgt_fast.retain_freed_cpu_memory` once beforehand, as ``rgt-fast upscale`` does:
    large images then run up to 2x faster.
    """
    scale, channels, device = _model_properties(model)
    autocast_dtype = _resolve_dtype(dtype)
    if tile is not None and tile < MIN_EVAL_SIZE:
        raise ValueError(f"tile must be at least {MIN_EVAL_SIZE} px, got {tile}")
    if tile_overlap < 0:
        raise ValueError(f"tile_overlap must be at least 0, got {tile_overlap}")
    if tile is not None and tile_overlap >= tile:
        raise ValueError(f"tile_overlap must be in [0, tile), got {tile_overlap} for tile {tile}")

    if isinstance(image, np.ndarray):
        x, numpy_dtype = _numpy_to_tensor(image, channels)
        squeeze = None
    elif isinstance(image, torch.Tensor):
        if image.ndim not in (3, 4) or image.shape[-3] != channels:
            raise ValueError(f"expected a ({channels}, H, W) or (B, {channels}, H, W) tensor, got shape "
                             f"{tuple(image.shape)}")
        if not image.is_floating_point():
            raise TypeError(f"expected a float tensor in [0, 1], got {image.dtype}")
        x, numpy_dtype, squeeze = (image[None] if image.ndim == 3 else image), None, image.ndim == 3
    else:
        raise TypeError(f"image must be a numpy array or a torch tensor, got {type(image).__name__}")
    H, W = x.shape[-2:]
    if H == 0 or W == 0:
        raise ValueError(f"empty image of size {H}x{W}")
    if x.shape[0] == 0:
        raise ValueError(f"empty batch: a tensor of shape {tuple(x.shape)} holds no image")
    if not torch.isfinite(x).all():
        raise ValueError("the image contains NaN or infinite values")
    low, high = torch.aminmax(x)
    if low < -FLOAT_RANGE_SLACK or high > 1 + FLOAT_RANGE_SLACK:
        # Most often 8-bit data converted to float without dividing by 255: the output would be clipped to white.
        raise ValueError(f"float image values must lie in [0, 1], got values from {low.item():.4g} to "
                         f"{high.item():.4g}; divide 8-bit data by 255 (or pass the uint8 array as it is)")

    model.eval()
    x = _reflect_to_minimum(x.to(device=device, dtype=next(model.parameters()).dtype), MIN_EVAL_SIZE)
    # None for an image that runs whole. Flips and transposes (self_ensemble) keep this: the rule treats H and W alike.
    elongated_tile = None if _runs_whole(*x.shape[-2:]) else _largest_runnable_tile(*x.shape[-2:])
    user_tile, user_overlap = tile, tile_overlap
    if tile is not None and not _runs_whole(min(tile, x.shape[-2]), min(tile, x.shape[-1])):
        # The tiles of a long strip are strips too; smaller tiles run (the rule follows the long side).
        user_tile, user_overlap = elongated_tile, min(tile_overlap, elongated_tile // 4)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype not in (None, torch.float32)
               else contextlib.nullcontext())
        with ctx:
            return model(batch).float()

    def run_in_tiles(batch: torch.Tensor, size: int) -> torch.Tensor:
        return _run_tiled(forward, batch, scale, size, min(tile_overlap, size // 4))

    def run_once(batch: torch.Tensor) -> torch.Tensor:
        if user_tile is not None:
            try:
                return _run_tiled(forward, batch, scale, user_tile, user_overlap)
            except RuntimeError as err:
                if not _is_out_of_memory(err):
                    raise
                raise MemoryError(f"tiles of {user_tile} px do not fit in memory; pass a smaller tile (at least "
                                  f"{MIN_EVAL_SIZE} px), use a 16-bit dtype (dtype='bf16'), or free memory") from err
        try:
            return forward(batch) if elongated_tile is None else run_in_tiles(batch, elongated_tile)
        except RuntimeError as err:
            if not _is_out_of_memory(err):
                raise
        for fallback_tile in (512, 256, 128):
            torch.cuda.empty_cache()
            try:
                return run_in_tiles(batch, fallback_tile)
            except RuntimeError as err:
                if not _is_out_of_memory(err):
                    raise
        raise MemoryError(f"a {batch.shape[-2]}x{batch.shape[-1]} image does not fit in memory, whole or in tiles of "
                          f"512, 256 or 128 px; free memory, use a 16-bit dtype (dtype='bf16'), or pass a smaller "
                          f"tile (at least {MIN_EVAL_SIZE} px)")

    if self_ensemble:
        output = sum(_dihedral(run_once(_dihedral(x, k)), k, inverse=True) for k in range(8)) / 8
    else:
        output = run_once(x)
    output = output[..., :H * scale, :W * scale]
    if numpy_dtype is not None:
        return _tensor_to_numpy(output, numpy_dtype, channels)
    return output[0] if squeeze else output


# The split of the authors' RGTModel.test with val.use_chop: an image gets size // PART_SPAN + 1 parts along each
# axis, and each part runs with PART_CONTEXT LQ px of its neighbours on the sides where it has any.
PART_SPAN = 200
PART_CONTEXT = 16


def _mirror_to_multiple(x: torch.Tensor, parts: int, dim: int) -> torch.Tensor:
    """``x`` extended at the end of ``dim`` to a multiple of ``parts`` by mirroring with the edge pixel repeated
    (numpy's 'symmetric', not F.pad's 'reflect'), which is what the authors' flip-and-concatenate gives. Fewer than
    ``parts`` <= size / PART_SPAN + 1 pixels are missing, so one mirror is always enough."""
    length = x.shape[dim]
    missing = -length % parts
    return torch.cat([x, x.narrow(dim, length - missing, missing).flip(dim)], dim)


def _part_spans(length: int, parts: int) -> list[tuple[slice, slice, slice]]:
    """(run, own, own_in_run) of each part along an axis of ``length`` (a multiple of ``parts``): the pixels the
    part runs on (its own plus PART_CONTEXT on each side that meets another part), the pixels it fills in the
    result, and where those lie within the pixels it runs on."""
    size = length // parts
    spans = []
    for index in range(parts):
        before = PART_CONTEXT if index > 0 else 0
        after = PART_CONTEXT if index < parts - 1 else 0
        own = slice(index * size, (index + 1) * size)
        spans.append((slice(own.start - before, own.stop + after), own, slice(before, before + size)))
    return spans


def _scaled(span: slice, scale: int) -> slice:
    return slice(span.start * scale, span.stop * scale)


@torch.no_grad()
def upscale_in_parts(model: nn.Module, image: Image, *, dtype: torch.dtype | str | None = None,
                     self_ensemble: bool = False) -> Image:
    """Super-resolve ``image`` split as the authors' ``RGTModel.test`` splits it when a test option file sets
    ``val.use_chop: true``, so that the images (and scores) are theirs.

    An image of h x w LQ px gets ``h // 200 + 1`` x ``w // 200 + 1`` equal parts, after mirroring its bottom and
    right edges (edge pixel repeated) to multiples of those counts. Each part runs on its own with 16 px of its
    neighbours' context, and its own region of the output is placed without blending; the result is cropped to
    the image's size times the scale. An image under 200 px on both sides is one part: the whole-image result.

    Each part goes through :func:`upscale`, with ``dtype`` and ``self_ensemble`` (the authors' chop has no
    ensemble; here each part is averaged over its 8 flips/transposes) and upscale's handling of parts under
    16 px, too elongated or too large for memory. ``image`` and the result are as for :func:`upscale`.
    """
    scale, channels, _ = _model_properties(model)
    if isinstance(image, np.ndarray):
        x, numpy_dtype = _numpy_to_tensor(image, channels)
    elif isinstance(image, torch.Tensor):
        # upscale() checks each part as it checks a whole tensor.
        x, numpy_dtype = image, None
    else:
        raise TypeError(f"image must be a numpy array or a torch tensor, got {type(image).__name__}")
    height, width = x.shape[-2:]
    row_parts, col_parts = height // PART_SPAN + 1, width // PART_SPAN + 1
    x = _mirror_to_multiple(_mirror_to_multiple(x, row_parts, -2), col_parts, -1)
    output = None
    for run_rows, own_rows, own_rows_in_run in _part_spans(x.shape[-2], row_parts):
        for run_cols, own_cols, own_cols_in_run in _part_spans(x.shape[-1], col_parts):
            part = upscale(model, x[..., run_rows, run_cols], dtype=dtype, self_ensemble=self_ensemble)
            if output is None:
                output = part.new_empty((*part.shape[:-2], x.shape[-2] * scale, x.shape[-1] * scale))
            output[..., _scaled(own_rows, scale), _scaled(own_cols, scale)] = \
                part[..., _scaled(own_rows_in_run, scale), _scaled(own_cols_in_run, scale)]
    output = output[..., :height * scale, :width * scale]
    return _tensor_to_numpy(output, numpy_dtype, channels) if numpy_dtype is not None else output
