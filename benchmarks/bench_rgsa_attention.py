"""Benchmark the fused RG-SA attention against the reference computation and PyTorch SDPA (CUDA only).

    python benchmarks/bench_rgsa_attention.py [--quick] [--json PATH]

For each shape and dtype it times the forward pass and forward+backward of
  * fused:     rgt_fast.kernels.rgsa_attention.rgsa_attention on the model's token-major views;
  * reference: the RGT module's q @ k^T * scale, softmax, @ v on (B, heads, N, D) tensors, with its permutes;
  * sdpa:      torch.nn.functional.scaled_dot_product_attention with the head dims zero-padded to 16 / 32
               (the padding copies are part of what it costs to use SDPA here).
and records the GPU kernel time per call (from torch.profiler: at the training shape the wall time is bound
by the CPU cost of autograd and kernel launches) and the peak memory each one allocates beyond its inputs.
A failure (out of memory, no SDPA kernel) is recorded in its row instead of stopping the run.
"""
from __future__ import annotations

import sys

from kernel_timing import DEVICE, benchmark_main, measure  # first: it turns Triton's interpreter off
import torch
import torch.nn.functional as F

from rgt_fast.bench import describe_failure
from rgt_fast.kernels.rgsa_attention import rgsa_attention

HEADS, DQK, DV = 6, 15, 30
# (name, batch, image tokens N, representative tokens N', dtypes)
SHAPES = (
    ("train", 32, 4096, 16, (torch.bfloat16, torch.float32)),
    ("infer-256", 1, 65536, 256, (torch.bfloat16,)),
    ("infer-1024", 1, 262144, 1024, (torch.bfloat16,)),
    ("infer-3969", 1, 1016064, 3969, (torch.bfloat16,)),
)
QUICK_SHAPES = ("train", "infer-256")


def fused(q, k, v, scale):
    batch, tokens = q.shape[:2]
    return rgsa_attention(q, k, v, scale).view(batch, tokens, -1)


def reference(q, k, v, scale):
    batch, tokens = q.shape[:2]
    attn = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * scale
    return (attn.softmax(dim=-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(batch, tokens, -1)


def sdpa(q, k, v, scale):
    batch, tokens = q.shape[:2]
    q16, k16 = (F.pad(t, (0, 16 - DQK)).transpose(1, 2) for t in (q, k))
    v32 = F.pad(v, (0, 32 - DV)).transpose(1, 2)
    out = F.scaled_dot_product_attention(q16, k16, v32, scale=scale)
    return out[..., :DV].transpose(1, 2).reshape(batch, tokens, -1)


IMPLEMENTATIONS = {"fused": fused, "reference": reference, "sdpa": sdpa}


def make_inputs(batch, tokens, keys, dtype, requires_grad):
    # q as the model makes it: a view of a Linear output with the heads interleaved along the channels.
    q_flat = torch.randn(batch, tokens, HEADS * DQK, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    k_flat = torch.randn(batch, keys, HEADS * DQK, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    v_flat = torch.randn(batch, keys, HEADS * DV, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    views = (q_flat.view(batch, tokens, HEADS, DQK), k_flat.view(batch, keys, HEADS, DQK),
             v_flat.view(batch, keys, HEADS, DV))
    return (q_flat, k_flat, v_flat), views


def run_row(name, batch, tokens, keys, dtype, with_backward, rep_ms):
    scale = DQK ** -0.5
    row = {"name": name, "shape": f"B={batch} N={tokens} N'={keys} heads={HEADS} Dqk={DQK} Dv={DV}",
           "dtype": str(dtype).removeprefix("torch."), "pass": "fwd+bwd" if with_backward else "fwd",
           # The bound on the fused forward's extra memory: its output and its float32 row statistics.
           "output_and_lse_mb": batch * tokens * HEADS * (DV * dtype.itemsize + 4) / 2**20}
    leaves, (q, k, v) = make_inputs(batch, tokens, keys, dtype, with_backward)
    grad = torch.randn(batch, tokens, HEADS * DV, device=DEVICE, dtype=dtype) if with_backward else None
    fused_out = None
    for impl_name in IMPLEMENTATIONS:
        impl = IMPLEMENTATIONS[impl_name]
        if with_backward:
            def step():
                impl(q, k, v, scale).backward(grad)
        else:
            @torch.no_grad()
            def step():
                return impl(q, k, v, scale)
        try:
            row[f"{impl_name}_ms"], row[f"{impl_name}_gpu_ms"], row[f"{impl_name}_peak_mb"] = measure(
                step, leaves, rep_ms)
            if not with_backward:
                out = step().float()
                if impl_name == "fused":
                    fused_out = out
                elif fused_out is not None:
                    row[f"{impl_name}_max_abs_diff_vs_fused"] = (out - fused_out).abs().max().item()
                del out
        except torch.cuda.OutOfMemoryError:
            row[f"{impl_name}_ms"], row[f"{impl_name}_error"] = None, "out of memory"
        except Exception as error:  # e.g. no SDPA kernel for these head dims: record it and go on
            row[f"{impl_name}_ms"], row[f"{impl_name}_error"] = None, describe_failure(error)
        torch.cuda.empty_cache()
    for other in ("reference", "sdpa"):
        if row.get("fused_ms") and row.get(f"{other}_ms"):
            row[f"speedup_vs_{other}"] = row[f"{other}_ms"] / row["fused_ms"]
            row[f"gpu_speedup_vs_{other}"] = row[f"{other}_gpu_ms"] / row["fused_gpu_ms"]
    return row


def format_rows(rows):
    def cell(value, digits=3):
        if value is None:
            return "-"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    headers = ("name", "dtype", "pass", "fused ms", "ref ms", "sdpa ms", "x ref", "x sdpa",
               "fused gpu", "ref gpu", "sdpa gpu", "gpu x ref", "gpu x sdpa", "fused MB", "ref MB", "sdpa MB",
               "notes")
    lines = []
    for row in rows:
        notes = "; ".join(f"{impl}: {row[f'{impl}_error']}" for impl in IMPLEMENTATIONS if f"{impl}_error" in row)
        lines.append((row["name"], row["dtype"], row["pass"],
                      *(cell(row.get(f"{impl}_ms")) for impl in IMPLEMENTATIONS),
                      cell(row.get("speedup_vs_reference"), 2), cell(row.get("speedup_vs_sdpa"), 2),
                      *(cell(row.get(f"{impl}_gpu_ms")) for impl in IMPLEMENTATIONS),
                      cell(row.get("gpu_speedup_vs_reference"), 2), cell(row.get("gpu_speedup_vs_sdpa"), 2),
                      *(cell(row.get(f"{impl}_peak_mb"), 1) for impl in IMPLEMENTATIONS), notes))
    widths = [max(len(line[i]) for line in [headers, *lines]) for i in range(len(headers))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
                     for line in [headers, *lines])


def rows(quick, rep_ms):
    for name, batch, tokens, keys, dtypes in SHAPES:
        if quick and name not in QUICK_SHAPES:
            continue
        for dtype in dtypes:
            for with_backward in (False, True):
                yield run_row(name, batch, tokens, keys, dtype, with_backward, rep_ms)


def main(argv=None) -> int:
    rows_measured = benchmark_main(argv, __doc__, "bench_rgsa_attention", QUICK_SHAPES, rows,
                                   lambda row: format_rows([row]).splitlines()[-1])
    if rows_measured:
        print()
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
              f"allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
        print(format_rows(rows_measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
