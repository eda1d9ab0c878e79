"""Benchmark the fused spatial gate of RGT's MLP against the reference modules (CUDA only).

    python benchmarks/bench_spatial_gate.py [--quick] [--json PATH]

Between the MLP's fc1 and fc2, for each shape and dtype, forward and forward+backward of
  * fused:     rgt_fast.kernels.spatial_gate.spatial_gate on fc1's (B, H*W, 360) output;
  * reference: the reference MLP's GELU and SpatialGate module (chunk, LayerNorm, channel-first view, depthwise
               3x3 conv, product), as the model runs them.
bf16 rows run under autocast with fp32 parameters, as training and ``rgt_fast.upscale`` do. Each row records
wall and GPU-kernel milliseconds per call and the peak memory allocated beyond the inputs (see
bench_rgsa_attention.measure).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

# Timing the interpreter would be meaningless, and it must be off before triton is first imported.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from bench_rgsa_attention import measure  # noqa: E402
from rgt_fast.kernels.spatial_gate import spatial_gate  # noqa: E402
from rgt_fast.reference.rgt import SpatialGate  # noqa: E402

CHANNELS = 180  # RGT and RGT-S: embed 180, mlp ratio 2, so fc1 gives 360 channels and the gate 180
# (name, batch, height, width, dtypes, passes)
SHAPES = (
    ("train", 32, 64, 64, (torch.bfloat16, torch.float32), (False, True)),
    ("infer-b8-128", 8, 128, 128, (torch.bfloat16, torch.float32), (False,)),
    ("infer-512", 1, 512, 512, (torch.bfloat16,), (False,)),
    ("infer-1024", 1, 1024, 1024, (torch.bfloat16,), (False,)),
)
QUICK_SHAPES = ("train", "infer-b8-128")


def autocast_for(dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def run_row(name, batch, height, width, dtype, with_backward, rep_ms):
    row = {"name": name, "shape": f"B={batch} {height}x{width} hidden={2 * CHANNELS}",
           "dtype": str(dtype).removeprefix("torch."), "pass": "fwd+bwd" if with_backward else "fwd"}
    module = SpatialGate(CHANNELS).cuda()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hidden = torch.randn(batch, height * width, 2 * CHANNELS, device="cuda", dtype=dtype,
                         requires_grad=with_backward)
    leaves = [hidden, *module.parameters()] if with_backward else [hidden]
    grad = torch.randn(batch, height * width, CHANNELS, device="cuda", dtype=dtype) if with_backward else None
    gate_params = (module.norm.weight, module.norm.bias, module.conv.weight, module.conv.bias, module.norm.eps)
    implementations = {
        "fused": lambda: spatial_gate(hidden, height, width, *gate_params),
        "reference": lambda: module(torch.nn.functional.gelu(hidden), height, width),
    }
    outputs = {}
    for impl_name, impl in implementations.items():
        if with_backward:
            def step():
                with autocast_for(dtype):
                    out = impl()
                out.backward(grad)
        else:
            @torch.no_grad()
            def step():
                with autocast_for(dtype):
                    return impl()
        try:
            row[f"{impl_name}_ms"], row[f"{impl_name}_gpu_ms"], row[f"{impl_name}_peak_mb"] = measure(
                step, leaves, rep_ms)
            if not with_backward:
                outputs[impl_name] = step().float()
        except torch.cuda.OutOfMemoryError:
            row[f"{impl_name}_ms"], row[f"{impl_name}_error"] = None, "out of memory"
        torch.cuda.empty_cache()
    if len(outputs) == 2:
        row["max_abs_diff"] = (outputs["fused"] - outputs["reference"]).abs().max().item()
    if row.get("fused_ms") and row.get("reference_ms"):
        row["speedup"] = row["reference_ms"] / row["fused_ms"]
        row["gpu_speedup"] = row["reference_gpu_ms"] / row["fused_gpu_ms"]
    return row


def format_row(row):
    def cell(key, digits=3):
        value = row.get(key)
        return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))
    notes = "; ".join(f"{impl}: {row[f'{impl}_error']}" for impl in ("fused", "reference") if f"{impl}_error" in row)
    return (f"{row['name']:<14} {row['dtype']:<9} {row['pass']:<8} fused {cell('fused_ms')} ms "
            f"(gpu {cell('fused_gpu_ms')}, {cell('fused_peak_mb', 1)} MB)  reference {cell('reference_ms')} ms "
            f"(gpu {cell('reference_gpu_ms')}, {cell('reference_peak_mb', 1)} MB)  x{cell('speedup', 2)} "
            f"(gpu x{cell('gpu_speedup', 2)})  max diff {cell('max_abs_diff', 5)} {notes}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"only the shapes {', '.join(QUICK_SHAPES)}, with shorter timing runs")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON to PATH")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_spatial_gate: no CUDA device, nothing measured (this benchmark needs a GPU).")
        return 0

    torch.manual_seed(0)
    rep_ms = 50 if args.quick else 200
    rows = []
    for name, batch, height, width, dtypes, passes in SHAPES:
        if args.quick and name not in QUICK_SHAPES:
            continue
        for dtype in dtypes:
            for with_backward in passes:
                rows.append(run_row(name, batch, height, width, dtype, with_backward, rep_ms))
                print(format_row(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
