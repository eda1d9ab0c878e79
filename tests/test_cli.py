import json

import pytest
import torch

import rgt_fast
from rgt_fast.cli import main


def test_inspect_prints_the_detected_architecture(tmp_path, capsys):
    path = tmp_path / "w.pth"
    torch.save({"params_ema": rgt_fast.create_model("RGT", 3, fused=False).state_dict()}, path)
    assert main(["inspect", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == "RGT" and info["upscale"] == 3


def test_inspect_of_a_missing_file_fails_cleanly(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.pth")]) == 1
    assert "missing.pth" in capsys.readouterr().err


def test_bench_quick_writes_valid_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--model", "RGT-S", "--scale", "2", "--size", "16x20", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["device"].startswith("cpu")
    (row,) = report["results"]
    assert {"name", "reference_ms", "fused_ms", "speedup", "max_abs_err"} <= row.keys()
    assert row["reference_ms"] > 0 and row["fused_ms"] > 0
    assert row["max_abs_err"] < 1e-3
    assert "speedup" in capsys.readouterr().out


def test_unknown_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "w.pth", "--frobnicate"])
    assert info.value.code == 2
    assert "--frobnicate" in capsys.readouterr().err
