"""Fused L-SA attention core vs the reference L-SA module and the best attention a user could assemble in PyTorch.

Implementations, all from the projected qkv (B, H*W, 3C) and the two position-bias MLPs to the concatenated branch
outputs (B, H*W, C):
  fused       rgt_fast.kernels.lsa_attention (Triton)
  reference   the reference module's ``attend`` (pad, roll, partition, bias + mask, softmax, matmuls)
  torch_sdpa  the op's own PyTorch path: padded/rolled window views and scaled_dot_product_attention with one
              materialised bias + mask per window group
  flex        FlexAttention (compiled) on partitioned windows, bias and mask in a score_mod (when it imports)

Each row also checks the fused op (output, dqkv, both table gradients) against the PyTorch path in float32 from
the same inputs, and that the table gradient is bitwise identical across two backward passes ("pass"), and lists
the kernels with the most GPU time in one fused forward and forward+backward.

    python benchmarks/bench_lsa_attention.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys

from kernel_timing import DEVICE, write_rows  # first: it turns Triton's interpreter off
import torch

from rgt_fast.bench import describe_failure, time_breakdown

SPLIT = [8, 32]
EMBED_DIM = 180
NUM_HEADS = 6
# (name, batch, H, W, dtype, tf32, shifted, in --quick): the bf16 points first, so that a run stopped by
# its time limit has them.
ROWS = [
    ("train", 32, 64, 64, torch.bfloat16, False, True, True),
    ("infer", 1, 256, 256, torch.bfloat16, False, True, True),
    ("infer", 1, 512, 512, torch.bfloat16, False, True, True),
    ("infer", 1, 1024, 1024, torch.bfloat16, False, True, False),
    ("train", 32, 64, 64, torch.bfloat16, False, False, False),
    ("train", 32, 64, 64, torch.float32, False, True, True),
    ("train", 32, 64, 64, torch.float32, True, True, True),
]
# Relative max error of the fused op vs the float32 PyTorch path that counts as a pass, per dot precision.
PASS_TOLERANCE = {"bf16": 3e-2, "fp16": 5e-3, "tf32": 5e-3, "fp32": 1e-4}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer rows; FlexAttention on the bf16 training row only (else on every bf16 row)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    return parser.parse_args()


def make_module(H: int, W: int, shifted: bool, dtype: torch.dtype):
    from rgt_fast.kernels.lsa_attention import _padded
    from rgt_fast.reference.rgt import LSA

    padded = max(_padded(H, SPLIT), _padded(W, SPLIT))
    # reso = the padded size: the reference then adds its cached mask buffers, which follow the module's dtype.
    module = LSA(EMBED_DIM, NUM_HEADS, split_size=SPLIT, shift_size=[4, 16], qkv_bias=True,
                 idx=2 if shifted else 0, reso=padded, rs_id=0)
    return module.to(device=DEVICE, dtype=dtype)


def tables_of(module):
    return [attn.position_bias_table() for attn in module.attns]


def fused(module, qkv, H, W):
    from rgt_fast.kernels.lsa_attention import lsa_attention

    return lsa_attention(qkv, H, W, NUM_HEADS, SPLIT, module.shifted, *tables_of(module), module.attns[0].scale)


def torch_sdpa(module, qkv, H, W):
    from rgt_fast.kernels.lsa_attention import lsa_attention_torch

    return lsa_attention_torch(qkv, H, W, NUM_HEADS, SPLIT, module.shifted, *tables_of(module),
                               module.attns[0].scale)


def reference(module, qkv, H, W):
    return module.attend(qkv, H, W)


def make_flex():
    """FlexAttention over padded, rolled, partitioned windows; None where it does not import."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    from rgt_fast.kernels.lsa_attention import _branch_window, _padded, _relative_position_index, _shift_masks

    # One compiled graph per shape and grad mode: a full run needs more than Dynamo's default of 8, past which the
    # late rows would quietly run FlexAttention uncompiled.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    compiled = torch.compile(flex_attention, dynamic=False)

    def flex(module, qkv, H, W):
        batch, _, channels = qkv.shape
        embed_dim, heads = channels // 3, NUM_HEADS // 2
        head_dim = embed_dim // NUM_HEADS
        padded_H, padded_W = _padded(H, SPLIT), _padded(W, SPLIT)
        image = qkv.reshape(batch, H, W, 3, 2, heads, head_dim)
        outputs = []
        for branch, table in enumerate(tables_of(module)):
            win_rows, win_cols = _branch_window(SPLIT, branch)
            rows, cols = padded_H // win_rows, padded_W // win_cols
            x = torch.nn.functional.pad(image[:, :, :, :, branch], (0, 0, 0, 0, 0, 0, 0, padded_W - W, 0, padded_H - H))
            if module.shifted:
                x = torch.roll(x, shifts=(-(win_rows // 2), -(win_cols // 2)), dims=(1, 2))
            q, k, v = x.view(batch, rows, win_rows, cols, win_cols, 3, heads, head_dim).permute(
                5, 0, 1, 3, 6, 2, 4, 7).reshape(3, batch * rows * cols, heads, win_rows * win_cols, head_dim)
            bias = table[_relative_position_index(win_rows, win_cols, qkv.device)].permute(2, 0, 1).float()
            group_masks = _shift_masks(win_rows, win_cols, qkv.device)
            window_row = torch.arange(batch * rows * cols, device=qkv.device) // cols % rows
            window_col = torch.arange(batch * rows * cols, device=qkv.device) % cols
            group = (window_row == rows - 1).long() * 2 + (window_col == cols - 1).long()

            def score_mod(score, b, h, q_index, kv_index):
                score = score + bias[h, q_index, kv_index]
                if module.shifted:
                    score = score + group_masks[group[b], q_index, kv_index]
                return score

            out = compiled(q, k, v, score_mod=score_mod, scale=module.attns[0].scale)
            out = out.view(batch, rows, cols, heads, win_rows, win_cols, head_dim).permute(0, 1, 4, 2, 5, 3, 6)
            out = out.reshape(batch, padded_H, padded_W, heads * head_dim)
            if module.shifted:
                out = torch.roll(out, shifts=(win_rows // 2, win_cols // 2), dims=(1, 2))
            outputs.append(out[:, :H, :W])
        return torch.cat(outputs, dim=-1).reshape(batch, H * W, embed_dim)

    return flex


def timed(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def forward_backward_step(impl, module, qkv, H, W, grad_out):
    """One forward+backward of ``impl`` from cleared gradients (no accumulation into earlier ones)."""
    def step():
        qkv.grad = None
        module.zero_grad(set_to_none=True)
        impl(module, qkv, H, W).backward(grad_out)
    return step


def measure(impl, module, qkv, H, W, grad_out):
    """(forward ms, forward+backward ms, peak MB of one forward+backward above the inputs)."""
    with torch.no_grad():
        forward_ms = timed(lambda: impl(module, qkv, H, W))
    forward_backward = forward_backward_step(impl, module, qkv, H, W, grad_out)
    backward_ms = timed(forward_backward)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward_backward()
    torch.cuda.synchronize()
    return forward_ms, backward_ms, (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def time_breakdowns(impl, module, qkv, H, W, grad_out) -> dict:
    """The kernels with the most GPU time in one forward and in one forward+backward (rgt_fast.bench)."""
    device = torch.device(DEVICE)
    breakdowns = {"fwd": time_breakdown(torch.no_grad()(lambda: impl(module, qkv, H, W)), device),
                  "fwd+bwd": time_breakdown(forward_backward_step(impl, module, qkv, H, W, grad_out), device)}
    qkv.grad = None
    return breakdowns


def check(module, qkv, H, W, grad_out, dtype_label):
    """Fused vs the float32 PyTorch path on the same inputs, and a reproducible table gradient."""
    tables = [t.detach().requires_grad_() for t in tables_of(module)]
    x = qkv.detach().requires_grad_()
    from rgt_fast.kernels.lsa_attention import lsa_attention, lsa_attention_torch

    args = (H, W, NUM_HEADS, SPLIT, module.shifted)
    out = lsa_attention(x, *args, *tables, module.attns[0].scale)
    first = torch.autograd.grad(out, [x, *tables], grad_out, retain_graph=True)
    second = torch.autograd.grad(out, [x, *tables], grad_out)
    reproducible = all(torch.equal(a, b) for a, b in zip(first[1:], second[1:]))
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        tables32 = [t.detach().float().requires_grad_() for t in tables]
        x32 = qkv.detach().float().requires_grad_()
        ref = lsa_attention_torch(x32, *args, *tables32, module.attns[0].scale)
        ref_grads = torch.autograd.grad(ref, [x32, *tables32], grad_out.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    errors = {}
    for name, actual, expected in zip(["out", "dqkv", "dtable0", "dtable1"], [out, *first], [ref, *ref_grads]):
        errors[name] = ((actual.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    passed = reproducible and all(e <= PASS_TOLERANCE[dtype_label] for e in errors.values())
    return passed, reproducible, errors


def run_row(row, flex, quick):
    name, batch, H, W, dtype, tf32, shifted, _ = row
    torch.backends.cuda.matmul.allow_tf32 = tf32
    dtype_label = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "tf32" if tf32 else "fp32")
    result = dict(name=name, shape=f"B={batch} {H}x{W} C={EMBED_DIM} heads={NUM_HEADS}", dtype=dtype_label,
                  shifted=shifted, ms={}, fwd_bwd_ms={}, peak_mb={}, errors={})
    torch.manual_seed(0)
    module = make_module(H, W, shifted, dtype)
    qkv = torch.randn(batch, H * W, 3 * EMBED_DIM, device=DEVICE, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(batch, H * W, EMBED_DIM, device=DEVICE, dtype=dtype)
    try:
        result["pass"], result["reproducible"], result["check_errors"] = check(module, qkv, H, W, grad_out, dtype_label)
    except torch.cuda.OutOfMemoryError:
        result["pass"] = "OOM"
    except Exception as error:  # the timings below still run and say whether the fused op works at all
        result["pass"] = describe_failure(error)
    torch.cuda.empty_cache()
    implementations = {"fused": fused, "reference": reference, "torch_sdpa": torch_sdpa}
    # FlexAttention compiles anew for every shape and dtype (tens of seconds): bf16 only, the comparison.
    if flex is not None and dtype == torch.bfloat16 and (not quick or name == "train"):
        implementations["flex"] = flex
    for impl_name, impl in implementations.items():
        try:
            forward_ms, backward_ms, peak = measure(impl, module, qkv, H, W, grad_out)
            result["ms"][impl_name], result["fwd_bwd_ms"][impl_name], result["peak_mb"][impl_name] = \
                forward_ms, backward_ms, peak
            if impl_name == "fused":
                try:
                    result["fused_time_breakdown"] = time_breakdowns(impl, module, qkv, H, W, grad_out)
                except Exception as error:  # the profile is a diagnosis: the timings stand without it
                    result["fused_time_breakdown_failed"] = describe_failure(error)
        except torch.cuda.OutOfMemoryError:
            result["errors"][impl_name] = "OOM"
        except Exception as error:  # a failing baseline (FlexAttention's compiler, say) must not end the run
            result["errors"][impl_name] = describe_failure(error)
        qkv.grad = None
        torch.cuda.empty_cache()
    fused_ms, fused_fb = result["ms"].get("fused"), result["fwd_bwd_ms"].get("fused")
    if fused_ms and fused_fb:
        if "reference" in result["ms"]:
            result["fwd_speedup_vs_reference"] = result["ms"]["reference"] / fused_ms
            result["fwd_bwd_speedup_vs_reference"] = result["fwd_bwd_ms"]["reference"] / fused_fb
        torch_names = [n for n in ("torch_sdpa", "flex") if n in result["ms"]]
        if torch_names:
            result["fwd_speedup_vs_best_torch"] = min(result["ms"][n] for n in torch_names) / fused_ms
            result["fwd_bwd_speedup_vs_best_torch"] = min(result["fwd_bwd_ms"][n] for n in torch_names) / fused_fb
    return result


def print_row(result):
    def cell(table, name):
        value = table.get(name)
        return f"{value:9.3f}" if value is not None else f"{result['errors'].get(name, '-')[:9]:>9}"

    names = ["fused", "reference", "torch_sdpa", "flex"]
    print(f"{result['name']:5} {result['shape']:34} {result['dtype']:4} shift={int(result['shifted'])} "
          f"pass={result.get('pass')}")
    print("      fwd ms     " + " ".join(f"{n}={cell(result['ms'], n)}" for n in names))
    print("      fwd+bwd ms " + " ".join(f"{n}={cell(result['fwd_bwd_ms'], n)}" for n in names))
    print("      peak MB    " + " ".join(f"{n}={cell(result['peak_mb'], n)}" for n in names))
    speedups = {k: round(v, 2) for k, v in result.items() if "speedup" in k}
    print(f"      speedups   {speedups}  check errors {result.get('check_errors')}", flush=True)


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("bench_lsa_attention: no CUDA device here; this benchmark times GPU kernels only. Nothing to do.")
        return 0
    flex = make_flex()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  flex: {flex is not None}")
    results = []
    for row in ROWS:
        if args.quick and not row[-1]:
            continue
        result = run_row(row, flex, args.quick)
        print_row(result)
        results.append(result)
        if args.json:
            write_rows(args.json, dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
