"""benchmarks/run_all.py: per-script results, timeouts and the --budget, with the JSON saved after every step."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

RUN_ALL_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "run_all.py"

FAST_SCRIPT = """
import argparse, json
parser = argparse.ArgumentParser()
parser.add_argument("--json")
parser.add_argument("--quick", action="store_true")
args = parser.parse_args()
with open(args.json, "w") as f:
    json.dump({"rows": [{"name": "fake", "quick": args.quick}]}, f)
"""
SLOW_SCRIPT = "import time\nprint('started', flush=True)\ntime.sleep(60)\n"
FAILING_SCRIPT = "import sys\nprint('no GPU kernel for this', flush=True)\nsys.exit(3)\n"


@pytest.fixture
def run_all():
    spec = importlib.util.spec_from_file_location("run_all_under_test", RUN_ALL_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_scripts(tmp_path, **scripts):
    paths = []
    for name, text in scripts.items():
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        paths.append(str(path))  # absolute: ROOT / "benchmarks" / path is the path itself
    return tuple(paths)


def read_report(results_dir):
    (path,) = results_dir.glob("*.json")
    return json.loads(path.read_text())


def test_each_script_is_recorded_and_a_failure_does_not_stop_the_others(run_all, monkeypatch, tmp_path):
    scripts = write_scripts(tmp_path, failing=FAILING_SCRIPT, fast=FAST_SCRIPT)
    monkeypatch.setattr(run_all, "BENCHMARKS", scripts)
    out = tmp_path / "out"
    assert run_all.main(["--quick", "--results-dir", str(tmp_path / "results"), "--out", str(out)]) == 1
    report = read_report(tmp_path / "results")
    assert report == read_report(out)
    failing, fast = (report["benchmarks"][s] for s in scripts)
    assert failing["exit_code"] == 3 and "no GPU kernel" in failing["output_tail"]
    assert fast["exit_code"] == 0 and fast["results"] == {"rows": [{"name": "fake", "quick": True}]}
    assert {"date", "torch", "triton", "device", "commit"} <= report["environment"].keys()


def run_within_budget(run_all, monkeypatch, tmp_path, scripts, share_weights: dict, budget: int,
                      *more_args: str) -> dict:
    """run_all.main over ``scripts`` with the given share weights and --budget; asserts that it reports a failure
    (a script timed out) and returns the report's benchmark entries."""
    monkeypatch.setattr(run_all, "BENCHMARKS", scripts)
    monkeypatch.setattr(run_all, "SHARE_WEIGHTS", share_weights)
    monkeypatch.setattr(run_all, "_MIN_SCRIPT_SECONDS", 1)
    assert run_all.main(["--budget", str(budget), "--results-dir", str(tmp_path / "results"), *more_args]) == 1
    return read_report(tmp_path / "results")["benchmarks"]


def test_budget_times_out_the_running_script_and_skips_the_rest(run_all, monkeypatch, tmp_path):
    scripts = write_scripts(tmp_path, fast=FAST_SCRIPT, slow=SLOW_SCRIPT, never=FAST_SCRIPT)
    # The slow script's share is then all the time left, so it runs into the budget itself.
    benchmarks = run_within_budget(run_all, monkeypatch, tmp_path, scripts, {Path(scripts[1]).name: 1000}, 6)
    assert benchmarks[scripts[0]]["exit_code"] == 0
    assert benchmarks[scripts[1]]["exit_code"] == 124 and benchmarks[scripts[1]]["seconds"] < 30
    assert "skipped" in benchmarks[scripts[2]]


def test_report_is_saved_before_a_later_step_finishes(run_all, monkeypatch, tmp_path):
    """A run cut short (a device lease ending) keeps what the finished steps measured."""
    scripts = write_scripts(tmp_path, fast=FAST_SCRIPT, slow=SLOW_SCRIPT)
    monkeypatch.setattr(run_all, "BENCHMARKS", scripts)
    real_run = run_all.run

    def run_checking_saved(cmd, timeout, env=None):
        if cmd[1] == scripts[1]:
            saved = read_report(tmp_path / "results")["benchmarks"]
            assert saved[scripts[0]]["exit_code"] == 0 and scripts[1] not in saved
            return 137, "killed", 0.0
        return real_run(cmd, timeout, env)

    monkeypatch.setattr(run_all, "run", run_checking_saved)
    assert run_all.main(["--results-dir", str(tmp_path / "results")]) == 1
    assert read_report(tmp_path / "results")["benchmarks"][scripts[1]]["exit_code"] == 137


PASSING_TESTS = "def test_passes():\n    assert 2 + 2 == 4\n"
FAILING_TESTS = "def test_fails():\n    assert 2 + 2 == 5\n"
SLOW_TESTS = "import time\n\ndef test_hangs():\n    time.sleep(60)\n"


BROKEN_TESTS = "import a_module_that_is_not_there\n"


def test_test_files_run_side_by_side_are_each_recorded_with_their_logs(run_all, monkeypatch, tmp_path):
    files = write_scripts(tmp_path, test_slow=SLOW_TESTS, test_failing=FAILING_TESTS, test_broken=BROKEN_TESTS,
                          test_passing=PASSING_TESTS)
    monkeypatch.setattr(run_all, "CUDA_TESTS", files)
    monkeypatch.setattr(run_all, "TEST_PROCESSES", 2)
    monkeypatch.setattr(run_all, "BENCHMARKS", write_scripts(tmp_path, fast=FAST_SCRIPT))
    monkeypatch.setattr(run_all, "_MIN_SCRIPT_SECONDS", 1)
    out = tmp_path / "out"
    started = time.perf_counter()
    assert run_all.main(["--tests", "--tests-budget", "20", "--results-dir", str(tmp_path / "results"),
                         "--out", str(out)]) == 1
    # The slow file holds one slot until the budget ends; the others ran in the second slot meanwhile.
    assert time.perf_counter() - started < 45
    report = read_report(tmp_path / "results")
    assert list(report["tests"]) == list(files)
    slow, failing, broken, passing = (report["tests"][f] for f in files)
    assert slow["exit_code"] == 124 and slow["seconds"] < 30
    assert failing["exit_code"] == 1 and "1 failed" in failing["summary"]
    assert any("test_fails" in line for line in failing["failures"])
    assert broken["exit_code"] == 2 and "1 error" in broken["summary"]
    assert any(line.startswith("ERROR ") for line in broken["failures"])
    assert passing["exit_code"] == 0 and "1 passed" in passing["summary"]
    # The benchmarks still run after the tests used up their share.
    assert all(entry["exit_code"] == 0 for entry in report["benchmarks"].values())
    (archive_path,) = out.glob("*-logs.tar.gz")
    with tarfile.open(archive_path) as archive:
        logs = {member.name: archive.extractfile(member).read().decode() for member in archive.getmembers()}
    assert len(logs) == len(files) + 1
    assert any("assert 2 + 2 == 5" in text for name, text in logs.items() if "test_failing" in name)


def test_a_test_file_that_cannot_start_before_the_test_budget_ends_is_skipped(run_all, monkeypatch, tmp_path):
    files = write_scripts(tmp_path, test_slow=SLOW_TESTS, test_never=PASSING_TESTS)
    monkeypatch.setattr(run_all, "CUDA_TESTS", files)
    monkeypatch.setattr(run_all, "TEST_PROCESSES", 1)
    monkeypatch.setattr(run_all, "BENCHMARKS", ())
    monkeypatch.setattr(run_all, "_MIN_SCRIPT_SECONDS", 1)
    assert run_all.main(["--tests", "--tests-budget", "6", "--results-dir", str(tmp_path / "results")]) == 1
    report = read_report(tmp_path / "results")
    assert report["tests"][files[0]]["exit_code"] == 124
    assert "skipped" in report["tests"][files[1]]


ROW_THEN_HANG_SCRIPT = """
import argparse, json, time
parser = argparse.ArgumentParser()
parser.add_argument("--json")
args = parser.parse_args()
with open(args.json, "w") as f:
    json.dump({"rows": [{"name": "measured before the hang"}]}, f)
print("first row done", flush=True)
time.sleep(60)
"""


def test_a_script_stopped_by_its_share_keeps_its_rows_and_leaves_time_to_the_others(run_all, monkeypatch, tmp_path):
    scripts = write_scripts(tmp_path, hangs=ROW_THEN_HANG_SCRIPT, fast=FAST_SCRIPT, also_fast=FAST_SCRIPT)
    benchmarks = run_within_budget(run_all, monkeypatch, tmp_path, scripts, {Path(scripts[0]).name: 2}, 24)
    hangs, fast, also_fast = (benchmarks[s] for s in scripts)
    # Weights 2, 1, 1: the first script may use half of the 24 s, not the whole budget.
    assert hangs["exit_code"] == 124 and 10 <= hangs["seconds"] <= 14
    assert hangs["results"] == {"rows": [{"name": "measured before the hang"}]}
    assert "first row done" in hangs["output_tail"]
    assert fast["exit_code"] == 0 and also_fast["exit_code"] == 0


def test_shares_are_of_the_budget_and_capped_by_the_timeout(run_all, monkeypatch, tmp_path):
    scripts = write_scripts(tmp_path, hangs=ROW_THEN_HANG_SCRIPT, fast=FAST_SCRIPT, also_fast=FAST_SCRIPT)
    benchmarks = run_within_budget(run_all, monkeypatch, tmp_path, scripts, {Path(scripts[0]).name: 2}, 30,
                                   "--timeout", "12")
    # Half of the 30 s budget is 15 s, capped at the 12 s timeout (a share of the timeout would be 6 s).
    assert benchmarks[scripts[0]]["exit_code"] == 124 and 11 <= benchmarks[scripts[0]]["seconds"] <= 14
    assert all(benchmarks[s]["exit_code"] == 0 for s in scripts[1:])


def test_kernel_benchmarks_write_their_rows_as_they_go(monkeypatch, tmp_path):
    """A benchmark stopped part-way (its share of time running out) has already written the rows it measured."""
    monkeypatch.syspath_prepend(str(RUN_ALL_PATH.parent))
    # Importing it turns Triton's interpreter off for the process; turn it back on for the tests that follow.
    interpret = os.environ.get("TRITON_INTERPRET", "1")
    import kernel_timing
    monkeypatch.setenv("TRITON_INTERPRET", interpret)

    monkeypatch.setattr(kernel_timing.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernel_timing.torch.cuda, "get_device_name", lambda: "a GPU")
    path = tmp_path / "rows.json"

    def make_rows(quick, rep_ms):
        yield {"name": "first"}
        assert json.loads(path.read_text())["rows"] == [{"name": "first"}]
        yield {"name": "second"}
        raise TimeoutError("stopped here")

    with pytest.raises(TimeoutError):
        kernel_timing.benchmark_main(["--json", str(path)], "doc", "a benchmark", ("first",), make_rows, str)
    saved = json.loads(path.read_text())
    assert saved["device"] == "a GPU" and saved["rows"] == [{"name": "first"}, {"name": "second"}]


SELECTED_TESTS = "def test_on_the_gpu():\n    assert 3 * 3 == 9\n\ndef test_cpu_only():\n    assert 3 * 3 == 10\n"


def test_chosen_test_files_and_benchmarks_alone_run_with_their_selection(run_all, monkeypatch, tmp_path):
    files = write_scripts(tmp_path, test_selected=SELECTED_TESTS, test_left_out=FAILING_TESTS)
    scripts = write_scripts(tmp_path, fast=FAST_SCRIPT, failing=FAILING_SCRIPT)
    monkeypatch.setattr(run_all, "CUDA_TESTS", files)
    monkeypatch.setattr(run_all, "GPU_TEST_SELECTION", {files[0]: "gpu"})
    monkeypatch.setattr(run_all, "BENCHMARKS", scripts)
    assert run_all.main(["--tests", "--test-files", files[0], "--benchmarks", scripts[0],
                         "--results-dir", str(tmp_path / "results")]) == 0
    report = read_report(tmp_path / "results")
    assert list(report["tests"]) == [files[0]]
    assert report["tests"][files[0]]["summary"].startswith("1 passed, 1 deselected")
    assert list(report["benchmarks"]) == [scripts[0]]


SHARD_TESTS = ("import os\n\ndef test_sees_its_shard():\n"
               "    print('shard', os.environ.get('RGT_FAST_TEST_SHARD'))\n"
               "    assert os.environ.get('RGT_FAST_TEST_SHARD') in ('1/2', '2/2')\n")


def test_a_sharded_file_runs_as_one_process_per_shard(run_all, monkeypatch, tmp_path):
    files = write_scripts(tmp_path, test_sharded=SHARD_TESTS, test_whole=PASSING_TESTS)
    monkeypatch.setattr(run_all, "CUDA_TESTS", files)
    monkeypatch.setattr(run_all, "TEST_SHARDS", {files[0]: 2})
    monkeypatch.setattr(run_all, "BENCHMARKS", ())
    assert run_all.main(["--tests", "--results-dir", str(tmp_path / "results")]) == 0
    tests = read_report(tmp_path / "results")["tests"]
    assert list(tests) == [f"{files[0]} [1/2]", f"{files[0]} [2/2]", files[1]]
    assert all(entry["exit_code"] == 0 for entry in tests.values())


def collected(test_file: str, shard: str | None) -> list[str]:
    env = {**os.environ, "RGT_FAST_TEST_SHARD": shard or ""}
    listing = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              test_file], cwd=RUN_ALL_PATH.parent.parent, env=env, capture_output=True, text=True)
    return [line for line in listing.stdout.splitlines() if "::" in line]


def test_shards_are_contiguous_slices_that_cover_the_file():
    whole = collected("tests/test_kernel_casts.py", None)
    shards = [collected("tests/test_kernel_casts.py", f"{k}/3") for k in (1, 2, 3)]
    assert len(whole) >= 3 and all(shards)
    assert sum(shards, []) == whole


def test_an_empty_benchmark_list_runs_none(run_all, monkeypatch, tmp_path):
    monkeypatch.setattr(run_all, "BENCHMARKS", write_scripts(tmp_path, failing=FAILING_SCRIPT))
    assert run_all.main(["--benchmarks", "--results-dir", str(tmp_path / "results")]) == 0
    assert read_report(tmp_path / "results")["benchmarks"] == {}


def test_an_unknown_benchmark_is_refused(run_all, capsys):
    with pytest.raises(SystemExit) as stop:
        run_all.main(["--benchmarks", "bench_everything.py"])
    assert stop.value.code == 2 and "invalid choice" in capsys.readouterr().err


WARMING_SCRIPT = """
import argparse, json, time
from pathlib import Path
marker = Path(__file__).with_suffix(".warmed")
parser = argparse.ArgumentParser()
parser.add_argument("--json")
parser.add_argument("--warm", action="store_true")
args = parser.parse_args()
if args.warm:
    time.sleep(2)
    marker.write_text("compiled")
else:
    with open(args.json, "w") as f:
        json.dump({"rows": [{"warmed before it ran": marker.exists()}]}, f)
"""


@pytest.mark.parametrize("gpu", [True, False])
def test_a_warm_up_runs_alongside_the_tests_and_ends_before_its_benchmark(run_all, monkeypatch, tmp_path, gpu):
    (script,) = write_scripts(tmp_path, warming=WARMING_SCRIPT)
    tests = write_scripts(tmp_path, test_passing=PASSING_TESTS)
    monkeypatch.setattr(run_all, "BENCHMARKS", (script,))
    monkeypatch.setattr(run_all, "CUDA_TESTS", tests)
    monkeypatch.setattr(run_all, "WARM_UPS", {Path(script).name: ["--warm"]})
    monkeypatch.setattr(run_all, "_gpu_present", lambda: gpu)
    out = tmp_path / "out"
    assert run_all.main(["--tests", "--results-dir", str(tmp_path / "results"), "--out", str(out)]) == 0
    entry = read_report(tmp_path / "results")["benchmarks"][script]
    assert entry["results"] == {"rows": [{"warmed before it ran": gpu}]}
    if gpu:
        assert entry["warm_up"]["exit_code"] == 0 and entry["warm_up"]["seconds"] >= 2
        (archive_path,) = out.glob("*-logs.tar.gz")
        with tarfile.open(archive_path) as archive:
            assert any("warm-up" in name for name in archive.getnames())
    else:
        assert "warm_up" not in entry
