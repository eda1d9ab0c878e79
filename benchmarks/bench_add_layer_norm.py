"""Benchmark the fused residual add + LayerNorm (norm2) and LayerNorm (norm1) of RGT's blocks (CUDA only).

    python benchmarks/bench_add_layer_norm.py [--quick] [--json PATH]

For each shape and dtype, forward and forward+backward of
  * add+norm, fused:     rgt_fast.kernels.add_layer_norm.add_layer_norm(x, attended, norm2.weight, norm2.bias);
  * add+norm, reference: ``summed = x + attended; norm2(summed)``, plus, under autocast, the cast of the
                         normalised tensor to bf16 that the next Linear (fc1) performs, which the fused op
                         makes unnecessary;
  * norm, fused / reference: rgt_fast.kernels.add_layer_norm.layer_norm(x, ...) against ``norm1(x)`` and the
                         cast that the attention's projections perform under autocast.
bf16 rows run under autocast as training does: an fp32 residual stream, a bf16 attention output, fp32
parameters. Each row records wall and GPU-kernel milliseconds per call and the peak memory allocated beyond
the inputs (see bench_rgsa_attention.measure).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# Timing the interpreter would be meaningless, and it must be off before triton is first imported.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from bench_rgsa_attention import measure  # noqa: E402
from bench_spatial_gate import autocast_for, format_row  # noqa: E402
from rgt_fast.kernels.add_layer_norm import add_layer_norm, layer_norm  # noqa: E402

CHANNELS = 180
# (name, batch, tokens, dtypes, passes)
SHAPES = (
    ("train", 32, 64 * 64, (torch.bfloat16, torch.float32), (False, True)),
    ("infer-b8-128", 8, 128 * 128, (torch.bfloat16, torch.float32), (False,)),
    ("infer-1024", 1, 1024 * 1024, (torch.bfloat16,), (False,)),
)
QUICK_SHAPES = ("train", "infer-b8-128")


def run_row(name, batch, tokens, dtype, with_backward, rep_ms, with_add=True):
    row = {"name": f"{name} {'add+norm' if with_add else 'norm'}", "shape": f"B={batch} N={tokens} C={CHANNELS}",
           "dtype": str(dtype).removeprefix("torch."), "pass": "fwd+bwd" if with_backward else "fwd"}
    norm = torch.nn.LayerNorm(CHANNELS).cuda()
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn_like(norm.weight))
        norm.bias.add_(0.1 * torch.randn_like(norm.bias))
    x = torch.randn(batch, tokens, CHANNELS, device="cuda", requires_grad=with_backward)
    attended = torch.randn(batch, tokens, CHANNELS, device="cuda", dtype=dtype, requires_grad=with_backward)
    # Each implementation returns the tensors the block goes on with; the normalised one last, in the dtype the
    # next matmul reads (under autocast the reference's cast is part of what it costs).
    if with_add:
        leaves = [x, attended, norm.weight, norm.bias]
        implementations = {
            "fused": lambda: add_layer_norm(x, attended, norm.weight, norm.bias, norm.eps),
            "reference": lambda: (lambda summed: (summed, norm(summed).to(dtype)))(x + attended),
        }
        grad_dtypes = (torch.float32, dtype)
    else:
        leaves = [x, norm.weight, norm.bias]
        implementations = {"fused": lambda: (layer_norm(x, norm.weight, norm.bias, norm.eps),),
                           "reference": lambda: (norm(x).to(dtype),)}
        grad_dtypes = (dtype,)
    grads = [torch.randn(batch, tokens, CHANNELS, device="cuda", dtype=d) for d in grad_dtypes]
    if not with_backward:
        leaves = [x]
    normed_outputs = {}
    for impl_name, impl in implementations.items():
        if with_backward:
            def step():
                with autocast_for(dtype):
                    outputs = impl()
                torch.autograd.backward(list(outputs), grads)
        else:
            @torch.no_grad()
            def step():
                with autocast_for(dtype):
                    return impl()
        try:
            row[f"{impl_name}_ms"], row[f"{impl_name}_gpu_ms"], row[f"{impl_name}_peak_mb"] = measure(
                step, leaves, rep_ms)
            if not with_backward:
                normed_outputs[impl_name] = step()[-1].float()
        except torch.cuda.OutOfMemoryError:
            row[f"{impl_name}_ms"], row[f"{impl_name}_error"] = None, "out of memory"
        torch.cuda.empty_cache()
    if len(normed_outputs) == 2:
        row["max_abs_diff"] = (normed_outputs["fused"] - normed_outputs["reference"]).abs().max().item()
    if row.get("fused_ms") and row.get("reference_ms"):
        row["speedup"] = row["reference_ms"] / row["fused_ms"]
        row["gpu_speedup"] = row["reference_gpu_ms"] / row["fused_gpu_ms"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"only the shapes {', '.join(QUICK_SHAPES)}, with shorter timing runs")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON to PATH")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_add_layer_norm: no CUDA device, nothing measured (this benchmark needs a GPU).")
        return 0

    torch.manual_seed(0)
    rep_ms = 50 if args.quick else 200
    rows = []
    for name, batch, tokens, dtypes, passes in SHAPES:
        if args.quick and name not in QUICK_SHAPES:
            continue
        for dtype in dtypes:
            for with_backward in passes:
                for with_add in (True, False):
                    rows.append(run_row(name, batch, tokens, dtype, with_backward, rep_ms, with_add))
                    print(format_row(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
