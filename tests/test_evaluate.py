"""``rgt-fast eval`` / train/evaluate.py: scores, outputs and failures on tiny generated benchmark sets."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import rgt_fast
from rgt_fast.cli import main
from rgt_fast.inference import upscale_in_parts
from rgt_fast.metrics import calculate_psnr, calculate_ssim
from rgt_fast.training import evaluate
from test_data import write_benchmark_set

REPO = Path(__file__).resolve().parents[1]


# Tiny models: extra threads only add contention on shared cores, and one thread makes CPU reductions
# bitwise reproducible, which the resume checks need.
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """x2 weights of a small RGT and two benchmark sets in the HR/ + LR_bicubic/X2 layout."""
    torch.manual_seed(0)
    model = rgt_fast.create_model("RGT-S", 2, depth=[2], num_heads=[2], embed_dim=48)
    weights = tmp_path / "tiny_x2.pth"
    rgt_fast.save_state_dict(model.state_dict(), weights)
    write_benchmark_set(tmp_path / "SetA", 2, [(32, 36), (34, 40), (40, 32)], seed=1)
    write_benchmark_set(tmp_path / "SetB", 2, [(36, 36)], seed=2)
    monkeypatch.chdir(tmp_path)
    return tmp_path, weights


def expected_scores(weights: Path, folder: Path, lr_name: str, hr_name: str) -> tuple[float, float, np.ndarray]:
    model = rgt_fast.load_model(weights)
    lq = cv2.imread(str(folder / "LR_bicubic" / "X2" / lr_name))
    gt = cv2.imread(str(folder / "HR" / hr_name))
    sr = rgt_fast.upscale(model, lq)
    return (calculate_psnr(sr, gt, 2, test_y_channel=True), calculate_ssim(sr, gt, 2, test_y_channel=True), sr)


def test_flags_mode_scores_every_image_and_writes_every_output(bench, capsys):
    root, weights = bench
    code = main(["eval", "--weights", str(weights), "--data", str(root / "SetA"), str(root / "SetB"), "--scale", "2",
                 "--json", "out/scores.json", "--csv", "out/scores.csv", "--out", "sr"])
    assert code == 0
    assert "SetA" in capsys.readouterr().out
    report = json.loads(Path("out/scores.json").read_text())
    assert report["scale"] == 2 and [s["name"] for s in report["sets"]] == ["SetA", "SetB"]
    set_a = report["sets"][0]
    assert [image["name"] for image in set_a["images"]] == ["img00x2", "img01x2", "img02x2"] and not set_a["failed"]
    psnr, ssim, sr = expected_scores(weights, root / "SetA", "img01x2.png", "img01.png")
    assert set_a["images"][1]["psnr"] == pytest.approx(psnr, abs=1e-9)
    assert set_a["images"][1]["ssim"] == pytest.approx(ssim, abs=1e-9)
    assert set_a["average"]["psnr"] == pytest.approx(np.mean([i["psnr"] for i in set_a["images"]]))
    np.testing.assert_array_equal(cv2.imread("sr/SetA/img01x2_RGT.png"), sr)
    rows = list(csv.DictReader(Path("out/scores.csv").open()))
    assert len(rows) == 3 + 1 + 1 + 1 and rows[3]["image"] == "(average)"
    assert float(rows[1]["psnr"]) == pytest.approx(psnr)


def test_an_exact_match_writes_strict_json(bench):
    """An SR image equal to its GT has an infinite PSNR, which json.dumps would write as Infinity."""
    root, weights = bench
    sr = rgt_fast.upscale(rgt_fast.load_model(weights), cv2.imread(str(root / "SetB/LR_bicubic/X2/img00x2.png")))
    cv2.imwrite(str(root / "SetB/HR/img00.png"), sr)

    assert main(["eval", "--weights", str(weights), "--data", str(root / "SetB"), "--scale", "2", "--json",
                 "scores.json"]) == 0

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    report = json.loads(Path("scores.json").read_text(), parse_constant=refuse)
    (image,) = report["sets"][0]["images"]
    assert image["psnr"] == "inf" and report["sets"][0]["average"]["psnr"] == "inf" and image["ssim"] == 1.0


def test_a_set_whose_lr_files_are_named_otherwise_is_refused_before_any_work(bench, capsys):
    root, weights = bench
    lr_folder = root / "SetB" / "LR_bicubic" / "X2"
    (lr_folder / "img00x2.png").rename(lr_folder / "img00_LRBI_x2.png")  # Manga109's naming

    assert main(["eval", "--weights", str(weights), "--data", str(root / "SetA"), str(root / "SetB"), "--scale",
                 "2", "--out", "sr"]) == 1

    error = capsys.readouterr().err
    assert "SetB: none of its LR files is named as --data expects (img00x2.png" in error
    assert "img00_LRBI_x2.png" in error and "filename_tmpl" in error
    assert not Path("sr").exists()


def test_weights_of_another_scale_are_an_error_naming_it(bench, capsys):
    root, weights = bench
    assert main(["eval", "--weights", str(weights), "--data", str(root / "SetA"), "--scale", "4"]) == 1
    assert "x2 model" in capsys.readouterr().err


def test_without_scale_the_weights_give_it(bench):
    root, weights = bench
    assert main(["eval", "--weights", str(weights), "--data", str(root / "SetA"), "--json", "scores.json"]) == 0
    report = json.loads(Path("scores.json").read_text())
    assert report["scale"] == 2 and len(report["sets"][0]["images"]) == 3


def test_a_corrupt_image_is_reported_and_the_rest_evaluated(bench):
    root, weights = bench
    (root / "SetA" / "LR_bicubic" / "X2" / "img01x2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code = main(["eval", "--weights", str(weights), "--data", str(root / "SetA"), "--data", str(root / "SetB"),
                 "--scale", "2", "--json", "scores.json", "--csv", "scores.csv"])
    assert code == 1
    set_a, set_b = json.loads(Path("scores.json").read_text())["sets"]
    assert [i["name"] for i in set_a["images"]] == ["img00x2", "img02x2"] and len(set_b["images"]) == 1
    assert set_a["failed"][0]["name"] == "img01x2" and "img01x2.png" in set_a["failed"][0]["error"]
    failed_rows = [r for r in csv.DictReader(Path("scores.csv").open()) if r["error"]]
    assert [r["image"] for r in failed_rows] == ["img01x2"]


@pytest.mark.parametrize("failure", [MemoryError("a 17x20 image does not fit in memory"),
                                     torch.OutOfMemoryError("CUDA out of memory")])
def test_an_image_that_does_not_fit_in_memory_is_reported_and_the_rest_scored(bench, monkeypatch, failure):
    root, weights = bench

    def upscale_within_memory(model, lq, **kwargs):
        if lq.shape[:2] == (17, 20):  # img01's LQ
            raise failure
        return rgt_fast.upscale(model, lq, **kwargs)

    monkeypatch.setattr(evaluate, "upscale", upscale_within_memory)
    assert main(["eval", "--weights", str(weights), "--data", str(root / "SetA"), "--scale", "2",
                 "--json", "scores.json"]) == 1
    (set_a,) = json.loads(Path("scores.json").read_text())["sets"]
    assert [image["name"] for image in set_a["images"]] == ["img00x2", "img02x2"]
    assert set_a["failed"] == [{"name": "img01x2", "error": str(failure)}]


def write_test_options(root: Path, weights: Path, **path_options) -> Path:
    """test_RGT_S_x2.yml for SetA and ``weights``, with use_chop."""
    options = yaml.safe_load((REPO / "train" / "options" / "test_RGT_S_x2.yml").read_text())
    options.update(name="test_tiny", datasets={
        "test_1": {"name": "SetA", "type": "PairedImageDataset", "dataroot_gt": str(root / "SetA" / "HR"),
                   "dataroot_lq": str(root / "SetA" / "LR_bicubic" / "X2"), "filename_tmpl": "{}x2",
                   "io_backend": {"type": "disk"}}})
    options["path"].update(pretrain_network_g=str(weights), **path_options)
    options["val"]["use_chop"] = True
    Path("test.yml").write_text(yaml.safe_dump(options))
    return Path("test.yml")


def test_a_test_option_file_loads_param_key_g_as_basicsr(bench):
    root, weights = bench
    params_ema = rgt_fast.create_model("RGT-S", 2, depth=[2], num_heads=[2], embed_dim=48).state_dict()
    rgt_fast.save_state_dict(params_ema, "ema_only.pth")
    torch.save({"params": rgt_fast.read_state_dict(weights), "params_ema": params_ema}, "both.pth")
    scores = {}
    for key in ("params", "params_ema"):
        assert main(["eval", "-opt", str(write_test_options(root, Path("both.pth"), param_key_g=key)),
                     "--json", f"{key}.json"]) == 0
        scores[key] = json.loads(Path(f"{key}.json").read_text())["sets"][0]["images"][0]["psnr"]
    assert scores["params"] == pytest.approx(expected_scores(weights, root / "SetA", "img00x2.png", "img00.png")[0],
                                             abs=1e-9)
    assert scores["params_ema"] == pytest.approx(
        expected_scores(Path("ema_only.pth"), root / "SetA", "img00x2.png", "img00.png")[0], abs=1e-9)
    assert scores["params"] != pytest.approx(scores["params_ema"], abs=1e-3)
    # Without param_key_g, 'params', as BasicSR's test.py loads.
    assert main(["eval", "-opt", str(write_test_options(root, Path("both.pth"))), "--json", "default.json"]) == 0
    assert json.loads(Path("default.json").read_text())["sets"][0]["images"][0]["psnr"] == scores["params"]


def test_a_test_option_file_runs_like_basicsr(bench):
    root, weights = bench
    write_test_options(root, weights)
    assert main(["eval", "-opt", "test.yml", "--json", "scores.json"]) == 0
    report = json.loads(Path("scores.json").read_text())
    psnr, _, sr = expected_scores(weights, root / "SetA", "img00x2.png", "img00.png")
    # SetA's images are under 200 px, which the authors' use_chop runs whole.
    assert report["use_chop"] and report["tile"] is None
    assert report["sets"][0]["images"][0]["psnr"] == pytest.approx(psnr, abs=1e-9)
    saved = Path("results/test_tiny/visualization/SetA/img00x2_test_tiny.png")
    np.testing.assert_array_equal(cv2.imread(str(saved)), sr)

    # A second run moves the first one's results aside, as BasicSR's test.py does.
    assert main(["eval", "-opt", "test.yml", "--force_yml", "val.suffix=again"]) == 0
    (archived,) = Path("results").glob("test_tiny_archived_*")
    assert (archived / "visualization" / "SetA" / "img00x2_test_tiny.png").is_file()
    assert sorted(p.name for p in saved.parent.iterdir()) == [f"img0{i}x2_again.png" for i in range(3)]


def test_option_file_and_data_flags_do_not_mix(bench, capsys):
    root, weights = bench
    assert main(["eval", "-opt", "x.yml", "--weights", str(weights)]) == 1
    assert "--weights cannot be combined with -opt" in capsys.readouterr().err
    assert main(["eval", "--weights", str(weights), "--data", str(root / "SetB"), "--scale", "2", "--tile", "16"]) == 1
    assert "--tile-overlap" in capsys.readouterr().err
    assert main(["eval", "--weights", str(weights), "--data", str(root / "SetB"), "--scale", "2", "--tile-overlap",
                 "-1", "--out", "sr"]) == 1
    assert "--tile-overlap must be at least 0, got -1" in capsys.readouterr().err
    assert not Path("sr").exists()


def test_entry_script_with_tiles_self_ensemble_and_bf16(bench):
    root, weights = bench
    result = subprocess.run(
        [sys.executable, str(REPO / "train" / "evaluate.py"), "--weights", str(weights), "--data", str(root / "SetB"),
         "--scale", "2", "--tile", "16", "--tile-overlap", "4", "--self-ensemble", "--dtype", "bf16",
         "--json", "scores.json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(Path("scores.json").read_text())
    assert report["tile"] == 16 and report["self_ensemble"] and report["dtype"] == "bf16"
    assert report["sets"][0]["average"]["psnr"] > 10


def tiny_x2_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return rgt_fast.create_model("RGT-S", 2, depth=[2], num_heads=[2], embed_dim=48).eval()


# (rows, columns) of the authors' use_chop parts, worked out by hand: (run from, run to, own from, own to) in LQ px.
# 40 x 230: 1 x 2 parts of 40 x 115, 16 px of context where they meet. 230 x 410: 2 x 3 parts; the width is
# mirrored to 411 (3 x 137), then cropped.
HAND_SPLITS = {
    (40, 230): ([(0, 40, 0, 40)], [(0, 131, 0, 115), (99, 230, 115, 230)]),
    (230, 410): ([(0, 131, 0, 115), (99, 230, 115, 230)],
                 [(0, 153, 0, 137), (121, 290, 137, 274), (258, 411, 274, 411)]),
}


@pytest.mark.parametrize("size", list(HAND_SPLITS))
def test_use_chop_places_each_part_output_as_the_authors_do(size):
    model = tiny_x2_model()
    height, width = size
    image = np.random.default_rng(3).random((height, width, 3), dtype=np.float32)
    row_parts, col_parts = HAND_SPLITS[size]
    padded_width = col_parts[-1][1]
    # numpy's 'symmetric' repeats the edge pixel, as the authors' flip-and-concatenate does.
    padded = np.pad(image, ((0, row_parts[-1][1] - height), (0, padded_width - width), (0, 0)), mode="symmetric")
    x = torch.from_numpy(padded.transpose(2, 0, 1).copy())[None]
    expected = torch.zeros(1, 3, row_parts[-1][1] * 2, padded_width * 2)
    with torch.no_grad():
        for run_top, run_bottom, top, bottom in row_parts:
            for run_left, run_right, left, right in col_parts:
                part = model(x[..., run_top:run_bottom, run_left:run_right])
                expected[..., top * 2:bottom * 2, left * 2:right * 2] = part[
                    ..., (top - run_top) * 2:(bottom - run_top) * 2, (left - run_left) * 2:(right - run_left) * 2]
    result = upscale_in_parts(model, torch.from_numpy(image.transpose(2, 0, 1).copy())[None])
    torch.testing.assert_close(result, expected[..., :height * 2, :width * 2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("size, options", [((50, 70), {}), ((13, 199), {}),
                                           ((40, 30), {"self_ensemble": True, "dtype": "bf16"})])
def test_use_chop_runs_an_image_under_200_px_whole(size, options):
    model = tiny_x2_model()
    image = np.random.default_rng(4).integers(0, 256, (*size, 3), dtype=np.uint8)
    np.testing.assert_array_equal(upscale_in_parts(model, image, **options), rgt_fast.upscale(model, image, **options))


DEMO_WEIGHTS = REPO / "rgt_fast" / "weights" / "demo_RGT_x2.safetensors"


def write_single_image_options(lq_folder: Path, **val_options) -> Path:
    """The authors' test_single_x2.yml, with the demo weights and ``lq_folder``."""
    options = {
        "name": "test_single_x2", "model_type": "RGTModel", "scale": 2, "num_gpu": 1, "manual_seed": 10,
        "datasets": {"test_1": {"name": "Single", "type": "SingleImageDataset", "dataroot_lq": str(lq_folder),
                                "io_backend": {"type": "disk"}}},
        "network_g": {"type": "RGT", "upscale": 2, "in_chans": 3, "img_size": 64, "img_range": 1.0,
                      "depth": [6] * 8, "embed_dim": 180, "num_heads": [6] * 8, "mlp_ratio": 2,
                      "resi_connection": "1conv", "split_size": [8, 32], "c_ratio": 0.5},
        "path": {"pretrain_network_g": str(DEMO_WEIGHTS), "strict_load_g": True},
        "val": {"save_img": True, "suffix": "x2", "use_chop": True, **val_options},
    }
    Path("test_single.yml").write_text(yaml.safe_dump(options))
    return Path("test_single.yml")


def write_lq_images(folder: Path, sizes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    images = {name: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for name, size in sizes.items()}
    for name, image in images.items():
        cv2.imwrite(str(folder / f"{name}.png"), image)
    return images


@pytest.fixture
def single_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # wide is split in 1 x 2 parts by use_chop.
    return write_lq_images(tmp_path / "single", {"small": (24, 30), "wide": (20, 210)})


def test_a_single_image_dataset_is_super_resolved_and_saved_without_scores(single_images, capsys):
    code = main(["eval", "-opt", str(write_single_image_options(Path("single"))), "--json", "out.json",
                 "--csv", "out.csv"])
    assert code == 0
    model = rgt_fast.load_model(DEMO_WEIGHTS)
    for name, lq in single_images.items():
        saved = cv2.imread(f"results/test_single_x2/visualization/Single/{name}_x2.png")
        np.testing.assert_array_equal(saved, upscale_in_parts(model, lq))
    assert "== Single: no GT, super-resolved without scores ==" in capsys.readouterr().out
    (single,) = json.loads(Path("out.json").read_text())["sets"]
    assert single == {"name": "Single", "scored": False, "average": None,
                      "images": [{"name": "small"}, {"name": "wide"}], "failed": []}
    rows = list(csv.DictReader(Path("out.csv").open()))
    assert [(row["set"], row["image"], row["error"]) for row in rows] == [("Single", "small", ""),
                                                                           ("Single", "wide", "")]


def test_a_corrupt_image_of_a_single_image_dataset_is_reported_and_the_rest_saved(single_images, capsys):
    Path("single/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(["eval", "-opt", str(write_single_image_options(Path("single"))), "--json", "out.json"]) == 1
    (single,) = json.loads(Path("out.json").read_text())["sets"]
    assert [image["name"] for image in single["images"]] == ["small", "wide"]
    assert single["failed"][0]["name"] == "broken" and "broken.png" in single["failed"][0]["error"]
    assert "Single/broken" in capsys.readouterr().err
    assert sorted(p.name for p in Path("results/test_single_x2/visualization/Single").iterdir()) == [
        "small_x2.png", "wide_x2.png"]


def test_a_single_image_dataset_without_save_img_is_an_error_before_anything_runs(single_images, capsys):
    assert main(["eval", "-opt", str(write_single_image_options(Path("single"), save_img=False))]) == 1
    assert "Single: no GT to score" in capsys.readouterr().err and not Path("results").exists()


def test_each_dataset_type_names_the_folder_it_misses(single_images, capsys):
    options = write_single_image_options(Path("single"))
    assert main(["eval", "-opt", str(options), "--force_yml", "datasets.test_1.dataroot_lq=null"]) == 1
    assert "missing required option datasets.test_1.dataroot_lq" in capsys.readouterr().err
    assert main(["eval", "-opt", str(options), "--force_yml", "datasets.test_1.type=PairedImageDataset"]) == 1
    err = capsys.readouterr().err
    assert "missing required option datasets.test_1.dataroot_gt" in err and "SingleImageDataset" in err
