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


def test_rows_record_where_each_model_spends_its_time(monkeypatch):
    """On CUDA every row profiles one more call of each model (here the CPU stands in): the ops with the most own
    time, the convolutions of the tail among them; a profiler that fails leaves the row's figures standing."""
    monkeypatch.setattr(bench, "BREAKDOWN_DEVICE_TYPES", ("cpu",))
    torch.manual_seed(0)
    reference, fused = bench.build_pair("RGT-S", 2, torch.device("cpu"))
    x = torch.rand(1, 3, 16, 16)
    row = bench.inference_row("profiled", reference, fused, x, None, warmup=0, iters=1)
    for label in ("reference", "fused"):
        entries = row[f"{label}_time_breakdown"]
        assert 0 < len(entries) <= bench.BREAKDOWN_ENTRIES
        assert [e["ms"] for e in entries] == sorted((e["ms"] for e in entries), reverse=True)
        assert all(0 <= e["share"] <= 1 and e["count"] >= 1 for e in entries)
        assert any("conv" in e["name"] for e in entries), entries
    assert not bench.failures(row)

    def broken_profile(fn, device):
        raise RuntimeError("profiler unavailable")

    monkeypatch.setattr(bench, "time_breakdown", broken_profile)
    row = bench.inference_row("unprofiled", reference, fused, x, None, warmup=0, iters=1)
    assert row["fused_time_breakdown_failed"] == "RuntimeError: profiler unavailable"
    assert row["fused_ms"] > 0 and not bench.failures(row)


def test_environment_names_the_commit_it_is_told_over_what_git_says(monkeypatch):
    monkeypatch.delenv("RGT_FAST_COMMIT", raising=False)
    from_git = bench.environment(torch.device("cpu"))["commit"]
    assert from_git != "0" * 40
    monkeypatch.setenv("RGT_FAST_COMMIT", "0" * 40)
    told = bench.environment(torch.device("cpu"))
    assert told["commit"] == "0" * 40 and told["dirty"] is None
