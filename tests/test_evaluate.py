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


def test_weights_of_another_scale_are_an_error_naming_it(bench, capsys):
    root, weights = bench
    assert main(["eval", "--weights", str(weights), "--data", str(root / "SetA"), "--scale", "4"]) == 1
    assert "x2 model" in capsys.readouterr().err


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
    """test_RGT_S_x2.yml for SetA and ``weights``, in tiles as use_chop asks."""
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
    assert report["tile"] == 256 and report["sets"][0]["images"][0]["psnr"] == pytest.approx(psnr, abs=1e-9)
    saved = Path("results/test_tiny/visualization/SetA/img00x2_test_tiny.png")
    np.testing.assert_array_equal(cv2.imread(str(saved)), sr)


def test_option_file_and_data_flags_do_not_mix(bench, capsys):
    root, weights = bench
    assert main(["eval", "-opt", "x.yml", "--weights", str(weights)]) == 1
    assert "--weights cannot be combined with -opt" in capsys.readouterr().err
    assert main(["eval", "--weights", str(weights), "--data", str(root / "SetB"), "--scale", "2", "--tile", "16"]) == 1
    assert "--tile-overlap" in capsys.readouterr().err


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
