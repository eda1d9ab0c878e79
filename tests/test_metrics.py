"""PSNR/SSIM with BasicSR semantics: hand-computable values, properties, and an independent float64 oracle."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rgt_fast.metrics import bgr2ycbcr, calculate_psnr, calculate_ssim, rgb2ycbcr, to_y_channel

# BGR order, as OpenCV reads images.
WHITE, BLACK, BLUE, RED = (255, 255, 255), (0, 0, 0), (255, 0, 0), (0, 0, 255)


def solid(bgr, size=16):
    return np.broadcast_to(np.array(bgr, dtype=np.uint8), (size, size, 3)).copy()


def random_image(seed, shape=(24, 20, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Oracle: the metric definitions written out with explicit sliding windows instead of OpenCV, so a mistake in
# the filtering, the valid-region cut or the channel handling of the implementation shows up as a mismatch.

def oracle_gaussian_window(size=11, sigma=1.5):
    offsets = np.arange(size) - (size - 1) / 2
    profile = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    profile /= profile.sum()
    return np.outer(profile, profile)


def oracle_valid_filter(plane, window):
    patches = np.lib.stride_tricks.sliding_window_view(plane, window.shape)
    return np.einsum("ijkl,kl->ij", patches, window)


def oracle_y_channel(bgr):
    """Y on the 0-255 scale, rounded through float32 exactly where BasicSR rounds; other channel counts
    pass through float32 unchanged."""
    unit = bgr.astype(np.float32) / np.float32(255)
    if bgr.shape[2] != 3:
        return unit * np.float32(255)
    blue, green, red = (unit[..., c].astype(np.float64) for c in range(3))
    y = 16 + 24.966 * blue + 128.553 * green + 65.481 * red
    return ((y / 255).astype(np.float32) * np.float32(255))[..., None]


def oracle_prepare(img, crop, y):
    if crop:
        img = img[crop:-crop, crop:-crop]
    return (oracle_y_channel(img) if y else img).astype(np.float64)


def oracle_psnr(img, img2, crop, y):
    a, b = oracle_prepare(img, crop, y), oracle_prepare(img2, crop, y)
    mse = np.mean((a - b) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def oracle_ssim(img, img2, crop, y):
    a, b = oracle_prepare(img, crop, y), oracle_prepare(img2, crop, y)
    window = oracle_gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for channel in range(a.shape[2]):
        x, z = a[..., channel], b[..., channel]
        mx, mz = oracle_valid_filter(x, window), oracle_valid_filter(z, window)
        vx = oracle_valid_filter(x * x, window) - mx * mx
        vz = oracle_valid_filter(z * z, window) - mz * mz
        cov = oracle_valid_filter(x * z, window) - mx * mz
        scores.append(np.mean((2 * mx * mz + c1) * (2 * cov + c2) / ((mx ** 2 + mz ** 2 + c1) * (vx + vz + c2))))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------------------
# Hand-computable values

@pytest.mark.parametrize("y", [False, True])
def test_identical_images_give_infinite_psnr_and_unit_ssim(y):
    img = random_image(0)
    assert calculate_psnr(img, img.copy(), 0, test_y_channel=y) == math.inf
    assert calculate_ssim(img, img.copy(), 0, test_y_channel=y) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("offset", [1, 3, 10, 100])
def test_constant_offset_gives_the_closed_form_psnr(offset):
    img = np.random.default_rng(1).integers(0, 256 - offset, (20, 18, 3), dtype=np.uint8)
    shifted = img + np.uint8(offset)
    # Both directions: a uint8 difference taken before the float64 cast would wrap around.
    expected = 10 * math.log10(255 ** 2 / offset ** 2)
    assert calculate_psnr(img, shifted, 0) == pytest.approx(expected, rel=1e-15)
    assert calculate_psnr(shifted, img, 0) == pytest.approx(expected, rel=1e-15)


def test_uint8_and_float_inputs_agree():
    img, img2 = random_image(2), random_image(3)
    assert calculate_psnr(img, img2, 2) == calculate_psnr(img.astype(np.float32), img2.astype(np.float64), 2)
    assert calculate_ssim(img, img2, 2) == pytest.approx(calculate_ssim(img.astype(np.float64), img2, 2), abs=1e-12)


def test_ssim_of_flat_images_is_the_luminance_term():
    a, b = 100.0, 140.0
    c1 = (0.01 * 255) ** 2
    img, img2 = np.full((16, 16, 1), a), np.full((16, 16, 1), b)
    # No variance, so the contrast-structure factor is (C2 / C2) and only the luminance term is left.
    assert calculate_ssim(img, img2, 0) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)


def test_crop_border_removes_exactly_that_many_pixels_from_each_edge():
    img = random_image(4, (20, 20, 3))
    ring = np.ones((20, 20), dtype=bool)
    ring[2:-2, 2:-2] = False
    border_only = img.copy()
    border_only[ring] ^= 1
    assert calculate_psnr(img, border_only, 2) == math.inf
    assert calculate_ssim(img, border_only, 2) == pytest.approx(1.0, abs=1e-12)
    # A 2-pixel ring differs by 1; crop 1 keeps its inner half: 18*18 - 16*16 = 68 of 324 pixels differ.
    assert calculate_psnr(img, border_only, 1) == pytest.approx(10 * math.log10(255 ** 2 / (68 / 324)), rel=1e-14)
    assert calculate_psnr(img, border_only, 0) == pytest.approx(10 * math.log10(255 ** 2 / (144 / 400)), rel=1e-14)


def test_chw_and_hwc_give_the_same_values():
    img, img2 = random_image(5), random_image(6)
    chw, chw2 = img.transpose(2, 0, 1), img2.transpose(2, 0, 1)
    for metric in (calculate_psnr, calculate_ssim):
        for y in (False, True):
            assert metric(chw, chw2, 3, input_order="CHW", test_y_channel=y) == metric(
                img, img2, 3, input_order="HWC", test_y_channel=y)


def test_gray_images_may_be_two_dimensional():
    img, img2 = random_image(7, (20, 20)), random_image(8, (20, 20))
    assert calculate_psnr(img, img2, 1) == calculate_psnr(img[..., None], img2[..., None], 1)
    assert calculate_ssim(img, img2, 1) == calculate_ssim(img[..., None], img2[..., None], 1)


# ----------------------------------------------------------------------------------------------------------
# Y channel (BT.601 studio swing)

@pytest.mark.parametrize("bgr, expected_y", [
    (WHITE, 235.0), (BLACK, 16.0), (BLUE, 16 + 24.966), (RED, 16 + 65.481), ((0, 255, 0), 16 + 128.553)])
def test_y_channel_of_known_colours(bgr, expected_y):
    y = to_y_channel(solid(bgr))
    assert y.shape == (16, 16, 1) and y.dtype == np.float32
    np.testing.assert_allclose(y, expected_y, rtol=1e-6)


def test_y_channel_psnr_of_white_against_black_uses_the_219_level_range():
    # Y spans 16..235, so white vs black differ by 219 levels, not 255.
    assert calculate_psnr(solid(WHITE), solid(BLACK), 0, test_y_channel=True) == pytest.approx(
        10 * math.log10(255 ** 2 / 219 ** 2), abs=1e-5)
    assert calculate_psnr(solid(WHITE), solid(BLACK), 0) == pytest.approx(0.0, abs=1e-12)


def test_y_channel_ignores_chroma_only_differences():
    red = solid(RED)
    gray_level = 65.481 * 255 / 219  # the gray whose Y equals red's: 16 + 219 * level / 255 = 16 + 65.481
    same_luma_gray = np.full(red.shape, gray_level)
    assert calculate_psnr(red, same_luma_gray, 0, test_y_channel=True) > 100
    assert calculate_psnr(red, same_luma_gray, 0) < 10


def test_y_channel_of_gray_images_passes_through():
    img, img2 = random_image(9, (16, 16, 1)), random_image(10, (16, 16, 1))
    assert calculate_psnr(img, img2, 0, test_y_channel=True) == calculate_psnr(img, img2, 0)


def test_ycbcr_helpers_on_uint8_and_float():
    white, black = solid(WHITE, 2), solid(BLACK, 2)
    np.testing.assert_array_equal(bgr2ycbcr(white), np.full((2, 2, 3), [235, 128, 128]))
    np.testing.assert_array_equal(bgr2ycbcr(black), np.full((2, 2, 3), [16, 128, 128]))
    np.testing.assert_array_equal(bgr2ycbcr(white, y_only=True), np.full((2, 2), 235))
    assert bgr2ycbcr(white).dtype == np.uint8
    unit = white.astype(np.float32) / 255
    np.testing.assert_allclose(bgr2ycbcr(unit), np.full((2, 2, 3), [235 / 255, 128 / 255, 128 / 255]), rtol=1e-6)
    assert bgr2ycbcr(unit).dtype == np.float32 and bgr2ycbcr(unit.astype(np.float64)).dtype == np.float64
    # Saturated blue in BGR: maximum Cb; the same pixel read as RGB is saturated red: maximum Cr.
    np.testing.assert_array_equal(bgr2ycbcr(solid(BLUE, 1))[0, 0], [round(16 + 24.966), 240, 110])
    colourful = random_image(11, (5, 6, 3))
    np.testing.assert_array_equal(rgb2ycbcr(colourful[..., ::-1]), bgr2ycbcr(colourful))
    with pytest.raises(TypeError, match="uint8"):
        bgr2ycbcr(colourful.astype(np.int32))


# ----------------------------------------------------------------------------------------------------------
# Properties

def test_ssim_and_psnr_fall_as_noise_grows():
    rng = np.random.default_rng(12)
    img = rng.integers(40, 216, (32, 32, 3)).astype(np.float64)
    noise = rng.standard_normal(img.shape)
    noisy = [img + sigma * noise for sigma in (1, 4, 16, 64)]
    ssims = [calculate_ssim(img, other, 0) for other in noisy]
    psnrs = [calculate_psnr(img, other, 0) for other in noisy]
    assert all(a > b for a, b in zip(ssims, ssims[1:]))
    assert all(a > b for a, b in zip(psnrs, psnrs[1:]))


def test_anticorrelated_images_have_negative_ssim():
    img = random_image(13, (20, 20, 1)).astype(np.float64)
    assert -1 <= calculate_ssim(img, 255 - img, 0) < 0


def test_extra_options_are_ignored():
    img, img2 = random_image(14), random_image(15)
    assert calculate_psnr(img, img2, 0, better="higher") == calculate_psnr(img, img2, 0)
    assert calculate_ssim(img, img2, 0, better="higher") == calculate_ssim(img, img2, 0)


image_pairs = st.tuples(st.integers(11, 19), st.integers(11, 19), st.sampled_from([1, 3]),
                        st.integers(0, 2 ** 32 - 1)).map(
    lambda spec: (random_image(spec[3], spec[:3]), random_image(spec[3] + 1, spec[:3])))


@settings(max_examples=25, deadline=None)
@given(pair=image_pairs, y=st.booleans(), similar=st.booleans())
def test_metrics_match_the_oracle_and_are_symmetric(pair, y, similar):
    img, img2 = pair
    if similar:
        img2 = np.clip(img.astype(np.int16) + (img2.astype(np.int16) - 128) // 16, 0, 255).astype(np.uint8)
    psnr, ssim = calculate_psnr(img, img2, 0, test_y_channel=y), calculate_ssim(img, img2, 0, test_y_channel=y)
    assert psnr == pytest.approx(oracle_psnr(img, img2, 0, y), abs=1e-6)
    assert ssim == pytest.approx(oracle_ssim(img, img2, 0, y), abs=1e-6)
    assert -1 <= ssim <= 1
    assert calculate_psnr(img2, img, 0, test_y_channel=y) == psnr
    assert calculate_ssim(img2, img, 0, test_y_channel=y) == pytest.approx(ssim, abs=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), crop=st.integers(1, 4), y=st.booleans())
def test_cropped_metrics_match_the_oracle(seed, crop, y):
    img, img2 = random_image(seed, (27, 25, 3)), random_image(seed + 1, (27, 25, 3))
    assert calculate_psnr(img, img2, crop, test_y_channel=y) == pytest.approx(oracle_psnr(img, img2, crop, y),
                                                                              abs=1e-6)
    assert calculate_ssim(img, img2, crop, test_y_channel=y) == pytest.approx(oracle_ssim(img, img2, crop, y),
                                                                              abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Errors

@pytest.mark.parametrize("metric", [calculate_psnr, calculate_ssim])
def test_bad_arguments_raise_value_error(metric):
    img = random_image(16)
    with pytest.raises(ValueError, match="same shape"):
        metric(img, img[:-1], 0)
    with pytest.raises(ValueError, match="input_order"):
        metric(img, img, 0, input_order="NHWC")
    with pytest.raises(ValueError, match="crop_border"):
        metric(img, img, 10)
    with pytest.raises(ValueError, match="crop_border"):
        metric(img, img, -1)


def test_ssim_refuses_images_smaller_than_its_window():
    img = random_image(17, (14, 14, 3))
    with pytest.raises(ValueError, match="11x11"):
        calculate_ssim(img, img, 2)
    assert calculate_ssim(img, img, 1) == pytest.approx(1.0)
