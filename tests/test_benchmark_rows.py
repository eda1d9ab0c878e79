"""The GPU benchmarks' rows, run on small CPU tensors in the interpreter with the timing stubbed out.

The benchmarks only run on a lent GPU, in one call that cannot be repeated: a row that fails there (a wrong
argument, a shape mismatch, implementations that disagree) would cost that call's figures. Here each row builds
its inputs, runs every implementation forward (and backward) and compares them, as it would on the GPU; only
the timing, which needs CUDA, is replaced.
"""
import importlib
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import rgt_fast
from rgt_fast import bench
import rgt_fast.kernels.add_layer_norm  # noqa: F401  (imported before the benchmarks, under the interpreter)
import rgt_fast.kernels.lsa_attention  # noqa: F401
import rgt_fast.kernels.rgsa_attention  # noqa: F401
import rgt_fast.kernels.spatial_gate  # noqa: F401

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def load_benchmark(monkeypatch):
    """Import a benchmark script with its tensors on the CPU and its timing stubbed: each measured step runs
    once and reports 1 ms."""
    monkeypatch.syspath_prepend(str(BENCHMARKS_DIR))
    # kernel_timing turns Triton's interpreter off for the process when first imported; turn it back on.
    interpret = os.environ.get("TRITON_INTERPRET", "1")
    kernel_timing = importlib.import_module("kernel_timing")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setattr(kernel_timing, "DEVICE", "cpu")

    def run_once(step, leaves, rep_ms):
        step()
        return 1.0, 1.0, 0.0

    monkeypatch.setattr(kernel_timing, "measure", run_once)

    def load(name):
        module = importlib.import_module(name)
        for attribute, value in (("DEVICE", "cpu"), ("measure", run_once)):
            if hasattr(module, attribute):
                monkeypatch.setattr(module, attribute, value)
        return module

    yield load
    for name in ("bench_rgsa_attention", "bench_spatial_gate", "bench_add_layer_norm", "bench_lsa_attention",
                 "bench_model", "bench_launch_overhead", "sweep_tiles", "summarize"):
        sys.modules.pop(name, None)


def max_abs_diff_bound(dtype):
    """Outputs reach magnitudes of about 10, where a bf16 step is 0.0625: an implementation that computed something
    else (a wrong layout, a missed term) would differ by whole units."""
    return 1e-4 if dtype == torch.float32 else 0.25


def assert_measured(row, implementations, max_diff_keys, bound):
    assert not [key for key in row if key.endswith("_error")], row
    for impl in implementations:
        assert row[f"{impl}_ms"] == 1.0
    for key in max_diff_keys:
        assert math.isfinite(row[key]) and row[key] <= bound, (key, row[key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_backward", [False, True])
def test_rgsa_rows(load_benchmark, dtype, with_backward):
    bench = load_benchmark("bench_rgsa_attention")
    row = bench.run_row("smoke", 2, 37, 5, dtype, with_backward, rep_ms=1)
    diffs = [] if with_backward else ["reference_max_abs_diff_vs_fused", "sdpa_max_abs_diff_vs_fused"]
    assert_measured(row, bench.IMPLEMENTATIONS, diffs, max_abs_diff_bound(dtype))
    assert row["speedup_vs_reference"] == 1.0 and row["speedup_vs_sdpa"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_backward", [False, True])
def test_spatial_gate_rows(load_benchmark, dtype, with_backward):
    bench = load_benchmark("bench_spatial_gate")
    row = bench.run_row("smoke", 2, 5, 7, dtype, with_backward, rep_ms=1)
    assert_measured(row, ("fused", "reference"), [] if with_backward else ["max_abs_diff"],
                    max_abs_diff_bound(dtype))
    assert row["speedup"] == 1.0


@pytest.mark.parametrize("variant", ["add+norm+fc1", "norm+qkv", "norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_backward", [False, True])
def test_add_layer_norm_rows(load_benchmark, dtype, with_backward, variant):
    bench = load_benchmark("bench_add_layer_norm")
    row = bench.run_row("smoke", 2, 37, dtype, with_backward, 1, variant)
    assert_measured(row, ("fused", "reference"), [] if with_backward else ["max_abs_diff"],
                    max_abs_diff_bound(dtype))


def test_launch_overhead_rows(load_benchmark):
    """Every stage runs (the backward launchers on the tensors their forwards saved) and is profiled; under the
    interpreter the interpreter's own functions fill the profile, so only its form is checked here."""
    bench = load_benchmark("bench_launch_overhead")
    shapes = {"layer_norm": (2, 7, 12), "rgsa": (1, 9, (5, 2, 3, 4))}
    rows = list(bench.rows(True, shapes, calls=2))
    stages = [(row["name"], row["stage"]) for row in rows]
    assert stages == [("triton launch", "21 ints + 1 float"), ("torch op", "add_ on 1 element"),
                      ("fused layer_norm", "forward"), ("fused layer_norm", "backward launcher"),
                      ("fused layer_norm", "forward+backward"), ("torch layer_norm", "forward"),
                      ("torch layer_norm", "forward+backward"), ("fused rgsa_attention", "forward"),
                      ("fused rgsa_attention", "backward launcher"), ("fused rgsa_attention", "forward+backward")]
    for row in rows:
        assert row["issue_ms"] > 0 and 0 < len(row["profile"]) <= bench.PROFILE_ENTRIES
        assert all(entry["own_us_per_step"] >= 0 and entry["calls_per_step"] > 0 for entry in row["profile"])
        assert all(re.fullmatch(r"[^:]+:\d+\(.+\)", entry["function"]) for entry in row["profile"]), row["profile"]
    assert bench.describe(rows[2]).startswith("fused layer_norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lsa_rows(load_benchmark, monkeypatch, whole_window_tiles, dtype):
    bench = load_benchmark("bench_lsa_attention")
    # Two heads of 32 channels: the benchmark's 180 channels cost the interpreter minutes and change no code path.
    monkeypatch.setattr(bench, "EMBED_DIM", 64)
    monkeypatch.setattr(bench, "NUM_HEADS", 2)

    def run_forward_and_backward_once(impl, module, qkv, H, W, grad_out):
        with torch.no_grad():
            impl(module, qkv, H, W)
        impl(module, qkv, H, W).backward(grad_out)
        return 1.0, 1.0, 0.0

    monkeypatch.setattr(bench, "measure", run_forward_and_backward_once)
    # 12x40 pads to 32x64: both branches' windows, the shift and the padding.
    row = bench.run_row(("smoke", 2, 12, 40, dtype, False, True, True), flex=None, quick=False)
    assert row["pass"] is True and row["reproducible"] is True, row["check_errors"]
    assert row["errors"] == {}
    assert set(row["ms"]) == {"fused", "reference", "torch_sdpa"}
    assert row["fwd_speedup_vs_reference"] == 1.0 and row["fwd_bwd_speedup_vs_best_torch"] == 1.0
    assert set(row["fused_time_breakdown"]) == {"fwd", "fwd+bwd"}
    assert all(entries and entries[0]["ms"] >= entries[-1]["ms"] for entries in row["fused_time_breakdown"].values())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_lsa_flex_assembly_matches_the_reference(load_benchmark, monkeypatch):
    """The FlexAttention baseline (run eagerly here) computes the same attention as the reference module.

    Its score_mod adds a float32 bias to float64 scores, hence a float32-sized tolerance; a wrong bias, mask or
    layout differs by tenths or more."""
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")
    bench = load_benchmark("bench_lsa_attention")
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    flex = bench.make_flex()
    assert flex is not None and flex_attention is not None
    torch.manual_seed(0)
    for shifted in (True, False):
        module = bench.make_module(20, 40, shifted, torch.float64)
        qkv = torch.randn(2, 20 * 40, 3 * bench.EMBED_DIM, dtype=torch.float64)
        with torch.no_grad():
            expected = bench.reference(module, qkv, 20, 40)
            actual = flex(module, qkv, 20, 40)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_summary_checks_each_issue_target_against_the_rows_the_benchmarks_write(load_benchmark, monkeypatch,
                                                                               whole_window_tiles):
    """summarize.py reads the rows as the benchmarks really write them (made here with stubbed timings, then
    given chosen speedups), and judges each target from them."""
    rgsa, gate, lsa = (load_benchmark(name) for name in ("bench_rgsa_attention", "bench_spatial_gate",
                                                          "bench_lsa_attention"))
    bench_model, summarize = load_benchmark("bench_model"), load_benchmark("summarize")
    rgsa_forward = rgsa.run_row("train", 2, 37, 5, torch.bfloat16, False, 1)
    rgsa_forward.update(speedup_vs_reference=3.5, gpu_speedup_vs_reference=6.0, speedup_vs_sdpa=1.2,
                        gpu_speedup_vs_sdpa=4.0, fused_peak_mb=rgsa_forward["output_and_lse_mb"] + 0.5)
    rgsa_backward = rgsa.run_row("train", 2, 37, 5, torch.bfloat16, True, 1)
    monkeypatch.setattr(lsa, "EMBED_DIM", 64)
    monkeypatch.setattr(lsa, "NUM_HEADS", 2)
    monkeypatch.setattr(lsa, "measure", lambda *args: (1.0, 1.0, 0.0))
    lsa_row = lsa.run_row(("train", 1, 12, 40, torch.bfloat16, False, True, True), flex=None, quick=False)
    lsa_row.update(fwd_speedup_vs_reference=4.2, fwd_speedup_vs_best_torch=1.6, fwd_bwd_speedup_vs_reference=2.0)

    torch.manual_seed(0)
    reference = rgt_fast.create_model("RGT-S", 2, fused=False, depth=[2], num_heads=[6], embed_dim=36)
    fused = rgt_fast.accelerate(reference, backend="torch")
    x = torch.rand(1, 3, 16, 20)
    inference = bench.inference_row(bench_model.INFERENCE_ROWS["bf16"], reference, fused, x, torch.bfloat16, 0, 1)
    inference.update(speedup=2.6, reference_peak_mb=100.0, fused_peak_mb=60.0, fused_time_breakdown=[
        {"name": "_lsa_fwd_kernel", "ms": 1.25, "share": 0.4, "count": 36}])
    training = bench.training_row(bench_model.TRAINING_ROWS["bf16"], reference, fused, x, torch.bfloat16, 0, 1)
    training.update(reference_ms=500.0, reference_peak_mb=1000.0)
    # rgt-fast train's recorded step: twice the reference's eager speed, 0.7 of its memory.
    graph = {"name": bench_model.GRAPH_TRAINING_ROW, "mode": "train-graph", "reference_ms": 400.0, "fused_ms": 250.0,
             "fused_peak_mb": 700.0, "reference_it_per_s": 2.5, "fused_it_per_s": 4.0}
    big = {"name": bench_model.BIG_IMAGE_ROW, "fused_ms": 900.0, "fused_peak_mb": 30 * 1024.0,
           "reference_error": "out of memory: CUDA out of memory. Tried to allocate 48.00 GiB."}
    report = {"environment": {"device": "NVIDIA H100 80GB HBM3", "commit": "abc"},
              "tests": {"tests/test_model.py": {"exit_code": 0, "seconds": 12.0, "summary": "30 passed",
                                                "failures": []}},
              "benchmarks": {
                  "bench_rgsa_attention.py": {"exit_code": 0, "results": {"rows": [rgsa_forward, rgsa_backward]}},
                  "bench_lsa_attention.py": {"exit_code": 124, "seconds": 90.0, "results": {"rows": [lsa_row]}},
                  "bench_model.py": {"exit_code": 0, "results": {"results": [inference, training, graph, big],
                                                                  "low_precision_drift": []}},
                  "bench_spatial_gate.py": {"exit_code": 0, "results": {"rows": [
                      gate.run_row("train", 2, 5, 7, torch.bfloat16, False, 1)]}},
                  "bench_add_layer_norm.py": {"skipped": "the --budget ran out before it could start"},
                  "bench_launch_overhead.py": {"exit_code": 0, "results": {"rows": [
                      {"name": "fused layer_norm", "stage": "backward launcher", "issue_ms": 0.0421,
                       "profile": [{"function": "jit.py:700(run)", "calls_per_step": 1.0, "own_us_per_step": 12.5,
                                    "cumulative_us_per_step": 30.0}]}]}},
                  "sweep_tiles.py": {"exit_code": 0, "results": {"rows": [
                      {"kernel": "lsa_fwd", "shape": "lsa-train", "tiles": [128, 32, 8, 2], "shipped": True,
                       "ms": 1.7861, "max_difference": 0.0}]}}}}
    text = summarize.summarize(report)
    targets = {line.split(" | ")[1]: line.split(" | ")[-1].rstrip(" |") for line in text.splitlines()
               if line.startswith("| ") and line.split(" | ")[0] in ("| 3", "| 4", "| 5", "| 6")}

    def verdict(*words):
        (found,) = [v for target, v in targets.items() if all(word in target for word in words)]
        return found

    assert verdict("RG-SA train", "forward vs reference, wall") == "met"
    assert verdict("RG-SA train", "forward vs SDPA, wall") == "missed"
    assert verdict("RG-SA train", "forward vs SDPA, kernel") == "met"
    assert verdict("RG-SA train", "forward+backward vs reference, wall") == "missed"  # the stubbed 1 ms each
    assert verdict("RG-SA train", "peak extra memory") == "met"
    assert verdict("L-SA train", "forward vs reference core") == "met"
    assert verdict("L-SA train", "best PyTorch") == "met"
    assert verdict("L-SA train", "forward+backward") == "missed"
    assert verdict(bench_model.INFERENCE_ROWS["bf16"], "speedup") == "met"
    assert verdict(bench_model.INFERENCE_ROWS["bf16"], "peak memory") == "missed"  # 0.6 > 0.5
    assert verdict(bench_model.INFERENCE_ROWS["fp32"], "speedup") == "not measured"
    assert verdict(f'{bench_model.TRAINING_ROWS["bf16"]}: iterations/s') == "measured"
    assert verdict(bench_model.GRAPH_TRAINING_ROW, "iterations/s") == "measured"
    assert verdict(bench_model.GRAPH_TRAINING_ROW, "eager step, speedup") == "met"
    assert verdict(bench_model.GRAPH_TRAINING_ROW, "eager step, memory") == "missed"
    assert verdict(bench_model.TRAINING_ROWS["fp32"], "iterations/s") == "not measured"
    assert verdict(bench_model.BIG_IMAGE_ROW) == "met"
    assert "reference: out of memory" in text
    assert "bench_lsa_attention.py: exit code 124 after 90.0 s" in text
    assert "bench_add_layer_norm.py: the --budget ran out" in text
    assert "## Spatial gate" in text and "| tests/test_model.py | 0 |" in text
    assert "| fused layer_norm | backward launcher | 0.042 | jit.py:700(run) 12.5 |" in text
    assert f"{bench_model.INFERENCE_ROWS['bf16']}, fused: the kernels with the most GPU time" in text
    assert "| _lsa_fwd_kernel | 1.250 | 0.40 | 36 |" in text
    assert "| lsa_fwd | lsa-train | (128, 32, 8, 2) | yes | 1.786 | 0.0000 |" in text
    assert "L-SA train B=1 12x40" in text and "fused fwd+bwd: the kernels with the most GPU time" in text


def test_summary_refuses_a_file_that_is_not_a_run_all_report(load_benchmark, tmp_path, capsys):
    summarize = load_benchmark("summarize")
    bench_json = tmp_path / "bench.json"
    bench_json.write_text('{"device": "cpu", "results": []}')
    assert summarize.main([str(bench_json)]) == 2
    assert "not a run_all.py report" in capsys.readouterr().err
    assert summarize.main([str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_token_linear_benchmark_rows(monkeypatch, tmp_path):
    """The CPU benchmark of TokenLinear against F.linear: every linear of the model, a row per shape and thread
    count, the dispatch recorded, both ways agreeing."""
    monkeypatch.syspath_prepend(str(BENCHMARKS_DIR))
    bench_token_linear = importlib.import_module("bench_token_linear")
    report = tmp_path / "token_linear.json"
    threads = torch.get_num_threads()
    try:
        assert bench_token_linear.main(["--size", "20x36", "--threads", "1", "--warmup", "0", "--iters", "1",
                                        "--json", str(report)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(report.read_text())["results"]
    shapes = {(row["rows"], row["in_features"], row["out_features"]) for row in rows}
    assert (720, 180, 540) in shapes and (720, 180, 360) in shapes, "the L-SA qkv and the MLP's fc1 on 20x36 tokens"
    assert sum(row["calls_per_forward"] for row in rows if row["in_features"] == 180 and row["rows"] == 720) > 36
    for row in rows:
        assert row["onednn"] == (rgt_fast.model.ONEDNN_ON_X86 and row["rows"] * row["in_features"]
                                 * row["out_features"] >= rgt_fast.model.ONEDNN_LINEAR_MIN_MACS)
        assert row["max_abs_difference"] < 1e-3 and row["forward_token_linear_ms"] > 0


def test_tile_sweep_rows(load_benchmark, monkeypatch):
    """Every candidate tile of each kernel runs the op and agrees with the shipped tile; the shipped tiles are
    restored afterwards. Small shapes and two L-SA heads of 32 channels keep the interpreter quick."""
    sweep = load_benchmark("sweep_tiles")
    monkeypatch.setattr(sweep, "SHAPES",
                        {"lsa-train": (1, 8, 32), "rgsa-infer-1024": (40, 70), "gate-train": (2, 5, 7)})
    monkeypatch.setattr(sweep, "GATE_CHANNELS", 20)
    monkeypatch.setattr(sweep, "LSA_EMBED_DIM", 64)
    monkeypatch.setattr(sweep, "LSA_HEADS", 2)
    shipped_lsa = {kernel: dict(classes) for kernel, classes in sweep.lsa._CONFIGS.items()}
    shipped_rgsa = dict(sweep.rgsa._TILE_TABLE)
    shipped_gate = dict(sweep.gate._CONV_TILES)
    for kernel, (_, candidates) in sweep.CANDIDATES.items():
        rows = list(sweep.sweep(kernel, 1, time_ms=lambda fn, rep: 1.0))
        assert [tuple(row["tiles"]) for row in rows] == candidates
        assert [row["shipped"] for row in rows] == [True] + [False] * (len(candidates) - 1)
        for row in rows:
            assert "error" not in row, row
            assert row["ms"] == 1.0 and row["max_difference"] < 0.05, row  # bf16 rounding, not another result
            assert sweep.describe(row).startswith(kernel)
    assert {kernel: dict(classes) for kernel, classes in sweep.lsa._CONFIGS.items()} == shipped_lsa
    assert dict(sweep.rgsa._TILE_TABLE) == shipped_rgsa
    assert dict(sweep.gate._CONV_TILES) == shipped_gate
    assert sweep.CANDIDATES["gate_conv_backward"][1][0] == sweep.gate._CONV_TILES["backward"]
    assert sweep.CANDIDATES["lsa_fwd"][1][0] == sweep.lsa._CONFIGS["fwd"]["16-bit"]
    assert sweep.CANDIDATES["rgsa_forward"][1][0] == sweep.rgsa._TILE_TABLE[("forward", "16bit")][1]


def test_every_model_row_has_a_warm_up_that_runs(load_benchmark, monkeypatch):
    """Each warm-up (one per CUDA row, and the drift's) runs its model calls: here a small model stands in on CPU
    tensors, at small sizes, with the rows' modes and dtypes."""
    bench_model = load_benchmark("bench_model")
    assert set(bench_model.WARM_UPS) == {spec[0] for spec in bench_model.CUDA_ROWS
                                         if spec[0] != bench_model.GRAPH_TRAINING_ROW} | {"drift"}
    small = dict(depth=[2], num_heads=[6], embed_dim=36)

    def small_pair(model, scale, device):
        torch.manual_seed(0)
        reference = rgt_fast.create_model("RGT-S", scale, fused=False, **small).to(device)
        return reference, rgt_fast.accelerate(reference)

    calls = []
    monkeypatch.setattr(bench_model, "build_pair", small_pair)
    monkeypatch.setattr(bench_model, "CUDA_ROWS", tuple((name, mode, scale, (1, 3, 16, 20), dtype)
                                                        for name, mode, scale, _, dtype in bench_model.CUDA_ROWS))
    monkeypatch.setattr(bench_model, "DRIFT_SIZE", 16)
    real_forward = rgt_fast.RGT.forward

    def counted_forward(model, x):
        calls.append((model.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return real_forward(model, x)

    monkeypatch.setattr(rgt_fast.RGT, "forward", counted_forward)
    for name in bench_model.WARM_UPS:
        bench_model.warm_up(name, torch.device("cpu"))
    # bf16 inference, a bf16 training step, fp32 inference, an fp32 training step, the 1024 image's bf16, the
    # drift's fp32/bf16/fp16
    assert calls == [(False, False, True), (True, True, True), (False, False, False), (True, True, False),
                     (False, False, True), (False, False, False), (False, False, True), (False, False, True)]
