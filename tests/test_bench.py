"""The timing and the result rows of ``rgt-fast bench``."""
import pytest
import torch

import rgt_fast
from rgt_fast import bench


def test_interleaved_median_ms_takes_turns_and_reports_each_median(monkeypatch):
    durations_ms = {"a": [5, 1, 9], "b": [2, 7, 3]}
    calls = []
    now = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])

    def make(name):
        def fn():
            calls.append(name)
            if len(calls) > 2:  # the first call of each is the warm-up, which takes no time here
                now[0] += durations_ms[name].pop(0) / 1000
        return fn

    medians = bench.interleaved_median_ms([make("a"), make("b")], warmup=1, iters=3, device=torch.device("cpu"))
    assert calls == ["a", "b"] * 4
    assert medians == pytest.approx([5.0, 3.0])


class _OutOfMemory(torch.nn.Module):
    """Stands in for a model too large for the device: every call fails as CUDA's allocator would."""

    def forward(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 48.00 GiB.")


def test_a_model_out_of_memory_is_recorded_and_the_other_still_measured():
    torch.manual_seed(0)
    fused = rgt_fast.create_model("RGT-S", 2, depth=[2], num_heads=[6], embed_dim=36, backend="torch")
    x = torch.rand(1, 3, 20, 24)
    row = bench.inference_row("too large for the reference", _OutOfMemory(), fused, x, None, warmup=1, iters=2)
    assert row["reference_error"].startswith("out of memory: CUDA out of memory. Tried to allocate 48.00 GiB")
    assert "reference_ms" not in row and "speedup" not in row and "max_abs_err" not in row
    assert row["fused_ms"] > 0 and row["fused_tflops"] > 0
    table = bench.format_table([row])
    assert "too large for the reference" in table and "reference: out of memory" in table
