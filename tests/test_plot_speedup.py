import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "plot_speedup.py"
spec = importlib.util.spec_from_file_location("plot_speedup", SCRIPT)
plot_speedup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_speedup)


def bench_rows(dtype, mode, points):
    return [{"name": f"RGT-S x4 {side}x{side} b1 {dtype}", "shape": [1, 3, side, side], "dtype": dtype,
             "mode": mode, "speedup": speedup} for side, speedup in points]


def test_plot_from_bench_and_run_all_reports(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"device": "cpu (1 threads)", "results": bench_rows(
        "fp32", "inference", [(32, 0.97), (64, 1.08), (96, 1.12)]) + [{"name": "big", "error": "out of memory"}]}))
    run_all = tmp_path / "run_all.json"
    run_all.write_text(json.dumps({"environment": {"device": "NVIDIA H100"}, "benchmarks": {
        "bench_rgsa_attention.py": {"exit_code": 0, "results": {"rows": [{"name": "train"}]}},
        "bench_model.py": {"exit_code": 0, "results": {"device": "NVIDIA H100", "results": bench_rows(
            "bfloat16", "inference", [(64, 1.9), (128, 2.4)])}}}}))
    out = tmp_path / "plot" / "speedup.png"

    assert plot_speedup.main([str(bench), str(run_all), "--out", str(out)]) == 0

    assert out.stat().st_size > 0
    img = cv2.imread(str(out))
    assert img.shape == (plot_speedup.HEIGHT, plot_speedup.WIDTH, 3) == (560, 900, 3)
    for colour in plot_speedup.COLOURS[:2]:
        assert (img == np.array(colour, np.uint8)).all(axis=-1).sum() > 50, "each series is drawn in its colour"
    assert set(plot_speedup.load_series([bench, run_all], "side")) == {
        "cpu (1 threads), fp32, inference", "NVIDIA H100, bfloat16, inference"}


def test_files_without_speedup_rows_are_an_error(tmp_path, capsys):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"device": "cpu", "results": [{"name": "x", "error": "out of memory"}]}))
    assert plot_speedup.main([str(path), "--out", str(tmp_path / "out.png")]) == 1
    assert "no rows" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()
