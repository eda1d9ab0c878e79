"""The timing helper of ``rgt-fast bench``."""
import pytest
import torch

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
