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
the inputs (see kernel_timing.measure).
"""
from __future__ import annotations

import sys

from kernel_timing import DEVICE, benchmark_main, format_row, time_fused_and_reference  # first: interpreter off
import torch

from rgt_fast.kernels.add_layer_norm import add_layer_norm, layer_norm

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
    norm = torch.nn.LayerNorm(CHANNELS).to(DEVICE)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn_like(norm.weight))
        norm.bias.add_(0.1 * torch.randn_like(norm.bias))
    x = torch.randn(batch, tokens, CHANNELS, device=DEVICE, requires_grad=with_backward)
    attended = torch.randn(batch, tokens, CHANNELS, device=DEVICE, dtype=dtype, requires_grad=with_backward)
    # Each implementation returns the tensors the block goes on with; the normalised one last, in the dtype the
    # next matmul reads (under autocast the reference's cast is part of what it costs).
    if with_add:
        def reference_add_norm():
            summed = x + attended
            return summed, norm(summed).to(dtype)

        leaves = [x, attended, norm.weight, norm.bias]
        implementations = {"fused": lambda: add_layer_norm(x, attended, norm.weight, norm.bias, norm.eps),
                           "reference": reference_add_norm}
        grad_dtypes = (torch.float32, dtype)
    else:
        leaves = [x, norm.weight, norm.bias]
        implementations = {"fused": lambda: (layer_norm(x, norm.weight, norm.bias, norm.eps),),
                           "reference": lambda: (norm(x).to(dtype),)}
        grad_dtypes = (dtype,)
    grads = [torch.randn(batch, tokens, CHANNELS, device=DEVICE, dtype=d) for d in grad_dtypes]
    if not with_backward:
        leaves, grads = [x], None
    return time_fused_and_reference(row, implementations, leaves, grads, dtype, rep_ms)


def rows(quick, rep_ms):
    for name, batch, tokens, dtypes, passes in SHAPES:
        if quick and name not in QUICK_SHAPES:
            continue
        for dtype in dtypes:
            for with_backward in passes:
                for with_add in (True, False):
                    yield run_row(name, batch, tokens, dtype, with_backward, rep_ms, with_add)


def main(argv=None) -> int:
    benchmark_main(argv, __doc__, "bench_add_layer_norm", QUICK_SHAPES, rows, format_row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
