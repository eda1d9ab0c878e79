"""F.linear against the fused model's TokenLinear on every distinct linear of RGT-S x4, on CPU in float32.

    python benchmarks/bench_token_linear.py [--size 64x64] [--threads 1 2] [--json PATH]

TokenLinear runs large float32 CPU products as oneDNN 1x1 convolutions (see ``rgt_fast.model``). The shapes are
recorded from one forward pass of the fused model at ``--size``, so they are the products the model computes:
rows x in_features -> out_features. Each shape is timed forward and forward+backward, both ways in turns, at each
thread count; rows where TokenLinear keeps F.linear (too small for oneDNN) are timed too.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

import rgt_fast
from rgt_fast.bench import environment, interleaved_median_ms, parse_size
from rgt_fast.files import write_atomically
from rgt_fast.model import TokenLinear, linear_runs_on_onednn


def model_linear_shapes(size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(rows, in_features, out_features, calls per forward) of the fused RGT-S x4's linears on one image."""
    model = rgt_fast.create_model("RGT-S", 4).eval()
    calls: Counter[tuple[int, int, int]] = Counter()

    def record(linear, args):
        calls[(args[0].numel() // linear.in_features, linear.in_features, linear.out_features)] += 1

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, TokenLinear)]
    with torch.no_grad():
        model(torch.rand(1, 3, *size))
    for hook in hooks:
        hook.remove()
    return [(*shape, count) for shape, count in calls.items()]


def linear_row(rows: int, in_features: int, out_features: int, calls: int, warmup: int, iters: int) -> dict:
    layer = TokenLinear(in_features, out_features)
    x = torch.randn(1, rows, in_features, requires_grad=True)
    grad = torch.randn(1, rows, out_features)

    def forward(fn):
        def step():
            with torch.no_grad():
                fn(x)
        return step

    def forward_backward(fn):
        def step():
            x.grad = layer.weight.grad = layer.bias.grad = None
            fn(x).backward(grad)
        return step

    def blas(t):
        return F.linear(t, layer.weight, layer.bias)

    flops = 2 * rows * in_features * out_features
    # layer.forward, not layer(...): nn.Module's call overhead would count against TokenLinear only.
    fwd_blas, fwd_token = interleaved_median_ms([forward(blas), forward(layer.forward)], warmup, iters, x.device)
    both_blas, both_token = interleaved_median_ms([forward_backward(blas), forward_backward(layer.forward)], warmup,
                                                  iters, x.device)
    with torch.no_grad():
        difference = (layer(x) - blas(x)).abs().max().item()
    return {"rows": rows, "in_features": in_features, "out_features": out_features, "calls_per_forward": calls,
            "threads": torch.get_num_threads(), "onednn": linear_runs_on_onednn(x, layer.weight),
            "forward_f_linear_ms": fwd_blas, "forward_token_linear_ms": fwd_token,
            "forward_speedup": fwd_blas / fwd_token,
            "forward_f_linear_gflops": flops / fwd_blas / 1e6, "forward_token_linear_gflops": flops / fwd_token / 1e6,
            "fwd_bwd_f_linear_ms": both_blas, "fwd_bwd_token_linear_ms": both_token,
            "fwd_bwd_speedup": both_blas / both_token, "max_abs_difference": difference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(64, 64), help="input image HxW (default 64x64)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--json", help="write the rows and the environment to this file")
    args = parser.parse_args(argv)

    shapes = model_linear_shapes(args.size)
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for shape in shapes:
            row = linear_row(*shape, args.warmup, args.iters)
            results.append(row)
            print(f"{threads} thread(s) {row['rows']:>6} x {row['in_features']:>3} -> {row['out_features']:>3} "
                  f"(x{row['calls_per_forward']:>2})  oneDNN {str(row['onednn']):5}  forward "
                  f"{row['forward_f_linear_ms']:7.3f} -> {row['forward_token_linear_ms']:7.3f} ms "
                  f"({row['forward_speedup']:.2f}x)  fwd+bwd {row['fwd_bwd_f_linear_ms']:7.3f} -> "
                  f"{row['fwd_bwd_token_linear_ms']:7.3f} ms ({row['fwd_bwd_speedup']:.2f}x)")
    if args.json:
        report = {**environment(torch.device("cpu")), "device": "cpu", "size": list(args.size), "results": results}
        write_atomically(json.dumps(report, indent=1).encode(), Path(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
