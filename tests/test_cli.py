import json

import pytest
import torch

import rgt_fast
from rgt_fast.bench import peak_mb, training_row
from rgt_fast.cli import main


def _peak_rss_resettable() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


PEAK_RSS_RESETTABLE = _peak_rss_resettable()


def test_inspect_prints_the_detected_architecture(tmp_path, capsys):
    path = tmp_path / "w.pth"
    torch.save({"params_ema": rgt_fast.create_model("RGT", 3, fused=False).state_dict()}, path)
    assert main(["inspect", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == "RGT" and info["upscale"] == 3


def test_inspect_of_a_missing_file_fails_cleanly(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.pth")]) == 1
    assert "missing.pth" in capsys.readouterr().err


def test_inspect_of_another_architecture_names_the_file(tmp_path, capsys):
    path = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.randn(3, 4)}, path)
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert "resnet.pth" in err and "not an RGT" in err


def test_bench_quick_writes_valid_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--model", "RGT-S", "--scale", "2", "--size", "16x20", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["device"].startswith("cpu")
    (row,) = report["results"]
    assert {"name", "reference_ms", "fused_ms", "speedup", "max_abs_err"} <= row.keys()
    assert row["reference_ms"] > 0 and row["fused_ms"] > 0
    assert row["max_abs_err"] < 1e-3
    if PEAK_RSS_RESETTABLE:
        assert isinstance(row["reference_peak_mb"], float) and row["reference_peak_mb"] > 0
        assert isinstance(row["fused_peak_mb"], float) and row["fused_peak_mb"] > 0
    assert "speedup" in capsys.readouterr().out


def test_bench_training_row_times_the_same_adam_step_on_both_models():
    torch.manual_seed(0)
    reference = rgt_fast.create_model("RGT-S", 2, fused=False, depth=[2], num_heads=[6], embed_dim=36)
    fused = rgt_fast.accelerate(reference, backend="torch")
    x = torch.rand(2, 3, 16, 20)
    row = training_row("tiny train", reference, fused, x, None, warmup=1, iters=2)
    assert row["mode"] == "train" and row["max_abs_err"] < 1e-5  # the first steps' losses agree
    assert row["reference_ms"] > 0 and row["fused_ms"] > 0
    assert row["fused_it_per_s"] == pytest.approx(1000.0 / row["fused_ms"])
    assert row["reference_it_per_s"] == pytest.approx(1000.0 / row["reference_ms"])


@pytest.mark.skipif(not PEAK_RSS_RESETTABLE,
                    reason="/proc/self/clear_refs is not writable, so CPU peak memory is not measured")
def test_cpu_peak_mb_is_the_growth_fn_causes():
    tensor_mib = 200
    peak = peak_mb(lambda: torch.ones(tensor_mib * 2**20 // 4), torch.device("cpu"))
    assert 150 <= peak <= 400
    assert peak_mb(lambda: None, torch.device("cpu")) < 10


def test_unknown_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "w.pth", "--frobnicate"])
    assert info.value.code == 2
    assert "--frobnicate" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["upscale", "in.png", "-o", "out"], ["eval", "--weights", "w.pth"], ["bench"]])
@pytest.mark.parametrize("device, message", [
    ("gpu0", "is not a torch device; use cpu, cuda or cuda:N"),
    # One past the last CUDA device: on a CPU-only machine that is cuda:0, which is refused as unavailable.
    (f"cuda:{torch.cuda.device_count()}",
     "no CUDA device is available here" if torch.cuda.device_count() == 0 else "CUDA device(s), cuda:0 to"),
])
def test_a_device_this_machine_lacks_is_a_usage_error(command, device, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([*command, "--device", device])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--device" in err and message in err
    assert not any(tmp_path.iterdir())  # refused before anything was read or written


@pytest.mark.parametrize("batch", ["0", "-2", "two"])
def test_bench_refuses_a_batch_that_is_not_a_positive_number(batch, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--quick", "--batch", batch])
    assert info.value.code == 2
    assert "batch must be a positive whole number" in capsys.readouterr().err
