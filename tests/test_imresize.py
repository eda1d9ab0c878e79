"""MATLAB bicubic imresize: hand-derived values, exactness properties, and a per-pixel loop oracle."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rgt_fast.matlab_resize import contributions, cubic, imresize

SCALES = [1 / 4, 1 / 3, 1 / 2, 2, 3, 4]


def oracle_imresize_axis0(img, scale, antialiasing):
    """MATLAB's algorithm written pixel by pixel from its definition (1-based coordinates throughout)."""
    in_length = img.shape[0]
    out_length = math.ceil(in_length * scale)
    stretch = 1 / scale if scale < 1 and antialiasing else 1.0
    mirror = list(range(1, in_length + 1)) + list(range(in_length, 0, -1))
    out = np.zeros((out_length,) + img.shape[1:])
    for x in range(1, out_length + 1):
        centre = x / scale + 0.5 * (1 - 1 / scale)
        taps = [(index, cubic(np.float64((centre - index) / stretch)) / stretch)
                for index in range(math.floor(centre - 2 * stretch), math.ceil(centre + 2 * stretch) + 1)]
        total = sum(weight for _, weight in taps)
        for index, weight in taps:
            source = mirror[(index - 1) % len(mirror)] - 1
            out[x - 1] += weight / total * img[source]
    return out


def oracle_imresize(img, scale, antialiasing=True):
    rows = oracle_imresize_axis0(img, scale, antialiasing)
    return oracle_imresize_axis0(rows.swapaxes(0, 1), scale, antialiasing).swapaxes(0, 1)


# ----------------------------------------------------------------------------------------------------------
# Hand-derived values

def test_cubic_kernel_values():
    x = np.array([0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5])
    expected = [1, 0.8671875, 0.5625, 0.2265625, 0, -0.0703125, -0.0625, -0.0234375, 0, 0]
    np.testing.assert_array_equal(cubic(x), expected)
    np.testing.assert_array_equal(cubic(-x), expected)


def test_upscale_pixels_computed_by_hand():
    # x2 of [0, 1, 0, 0]. Output 1 sits at input 0.75 (1-based): taps at inputs -1, 0, 1, 2 with weights
    # cubic(1.75), cubic(0.75), cubic(0.25), cubic(1.25); the mirror maps input -1 to 2 and input 0 to 1, so
    # the value is cubic(1.75) + cubic(1.25). Output 2 sits at 1.25 and reads input 3 (value 1) with cubic(0.75).
    out = imresize(np.array([[0.0, 1.0, 0.0, 0.0]]), 2)
    assert out.shape == (2, 8)
    np.testing.assert_array_equal(out[:, :2], [[-0.09375, 0.2265625]] * 2)


def test_antialiased_downscale_pixel_computed_by_hand():
    # x1/2 of [0, 1, 0, 0]. Output 1 sits at input 1.5 with the kernel stretched to width 8: the weight of input
    # i is 0.5 * cubic((1.5 - i) / 2). Input 2 (value 1) is read directly (distance 0.5, weight 0.43359375) and
    # again as the mirror of input -1 (distance 2.5, weight -0.03515625).
    out = imresize(np.array([[0.0, 1.0, 0.0, 0.0]]), 1 / 2)
    assert out.shape == (1, 2)
    assert out[0, 0] == 0.43359375 - 0.03515625


def test_downscale_of_block_image_is_a_fixed_five_tap_filter():
    # At x1/2 every output is centred on a 2x2 block. The stretched kernel weighs the own block's pixels
    # (distances 0.5) 0.5 * cubic(0.25) each, the neighbouring blocks' (1.5, 2.5) 0.5 * (cubic(0.75) + cubic(1.25))
    # together and the next blocks' (3.5, 4.5) 0.5 * cubic(1.75): per block, in one dimension:
    block_taps = np.array([-0.01171875, 0.078125, 0.8671875, 0.078125, -0.01171875])
    blocks = np.random.default_rng(0).random((12, 10))
    expected = np.apply_along_axis(np.convolve, 0, blocks, block_taps, mode="valid")
    expected = np.apply_along_axis(np.convolve, 1, expected, block_taps, mode="valid")
    out = imresize(np.kron(blocks, np.ones((2, 2))), 1 / 2)
    assert out.shape == blocks.shape
    np.testing.assert_allclose(out[2:-2, 2:-2], expected, rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------
# Exactness properties

@pytest.mark.parametrize("scale", SCALES + [0.37, 1.5])
@pytest.mark.parametrize("antialiasing", [True, False])
def test_constant_image_stays_constant(scale, antialiasing):
    out = imresize(np.full((13, 17, 3), 0.7), scale, antialiasing)
    np.testing.assert_allclose(out, 0.7, rtol=0, atol=1e-14)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("size", [(16, 16), (17, 23), (1, 5), (5, 1), (2040 // 8, 1356 // 8)])
def test_output_size_is_the_ceiling_of_input_times_scale(scale, size):
    out = imresize(np.zeros(size + (3,)), scale)
    assert out.shape == (math.ceil(size[0] * scale), math.ceil(size[1] * scale), 3)
    assert imresize(np.zeros(size), scale).shape == out.shape[:2]


def test_scale_one_returns_the_image_unchanged():
    img = np.random.default_rng(1).random((9, 11, 3))
    np.testing.assert_array_equal(imresize(img, 1), img)


def ramp(shape, scale=None):
    """a*row + b*col + c at 1-based pixel centres; with ``scale``, the ramp sampled at the output's centres."""
    rows, cols = (np.arange(1, n + 1, dtype=np.float64) for n in shape)
    if scale is not None:
        rows, cols = (positions / scale + 0.5 * (1 - 1 / scale) for positions in (rows, cols))
    return 0.3 * rows[:, None] - 0.2 * cols[None, :] + 5


@pytest.mark.parametrize("scale", SCALES)
def test_linear_ramps_are_reproduced_away_from_the_borders(scale):
    in_shape = (40, 48)
    out = imresize(ramp(in_shape), scale)
    expected = ramp(out.shape, scale)
    # Outputs whose kernel reaches past the edge read the mirror image, which bends the ramp. The kernel spans
    # 2 input pixels either side (2 * scale outputs) when upscaling and 2 outputs when downscaling.
    margin = math.ceil(2 * scale) + 1 if scale > 1 else 2
    interior = (slice(margin, -margin), slice(margin, -margin))
    np.testing.assert_allclose(out[interior], expected[interior], rtol=0, atol=1e-12)
    assert not np.allclose(out[0], expected[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [2, 3, 4, 1.7])
def test_upscaling_reproduces_quadratics(scale):
    # Among the cubic kernels only a = -0.5 is exact on quadratics, so this pins MATLAB's kernel (OpenCV's
    # a = -0.75 fails it).
    positions = np.arange(1, 31, dtype=np.float64)
    out = imresize((positions ** 2)[:, None], scale)[:, 0]
    centres = np.arange(1, len(out) + 1) / scale + 0.5 * (1 - 1 / scale)
    inside = (centres > 3) & (centres < 28)
    np.testing.assert_allclose(out[inside], centres[inside] ** 2, rtol=1e-13)


@pytest.mark.parametrize("scale", SCALES + [0.37, 0.05, 1.5])
@pytest.mark.parametrize("antialiasing", [True, False])
@pytest.mark.parametrize("in_length", [1, 2, 7, 64])
def test_weights_sum_to_one_and_indices_stay_inside(scale, antialiasing, in_length):
    out_length = math.ceil(in_length * scale)
    indices, weights = contributions(in_length, out_length, scale, antialiasing)
    assert indices.shape == weights.shape and indices.shape[0] == out_length
    np.testing.assert_allclose(weights.sum(axis=1), 1, rtol=0, atol=1e-14)
    assert indices.min() >= 0 and indices.max() < in_length


def test_antialiasing_widens_the_kernel_only_when_downscaling():
    narrow = contributions(64, 16, 1 / 4, antialiasing=False)[1].shape[1]
    wide = contributions(64, 16, 1 / 4, antialiasing=True)[1].shape[1]
    assert (narrow, wide) == (4, 16)
    assert contributions(16, 64, 4, antialiasing=True)[1].shape[1] == 4


def test_float32_in_float32_out_and_close_to_float64():
    img = np.random.default_rng(2).random((15, 14, 3))
    out32 = imresize(img.astype(np.float32), 1 / 3)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, imresize(img, 1 / 3), rtol=0, atol=1e-6)
    assert imresize(img, 1 / 3).dtype == np.float64


# ----------------------------------------------------------------------------------------------------------
# Random sizes against the oracle

@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 14), width=st.integers(1, 14), channels=st.sampled_from([None, 1, 3]),
       scale=st.one_of(st.sampled_from(SCALES), st.floats(0.1, 4.0)), antialiasing=st.booleans(),
       seed=st.integers(0, 2 ** 32 - 1))
def test_random_sizes_match_the_oracle_and_stay_within_the_overshoot(height, width, channels, scale, antialiasing,
                                                                     seed):
    shape = (height, width) if channels is None else (height, width, channels)
    img = np.random.default_rng(seed).uniform(-1, 3, shape)
    out = imresize(img, scale, antialiasing)
    assert out.shape == (math.ceil(height * scale), math.ceil(width * scale)) + shape[2:]
    np.testing.assert_allclose(out, oracle_imresize(img, scale, antialiasing), rtol=0, atol=1e-12)
    # The negative lobes of the a = -0.5 cubic add up to at most 1/8 per axis, wherever the output falls; two
    # axes compound that to (1 + 1/4)^2 - 1 of the input range at worst.
    spread = img.max() - img.min()
    overshoot = ((1 + 2 / 8) ** 2 - 1) / 2 * spread + 1e-12
    assert img.min() - overshoot <= out.min() and out.max() <= img.max() + overshoot


# ----------------------------------------------------------------------------------------------------------
# Errors

@pytest.mark.parametrize("dtype", [np.uint8, np.int32, bool])
def test_integer_images_are_refused_with_a_hint(dtype):
    with pytest.raises(TypeError, match="float"):
        imresize(np.zeros((4, 4, 3), dtype=dtype), 1 / 2)


def test_a_tensor_is_refused_rather_than_read_as_an_image_c_px_high():
    with pytest.raises(TypeError, match=r"numpy \(H, W\) or \(H, W, C\) array, got Tensor.*permute\(1, 2, 0\)"):
        imresize(torch.rand(3, 8, 8, dtype=torch.float64), 1 / 2)


@pytest.mark.parametrize("scale", [0, -2, math.inf, math.nan])
def test_bad_scales_are_refused(scale):
    with pytest.raises(ValueError, match="scale"):
        imresize(np.zeros((4, 4)), scale)


@pytest.mark.parametrize("shape", [(4,), (2, 4, 4, 3), (0, 4)])
def test_bad_shapes_are_refused(shape):
    with pytest.raises(ValueError):
        imresize(np.zeros(shape), 2)
