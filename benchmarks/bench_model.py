"""Whole-model benchmark: the fused RGT against the reference with the same weights, in one run.

    python benchmarks/bench_model.py [--quick] [--json PATH]

On CUDA: RGT x4 inference on 128x128 inputs, batch 8, in fp32 and bf16 autocast; a training step of RGT x2
(batch 8, 64x64, bf16 autocast, Adam); a 1024x1024 x4 whole-image bf16 inference (fused, and the reference
when it fits). On CPU: RGT-S x4 on a 64x64 input with the auto (torch) backend. Each row records ms per call,
speedup, peak memory and the max abs difference of the outputs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

import rgt_fast
from rgt_fast.model import accelerate


def model_flops(model: torch.nn.Module, H: int, W: int) -> float:
    """2 x multiply-adds of the convolutions, linear layers and attention matmuls for one H x W image."""
    from rgt_fast.reference.rgt import recursion_count

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


def timed(fn, warmup: int, iters: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    start_time = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start_time) * 1000 / iters


def peak_mb(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def inference_row(name, reference, fused, x, dtype, device, warmup, iters) -> dict:
    def run(model):
        def call():
            with torch.no_grad(), autocast(device, dtype):
                return model(x)
        return call

    row = {"name": name, "shape": list(x.shape), "dtype": str(dtype or x.dtype).replace("torch.", "")}
    with torch.no_grad():
        out_ref, out_fused = run(reference)(), run(fused)()
    row["max_abs_err"] = (out_ref.float() - out_fused.float()).abs().max().item()
    row["reference_ms"] = timed(run(reference), warmup, iters, device)
    row["fused_ms"] = timed(run(fused), warmup, iters, device)
    row["speedup"] = row["reference_ms"] / row["fused_ms"]
    row["reference_peak_mb"] = peak_mb(run(reference), device)
    row["fused_peak_mb"] = peak_mb(run(fused), device)
    if device.type == "cuda":
        flops = model_flops(fused, x.shape[-2], x.shape[-1]) * x.shape[0]
        row["fused_tflops"] = flops / row["fused_ms"] / 1e9
    return row


def training_row(name, reference, fused, x, target, dtype, device, warmup, iters) -> dict:
    def step_fn(model):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-7)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                loss = torch.nn.functional.l1_loss(model(x).float(), target)
            loss.backward()
            optimizer.step()
        return step

    reference.train()
    fused.train()
    row = {"name": name, "shape": list(x.shape), "dtype": str(dtype or x.dtype).replace("torch.", "")}
    row["reference_ms"] = timed(step_fn(reference), warmup, iters, device)
    row["fused_ms"] = timed(step_fn(fused), warmup, iters, device)
    row["speedup"] = row["reference_ms"] / row["fused_ms"]
    row["reference_peak_mb"] = peak_mb(step_fn(reference), device)
    row["fused_peak_mb"] = peak_mb(step_fn(fused), device)
    return row


def guarded(rows: list, fn, *args) -> None:
    try:
        rows.append(fn(*args))
    except torch.cuda.OutOfMemoryError as err:
        rows.append({"name": args[0], "error": f"out of memory: {str(err)[:200]}"})
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(json.dumps(rows[-1]), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    rows: list[dict] = []
    warmup, iters = (1, 3) if args.quick else (3, 10)

    if device.type == "cuda":
        reference = rgt_fast.create_model("RGT", 4, fused=False).to(device).eval()
        fused = accelerate(reference)
        x = torch.rand(8, 3, 128, 128, device=device)
        guarded(rows, inference_row, "RGT x4 128x128 b8 fp32", reference, fused, x, None, device, warmup, iters)
        guarded(rows, inference_row, "RGT x4 128x128 b8 bf16", reference, fused, x, torch.bfloat16, device,
                warmup, iters)
        big = torch.rand(1, 3, 1024, 1024, device=device)
        guarded(rows, inference_row, "RGT x4 1024x1024 b1 bf16", reference, fused, big, torch.bfloat16, device,
                1, 1)
        del reference, fused
        reference = rgt_fast.create_model("RGT", 2, fused=False).to(device)
        fused = accelerate(reference)
        x = torch.rand(8, 3, 64, 64, device=device)
        guarded(rows, training_row, "RGT x2 train step 64x64 b8 bf16", reference, fused, x,
                torch.rand(8, 3, 128, 128, device=device), torch.bfloat16, device, warmup, iters)
    else:
        torch.set_num_threads(torch.get_num_threads())
        reference = rgt_fast.create_model("RGT-S", 4, fused=False).eval()
        fused = accelerate(reference)
        x = torch.rand(1, 3, 64, 64)
        guarded(rows, inference_row, "RGT-S x4 64x64 b1 fp32 (cpu)", reference, fused, x, None, device,
                1, 2 if args.quick else 5)

    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
