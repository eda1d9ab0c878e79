"""rgt_fast.upscale on numpy and tensor images: layouts, tiling, ensembles, small and bad inputs."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import rgt_fast
from rgt_fast.inference import _dihedral, _reflect_to_minimum, _tile_starts, upscale


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = rgt_fast.create_model("RGT-S", 2, fused=False, depth=[2], num_heads=[6], embed_dim=48)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.double().eval()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_numpy_bgr_round_trip_matches_the_model_on_rgb_in_the_same_sample_type(model, dtype):
    top = np.iinfo(dtype).max
    image = np.random.default_rng(0).integers(0, top + 1, (23, 31, 3), dtype=dtype)
    out = upscale(model, image)
    assert out.shape == (46, 62, 3) and out.dtype == dtype
    rgb = torch.from_numpy(image[..., ::-1].astype(np.float64).transpose(2, 0, 1).copy())[None] / top
    with torch.no_grad():
        expected = model(rgb)[0].clamp(0, 1).permute(1, 2, 0).numpy()[..., ::-1]
    assert np.abs(out.astype(np.float64) - np.round(expected * top)).max() <= 1
    # Samples in the other byte order, as some TIFF readers return 16-bit data.
    np.testing.assert_array_equal(upscale(model, image.astype(image.dtype.newbyteorder(">"))), out)


def test_tensor_in_tensor_out(model):
    x = torch.rand(2, 3, 20, 24, dtype=torch.float64)
    torch.testing.assert_close(upscale(model, x), model(x).float())
    assert upscale(model, x[0]).shape == (3, 40, 48)


def test_small_images_are_reflect_padded_and_cropped(model):
    for size in ((5, 9), (1, 3), (15, 40)):
        out = upscale(model, torch.rand(3, *size, dtype=torch.float64))
        assert out.shape == (3, 2 * size[0], 2 * size[1])
        assert torch.isfinite(out).all()


def test_tiles_cover_the_image():
    assert _tile_starts(100, 40, 8) == [0, 32, 60]
    assert _tile_starts(30, 40, 8) == [0]


class LocalModel(torch.nn.Module):
    """A 3x3 conv + pixel shuffle: its output depends on a 1-pixel neighbourhood only."""

    upscale, in_chans = 2, 3

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 12, 3, padding=1).double()
        self.shuffle = torch.nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.conv(x))


def test_tiles_with_overlap_beyond_the_receptive_field_reproduce_a_local_model_exactly():
    model = LocalModel()
    x = torch.rand(2, 3, 50, 71, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x).float()
    torch.testing.assert_close(upscale(model, x, tile=24, tile_overlap=6), expected)


def test_tiled_rgt_output_differs_only_slightly_from_whole_image(model):
    """RG-SA attends over the whole image, so a tile sees other representative tokens: outputs differ."""
    x = torch.rand(1, 3, 48, 56, dtype=torch.float64)
    whole = upscale(model, x)
    tiled = upscale(model, x, tile=32, tile_overlap=8)
    assert tiled.shape == whole.shape
    assert not torch.equal(tiled, whole)
    assert ((tiled - whole).norm() / whole.norm()).item() < 0.1


def test_one_tile_covering_the_image_equals_whole_image(model):
    x = torch.rand(1, 3, 30, 20, dtype=torch.float64)
    torch.testing.assert_close(upscale(model, x, tile=32, tile_overlap=8), upscale(model, x))


class Recorded(torch.nn.Module):
    """``model``, noting the size of every input it is given."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.upscale, self.in_chans = model.upscale, model.in_chans
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.model(x)


class MemoryLimited(Recorded):
    """``model`` on a device that fails every forward pass over ``max_pixels`` pixels with ``message``."""

    def __init__(self, model, max_pixels: int, message: str):
        super().__init__(model)
        self.max_pixels, self.message = max_pixels, message

    def forward(self, x):
        if x.shape[-2] * x.shape[-1] > self.max_pixels:
            self.sizes.append(tuple(x.shape[-2:]))
            raise RuntimeError(self.message)
        return super().forward(x)


ALLOCATION_FAILURES = {
    "cuda": "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)",
    "cpu": "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 10000000000000 bytes. Error code 12 (Cannot allocate memory)",
}


@pytest.mark.parametrize("message", ALLOCATION_FAILURES.values(), ids=ALLOCATION_FAILURES.keys())
def test_whole_image_out_of_memory_is_retried_in_smaller_tiles(model, message):
    limited = MemoryLimited(model, 128 * 128, message)
    x = torch.rand(1, 3, 150, 140, dtype=torch.float64)
    out = upscale(limited, x)
    # Whole image, then 512 and 256 px tiles (each one tile covering the image), then 128 px tiles that fit.
    assert limited.sizes[:3] == [(150, 140)] * 3 and set(limited.sizes[3:]) == {(128, 128)}
    torch.testing.assert_close(out, upscale(model, x, tile=128, tile_overlap=32))


def test_fallback_tiles_cut_an_overlap_they_cannot_take(model):
    limited = MemoryLimited(model, 128 * 100, ALLOCATION_FAILURES["cuda"])
    x = torch.rand(1, 3, 130, 100, dtype=torch.float64)
    out = upscale(limited, x, tile_overlap=200)  # more than the 128 px tiles it ends up in
    assert torch.isfinite(out).all() and limited.sizes[-2:] == [(128, 100)] * 2
    torch.testing.assert_close(out, upscale(model, x, tile=128, tile_overlap=128 // 4))


def test_given_tiles_that_run_out_of_memory_get_an_error_that_says_what_to_do(model):
    limited = MemoryLimited(model, 20 * 20, ALLOCATION_FAILURES["cuda"])
    with pytest.raises(MemoryError, match="tiles of 32 px do not fit.*smaller tile.*dtype='bf16'"):
        upscale(limited, torch.rand(1, 3, 50, 40, dtype=torch.float64), tile=32, tile_overlap=8)
    assert limited.sizes == [(32, 32)]  # the size asked for is not second-guessed


def test_image_that_fits_in_no_tile_gets_an_error_that_says_what_to_do(model):
    limited = MemoryLimited(model, 100, ALLOCATION_FAILURES["cpu"])
    with pytest.raises(MemoryError, match="150x140 image does not fit.*dtype='bf16'.*smaller tile"):
        upscale(limited, torch.rand(1, 3, 150, 140, dtype=torch.float64))


def test_errors_other_than_memory_are_not_retried(model):
    limited = MemoryLimited(model, 100, "expected scalar type Float but found Double")
    with pytest.raises(RuntimeError, match="expected scalar type"):
        upscale(limited, torch.rand(1, 3, 150, 140, dtype=torch.float64))
    assert limited.sizes == [(150, 140)]


@pytest.mark.parametrize("size,tiles", [
    ((16, 1023), [(16, 1023)]),  # the longest 16 px high image the recursion rule reduces twice: it runs whole
    ((16, 1024), [(16, 1023)] * 2),  # reduced three times, its height would be nothing
    ((9, 1030), [(16, 1023)] * 2),  # reflect-padded to 16 px high first
    ((64, 4100), [(64, 4095)] * 2),
    ((4100, 64), [(4095, 64)] * 2),
    ((300, 310), [(300, 310)]),
])
def test_images_too_elongated_to_run_whole_go_in_the_largest_square_tiles_that_run(size, tiles):
    recorded = Recorded(LocalModel())
    x = torch.rand(1, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        expected = recorded.model(_reflect_to_minimum(x, 16))[..., :2 * size[0], :2 * size[1]].float()
    torch.testing.assert_close(upscale(recorded, x), expected)
    assert recorded.sizes == tiles


@pytest.mark.parametrize("tile,tiles", [(2048, [(16, 1023)] * 2), (1024, [(16, 1023)] * 2), (512, [(16, 512)] * 3)])
def test_a_given_tile_too_elongated_to_run_becomes_the_largest_tile_that_runs(tile, tiles):
    recorded = Recorded(LocalModel())
    x = torch.rand(1, 3, 16, 1100, dtype=torch.float64)
    with torch.no_grad():
        expected = recorded.model(x).float()
    torch.testing.assert_close(upscale(recorded, x, tile=tile, tile_overlap=32), expected)
    assert recorded.sizes == tiles


def test_an_rgt_upscales_an_image_it_cannot_run_whole(model):
    image = np.random.default_rng(7).integers(0, 256, (16, 1100, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="cannot reduce a 16x1100 map"):
        model(torch.rand(1, 3, 16, 1100, dtype=torch.float64))
    recorded = Recorded(model)
    out = upscale(recorded, image)
    assert out.shape == (32, 2200, 3) and recorded.sizes == [(16, 1023)] * 2
    assert out.max(axis=(0, 2)).min() > 0  # no black columns, where tiles would have left a gap


@pytest.mark.parametrize("k", range(8))
def test_dihedral_inverse(k):
    x = torch.rand(1, 3, 5, 7)
    assert torch.equal(_dihedral(_dihedral(x, k), k, inverse=True), x)


def test_self_ensemble_averages_eight_transforms(model):
    x = torch.rand(1, 3, 18, 22, dtype=torch.float64)
    expected = sum(_dihedral(model(_dihedral(x, k)), k, inverse=True) for k in range(8)) / 8
    torch.testing.assert_close(upscale(model, x, self_ensemble=True), expected.float())


def test_bf16_autocast_stays_close(model):
    net = rgt_fast.create_model("RGT-S", 2, fused=False, depth=[2], num_heads=[6], embed_dim=48).eval()
    net.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 20, 20)
    drift = (upscale(net, x, dtype="bf16") - upscale(net, x)).abs().max()
    assert 0 < drift < 0.05


@pytest.mark.parametrize("bad,error,match", [
    (np.zeros((8, 8), np.uint8) + 3, ValueError, "HWC"),
    (np.full((8, 8, 4), 3, np.uint8), ValueError, "3-channel"),
    (np.ones((0, 8, 3), np.uint8), ValueError, "empty"),
    (np.full((8, 8, 3), np.nan, np.float32), ValueError, "NaN"),
    (np.full((8, 8, 3), 2, np.int32), TypeError, "unsupported image dtype"),
    (torch.rand(2, 20, 20), ValueError, "tensor"),
    ([1, 2, 3], TypeError, "numpy array or a torch tensor"),
    (np.random.default_rng(0).random((8, 8, 3), np.float32) * 255, ValueError, r"must lie in \[0, 1\]"),
    (torch.rand(3, 20, 20) * 255, ValueError, "divide 8-bit data by 255"),
    (torch.rand(3, 20, 20) - 0.75, ValueError, "from -0.7"),
    (torch.rand(0, 3, 20, 20), ValueError, "empty batch"),
])
def test_bad_inputs_get_clear_errors(model, bad, error, match):
    with pytest.raises(error, match=match):
        upscale(model, bad)


def test_a_grayscale_array_gets_advice_that_works_for_the_model(model):
    gray = np.random.default_rng(5).integers(0, 256, (18, 20), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"cv2\.cvtColor\(img, cv2\.COLOR_GRAY2BGR\)") as refused:
        upscale(model, gray)
    assert "None]" not in str(refused.value)
    assert upscale(model, cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)).shape == (36, 40, 3)

    gray_model = rgt_fast.create_model("RGT-S", 2, fused=False, in_chans=1, depth=[2], num_heads=[2], embed_dim=16)
    with pytest.raises(ValueError, match=r"1 channels.*pass a grayscale image as img\[\.\.\., None\]"):
        upscale(gray_model, gray)
    assert upscale(gray_model, gray[..., None]).shape == (36, 40, 1)


def test_float_values_a_little_outside_0_1_are_accepted(model):
    x = torch.rand(3, 20, 20, dtype=torch.float64) * 1.4 - 0.2  # as resampling or sharpening can overshoot
    assert upscale(model, x).shape == (3, 40, 40)


def test_bad_options_get_clear_errors(model):
    x = torch.rand(3, 20, 20, dtype=torch.float64)
    with pytest.raises(ValueError, match="tile must be at least 16"):
        upscale(model, x, tile=8)
    with pytest.raises(ValueError, match="tile_overlap"):
        upscale(model, x, tile=32, tile_overlap=32)
    with pytest.raises(ValueError, match="tile_overlap must be at least 0"):
        upscale(model, x, tile_overlap=-1)  # the tiles upscale falls back to would take it too
    with pytest.raises(ValueError, match="dtype"):
        upscale(model, x, dtype="int8")
