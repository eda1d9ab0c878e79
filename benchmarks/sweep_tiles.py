"""Time the bf16 launch configurations of the kernels that the H100 run left in doubt (CUDA).

    python benchmarks/sweep_tiles.py [--kernels NAME ...] [--quick] [--json PATH]

On the H100 (benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-27.json) L-SA's forward ran at about 14 TFLOP/s at
the training shape, and RG-SA's forward lost its lead over SDPA from N' = 1024 keys on. Each candidate below
is a (BLOCK_M, BLOCK_N, num_warps, num_stages) tile of one attention kernel, or a (BLOCK_T, BLOCK_C, num_warps)
tile of the spatial gate's conv backward; the first is the shipped one. For each, the
op's launcher runs with only that kernel's tile changed, and the row records the median milliseconds
(triton.testing.do_bench) and the largest difference from the shipped tile's result (a tile that computes
something else shows up there). Compiling a candidate takes seconds, so the lists are short; none of them spills
on sm_90a (bf16). A candidate that fails is recorded as such; the script fails only if a shipped tile does.

Until the kernels learnt their rows' alignment (ROW_ALIGN), every L-SA tile took 170 to 255 registers per thread
whatever its size, and its 16-bit loads were not pipelined. With 64-bit window and token indices (until commit
32d13dd) the forward candidates took, on sm_90a (bf16, shifted and unshifted, both branches): 128x32/8 warps
134-178, 128x64/8 warps 187-255, 64x32/4 warps 140-170, 64x16/4 warps 101-134 registers; with 32-bit ones
119-128, 181-190, 94-138 and 80-107, and 128x16/8 warps 85-111. 4-warp programs of at most 128 registers fit 4
to a multiprocessor, of at most 96 five.

The spatial gate's forward + backward ran only 1.15x faster than PyTorch's at the training shape. Its conv
backward sums each tap's weight gradient over the tile's tokens, ten reductions per tile; with 4 warps that is 36
barriers per tile (sm_90a). One-warp programs of 8 tokens need 12, and two-warp ones have a smaller body.
"""
from __future__ import annotations

import importlib
import argparse
import sys

from kernel_timing import DEVICE, write_rows  # first: it turns Triton's interpreter off
import torch

from rgt_fast.bench import describe_failure
lsa = importlib.import_module("rgt_fast.kernels.lsa_attention")
rgsa = importlib.import_module("rgt_fast.kernels.rgsa_attention")
gate = importlib.import_module("rgt_fast.kernels.spatial_gate")

LSA_SPLIT = [8, 32]
LSA_EMBED_DIM, LSA_HEADS = 180, 6
# kernel -> (shape name, candidates); each candidate (BLOCK_M, BLOCK_N, num_warps, num_stages).
CANDIDATES = {
    "lsa_fwd": ("lsa-train", [(64, 16, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 16, 8, 2)]),
    "lsa_dq": ("lsa-train", [(64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2), (32, 32, 4, 2)]),
    "lsa_dkdv": ("lsa-train", [(16, 64, 4, 2), (32, 64, 4, 2), (16, 32, 4, 2), (32, 128, 8, 2)]),
    "lsa_score_grad_sum": ("lsa-train", [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)]),
    "rgsa_forward": ("rgsa-infer-1024", [(128, 32, 4, 2), (128, 64, 4, 2), (128, 128, 8, 2), (128, 64, 8, 2),
                                         (64, 64, 4, 3)]),
    "gate_conv_backward": ("gate-train", [(32, 64, 4), (8, 64, 1), (8, 64, 2)]),
}
# L-SA: (batch, height, width), shifted windows; RG-SA: (queries, keys) of one image, 6 heads of 15/30; spatial
# gate: (batch, height, width) with GATE_CHANNELS channels.
SHAPES = {"lsa-train": (32, 64, 64), "rgsa-infer-1024": (262144, 1024), "gate-train": (32, 64, 64)}
GATE_CHANNELS = 180
QUICK_KERNELS = ("lsa_fwd", "rgsa_forward")
_LSA_CONFIG_KEYS = {"lsa_fwd": "fwd", "lsa_dq": "dq", "lsa_dkdv": "dkdv", "lsa_score_grad_sum": "score_grad_sum"}


def lsa_inputs(batch: int, height: int, width: int):
    torch.manual_seed(0)
    qkv = torch.randn(batch, height * width, 3 * LSA_EMBED_DIM, device=DEVICE, dtype=torch.bfloat16)
    entries = (2 * LSA_SPLIT[0] - 1) * (2 * LSA_SPLIT[1] - 1)
    tables = [torch.randn(entries, LSA_HEADS // 2, device=DEVICE) for _ in range(2)]
    args = (height, width, LSA_HEADS, LSA_SPLIT, True, *tables, (LSA_EMBED_DIM // LSA_HEADS) ** -0.5)
    out, lse = lsa._forward_triton(qkv, *args)
    grad_out = torch.randn_like(out)
    return qkv, args, out, lse, grad_out


def rgsa_inputs(num_queries: int, num_keys: int):
    torch.manual_seed(0)
    q = torch.randn(1, num_queries, 6, 15, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, num_keys, 6, 15, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn(1, num_keys, 6, 30, device=DEVICE, dtype=torch.bfloat16)
    return q, k, v, 15 ** -0.5


def gate_inputs(batch: int, height: int, width: int):
    torch.manual_seed(0)
    hidden = torch.randn(batch, height * width, 2 * GATE_CHANNELS, device=DEVICE, dtype=torch.bfloat16)
    dout = torch.randn(batch, height * width, GATE_CHANNELS, device=DEVICE, dtype=torch.bfloat16)
    parameters = (1 + 0.3 * torch.randn(GATE_CHANNELS), 0.3 * torch.randn(GATE_CHANNELS),
                  0.3 * torch.randn(GATE_CHANNELS, 1, 3, 3), 0.3 * torch.randn(GATE_CHANNELS))
    # As the model's MLP runs it: the projection after the gate needs the gate's output recomputed.
    return dout, hidden, height, width, *(p.to(DEVICE) for p in parameters), 1e-5, True


def launcher(kernel: str, shape: str):
    """A call of the op's launcher that runs ``kernel`` at ``shape`` and returns the tensors it computes."""
    if kernel.startswith("gate"):
        args = gate_inputs(*SHAPES[shape])
        return lambda: gate._triton_backward(*args)
    if kernel.startswith("lsa"):
        qkv, args, out, lse, grad_out = lsa_inputs(*SHAPES[shape])
        if kernel == "lsa_fwd":
            return lambda: lsa._forward_triton(qkv, *args)
        return lambda: lsa._backward_triton(grad_out, qkv, out, lse, *args)
    q, k, v, scale = rgsa_inputs(*SHAPES[shape])
    return lambda: rgsa._triton_forward(q, k, v, scale)


def tiles_of(kernel: str) -> tuple:
    if kernel.startswith("gate"):
        return gate._CONV_TILES["backward"]
    if kernel.startswith("lsa"):
        return lsa._CONFIGS[_LSA_CONFIG_KEYS[kernel]]["16-bit"]
    return rgsa._TILE_TABLE[("forward", "16bit")][1]


def set_tiles(kernel: str, tiles: tuple) -> None:
    if kernel.startswith("gate"):
        gate._CONV_TILES["backward"] = tiles
    elif kernel.startswith("lsa"):
        lsa._CONFIGS[_LSA_CONFIG_KEYS[kernel]]["16-bit"] = tiles
    else:
        small_map, _ = rgsa._TILE_TABLE[("forward", "16bit")]
        rgsa._TILE_TABLE[("forward", "16bit")] = (small_map, tiles)


def max_difference(results, baseline) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(results, baseline))


def sweep(kernel: str, rep_ms: int, time_ms=None):
    """One row per candidate of ``kernel``; ``time_ms(fn, rep_ms)`` times a call (do_bench by default)."""
    if time_ms is None:
        import triton.testing

        def time_ms(fn, rep):
            return triton.testing.do_bench(fn, warmup=max(5, rep // 10), rep=rep, return_mode="median")

    shape, candidates = CANDIDATES[kernel]
    call = launcher(kernel, shape)
    shipped = tiles_of(kernel)
    baseline = None
    try:
        for tiles in candidates:
            set_tiles(kernel, tiles)
            row = {"kernel": kernel, "shape": shape, "tiles": list(tiles), "shipped": tiles == shipped}
            try:
                results = call()
                if row["shipped"]:
                    baseline = results
                if baseline is not None:
                    row["max_difference"] = max_difference(results, baseline)
                row["ms"] = time_ms(call, rep_ms)
            except torch.cuda.OutOfMemoryError as error:
                row["error"] = f"out of memory: {str(error)[:200]}"
            except Exception as error:  # a candidate that fails to compile or launch: the others still count
                row["error"] = describe_failure(error)
            yield row
    finally:
        set_tiles(kernel, shipped)


def describe(row: dict) -> str:
    difference = row.get("max_difference")
    result = row.get("error") or (f"{row['ms']:.3f} ms, max difference "
                                  f"{'-' if difference is None else format(difference, '.3g')}")
    shipped = " (shipped)" if row["shipped"] else ""
    return f"{row['kernel']:<20} {row['shape']:<16} tiles {tuple(row['tiles'])}{shipped}: {result}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_KERNELS)}, shorter timing")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_tiles.py: no CUDA device, nothing measured (this benchmark needs a GPU).")
        return 0
    kernels = [k for k in args.kernels if not args.quick or k in QUICK_KERNELS]
    rows = []
    for kernel in kernels:
        for row in sweep(kernel, 50 if args.quick else 200):
            rows.append(row)
            print(describe(row), flush=True)
            if args.json:
                write_rows(args.json, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "rows": rows})
    return 1 if any("error" in row and row["shipped"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
