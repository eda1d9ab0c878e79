"""Fused against reference RGT with the same weights, on the current device, in one run (``rgt-fast bench``)."""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .config import preset_kwargs
from .inference import DTYPES, default_device, parse_device
from .model import accelerate
from .reference import RGT as ReferenceRGT
from .reference.rgt import recursion_count



def model_flops(model: torch.nn.Module, H: int, W: int) -> float:
    """2 x multiply-adds of the convolutions, linear layers and attention matmuls for one H x W image (eval).

    RGT x4 at 128x128 gives 248.8 G multiply-adds (the paper counts 251.07 G), RGT-S 191.3 G (193.08 G).
    """
    C, N, feat = model.embed_dim, H * W, model.num_feat
    flops = 2 * N * 3 * C * 9 + 2 * N * C * C * 9 + 2 * N * C * feat * 9
    for group in model.layers:
        flops += 2 * N * C * C * 9
        for block in group.blocks:
            hidden = block.mlp.fc1.out_features
            flops += 2 * N * (C * hidden + hidden // 2 * 9 + hidden // 2 * C)
            attn = block.attn
            if hasattr(attn, "attns"):
                # qkv, proj, get_v; scores and P@V of both branches over 256-token windows
                flops += 2 * N * (3 * C * C + C * C + 9 * C) + 2 * 2 * N * 256 * C
            else:
                steps = recursion_count(H, W, training=False)
                n_rep = (H // 4 ** steps) * (W // 4 ** steps)
                flops += 2 * N * (C * attn.cr + C * C) + 2 * N * n_rep * (attn.cr + C)
    pixels = N
    for module in model.upsample:
        if isinstance(module, torch.nn.Conv2d):
            flops += 2 * pixels * module.in_channels * module.out_channels * 9
        else:
            pixels *= module.upscale_factor ** 2
    return flops + 2 * pixels * feat * 3 * 9


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_median_ms(fns: list[Callable[[], object]], warmup: int, iters: int,
                          device: torch.device) -> list[float]:
    """Median wall time in ms of each of ``fns``, synchronising the device around each call.

    The functions are timed in turns, so that a machine whose speed drifts during the run (a CPU shared with
    other work, a GPU changing clocks) slows all of them alike instead of whichever ran last.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, fn_samples in zip(fns, samples):
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            fn_samples.append((time.perf_counter() - start) * 1000)
    return [sorted(fn_samples)[len(fn_samples) // 2] for fn_samples in samples]


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field}")


def _release_free_heap() -> None:
    # glibc keeps freed heap pages resident, so a model run a second time would reuse them and read ~0 MiB of
    # growth; handing them back first makes repeated measurements agree. musl has no malloc_trim.
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except AttributeError:
        pass


def _cpu_peak_mb(fn: Callable[[], object]) -> float | None:
    if not sys.platform.startswith("linux"):
        return None
    _release_free_heap()
    try:
        # "5" resets the kernel's high-water mark (VmHWM) to the current resident set size.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_mib("VmRSS")
    except OSError:
        return None
    fn()
    return _proc_status_mib("VmHWM") - base


def peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory in MiB that ``fn`` needs beyond what was already in use, or None where it cannot be measured.

    On CUDA it is the caching allocator's peak of allocated bytes. On CPU (Linux only, through /proc) it is the
    peak growth of the process's resident set, so it includes allocator behaviour (fragmentation, pages the
    allocator keeps resident) and anything else the process touches meanwhile; free heap memory is handed back
    to the system before the baseline is read, where the C library allows it (glibc's malloc_trim).
    """
    gc.collect()
    if device.type == "cpu":
        return _cpu_peak_mb(fn)
    if device.type != "cuda":
        return None
    _synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    _synchronize(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


BREAKDOWN_ENTRIES = 12
# Rows profile one more call of each model here: a GPU call is short, and a lent GPU cannot be asked twice. On a
# CPU, a profiled run would add minutes to `rgt-fast bench`.
BREAKDOWN_DEVICE_TYPES = ("cuda",)


def time_breakdown(fn: Callable[[], object], device: torch.device) -> list[dict]:
    """Where one call of ``fn`` spends its time: on CUDA the GPU kernels, elsewhere the operators, with the most
    own time, as {name, ms, share of the total own time, count}."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as profiler:
        fn()
        _synchronize(device)
    if on_gpu:
        events = [e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        own_us = {e.key: e.self_device_time_total for e in events}
    else:
        events = list(profiler.key_averages())
        own_us = {e.key: e.self_cpu_time_total for e in events}
    total = sum(own_us.values()) or 1.0
    ranked = sorted(events, key=lambda e: own_us[e.key], reverse=True)[:BREAKDOWN_ENTRIES]
    return [{"name": e.key[:160], "ms": own_us[e.key] / 1000, "share": own_us[e.key] / total, "count": e.count}
            for e in ranked]


def autocast_to(device: torch.device, dtype: torch.dtype | None, cache_enabled: bool = True):
    """Autocast to a 16-bit ``dtype``; None or float32 runs the models as they are."""
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


def _dtype_label(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype in (None, torch.float32) else str(dtype).replace("torch.", "")


def _out_of_memory(err: torch.cuda.OutOfMemoryError) -> str:
    return f"out of memory: {str(err).splitlines()[0][:200]}"


def describe_failure(err: Exception) -> str:
    """An exception as a benchmark row records it: its type and the start of its message."""
    return f"{type(err).__name__}: {str(err)[:300]}"


def _compare(row: dict, name_to_call: dict[str, Callable[[], object]], device: torch.device, warmup: int,
             iters: int) -> dict:
    """Fill ``row`` with the first result, median ms and peak MB of each of the "reference" and "fused" calls.

    A model that runs out of memory (or fails otherwise) gets a ``<model>_error`` entry and the other is still
    measured: at the largest sizes the reference is expected not to fit, and the fused model's figures are the point
    of the row.
    Returns the first results of the models that ran.
    """
    firsts, fitting = {}, {}
    for label, call in name_to_call.items():
        try:
            firsts[label] = call()
            fitting[label] = call
        except torch.cuda.OutOfMemoryError as err:
            row[f"{label}_error"] = _out_of_memory(err)
        except Exception as err:  # a kernel that fails on this device: the other model's figures still count
            row[f"{label}_error"] = describe_failure(err)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    medians = interleaved_median_ms(list(fitting.values()), warmup, iters, device)
    for label, median in zip(fitting, medians):
        row[f"{label}_ms"] = median
    if "reference" in fitting and "fused" in fitting:
        row["speedup"] = row["reference_ms"] / row["fused_ms"]
    for label, call in fitting.items():
        row[f"{label}_peak_mb"] = peak_mb(call, device)
        if device.type not in BREAKDOWN_DEVICE_TYPES:
            continue
        try:
            row[f"{label}_time_breakdown"] = time_breakdown(call, device)
        except Exception as err:  # the profile is a diagnosis: the row's figures stand without it
            row[f"{label}_time_breakdown_failed"] = describe_failure(err)
    return firsts


def inference_row(name: str, reference, fused, x: torch.Tensor, dtype, warmup: int, iters: int) -> dict:
    device = x.device

    def runner(model):
        def call():
            with torch.no_grad(), autocast_to(device, dtype):
                return model(x)
        return call

    reference.eval()
    fused.eval()
    row = {"name": name, "mode": "inference", "shape": list(x.shape), "dtype": _dtype_label(dtype)}
    outputs = _compare(row, {"reference": runner(reference), "fused": runner(fused)}, device, warmup, iters)
    if len(outputs) == 2:
        row["max_abs_err"] = (outputs["reference"].float() - outputs["fused"].float()).abs().max().item()
    del outputs
    if "fused_ms" in row:
        row["fused_tflops"] = model_flops(fused, x.shape[-2], x.shape[-1]) * x.shape[0] / row["fused_ms"] / 1e9
    return row


def _l1_update(model, optimizer, dtype):
    """One training step after the gradients are cleared: forward under autocast to ``dtype``, L1 loss, backward,
    optimizer step; returns the loss, detached. The autocast weight cache is off, as a CUDA graph needs."""
    def forward_backward_update(lq, gt):
        with autocast_to(lq.device, dtype, cache_enabled=False):
            loss = torch.nn.functional.l1_loss(model(lq).float(), gt)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return forward_backward_update


def _upscaled_target(model, x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x.shape[0], x.shape[1], x.shape[2] * model.upscale, x.shape[3] * model.upscale,
                      device=x.device)


def _seeded(step):
    # Both models' first steps see the same random state, so that their losses are comparable.
    def first_step():
        torch.manual_seed(0)
        return step()
    return first_step


def training_row(name: str, reference, fused, x: torch.Tensor, dtype, warmup: int, iters: int) -> dict:
    """One Adam step on an L1 loss; both models start from the same weights and take the same steps.

    Each model keeps one optimizer throughout, so the timed steps and the peak memory are those of steady-state
    training: Adam's state exists before they start."""
    target = _upscaled_target(reference, x)

    def stepper(model):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-7)
        forward_backward_update = _l1_update(model, optimizer, dtype)

        def step():
            optimizer.zero_grad(set_to_none=True)
            return forward_backward_update(x, target).item()
        return step

    reference.train()
    fused.train()
    row = {"name": name, "mode": "train", "shape": list(x.shape), "dtype": _dtype_label(dtype)}
    losses = _compare(row, {label: _seeded(stepper(model)) for label, model in
                            (("reference", reference), ("fused", fused))}, device=x.device, warmup=warmup,
                      iters=iters)
    if len(losses) == 2:
        row["max_abs_err"] = abs(losses["reference"] - losses["fused"])
    for label in losses:
        row[f"{label}_it_per_s"] = 1000.0 / row[f"{label}_ms"]
    return row


def graph_training_row(name: str, reference, fused, x: torch.Tensor, dtype, warmup: int, iters: int) -> dict:
    """The training step as ``rgt-fast train`` runs it on CUDA, for each model (on a copy): fused Adam, a few eager
    steps, then the step recorded once as a CUDA graph and replayed. Peak memory includes the graph's private pool,
    which keeps the step's activations between replays."""
    from .training.cuda_graph import CapturedStep
    from .training.trainer import EAGER_STEPS_BEFORE_CAPTURE

    target = _upscaled_target(reference, x)
    pools_mb = {}

    def graph_stepper(label, model):
        model = copy.deepcopy(model).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-7, fused=True)
        forward_backward_update = _l1_update(model, optimizer, dtype)
        for _ in range(EAGER_STEPS_BEFORE_CAPTURE):
            optimizer.zero_grad(set_to_none=True)
            forward_backward_update(x, target)
        _synchronize(x.device)
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(x.device)
        captured = CapturedStep(forward_backward_update, optimizer, x, target)
        pools_mb[label] = (torch.cuda.memory_reserved(x.device) - reserved) / 2**20
        return lambda: captured(x, target).item()

    row = {"name": name, "mode": "train-graph", "shape": list(x.shape), "dtype": _dtype_label(dtype)}
    steps = {}
    for label, model in (("reference", reference), ("fused", fused)):
        try:
            steps[label] = graph_stepper(label, model)
        except Exception as err:  # a model whose step cannot be recorded: the other's figures still count
            row[f"{label}_error"] = describe_failure(err)
    _compare(row, steps, device=x.device, warmup=warmup, iters=iters)
    for label, pool_mb in pools_mb.items():
        if f"{label}_ms" in row:
            row[f"{label}_it_per_s"] = 1000.0 / row[f"{label}_ms"]
            row[f"{label}_peak_mb"] += pool_mb
    return row


def guarded(rows: list, row_fn: Callable[..., dict], name: str, *args) -> None:
    """Run one row; an error outside the models' own runs (running out of memory while building inputs, say)
    becomes a row that says so, and the other rows still run."""
    try:
        rows.append(row_fn(name, *args))
    except torch.cuda.OutOfMemoryError as err:
        rows.append({"name": name, "error": _out_of_memory(err)})
    except Exception as err:
        rows.append({"name": name, "error": describe_failure(err)})
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build_pair(model: str, scale: int, device: torch.device, backend: str = "auto"):
    """A freshly initialised reference and the fused model with the same weights, on ``device``."""
    torch.manual_seed(0)
    reference = ReferenceRGT(**preset_kwargs(model, scale)).to(device)
    return reference, accelerate(reference, backend=backend)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'' if threads == 1 else 's'})"


def _source_commit() -> tuple[str, bool | None]:
    """RGT_FAST_COMMIT when set (a copied working tree can carry stale git metadata: the device machine's said
    0a2e25f for the tree of 309cd67); else the git commit of the project checkout this package runs from (and
    whether tracked files differ from it); "unknown" for an installed copy or a machine without git."""
    if os.environ.get("RGT_FAST_COMMIT"):
        return os.environ["RGT_FAST_COMMIT"], None
    checkout = Path(__file__).resolve().parent.parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=checkout, capture_output=True, text=True,
                             check=True).stdout.strip()
        if Path(top).resolve() != checkout:
            raise FileNotFoundError(top)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout,
                                    capture_output=True, text=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Where and with what a benchmark ran: date, versions, device, and the project's commit."""
    import triton

    commit, dirty = _source_commit()
    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
            "device": device_name(device), "commit": commit, "dirty": dirty}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(sm_count=props.multi_processor_count, memory_gb=round(props.total_memory / 2**30, 1),
                    capability=list(torch.cuda.get_device_capability(device)))
    else:
        # The C allocator's settings change CPU timings: glibc returns large freed blocks to the system, and a
        # model that allocates large temporaries then pays page faults on every call.
        allocator = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
        info.update(cpu=_cpu_name(), cpu_count=os.cpu_count(), allocator_env=allocator)
    return info


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"size must look like 64x64, got {text!r}") from err
    return h, w


def parse_batch(text: str) -> int:
    try:
        batch = int(text)
    except ValueError:
        batch = 0
    if batch < 1:
        raise argparse.ArgumentTypeError(f"batch must be a positive whole number, got {text!r}")
    return batch


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="one size, few repetitions (about a minute on CPU)")
    parser.add_argument("--model", choices=["RGT", "RGT-S"], default="RGT-S")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--size", type=parse_size, nargs="+", help="input sizes HxW (default 64x64 on CPU, "
                        "128x128 on CUDA)")
    parser.add_argument("--batch", type=parse_batch, default=1)
    parser.add_argument("--dtype", choices=list(DTYPES), nargs="+", default=["fp32"])
    parser.add_argument("--train", action="store_true", help="also time a training step (Adam, L1)")
    parser.add_argument("--device", type=parse_device, help="default: cuda if available, else cpu")
    parser.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    parser.add_argument("--json", help="write the results here")


def run_bench(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    sizes = args.size or [(128, 128) if device.type == "cuda" else (64, 64)]
    warmup, iters = (1, 2) if args.quick else (2, 5)
    if args.quick:
        sizes = sizes[:1]
    reference, fused = build_pair(args.model, args.scale, device, args.backend)
    rows: list[dict] = []
    for H, W in sizes:
        x = torch.rand(args.batch, 3, H, W, device=device)
        for dtype_name in args.dtype:
            label = f"{args.model} x{args.scale} {H}x{W} b{args.batch} {dtype_name}"
            guarded(rows, inference_row, label, reference, fused, x, DTYPES[dtype_name], warmup, iters)
            if args.train:
                guarded(rows, training_row, label + " train", reference, fused, x, DTYPES[dtype_name], warmup,
                        iters)
    report = {**environment(device), "backend": args.backend, "results": rows}
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if any(failures(row) for row in rows) else 0


def failures(row: dict) -> list[str]:
    """The errors of a row other than running out of memory (which the reference is expected to do at the
    largest sizes)."""
    errors = [value for key, value in row.items() if key == "error" or key.endswith("_error")]
    return [error for error in errors if not error.startswith("out of memory")]


def format_table(rows: list[dict]) -> str:
    header = (f"{'name':<40} {'reference ms':>12} {'fused ms':>10} {'speedup':>8} {'max abs err':>12} "
              f"{'peak MB ref/fused':>18}")
    lines = [header, "-" * len(header)]

    def cell(row: dict, key: str, spec: str) -> str:
        return "-" if row.get(key) is None else format(row[key], spec)

    for row in rows:
        if "error" in row:
            lines.append(f"{row['name']:<40} {row['error']}")
            continue
        memory = f"{cell(row, 'reference_peak_mb', '.0f')}/{cell(row, 'fused_peak_mb', '.0f')}"
        speedup = "-" if row.get("speedup") is None else f"{row['speedup']:.2f}x"
        lines.append(f"{row['name']:<40} {cell(row, 'reference_ms', '.2f'):>12} {cell(row, 'fused_ms', '.2f'):>10} "
                     f"{speedup:>8} {cell(row, 'max_abs_err', '.2e'):>12} {memory:>18}")
        lines.extend(f"{'':<40} {label}: {row[f'{label}_error']}" for label in ("reference", "fused")
                     if f"{label}_error" in row)
    return "\n".join(lines)
