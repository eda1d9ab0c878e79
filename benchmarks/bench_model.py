"""Whole-model benchmark of issue 5's points: the fused RGT against the reference with the same weights.

    python benchmarks/bench_model.py [--quick] [--json PATH]
    python benchmarks/bench_model.py --warm    # compile every row's kernels in parallel first (CUDA)

CUDA: RGT x4 on 128x128 inputs, batch 8, fp32 and bf16 autocast (with the fraction of the GPU's bf16 peak); a
training step of RGT x2 (batch 8, 64x64, Adam) in bf16 autocast and in fp32, with iterations per second, and in bf16
as rgt-fast train runs it (fused Adam, the step recorded as a CUDA graph, for both models); a 1024x1024 x4
whole-image bf16 inference (a model that runs out of memory is recorded as such, the other is still measured).
CPU: RGT-S x4 on a 64x64 input with the auto (torch) backend.
Both: the drift of bf16 and fp16 autocast outputs against fp32, with the built-in x4 demo model's weights.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys

from kernel_timing import write_rows  # first: it turns Triton's interpreter off
import torch

from rgt_fast import accelerate, load_model
from rgt_fast.bench import (autocast_to, build_pair, describe_failure, device_name, failures, format_table,
                            graph_training_row, guarded, inference_row, training_row)
from rgt_fast.inference import default_device
from rgt_fast.upscale_cli import default_weights

# Dense bf16 tensor-core peak of an H100 SXM, for the achieved-fraction column.
H100_BF16_PEAK_TFLOPS = 989.0
INFERENCE_ROWS = {"fp32": "RGT x4 128x128 b8 fp32", "bf16": "RGT x4 128x128 b8 bf16"}
TRAINING_ROWS = {"bf16": "RGT x2 train 64x64 b8 bf16", "fp32": "RGT x2 train 64x64 b8 fp32"}
GRAPH_TRAINING_ROW = "RGT x2 train 64x64 b8 bf16, CUDA graph"
BIG_IMAGE_ROW = "RGT x4 1024x1024 b1 bf16"
# Issue 5's targets: the speedup at least, and the fused model's peak memory over the reference's at most.
TARGETS = {INFERENCE_ROWS["bf16"]: (2.5, 0.5), INFERENCE_ROWS["fp32"]: (2.0, 0.5), TRAINING_ROWS["bf16"]: (1.8, 0.6)}
# Issue 5: the whole-image 1024x1024 x4 bf16 inference fits in an 80 GB GPU.
BIG_IMAGE_LIMIT_GIB = 80
# The CUDA rows in the order they run, the bf16 points of issues 5 and 6 first (a device's time limit cut the first
# H100 run before the training rows), the 1024x1024 image (the longest) last: (name, mode, scale, input shape,
# autocast dtype). Training is the official RGT x2 option's step (batch 8 per GPU, 64x64 LR patches, Adam).
CUDA_ROWS = (
    (INFERENCE_ROWS["bf16"], "inference", 4, (8, 3, 128, 128), torch.bfloat16),
    (TRAINING_ROWS["bf16"], "training", 2, (8, 3, 64, 64), torch.bfloat16),
    (GRAPH_TRAINING_ROW, "training-graph", 2, (8, 3, 64, 64), torch.bfloat16),
    (INFERENCE_ROWS["fp32"], "inference", 4, (8, 3, 128, 128), None),
    (TRAINING_ROWS["fp32"], "training", 2, (8, 3, 64, 64), None),
    (BIG_IMAGE_ROW, "inference", 4, (1, 3, 1024, 1024), torch.bfloat16),
)
DRIFT_DTYPES = (torch.bfloat16, torch.float16)
DRIFT_SIZE = 256


def low_precision_drift(device: torch.device) -> list[dict]:
    """Output drift of bf16 and fp16 autocast against fp32, with trained weights (the built-in x4 demo model),
    for the fused model and the reference, on a smooth 256x256 image (bicubic-upsampled noise): 8-bit levels."""
    torch.manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 32, 32, device=device), size=(DRIFT_SIZE, DRIFT_SIZE),
                                            mode="bicubic", align_corners=False).clamp(0, 1)
    reference = load_model(default_weights(4), fused=False, device=device)
    models = {"fused": accelerate(reference), "reference": reference}
    rows = []
    for name, model in models.items():
        with torch.no_grad():
            exact = model(image).float().clamp(0, 1)
            for dtype in DRIFT_DTYPES:
                with torch.autocast(device.type, dtype=dtype):
                    out = model(image).float().clamp(0, 1)
                levels = ((out - exact) * 255).abs()
                mse = ((out - exact) ** 2).mean().item()
                rows.append({"model": name, "dtype": str(dtype).removeprefix("torch."),
                             "max_levels": levels.max().item(), "mean_levels": levels.mean().item(),
                             "psnr_vs_fp32_db": float("inf") if mse == 0 else -10 * math.log10(mse),
                             "finite": bool(torch.isfinite(out).all())})
    return rows


# The recorded training step runs the kernels of the eager bf16 step, which that row's warm-up compiles.
WARM_UPS = tuple(spec[0] for spec in CUDA_ROWS if spec[1] != "training-graph") + ("drift",)


def warm_up(name: str, device: torch.device) -> None:
    """Run the fused model's calls of one row (a name of CUDA_ROWS, or "drift") once, untimed, so that Triton
    compiles their kernels into its on-disk cache: the timed run then loads them instead of compiling them one
    after another, which took most of this benchmark's first minute and a half on the H100."""
    torch.manual_seed(0)
    if name == "drift":
        fused = accelerate(load_model(default_weights(4), fused=False, device=device))
        image = torch.rand(1, 3, DRIFT_SIZE, DRIFT_SIZE, device=device)
        with torch.no_grad():
            fused(image)
            for dtype in DRIFT_DTYPES:
                with torch.autocast(device.type, dtype=dtype):
                    fused(image)
        return
    ((_, mode, scale, shape, dtype),) = [spec for spec in CUDA_ROWS if spec[0] == name]
    _, fused = build_pair("RGT", scale, device)
    x = torch.rand(*shape, device=device)
    if mode == "inference":
        with torch.no_grad(), autocast_to(device, dtype):
            fused.eval()(x)
    else:
        with autocast_to(device, dtype):
            out = fused.train()(x)
        out.float().abs().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_all() -> int:
    """Every warm-up in a process of its own, all at once (compiling keeps one CPU core busy per process)."""
    processes = {name: subprocess.Popen([sys.executable, __file__, "--warm-up", name]) for name in WARM_UPS}
    failed = [name for name, process in processes.items() if process.wait() != 0]
    print(f"warm-ups done; failed: {failed or 'none'}", flush=True)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the results here (after every row, so that a run stopped early "
                                       "keeps the rows it measured)")
    parser.add_argument("--warm", action="store_true",
                        help="measure nothing: compile the kernels of every CUDA row at once, in parallel "
                             "processes, into Triton's cache (run_all.py starts this while the tests run)")
    parser.add_argument("--warm-up", choices=WARM_UPS, help=argparse.SUPPRESS)
    parser.add_argument("--rows", nargs="+", choices=[spec[0] for spec in CUDA_ROWS], metavar="NAME",
                        help="on CUDA, only these rows (a short device lease finishing what a run left unmeasured); "
                             "the drift runs with the bf16 inference row")
    args = parser.parse_args()
    device = default_device()
    if args.warm or args.warm_up:
        if device.type != "cuda":
            print("bench_model.py: no CUDA device, nothing to warm up.")
            return 0
        if args.warm_up:
            warm_up(args.warm_up, device)
            return 0
        return warm_all()
    warmup, iters = (1, 3) if args.quick else (3, 10)
    rows: list[dict] = []
    drift: list[dict] = []

    def save() -> None:
        if args.json:
            write_rows(args.json, {"device": device_name(device), "torch": torch.__version__, "results": rows,
                                   "low_precision_drift": drift})

    def measure_drift() -> None:
        try:
            drift.extend(low_precision_drift(device))
        except Exception as error:  # the timed rows still count
            drift.append({"error": describe_failure(error)})
        save()

    def measure(row_fn, name, *row_args) -> None:
        guarded(rows, row_fn, name, *row_args)
        if rows[-1].get("dtype") == "bfloat16" and "fused_tflops" in rows[-1] and device.type == "cuda":
            rows[-1]["fraction_of_h100_bf16_peak"] = rows[-1]["fused_tflops"] / H100_BF16_PEAK_TFLOPS
        save()

    if device.type == "cuda":
        pairs = {}  # scale -> (reference, fused) with the same weights, built once
        for name, mode, scale, shape, dtype in CUDA_ROWS:
            if args.rows and name not in args.rows:
                continue
            if scale not in pairs:
                pairs[scale] = build_pair("RGT", scale, device)
            x = torch.rand(*shape, device=device)
            runs = (1, 1) if name == BIG_IMAGE_ROW else (warmup, iters)
            row_fn = {"inference": inference_row, "training": training_row, "training-graph": graph_training_row}[mode]
            measure(row_fn, name, *pairs[scale], x, dtype, *runs)
            del x
            if name == INFERENCE_ROWS["bf16"]:
                measure_drift()  # before the long rows, which a device's time limit may cut
            if name == TRAINING_ROWS["fp32"]:
                pairs.pop(2, None)  # the 1024x1024 image wants the memory
    else:
        reference, fused = build_pair("RGT-S", 4, device)
        x = torch.rand(1, 3, 64, 64)
        measure(inference_row, "RGT-S x4 64x64 b1 fp32", reference, fused, x, None, 1, 2 if args.quick else 5)
        measure_drift()
    print(format_table(rows))
    for row in drift:
        if "error" in row:
            print(f"drift: {row['error']}")
            continue
        print(f"drift {row['model']:<9} {row['dtype']:<8} max {row['max_levels']:.2f} levels, mean "
              f"{row['mean_levels']:.4f}, PSNR vs fp32 {row['psnr_vs_fp32_db']:.1f} dB, finite {row['finite']}")
    return 1 if any(failures(row) for row in rows) or any("error" in row for row in drift) else 0


if __name__ == "__main__":
    sys.exit(main())
