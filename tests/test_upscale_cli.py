import os
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch

import rgt_fast
from rgt_fast import upscale_cli
from rgt_fast.kernels import _common
from rgt_fast.cli import main

TINY = dict(depth=[2], num_heads=[2], embed_dim=16)
HEIGHT, WIDTH = 20, 24


def _save_tiny_weights(path, scale):
    torch.manual_seed(scale)
    rgt_fast.save_state_dict(rgt_fast.create_model("RGT-S", scale, fused=False, **TINY).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights_x2(tmp_path_factory):
    return _save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny_x2.pth", 2)


@pytest.fixture(scope="module")
def model_x2(weights_x2):
    return rgt_fast.load_model(weights_x2, backend="torch")


def _random_image(shape, dtype=np.uint8, seed=0):
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, size=shape, endpoint=True, dtype=dtype)


def _write(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def _upscale(weights, *arguments):
    return main(["upscale", *map(str, arguments), "--weights", str(weights), "--backend", "torch"])


def _exif_orientation(value):
    """EXIF data (a big-endian TIFF structure) holding one tag: Orientation (0x0112), a SHORT."""
    return b"MM\x00\x2a" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, value, 0) + bytes(4)


def _jpeg_with_orientation(image, value):
    encoded = cv2.imencode(".jpg", image)[1].tobytes()
    exif = b"Exif\x00\x00" + _exif_orientation(value)
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    return encoded[:2] + app1 + encoded[2:]  # right after the start-of-image marker


def _png_with_orientation(image, value):
    encoded = cv2.imencode(".png", image)[1].tobytes()
    exif = _exif_orientation(value)
    chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif))
    return encoded[:33] + chunk + encoded[33:]  # after the signature (8 bytes) and the IHDR chunk (25)


class OutOfMemoryAbove(torch.nn.Module):
    """``model`` on a device that runs out of memory on inputs of over ``max_pixels`` pixels."""

    def __init__(self, model, max_pixels):
        super().__init__()
        self.model, self.max_pixels = model, max_pixels
        self.upscale, self.in_chans = model.upscale, model.in_chans

    def forward(self, x):
        if x.shape[-2] * x.shape[-1] > self.max_pixels:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)")
        return self.model(x)


def test_a_file_is_written_as_the_library_upscales_it(tmp_path, weights_x2, model_x2, capsys):
    image = _random_image((HEIGHT, WIDTH, 3))
    source = _write(tmp_path / "in" / "photo.jpg", image)
    out = tmp_path / "new" / "out"

    assert _upscale(weights_x2, source, "-o", out) == 0

    assert os.listdir(out) == ["photo.png"]  # no temporary file left beside it
    plain_file = tmp_path / "plain"
    plain_file.write_bytes(b"")
    assert (out / "photo.png").stat().st_mode == plain_file.stat().st_mode  # the umask's mode, not a temp file's
    written = cv2.imread(str(out / "photo.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(written, rgt_fast.upscale(model_x2, cv2.imread(str(source), cv2.IMREAD_UNCHANGED)))
    assert "1 written, 0 failed" in capsys.readouterr().out


def test_a_folder_keeps_each_image_layout_and_bit_depth(tmp_path, weights_x2, model_x2):
    folder = tmp_path / "in"
    colour = _write(folder / "b_colour.PNG", _random_image((HEIGHT, WIDTH, 3)))
    gray = _write(folder / "a_gray.png", _random_image((HEIGHT, WIDTH), seed=1))
    deep = _write(folder / "c_deep.png", _random_image((HEIGHT, WIDTH, 3), np.uint16, seed=2))
    bgra = _write(folder / "d_bgra.png", _random_image((HEIGHT, WIDTH, 4), seed=3))
    (folder / "notes.txt").write_text("not an image")
    (folder / "nested").mkdir()
    _write(folder / "nested" / "e_inner.png", _random_image((HEIGHT, WIDTH, 3)))

    assert _upscale(weights_x2, folder, colour, "-o", tmp_path / "out") == 0  # colour named twice: upscaled once

    assert sorted(os.listdir(tmp_path / "out")) == ["a_gray.png", "b_colour.png", "c_deep.png", "d_bgra.png"]
    outputs = {p.stem: cv2.imread(str(tmp_path / "out" / f"{p.stem}.png"), cv2.IMREAD_UNCHANGED)
               for p in (colour, gray, deep, bgra)}
    size = (2 * HEIGHT, 2 * WIDTH)
    assert outputs["b_colour"].shape == (*size, 3) and outputs["b_colour"].dtype == np.uint8
    assert outputs["a_gray"].shape == size and outputs["a_gray"].dtype == np.uint8
    assert outputs["c_deep"].shape == (*size, 3) and outputs["c_deep"].dtype == np.uint16
    assert outputs["d_bgra"].shape == (*size, 4) and outputs["d_bgra"].dtype == np.uint8

    deep_image = cv2.imread(str(deep), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(outputs["c_deep"], rgt_fast.upscale(model_x2, deep_image))
    gray_image = cv2.imread(str(gray), cv2.IMREAD_UNCHANGED)
    expected_gray = cv2.cvtColor(rgt_fast.upscale(model_x2, cv2.cvtColor(gray_image, cv2.COLOR_GRAY2BGR)),
                                 cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(outputs["a_gray"], expected_gray)
    bgra_image = cv2.imread(str(bgra), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(outputs["d_bgra"][..., :3],
                                  rgt_fast.upscale(model_x2, np.ascontiguousarray(bgra_image[..., :3])))
    np.testing.assert_array_equal(outputs["d_bgra"][..., 3],
                                  cv2.resize(bgra_image[..., 3], size[::-1], interpolation=cv2.INTER_CUBIC))


def test_a_corrupt_file_is_reported_by_name_and_the_others_are_written(tmp_path, weights_x2, capsys):
    folder = tmp_path / "in"
    _write(folder / "good.png", _random_image((HEIGHT, WIDTH, 3)))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")

    assert _upscale(weights_x2, folder, "-o", tmp_path / "out") == 1

    captured = capsys.readouterr()
    assert f"rgt-fast upscale: {folder / 'broken.png'}: cannot be decoded" in captured.err  # its name, once
    assert captured.err.count("broken.png") == 1 and "good.png" not in captured.err
    assert os.listdir(tmp_path / "out") == ["good.png"]
    assert "1 written, 1 failed" in captured.out


def test_a_jpeg_is_turned_as_its_exif_orientation_says(tmp_path, weights_x2, model_x2):
    source = tmp_path / "in" / "portrait.jpg"
    source.parent.mkdir()
    source.write_bytes(_jpeg_with_orientation(_random_image((HEIGHT, WIDTH, 3), seed=4), 6))  # 6: 90 deg clockwise

    assert _upscale(weights_x2, source, "-o", tmp_path / "out") == 0

    as_stored = cv2.imread(str(source), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    written = cv2.imread(str(tmp_path / "out" / "portrait.png"), cv2.IMREAD_UNCHANGED)
    assert written.shape == (2 * WIDTH, 2 * HEIGHT, 3)
    np.testing.assert_array_equal(written, rgt_fast.upscale(model_x2, np.rot90(as_stored, -1)))


def test_an_alpha_plane_is_turned_with_the_colour(tmp_path, weights_x2, model_x2):
    bgra = _random_image((HEIGHT, WIDTH, 4), seed=5)
    source = tmp_path / "in" / "sticker.png"
    source.parent.mkdir()
    source.write_bytes(_png_with_orientation(bgra, 8))  # 8: 90 degrees anticlockwise

    assert _upscale(weights_x2, source, "-o", tmp_path / "out") == 0

    # OpenCV 5 applies a PNG's orientation, older versions only a JPEG's: the alpha must follow the colour either way.
    colour_turned = cv2.imread(str(source), cv2.IMREAD_COLOR).shape[:2] != bgra.shape[:2]
    turned = np.ascontiguousarray(np.rot90(bgra, 1) if colour_turned else bgra)
    size = (2 * turned.shape[0], 2 * turned.shape[1])
    written = cv2.imread(str(tmp_path / "out" / "sticker.png"), cv2.IMREAD_UNCHANGED)
    assert written.shape == (*size, 4)
    np.testing.assert_array_equal(written[..., :3], rgt_fast.upscale(model_x2, np.ascontiguousarray(turned[..., :3])))
    np.testing.assert_array_equal(written[..., 3],
                                  cv2.resize(turned[..., 3], size[::-1], interpolation=cv2.INTER_CUBIC))


def test_an_image_whose_tiles_run_out_of_memory_is_reported_and_the_others_are_written(tmp_path, weights_x2,
                                                                                      monkeypatch, capsys):
    monkeypatch.setattr(upscale_cli, "load_model",
                        lambda *args, **kwargs: OutOfMemoryAbove(rgt_fast.load_model(*args, **kwargs), 24 * 24))
    folder = tmp_path / "in"
    _write(folder / "a_large.png", _random_image((40, 48, 3), seed=6))  # 32 px tiles: 1024 px each
    _write(folder / "b_small.png", _random_image((HEIGHT, WIDTH, 3), seed=7))  # one tile of 480 px

    assert _upscale(weights_x2, folder, "-o", tmp_path / "out", "--tile", 32, "--tile-overlap", 8) == 1

    captured = capsys.readouterr()
    assert (f"{folder / 'a_large.png'}: tiles of 32 px do not fit in memory; pass a smaller tile (at least 16 px), "
            f"use a 16-bit dtype (dtype='bf16'), or free memory") in captured.err
    assert os.listdir(tmp_path / "out") == ["b_small.png"]
    assert "1 written, 1 failed" in captured.out


def test_a_negative_tile_overlap_is_refused_before_any_work(tmp_path, weights_x2, capsys):
    source = _write(tmp_path / "in" / "photo.png", _random_image((HEIGHT, WIDTH, 3)))

    assert _upscale(weights_x2, source, "-o", tmp_path / "out", "--tile-overlap", -1) == 2

    assert "--tile-overlap must be at least 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_triton_backend_without_a_gpu_is_refused_before_any_work(tmp_path, weights_x2, monkeypatch, capsys):
    monkeypatch.setattr(_common, "INTERPRET", False)  # as outside the test suite's interpreter runs
    source = _write(tmp_path / "in" / "photo.png", _random_image((HEIGHT, WIDTH, 3)))

    code = main(["upscale", str(source), "-o", str(tmp_path / "out"), "--weights", str(weights_x2),
                 "--backend", "triton", "--device", "cpu"])

    assert code == 2
    assert "--backend triton runs on CUDA devices, not on cpu; use --backend auto or torch" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_path_that_is_a_file_is_refused_before_any_work(tmp_path, weights_x2, capsys):
    source = _write(tmp_path / "in" / "photo.png", _random_image((HEIGHT, WIDTH, 3)))
    (tmp_path / "notes.txt").write_text("not a folder")

    assert _upscale(weights_x2, source, "-o", tmp_path / "notes.txt") == 2
    assert "is a file; pass a folder" in capsys.readouterr().err


def test_an_image_the_model_fails_on_is_reported_and_the_others_are_written(tmp_path, weights_x2, monkeypatch,
                                                                           capsys):
    def fails_on_wide_images(*args, **kwargs):
        model = rgt_fast.load_model(*args, **kwargs)
        forward = model.forward

        def checked(x):
            if x.shape[-1] > x.shape[-2]:
                raise RuntimeError("a PyTorch error on this image only")
            return forward(x)
        model.forward = checked
        return model

    monkeypatch.setattr(upscale_cli, "load_model", fails_on_wide_images)
    folder = tmp_path / "in"
    _write(folder / "a_wide.png", _random_image((HEIGHT, WIDTH, 3), seed=8))
    _write(folder / "b_tall.png", _random_image((WIDTH, HEIGHT, 3), seed=9))

    assert _upscale(weights_x2, folder, "-o", tmp_path / "out") == 1

    captured = capsys.readouterr()
    assert f"{folder / 'a_wide.png'}: a PyTorch error on this image only" in captured.err
    assert os.listdir(tmp_path / "out") == ["b_tall.png"]


def test_an_existing_output_is_kept_unless_overwrite_is_given(tmp_path, weights_x2, capsys):
    source = _write(tmp_path / "in" / "photo.png", _random_image((HEIGHT, WIDTH, 3)))
    existing = tmp_path / "out" / "photo.png"
    existing.parent.mkdir()
    existing.write_bytes(b"keep me")

    assert _upscale(weights_x2, source, "-o", existing.parent) == 1
    assert existing.read_bytes() == b"keep me"
    assert "--overwrite" in capsys.readouterr().err

    assert _upscale(weights_x2, source, "-o", existing.parent, "--overwrite") == 0
    assert cv2.imread(str(existing)).shape == (2 * HEIGHT, 2 * WIDTH, 3)


def test_writing_into_an_input_folder_needs_allow_input_dir(tmp_path, weights_x2, capsys):
    folder = tmp_path / "in"
    _write(folder / "photo.jpg", _random_image((HEIGHT, WIDTH, 3)))

    assert _upscale(weights_x2, folder, "-o", tmp_path / "elsewhere" / ".." / "in") == 2
    assert "--allow-input-dir" in capsys.readouterr().err
    assert os.listdir(folder) == ["photo.jpg"]

    assert _upscale(weights_x2, folder / "photo.jpg", "-o", folder, "--allow-input-dir") == 0
    assert sorted(os.listdir(folder)) == ["photo.jpg", "photo.png"]


def test_weights_of_another_scale_are_refused_before_any_work(tmp_path, capsys):
    weights_x4 = _save_tiny_weights(tmp_path / "tiny_x4.pth", 4)
    source = _write(tmp_path / "in" / "photo.png", _random_image((HEIGHT, WIDTH, 3)))

    assert _upscale(weights_x4, source, "-o", tmp_path / "out", "--scale", "2") == 2

    assert f"weights in {weights_x4} are a x4 model, but --scale 2 was asked" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_inputs_sharing_a_name_are_refused_before_any_work(tmp_path, weights_x2, capsys):
    first = _write(tmp_path / "a" / "photo.png", _random_image((HEIGHT, WIDTH, 3)))
    second = _write(tmp_path / "b" / "photo.jpg", _random_image((HEIGHT, WIDTH, 3)))

    assert _upscale(weights_x2, first, second, "-o", tmp_path / "out") == 2

    err = capsys.readouterr().err
    assert str(first) in err and str(second) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scale_args,scale", [([], 4), (["--scale", "2"], 2)])
def test_without_weights_the_built_in_demo_model_is_used(tmp_path, capsys, scale_args, scale):
    source = _write(tmp_path / "photo.png", _random_image((HEIGHT, WIDTH, 3)))

    assert main(["upscale", str(source), "-o", str(tmp_path / "out"), "--backend", "torch", *scale_args]) == 0

    assert cv2.imread(str(tmp_path / "out" / "photo.png")).shape == (HEIGHT * scale, WIDTH * scale, 3)
    assert capsys.readouterr().err.count("using the built-in demo model") == 1


def test_a_scale_without_a_built_in_model_asks_for_weights(tmp_path, capsys):
    source = _write(tmp_path / "photo.png", _random_image((HEIGHT, WIDTH, 3)))

    assert main(["upscale", str(source), "-o", str(tmp_path / "out"), "--scale", "3"]) == 2

    assert "no built-in demo model for x3 (built in: x2, x4)" in capsys.readouterr().err
