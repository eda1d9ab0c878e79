"""Run every benchmark (and optionally the CUDA test suite) in one go and write one JSON of results.

    python benchmarks/run_all.py [--tests [--tests-budget SECONDS] [--test-files FILE ...]] [--quick]
                                 [--benchmarks [SCRIPT ...]] [--budget SECONDS] [--out DIR] [--results-dir DIR]

With ``--tests``, the CUDA test files run first, several at once and the longest split into shards (compiling
kernels keeps a CPU core busy per process), until ``--tests-budget``; of test_model.py only the tests that use the
GPU run (GPU_TEST_SELECTION). ``--test-files`` and ``--benchmarks`` choose a subset, so that a short device lease
can finish what an earlier run left unmeasured. Each benchmark script is then run in its own process with
``--json``, within its share of the time left (see SHARE_WEIGHTS); a script that fails or times out is recorded with
its exit code, the rows it wrote before it stopped, and the tail of its output, and the others still run. The result
file is ``benchmarks/results/<device>-<date>.json`` (and a copy in ``--out``), with device, versions and commit;
``--out`` also gets every step's whole output, as ``<device>-<date>-logs.tar.gz``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Most important first: a run that the --budget cuts short keeps the issues' headline figures.
# The whole model first: its rows answer the most targets (issues 5 and 6), and the first H100 run, which gave it
# the time left after both attentions, ended before its training rows.
BENCHMARKS = ("bench_model.py", "bench_rgsa_attention.py", "bench_lsa_attention.py", "bench_spatial_gate.py",
              "bench_add_layer_norm.py", "bench_launch_overhead.py", "sweep_tiles.py")
# Each script's share of the time left when it starts, against the scripts still to run (others weigh 1), so that
# no early script can take the whole budget; what a script leaves unused passes on to the next ones. The weights
# follow the work: RG-SA runs three implementations up to a million tokens, L-SA compiles FlexAttention at every
# shape, the model runs two networks at five points (on the H100, a share of 96 s covered only the first two and
# the drift, and no run has yet reached its training rows); the spatial gate, the norms and the launch costs are
# quick.
SHARE_WEIGHTS = {"bench_rgsa_attention.py": 3, "bench_lsa_attention.py": 3, "bench_model.py": 5}
# A benchmark given less than this would only record its own timeout.
_MIN_SCRIPT_SECONDS = 30
# The longest first, so that they start at once; the whole model before the single kernels.
CUDA_TESTS = ("tests/test_model.py", "tests/test_lsa_attention.py", "tests/test_rgsa_attention.py",
              "tests/test_spatial_gate.py", "tests/test_add_layer_norm.py", "tests/test_fake_implementations.py",
              "tests/test_kernel_casts.py", "tests/test_large_offsets.py", "tests/test_guards.py",
              "tests/test_tf32_switch.py", "tests/test_cuda_graph.py")
# Benchmarks that can compile their kernels ahead: the warm-up starts with the run, in the background, so that
# it compiles while the tests run (on the H100, compiling took most of bench_model's first 95 s); the benchmark
# waits for it before it starts.
WARM_UPS = {"bench_model.py": ["--warm"]}
# pytest -k selections for test files whose other tests need no GPU (CI runs those): only these run here.
GPU_TEST_SELECTION = {"tests/test_model.py": "triton or cuda"}
# Files split into this many processes (contiguous slices, tests/conftest.py's RGT_FAST_TEST_SHARD): compiling
# their kernel variants one after another took test_model and test_rgsa_attention past 240 s on the H100; in
# thirds, the first third of test_rgsa_attention (fp32 oracle cases) still ran past 180 s on the H200; its
# Hypothesis shapes alone (new fp32 kernel builds each) took over 130 s in a process of their own.
TEST_SHARDS = {"tests/test_model.py": 3, "tests/test_lsa_attention.py": 3, "tests/test_rgsa_attention.py": 8,
               "tests/test_spatial_gate.py": 2, "tests/test_add_layer_norm.py": 2}
# Test processes running at once: each compiles its kernels on one CPU core, and the tests themselves are small;
# two cores stay for the benchmarks' warm-ups.
TEST_PROCESSES = max(1, (os.cpu_count() or 2) - 2)
_PYTEST_SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed|skipped|errors?|deselected|xfailed|xpassed).*?)\s*=*$",
                             flags=re.M)


def _environment() -> dict:
    from rgt_fast.bench import environment
    from rgt_fast.inference import default_device

    return environment(default_device())


def run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code = 124
        output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
    print(output[-4000:], flush=True)
    return code, output, time.perf_counter() - start


def _test_entry(code: int, output: str, seconds: float) -> dict:
    summary = _PYTEST_SUMMARY.findall(output)
    return {"exit_code": code, "seconds": round(seconds, 1), "summary": summary[-1] if summary else output[-2000:],
            "failures": re.findall(r"^(?:FAILED|ERROR) .*$", output, flags=re.M)[:50]}


def _log_name(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", path) + ".log"


def _gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def start_warm_ups(scripts: list[str], env: dict, log_dir: Path) -> dict:
    """The warm-up of each of ``scripts`` that has one, started in the background (on a GPU only):
    script -> (process, start time, log file)."""
    if not _gpu_present():
        return {}
    started = {}
    for script in scripts:
        arguments = WARM_UPS.get(Path(script).name)
        if arguments is None:
            continue
        log = (log_dir / _log_name(f"{script}-warm-up")).open("w")
        process = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / script), *arguments], cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        started[script] = (process, time.perf_counter(), log)
    return started


def _stop(process: subprocess.Popen) -> int:
    """Kill a process started in a session of its own, with the processes it started: exit code 124, timeout's."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return 124


def finish_warm_up(process: subprocess.Popen, started: float, log, timeout: float) -> dict:
    """Wait for a warm-up (stopping it at ``timeout``): its exit code and seconds."""
    try:
        code = process.wait(timeout=max(0.0, timeout))
    except subprocess.TimeoutExpired:
        code = _stop(process)
    log.close()
    return {"exit_code": code, "seconds": round(time.perf_counter() - started, 1)}


def test_jobs(files: tuple[str, ...]) -> list[tuple[str, str, str | None]]:
    """(name in the report, test file, shard) for each pytest process to run; a file in TEST_SHARDS is N jobs named
    ``file [K/N]``."""
    jobs = []
    for test_file in files:
        count = TEST_SHARDS.get(test_file, 1)
        if count == 1:
            jobs.append((test_file, test_file, None))
        else:
            jobs += [(f"{test_file} [{k}/{count}]", test_file, f"{k}/{count}") for k in range(1, count + 1)]
    return jobs


def run_test_files(files: tuple[str, ...], deadline: float, env: dict, log_dir: Path, on_result) -> dict:
    """Each test file (or shard of one, see TEST_SHARDS) in a pytest process of its own, TEST_PROCESSES at a time,
    all stopped at ``deadline`` (exit code 124); one that cannot start with _MIN_SCRIPT_SECONDS left is skipped.
    ``on_result(name, entry)`` is called as each one ends."""
    jobs = test_jobs(files)
    pending, running, results = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < TEST_PROCESSES:
            name, test_file, shard = pending.pop(0)
            if deadline - time.perf_counter() < _MIN_SCRIPT_SECONDS:
                results[name] = {"skipped": "the test budget ran out before it could start"}
                on_result(name, results[name])
                continue
            log = log_dir / _log_name(name)
            handle = log.open("w")
            selection = ["-k", GPU_TEST_SELECTION[test_file]] if test_file in GPU_TEST_SELECTION else []
            process = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10", *selection,
                 test_file],
                cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                env={**env, "RGT_FAST_TEST_SHARD": shard} if shard else env)
            running[name] = (process, time.perf_counter(), log, handle)
        time.sleep(0.2)
        for name, (process, started, log, handle) in list(running.items()):
            code = process.poll()
            if code is None and time.perf_counter() >= deadline:
                code = _stop(process)
            if code is None:
                continue
            handle.close()
            output = log.read_text(errors="replace")
            print(f"== {name} (exit {code})\n{output[-4000:]}", flush=True)
            results[name] = _test_entry(code, output, time.perf_counter() - started)
            on_result(name, results[name])
            del running[name]
    return {name: results[name] for name, _, _ in jobs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", action="store_true", help="run the kernel and model test files on CUDA first")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per benchmark script")
    parser.add_argument("--tests-budget", type=float, default=240,
                        help="seconds for all the test files together, within --budget")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run: what would start after it is recorded as skipped")
    parser.add_argument("--benchmarks", nargs="*", choices=BENCHMARKS, default=BENCHMARKS, metavar="SCRIPT",
                        help=f"only these benchmark scripts, none if the list is empty (default: all, "
                             f"in this order: {' '.join(BENCHMARKS)})")
    parser.add_argument("--test-files", nargs="*", choices=CUDA_TESTS, default=CUDA_TESTS, metavar="FILE",
                        help="with --tests, only these test files (default: all of CUDA_TESTS)")
    parser.add_argument("--out", type=Path, help="also copy the result JSON here")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where <device>-<date>.json is written (default: benchmarks/results)")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    report = {"environment": _environment(), "tests": None, "benchmarks": {}}
    device = re.sub(r"[^A-Za-z0-9]+", "-", report["environment"]["device"]).strip("-").lower()
    name = f"{device}-{report['environment']['date'][:10]}.json"
    destinations = [args.results_dir / name] + ([args.out / name] if args.out else [])
    log_dir = Path(tempfile.mkdtemp(prefix="run_all-logs-"))

    def save() -> None:
        # After every step, so that a run cut short (a device lease ending) still leaves what it measured.
        for path in destinations:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2) + "\n")
        if args.out:
            with tarfile.open(args.out / name.replace(".json", "-logs.tar.gz"), "w:gz") as archive:
                for log in sorted(log_dir.iterdir()):
                    archive.add(log, arcname=log.name)

    def budget_left() -> float:
        return float("inf") if args.budget is None else args.budget - (time.perf_counter() - start)

    def time_left() -> float:
        return min(args.timeout, budget_left())

    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
    benchmarks = [script for script in BENCHMARKS if script in args.benchmarks]
    warm_ups = start_warm_ups(benchmarks, env, log_dir)
    if args.tests:
        # One process per file: a file that hangs or runs out of time costs only its own result.
        report["tests"] = {}

        def record(test_file: str, entry: dict) -> None:
            report["tests"][test_file] = entry
            save()

        deadline = time.perf_counter() + min(args.tests_budget, budget_left())
        test_files = tuple(f for f in CUDA_TESTS if f in args.test_files)
        report["tests"] = run_test_files(test_files, deadline, env, log_dir, record)
        save()
    for position, script in enumerate(benchmarks):
        warm_up = finish_warm_up(*warm_ups[script], timeout=time_left()) if script in warm_ups else None
        if time_left() < _MIN_SCRIPT_SECONDS:
            report["benchmarks"][script] = {"skipped": "the --budget ran out before it could start"}
            continue
        weights = [SHARE_WEIGHTS.get(Path(name).name, 1) for name in benchmarks[position:]]
        # The share is of the whole budget left (not of one script's --timeout), then capped by the timeout.
        share = max(_MIN_SCRIPT_SECONDS, budget_left() * weights[0] / sum(weights))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "result.json"
            cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--json", str(path)]
            code, output, seconds = run(cmd + (["--quick"] if args.quick else []), timeout=min(share, time_left()),
                                        env=env)
            (log_dir / _log_name(script)).write_text(output)
            entry = {"exit_code": code, "seconds": round(seconds, 1)}
            if warm_up is not None:
                entry["warm_up"] = warm_up
            if path.exists():
                entry["results"] = json.loads(path.read_text())
            if code != 0 or not path.exists():
                entry["output_tail"] = output[-3000:]
            report["benchmarks"][script] = entry
        save()
    save()
    shutil.rmtree(log_dir, ignore_errors=True)
    print(f"wrote {destinations[0]}")
    failed = [s for s, e in report["benchmarks"].items() if e.get("exit_code", 0) != 0]
    failed += [f for f, e in (report["tests"] or {}).items() if e.get("exit_code", 0) != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
