"""PSNR and SSIM computed exactly as BasicSR's ``basicsr.metrics.psnr_ssim`` computes them.

Published super-resolution tables are BasicSR numbers, so every step here (crop, Y conversion and its float32
rounding, float64 arithmetic, OpenCV filtering) follows BasicSR's order of operations: results agree with
BasicSR's to rounding, and any "cleaner" variant would drift from the numbers users compare against.
"""
from __future__ import annotations

import cv2
import numpy as np

# ITU-R BT.601 YCbCr from RGB in [0, 1]: rows are the R, G, B inputs, columns the Y, Cb, Cr outputs on the
# 0-255 scale (the "studio swing" of MATLAB's rgb2ycbcr, which the SR literature evaluates on).
_YCBCR_FROM_RGB = np.array([[65.481, -37.797, 112.0],
                            [128.553, -74.203, -93.786],
                            [24.966, 112.0, -18.214]])
_YCBCR_OFFSET = np.array([16.0, 128.0, 128.0])
_YCBCR_FROM_BGR = np.ascontiguousarray(_YCBCR_FROM_RGB[::-1])

_SSIM_WINDOW_SIZE = 11
_SSIM_WINDOW_SIGMA = 1.5
_SSIM_C1 = (0.01 * 255) ** 2
_SSIM_C2 = (0.03 * 255) ** 2


def _to_ycbcr(img: np.ndarray, y_only: bool, from_input: np.ndarray) -> np.ndarray:
    """YCbCr (or Y alone) of a 3-channel image, in the input's dtype and range."""
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an image of shape (H, W, 3), got {img.shape}")
    input_dtype = img.dtype
    if input_dtype == np.uint8:
        # float32 before dividing, as BasicSR does: the Y-channel metrics inherit this rounding.
        unit_range = img.astype(np.float32) / 255.0
    elif np.issubdtype(input_dtype, np.floating):
        unit_range = img
    else:
        raise TypeError(f"expected a uint8 image in [0, 255] or a float image in [0, 1], got dtype {input_dtype}")
    if y_only:
        converted = np.dot(unit_range, np.ascontiguousarray(from_input[:, 0])) + _YCBCR_OFFSET[0]
    else:
        converted = np.matmul(unit_range, from_input) + _YCBCR_OFFSET
    if input_dtype == np.uint8:
        return converted.round().astype(np.uint8)
    return (converted / 255.0).astype(input_dtype)


def bgr2ycbcr(img: np.ndarray, y_only: bool = False) -> np.ndarray:
    """BT.601 YCbCr of a BGR image (OpenCV's order), like BasicSR's ``bgr2ycbcr``.

    uint8 in [0, 255] gives rounded uint8; float in [0, 1] gives the same float dtype in [0, 1] (Y in
    [16/255, 235/255]). ``y_only`` returns the (H, W) Y plane instead of (H, W, 3).
    """
    return _to_ycbcr(img, y_only, _YCBCR_FROM_BGR)


def rgb2ycbcr(img: np.ndarray, y_only: bool = False) -> np.ndarray:
    """BT.601 YCbCr of an RGB image; same conventions as :func:`bgr2ycbcr`."""
    return _to_ycbcr(img, y_only, _YCBCR_FROM_RGB)


def to_y_channel(img: np.ndarray) -> np.ndarray:
    """The (H, W, 1) float32 Y channel on the 0-255 scale of an (H, W, 3) BGR image in [0, 255].

    Images with another channel count pass through, but still via float32, as in BasicSR.
    """
    unit_range = img.astype(np.float32) / 255.0
    if unit_range.ndim == 3 and unit_range.shape[2] == 3:
        unit_range = bgr2ycbcr(unit_range, y_only=True)[..., None]
    return unit_range * 255.0


def _reorder_to_hwc(img: np.ndarray, input_order: str) -> np.ndarray:
    if input_order not in ("HWC", "CHW"):
        raise ValueError(f"input_order must be 'HWC' or 'CHW', got {input_order!r}")
    if img.ndim == 2:
        return img[..., None]
    if img.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D image, got shape {img.shape}")
    return img.transpose(1, 2, 0) if input_order == "CHW" else img


def _prepare_pair(img: np.ndarray, img2: np.ndarray, crop_border: int, input_order: str,
                  test_y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 HWC, cropped and optionally reduced to Y, in BasicSR's order of steps."""
    img, img2 = np.asarray(img), np.asarray(img2)
    if img.shape != img2.shape:
        raise ValueError(f"images must have the same shape, got {img.shape} and {img2.shape}")
    img = _reorder_to_hwc(img, input_order)
    img2 = _reorder_to_hwc(img2, input_order)
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        if min(img.shape[:2]) <= 2 * crop_border:
            raise ValueError(f"crop_border={crop_border} leaves nothing of a {img.shape[0]}x{img.shape[1]} image")
        img = img[crop_border:-crop_border, crop_border:-crop_border, ...]
        img2 = img2[crop_border:-crop_border, crop_border:-crop_border, ...]
    if test_y_channel:
        img = to_y_channel(img)
        img2 = to_y_channel(img2)
    return img.astype(np.float64), img2.astype(np.float64)


def calculate_psnr(img: np.ndarray, img2: np.ndarray, crop_border: int, input_order: str = "HWC",
                   test_y_channel: bool = False, **kwargs) -> float:
    """PSNR in dB of two images in [0, 255] (BGR if ``test_y_channel``), ``inf`` for identical images.

    ``kwargs`` are accepted and ignored so BasicSR metric options can be passed through unchanged.
    """
    img, img2 = _prepare_pair(img, img2, crop_border, input_order, test_y_channel)
    mse = np.mean((img - img2) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0 * 255.0 / mse))


def _ssim_one_channel(img: np.ndarray, img2: np.ndarray) -> float:
    kernel = cv2.getGaussianKernel(_SSIM_WINDOW_SIZE, _SSIM_WINDOW_SIGMA)
    window = np.outer(kernel, kernel.transpose())
    margin = _SSIM_WINDOW_SIZE // 2
    valid = (slice(margin, -margin), slice(margin, -margin))

    def local_mean(values: np.ndarray) -> np.ndarray:
        # Cut to the pixels whose whole window lies inside the image, so OpenCV's border mode never matters.
        return cv2.filter2D(values, -1, window)[valid]

    mu1, mu2 = local_mean(img), local_mean(img2)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 ** 2, mu2 ** 2, mu1 * mu2
    sigma1_sq = local_mean(img ** 2) - mu1_sq
    sigma2_sq = local_mean(img2 ** 2) - mu2_sq
    sigma12 = local_mean(img * img2) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + _SSIM_C1) * (2 * sigma12 + _SSIM_C2)) / (
        (mu1_sq + mu2_sq + _SSIM_C1) * (sigma1_sq + sigma2_sq + _SSIM_C2))
    return ssim_map.mean()


def calculate_ssim(img: np.ndarray, img2: np.ndarray, crop_border: int, input_order: str = "HWC",
                   test_y_channel: bool = False, **kwargs) -> float:
    """SSIM of two images in [0, 255] (BGR if ``test_y_channel``): the mean over channels of each channel's
    mean SSIM map, with an 11x11 Gaussian window (sigma 1.5) evaluated where it fits inside the image.

    ``kwargs`` are accepted and ignored so BasicSR metric options can be passed through unchanged.
    """
    img, img2 = _prepare_pair(img, img2, crop_border, input_order, test_y_channel)
    if min(img.shape[:2]) < _SSIM_WINDOW_SIZE:
        raise ValueError(f"SSIM needs at least {_SSIM_WINDOW_SIZE}x{_SSIM_WINDOW_SIZE} pixels after cropping, "
                         f"got {img.shape[0]}x{img.shape[1]}")
    per_channel = [_ssim_one_channel(np.ascontiguousarray(img[..., c]), np.ascontiguousarray(img2[..., c]))
                   for c in range(img.shape[2])]
    return float(np.array(per_channel).mean())
