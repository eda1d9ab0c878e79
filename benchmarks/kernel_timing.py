"""What the CUDA kernel benchmarks share: timing a step, fused-against-reference rows, the command line."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable, Iterable

# Timing the interpreter would be meaningless, and it must be off before triton is first imported.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from rgt_fast.bench import autocast_to, describe_failure  # noqa: E402
from rgt_fast.files import write_atomically  # noqa: E402

# Where the benchmarks put their tensors; the tests run the benchmarks' rows on CPU tensors in the interpreter.
DEVICE = "cuda"


def measure(step, leaves, rep_ms):
    """Median wall milliseconds per call of ``step``, GPU kernel milliseconds per call, and the peak memory (MB)
    it allocates beyond what exists before it.

    The wall time includes the CPU cost of launching: at the training shape the kernels are short enough that
    autograd and launch overheads can exceed them, so the kernel time is reported too.
    """
    import triton.testing
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    wall_ms = triton.testing.do_bench(step, warmup=max(5, rep_ms // 10), rep=rep_ms, grad_to_none=list(leaves),
                                      return_mode="median")
    calls = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    gpu_us = sum(event.self_device_time_total for event in prof.key_averages()
                 if event.device_type == torch.autograd.DeviceType.CUDA)
    return wall_ms, gpu_us / calls / 1000, peak_mb


def autocast_for(dtype):
    """Autocast to a 16-bit ``dtype`` on DEVICE (as training and inference run the model); fp32 runs as it is."""
    return autocast_to(torch.device(DEVICE), dtype)


def time_fused_and_reference(row: dict, implementations: dict, leaves: list, grads: list | None, dtype,
                             rep_ms: int) -> dict:
    """Fill ``row`` with the timings of the "fused" and "reference" implementations under ``autocast_for(dtype)``.

    Each implementation returns a tuple of tensors, the one to compare last. With ``grads`` the step is
    forward+backward (one gradient per returned tensor), else forward only, and the last outputs are compared.
    An out-of-memory error is recorded in the row and the other implementation still runs.
    """
    outputs = {}
    for impl_name, impl in implementations.items():
        if grads is not None:
            def step():
                with autocast_for(dtype):
                    results = impl()
                torch.autograd.backward(list(results), grads)
        else:
            @torch.no_grad()
            def step():
                with autocast_for(dtype):
                    return impl()
        try:
            row[f"{impl_name}_ms"], row[f"{impl_name}_gpu_ms"], row[f"{impl_name}_peak_mb"] = measure(
                step, leaves, rep_ms)
            if grads is None:
                outputs[impl_name] = step()[-1].float()
        except torch.cuda.OutOfMemoryError:
            row[f"{impl_name}_ms"], row[f"{impl_name}_error"] = None, "out of memory"
        except Exception as error:  # a kernel that fails on this device must not end the benchmark
            row[f"{impl_name}_ms"], row[f"{impl_name}_error"] = None, describe_failure(error)
        torch.cuda.empty_cache()
    if len(outputs) == 2:
        row["max_abs_diff"] = (outputs["fused"] - outputs["reference"]).abs().max().item()
    if row.get("fused_ms") and row.get("reference_ms"):
        row["speedup"] = row["reference_ms"] / row["fused_ms"]
        row["gpu_speedup"] = row["reference_gpu_ms"] / row["fused_gpu_ms"]
    return row


def format_row(row: dict) -> str:
    """One line for a row of :func:`time_fused_and_reference`."""
    def cell(key, digits=3):
        value = row.get(key)
        return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))
    notes = "; ".join(f"{impl}: {row[f'{impl}_error']}" for impl in ("fused", "reference") if f"{impl}_error" in row)
    return (f"{row['name']:<14} {row['dtype']:<9} {row['pass']:<8} fused {cell('fused_ms')} ms "
            f"(gpu {cell('fused_gpu_ms')}, {cell('fused_peak_mb', 1)} MB)  reference {cell('reference_ms')} ms "
            f"(gpu {cell('reference_gpu_ms')}, {cell('reference_peak_mb', 1)} MB)  x{cell('speedup', 2)} "
            f"(gpu x{cell('gpu_speedup', 2)})  max diff {cell('max_abs_diff', 5)} {notes}")


def benchmark_main(argv: list[str] | None, doc: str, script: str, quick_shapes: Iterable[str],
                   make_rows: Callable[[bool, int], Iterable[dict]],
                   describe: Callable[[dict], str]) -> list[dict] | None:
    """The command line of a kernel benchmark: ``[--quick] [--json PATH]``.

    ``make_rows(quick, rep_ms)`` yields the measured rows, each printed with ``describe`` as it comes; they are
    written to ``--json`` with the device and torch version. Returns the rows, or None without a GPU.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"only the shapes {', '.join(quick_shapes)}, with shorter timing runs")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON to PATH")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{script}: no CUDA device, nothing measured (this benchmark needs a GPU).")
        return None

    torch.manual_seed(0)
    rows = []
    for row in make_rows(args.quick, 50 if args.quick else 200):
        rows.append(row)
        print(describe(row), flush=True)
        if args.json:
            write_rows(args.json, {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows})
    return rows


def write_rows(path: str, payload: dict) -> None:
    """Replace the JSON at ``path`` with ``payload``; called after every row, so that a benchmark stopped by
    its time limit still leaves the rows it measured."""
    write_atomically((json.dumps(payload, indent=1) + "\n").encode(), Path(path))
