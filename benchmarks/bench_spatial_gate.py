"""Benchmark the fused spatial gate of RGT's MLP against the reference modules (CUDA only).

    python benchmarks/bench_spatial_gate.py [--quick] [--json PATH]

After the MLP's fc1, for each shape and dtype, forward and forward+backward of
  * fused:     rgt_fast.kernels.spatial_gate.spatial_gate on fc1's (B, H*W, 360) output with fc2 as its
               projection, as the fused model runs it (the backward recomputes the gate's output for fc2);
  * reference: the reference MLP's GELU, SpatialGate module (chunk, LayerNorm, channel-first view, depthwise
               3x3 conv, product) and fc2, as the model runs them.
bf16 rows run under autocast with fp32 parameters, as training and ``rgt_fast.upscale`` do. Each row records
wall and GPU-kernel milliseconds per call and the peak memory allocated beyond the inputs (see
kernel_timing.measure).
"""
from __future__ import annotations

import sys

from kernel_timing import DEVICE, benchmark_main, format_row, time_fused_and_reference  # first: interpreter off
import torch

from rgt_fast.kernels.spatial_gate import spatial_gate
from rgt_fast.reference.rgt import SpatialGate

CHANNELS = 180  # RGT and RGT-S: embed 180, mlp ratio 2, so fc1 gives 360 channels and the gate 180
# (name, batch, height, width, dtypes, passes)
SHAPES = (
    ("train", 32, 64, 64, (torch.bfloat16, torch.float32), (False, True)),
    ("infer-b8-128", 8, 128, 128, (torch.bfloat16, torch.float32), (False,)),
    ("infer-512", 1, 512, 512, (torch.bfloat16,), (False,)),
    ("infer-1024", 1, 1024, 1024, (torch.bfloat16,), (False,)),
)
QUICK_SHAPES = ("train", "infer-b8-128")


def run_row(name, batch, height, width, dtype, with_backward, rep_ms):
    row = {"name": name, "shape": f"B={batch} {height}x{width} hidden={2 * CHANNELS}",
           "dtype": str(dtype).removeprefix("torch."), "pass": "fwd+bwd" if with_backward else "fwd"}
    module = SpatialGate(CHANNELS).to(DEVICE)
    fc2 = torch.nn.Linear(CHANNELS, CHANNELS).to(DEVICE)  # the MLP's: hidden // 2 -> embed_dim, 180 -> 180
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hidden = torch.randn(batch, height * width, 2 * CHANNELS, device=DEVICE, dtype=dtype,
                         requires_grad=with_backward)
    leaves = [hidden, *module.parameters(), *fc2.parameters()] if with_backward else [hidden]
    grads = [torch.randn(batch, height * width, CHANNELS, device=DEVICE, dtype=dtype)] if with_backward else None
    gate_params = (module.norm.weight, module.norm.bias, module.conv.weight, module.conv.bias, module.norm.eps)
    implementations = {
        "fused": lambda: (spatial_gate(hidden, height, width, *gate_params, proj_weight=fc2.weight,
                                       proj_bias=fc2.bias),),
        "reference": lambda: (fc2(module(torch.nn.functional.gelu(hidden), height, width)),),
    }
    return time_fused_and_reference(row, implementations, leaves, grads, dtype, rep_ms)


def rows(quick, rep_ms):
    for name, batch, height, width, dtypes, passes in SHAPES:
        if quick and name not in QUICK_SHAPES:
            continue
        for dtype in dtypes:
            for with_backward in passes:
                yield run_row(name, batch, height, width, dtype, with_backward, rep_ms)


def main(argv=None) -> int:
    benchmark_main(argv, __doc__, "bench_spatial_gate", QUICK_SHAPES, rows, format_row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
