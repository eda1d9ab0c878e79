"""MATLAB's ``imresize(img, scale, 'bicubic')``, the resize that produced the LR images of the SR benchmarks.

OpenCV's bicubic differs from MATLAB's (kernel a = -0.75, no antialiasing when downscaling, other border
handling), and a model scored on LR images from another resize is not scored on the benchmark; BasicSR's
``basicsr.utils.matlab_functions.imresize`` exists for the same reason. This one works in float64 (BasicSR
works in float32), so it follows MATLAB's double-precision results more closely.
"""
from __future__ import annotations

import math

import numpy as np

_CUBIC_SUPPORT = 4.0


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5, supported on [-2, 2]."""
    absx = np.abs(x)
    absx2 = absx ** 2
    absx3 = absx ** 3
    near = (1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1)
    far = (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * ((absx > 1) & (absx <= 2))
    return near + far


def contributions(in_length: int, out_length: int, scale: float,
                  antialiasing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The input pixels each output pixel of one axis reads, and their weights, as MATLAB computes them.

    Returns ``(indices, weights)``, both of shape (out_length, taps): 0-based input indices, already
    mirrored into [0, in_length), and weights that sum to 1 along each row.
    """
    stretch = scale < 1 and antialiasing
    # Downscaling with antialiasing widens the kernel by 1/scale so it also acts as the low-pass filter.
    kernel_width = _CUBIC_SUPPORT / scale if stretch else _CUBIC_SUPPORT
    out_positions = np.arange(1, out_length + 1, dtype=np.float64)
    # Centre of each output pixel in input coordinates, both 1-based as in MATLAB (pixel centres aligned).
    centres = out_positions / scale + 0.5 * (1 - 1 / scale)
    first = np.floor(centres - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    indices = first[:, None] + np.arange(taps)
    distances = centres[:, None] - indices
    weights = scale * cubic(distances * scale) if stretch else cubic(distances)
    weights /= weights.sum(axis=1, keepdims=True)

    # The first and last taps always fall on the kernel's zeros; dropping all-zero taps saves their work.
    used = np.any(weights != 0, axis=0)
    indices, weights = indices[:, used], weights[:, used]

    # Half-sample symmetric extension (edge pixel repeated: c b a | a b c | c b a), periodic beyond one
    # image length, which is how MATLAB handles kernels wider than the image.
    period = 2 * in_length
    wrapped = np.mod(indices.astype(np.int64) - 1, period)
    mirrored = np.where(wrapped < in_length, wrapped, period - 1 - wrapped)
    return mirrored, weights


def _resize_first_axis(img: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
    trailing = (slice(None),) + (None,) * (img.ndim - 1)
    # One tap at a time keeps memory at one output-sized slab (gathering all taps at once takes 16 slabs at
    # x1/4) and sums the taps in MATLAB's order.
    out = weights[:, 0][trailing] * img[indices[:, 0]]
    for tap in range(1, weights.shape[1]):
        out += weights[:, tap][trailing] * img[indices[:, tap]]
    return out


def imresize(img: np.ndarray, scale: float, antialiasing: bool = True) -> np.ndarray:
    """Bicubic resize of an (H, W, C) or (H, W) float image by ``scale``, matching MATLAB's ``imresize``.

    The output is ceil(H * scale) x ceil(W * scale); values are not clipped (the cubic kernel overshoots at
    edges). Computed in float64 and returned in the input's float dtype. Height is resized first, as MATLAB
    does when both axes share one scale. Integer images are refused: MATLAB rounds uint8 results, so
    convert to float (``img.astype(np.float64) / 255`` or keep [0, 255]) and round yourself if needed.
    """
    if not isinstance(img, np.ndarray):
        # np.asarray would take a (C, H, W) tensor as an image C px high.
        raise TypeError(f"imresize expects a numpy (H, W) or (H, W, C) array, got {type(img).__name__}; for a "
                        f"(C, H, W) tensor pass tensor.permute(1, 2, 0).numpy()")
    if not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"imresize expects a float image (in [0, 1] or [0, 255]), got dtype {img.dtype}; "
                        "convert it first, e.g. img.astype(np.float64) / 255")
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {img.shape}")
    if min(img.shape[:2]) == 0:
        raise ValueError(f"cannot resize an empty image of shape {img.shape}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")

    in_h, in_w = img.shape[:2]
    out_h, out_w = math.ceil(in_h * scale), math.ceil(in_w * scale)
    rows = _resize_first_axis(img.astype(np.float64), *contributions(in_h, out_h, scale, antialiasing))
    # Gathering whole contiguous rows is several times faster than gathering through a transposed view.
    columns = _resize_first_axis(np.ascontiguousarray(rows.swapaxes(0, 1)),
                                 *contributions(in_w, out_w, scale, antialiasing))
    return np.ascontiguousarray(columns.swapaxes(0, 1), dtype=img.dtype)
