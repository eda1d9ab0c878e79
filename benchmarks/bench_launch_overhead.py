"""Where the CPU time of the fused ops' eager calls goes, at the training shapes (CUDA).

    python benchmarks/bench_launch_overhead.py [--quick] [--json PATH]

On the H100 (benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-27.json) RG-SA's forward + backward at the training
shape took 0.19 ms of GPU kernels but 1.0 ms per call, and the LayerNorm backward was slower than PyTorch's by wall
time while its kernels ran 2.2x faster: the calls cost more CPU time than their kernels take. For the fused
LayerNorm and RG-SA at their training shapes (bf16 autocast, as training runs), and for PyTorch's LayerNorm, each
row times one stage of a training step's work:

  * ``forward``: the op under no_grad;
  * ``backward launcher``: the op's backward launcher called directly on saved tensors, on this thread;
  * ``forward+backward``: the op and ``torch.autograd.backward``, whose engine runs a CUDA backward on a thread of
    its own.

Two baselines put those numbers in scale: one launch of a Triton kernel with as many scalar arguments as RG-SA's
forward (one program that stores their sum), and one PyTorch op on a one-element tensor.

``issue_ms`` is the milliseconds per call of calls issued back to back, with one synchronisation at the end: the
CPU's cost per call wherever it exceeds the GPU's. ``profile`` lists the functions with the most own time over
those calls (cProfile), in microseconds per call. From Python 3.12 on, cProfile also sees other threads, so the
forward+backward rows include the engine thread's Python (the op's backward) under ``run_backward``; the row
records the Python version.
"""
from __future__ import annotations

import cProfile
import importlib
import platform
import pstats
import sys
import time

from kernel_timing import DEVICE, autocast_for, benchmark_main  # first: it turns Triton's interpreter off
import torch
import triton
import triton.language as tl

aln = importlib.import_module("rgt_fast.kernels.add_layer_norm")
rgsa = importlib.import_module("rgt_fast.kernels.rgsa_attention")

# (name, batch, tokens, channels or (N', heads, Dqk, Dv)): RGT's training batch of 32 64x64 patches.
TRAIN_SHAPES = {"layer_norm": (32, 64 * 64, 180), "rgsa": (32, 64 * 64, (16, 6, 15, 30))}
PROFILE_ENTRIES = 12


def _synchronize() -> None:
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


@triton.jit
def _sum_of_arguments_kernel(out_ptr, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16,
                             a17, a18, a19, a20, scale):
    total = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11 + a12 + a13 + a14 + a15 + a16 + a17 + a18
    tl.store(out_ptr, (total + a19 + a20) * scale)


# RG-SA's forward takes 5 pointers, 16 strides, 4 sizes and a scale; most of them not multiples of 16.
_BASELINE_INTEGERS = (90, 15, 1, 30, 6, 8, 3, 12, 4096, 180, 45, 2, 60, 7, 5, 9, 11, 13, 17, 19, 21)


def baseline_rows(calls: int):
    out = torch.empty(1, device=DEVICE)

    def triton_launch():
        _sum_of_arguments_kernel[(1,)](out, *_BASELINE_INTEGERS, 0.5)

    yield stage_row("triton launch", "21 ints + 1 float", triton_launch, calls)
    yield stage_row("torch op", "add_ on 1 element", lambda: out.add_(1.0), calls)


def issue_ms(step, calls: int) -> float:
    step()
    _synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    _synchronize()
    return (time.perf_counter() - start) / calls * 1000


def profile(step, calls: int) -> list[dict]:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    _synchronize()
    stats = pstats.Stats(profiler).stats
    entries = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:PROFILE_ENTRIES]
    return [{"function": f"{'/'.join(path.rsplit('/', 2)[-2:])}:{line}({name})",
             "calls_per_step": round(primitive_calls / calls, 2),
             "own_us_per_step": round(own_seconds / calls * 1e6, 2),
             "cumulative_us_per_step": round(cumulative_seconds / calls * 1e6, 2)}
            for (path, line, name), (primitive_calls, _, own_seconds, cumulative_seconds, _) in entries]


def stage_row(op: str, stage: str, step, calls: int) -> dict:
    return {"name": op, "stage": stage, "issue_ms": issue_ms(step, calls), "profile": profile(step, calls),
            "python": platform.python_version()}


def layer_norm_rows(batch: int, tokens: int, channels: int, calls: int):
    x = torch.randn(batch, tokens, channels, device=DEVICE, requires_grad=True)
    norm = torch.nn.LayerNorm(channels).to(DEVICE)
    grad = torch.randn(batch, tokens, channels, device=DEVICE, dtype=torch.bfloat16)

    def fused():
        with autocast_for(torch.bfloat16):
            return aln.layer_norm(x, norm.weight, norm.bias, norm.eps)

    def reference():
        with autocast_for(torch.bfloat16):
            return norm(x).to(torch.bfloat16)  # the cast the next Linear would perform under autocast

    def forward_backward(op):
        def step():
            torch.autograd.backward([op()], [grad])
            x.grad = norm.weight.grad = norm.bias.grad = None
        return step

    saved_x = x.detach()
    _, _, mean, rstd = aln._triton_forward(saved_x, None, norm.weight, norm.bias, norm.eps, torch.bfloat16)

    def backward_launcher():
        aln._triton_backward(None, grad, saved_x, None, mean, rstd, norm.weight, norm.bias, torch.bfloat16, False)

    yield stage_row("fused layer_norm", "forward", torch.no_grad()(fused), calls)
    yield stage_row("fused layer_norm", "backward launcher", backward_launcher, calls)
    yield stage_row("fused layer_norm", "forward+backward", forward_backward(fused), calls)
    yield stage_row("torch layer_norm", "forward", torch.no_grad()(reference), calls)
    yield stage_row("torch layer_norm", "forward+backward", forward_backward(reference), calls)


def rgsa_rows(batch: int, tokens: int, keys_heads_dims: tuple, calls: int):
    num_keys, heads, dqk, dv = keys_heads_dims
    dtype = torch.bfloat16
    q = torch.randn(batch, tokens, heads, dqk, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, num_keys, heads, dqk, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, num_keys, heads, dv, device=DEVICE, dtype=dtype, requires_grad=True)
    dout = torch.randn(batch, tokens, heads, dv, device=DEVICE, dtype=dtype)
    scale = dqk ** -0.5

    def forward_backward():
        torch.autograd.backward([rgsa.rgsa_attention(q, k, v, scale)], [dout])
        q.grad = k.grad = v.grad = None

    saved = [t.detach() for t in (q, k, v)]
    out, lse = rgsa._triton_forward(*saved, scale)

    def backward_launcher():
        rgsa._triton_backward(dout, *saved, out, lse, scale, 0)

    yield stage_row("fused rgsa_attention", "forward", lambda: rgsa.rgsa_attention(*saved, scale), calls)
    yield stage_row("fused rgsa_attention", "backward launcher", backward_launcher, calls)
    yield stage_row("fused rgsa_attention", "forward+backward", forward_backward, calls)


def rows(quick: bool, shapes: dict = TRAIN_SHAPES, calls: int | None = None):
    calls = calls or (50 if quick else 200)
    yield from baseline_rows(calls)
    yield from layer_norm_rows(*shapes["layer_norm"], calls)
    yield from rgsa_rows(*shapes["rgsa"], calls)


def describe(row: dict) -> str:
    top = "; ".join(f"{entry['function']} {entry['own_us_per_step']:.1f} us" for entry in row["profile"][:4])
    return f"{row['name']:<22} {row['stage']:<18} {row['issue_ms']:.3f} ms/call  top: {top}"


def main(argv: list[str] | None = None) -> int:
    benchmark_main(argv, __doc__, "bench_launch_overhead.py", ("layer_norm", "rgsa"),
                   lambda quick, rep_ms: rows(quick), describe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
