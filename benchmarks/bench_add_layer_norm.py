"""Benchmark the fused norms of RGT's blocks with the linear layers after them (CUDA only).

    python benchmarks/bench_add_layer_norm.py [--quick] [--json PATH]

For each shape and dtype, forward and forward+backward of the three ways the fused model runs them:
  * add+norm+fc1: rgt_fast.kernels.add_layer_norm.add_layer_norm(x, attended, norm2..., proj_weight=fc1.weight,
                  proj_bias=fc1.bias) against ``summed = x + attended; fc1(norm2(summed))``;
  * norm+qkv:     layer_norm(x, norm1..., proj_weight=qkv.weight, ...) against ``qkv(norm1(x))`` (L-SA blocks);
  * norm:         layer_norm(x, norm1...) against ``norm1(x)`` and, under autocast, the cast to bf16 that RG-SA's
                  projections perform, which the fused op makes unnecessary (RG-SA blocks).
With a linear layer, the fused backward writes the normalised rows again for its weight gradient instead of
keeping them from the forward: the peak memory shows what that saves, the times what it costs.
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


# The linear layer after each variant's norm: RGT's fc1 (180 -> 360) and L-SA's qkv (180 -> 540).
VARIANTS = {"add+norm+fc1": 2 * CHANNELS, "norm+qkv": 3 * CHANNELS, "norm": None}


def run_row(name, batch, tokens, dtype, with_backward, rep_ms, variant="add+norm+fc1"):
    row = {"name": f"{name} {variant}", "shape": f"B={batch} N={tokens} C={CHANNELS}",
           "dtype": str(dtype).removeprefix("torch."), "pass": "fwd+bwd" if with_backward else "fwd"}
    norm = torch.nn.LayerNorm(CHANNELS).to(DEVICE)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn_like(norm.weight))
        norm.bias.add_(0.1 * torch.randn_like(norm.bias))
    out_features = VARIANTS[variant]
    linear = None if out_features is None else torch.nn.Linear(CHANNELS, out_features).to(DEVICE)
    projection = {} if linear is None else {"proj_weight": linear.weight, "proj_bias": linear.bias}
    x = torch.randn(batch, tokens, CHANNELS, device=DEVICE, requires_grad=with_backward)
    attended = torch.randn(batch, tokens, CHANNELS, device=DEVICE, dtype=dtype, requires_grad=with_backward)
    # Each implementation returns the tensors the block goes on with; the last in the dtype the next matmul reads
    # (without a linear layer, under autocast the reference's cast is part of what it costs).
    if variant == "add+norm+fc1":
        def reference():
            summed = x + attended
            return summed, linear(norm(summed))

        leaves = [x, attended, norm.weight, norm.bias, *linear.parameters()]
        implementations = {"fused": lambda: add_layer_norm(x, attended, norm.weight, norm.bias, norm.eps,
                                                           **projection),
                           "reference": reference}
        grad_shapes = ((CHANNELS, torch.float32), (out_features, dtype))
    else:
        leaves = [x, norm.weight, norm.bias, *([] if linear is None else linear.parameters())]
        implementations = {"fused": lambda: (layer_norm(x, norm.weight, norm.bias, norm.eps, **projection),),
                           "reference": lambda: (norm(x).to(dtype) if linear is None else linear(norm(x)),)}
        grad_shapes = ((out_features or CHANNELS, dtype),)
    grads = [torch.randn(batch, tokens, width, device=DEVICE, dtype=d) for width, d in grad_shapes]
    if not with_backward:
        leaves, grads = [x], None
    return time_fused_and_reference(row, implementations, leaves, grads, dtype, rep_ms)


def rows(quick, rep_ms):
    for name, batch, tokens, dtypes, passes in SHAPES:
        if quick and name not in QUICK_SHAPES:
            continue
        for dtype in dtypes:
            for with_backward in passes:
                for variant in VARIANTS:
                    yield run_row(name, batch, tokens, dtype, with_backward, rep_ms, variant)


def main(argv=None) -> int:
    benchmark_main(argv, __doc__, "bench_add_layer_norm", QUICK_SHAPES, rows, format_row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
