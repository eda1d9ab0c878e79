"""Run every benchmark (and optionally the CUDA test suite) in one go and write one JSON of results.

    python benchmarks/run_all.py [--tests] [--quick] [--out DIR]

Each benchmark script is run in its own process with ``--json``; a script that fails or times out is
recorded with its exit code and the tail of its output, and the others still run. The result file is
``benchmarks/results/<device>-<date>.json`` (and a copy in ``--out``), with device, versions and commit.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("bench_rgsa_attention.py", "bench_lsa_attention.py", "bench_model.py")
CUDA_TESTS = ("tests/test_rgsa_attention.py", "tests/test_lsa_attention.py")


def environment() -> dict:
    import torch
    import triton

    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
        "cuda": torch.version.cuda, "device": "cpu",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sm_count=props.multi_processor_count,
                    memory_gb=round(props.total_memory / 2**30, 1), capability=list(torch.cuda.get_device_capability()))
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                        check=True).stdout.strip()
        info["dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                            capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = os.environ.get("RGT_FAST_COMMIT", "unknown")
    return info


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", action="store_true", help="run the kernel test files on CUDA first")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per benchmark script")
    parser.add_argument("--out", type=Path, help="also copy the result JSON here")
    args = parser.parse_args()

    report = {"environment": environment(), "tests": None, "benchmarks": {}}
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
    if args.tests:
        code, output, seconds = run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                     *CUDA_TESTS], timeout=args.timeout, env=env)
        summary = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", output, flags=re.M)
        report["tests"] = {"exit_code": code, "seconds": round(seconds, 1),
                           "summary": summary[-1] if summary else output[-2000:]}
    for script in BENCHMARKS:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "result.json"
            cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--json", str(path)]
            code, output, seconds = run(cmd + (["--quick"] if args.quick else []), timeout=args.timeout, env=env)
            entry = {"exit_code": code, "seconds": round(seconds, 1)}
            if path.exists():
                entry["results"] = json.loads(path.read_text())
            else:
                entry["output_tail"] = output[-3000:]
            report["benchmarks"][script] = entry

    device = re.sub(r"[^A-Za-z0-9]+", "-", report["environment"]["device"]).strip("-").lower()
    name = f"{device}-{report['environment']['date'][:10]}.json"
    results_dir = ROOT / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / name).write_text(json.dumps(report, indent=2) + "\n")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(results_dir / name, args.out / name)
    print(f"wrote {results_dir / name}")
    failed = [s for s, e in report["benchmarks"].items() if e["exit_code"] != 0]
    if report["tests"] and report["tests"]["exit_code"] != 0:
        failed.append("tests")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
