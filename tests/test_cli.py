import json
import subprocess
import sys

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


def test_planned_subcommands_say_so_and_exit_non_zero():
    result = subprocess.run([sys.executable, "-m", "rgt_fast.cli", "upscale", "x.png"], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "not yet available" in result.stderr
