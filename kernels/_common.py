"""Shared plumbing for the Triton kernels: interpreter detection, dtype names, AOT variants."""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch
import triton
import triton.language as tl

# Triton's interpreter computes tl.dot on bf16 operands wrongly (errors around 1e10, Triton 3.6). Kernels
# take this flag as a constexpr and upcast their dot operands to fp32 only when it is set, so the compiled
# GPU kernels keep their bf16/fp16 tensor-core MMAs.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _let_interpreter_loops_take_runtime_bounds() -> None:
    """Make Triton 3.6's interpreter accept ``range(start, runtime_bound, step)`` under NumPy >= 2.4.

    The interpreter holds scalar kernel arguments as 1-element arrays and converts them for ``range`` with
    ``int(array)``, which NumPy 2.4 turned into a TypeError; ``.item()`` is the conversion NumPy keeps.
    Patching the function that installs ``tensor.__index__`` (it runs at every kernel launch) is process-wide,
    so every interpreted kernel of the project benefits.
    """
    from triton.runtime import interpreter

    install_tensor_methods = getattr(interpreter, "_patch_lang_tensor", None)
    if install_tensor_methods is None or getattr(install_tensor_methods, "rgt_fast_scalar_index", False):
        return  # another Triton (nothing to patch), or already patched

    def install_tensor_methods_with_scalar_index(tensor, scope):
        install_tensor_methods(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    install_tensor_methods_with_scalar_index.rgt_fast_scalar_index = True
    interpreter._patch_lang_tensor = install_tensor_methods_with_scalar_index


def _make_interpreter_round_fp32_to_bf16_to_nearest() -> None:
    """Make Triton 3.6's interpreter round fp32 -> bf16 casts to nearest even, as the GPU's cvt.rn does.

    The interpreter truncates them (its cast passes no rounding mode), an error of up to 2**-7 relative
    instead of 2**-8, which made bf16 stores in interpreted tests look up to twice as bad as on a GPU.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder_class = getattr(interpreter, "InterpreterBuilder", None)
    cast_impl = getattr(builder_class, "cast_impl", None)
    if cast_impl is None or getattr(cast_impl, "rgt_fast_round_to_nearest", False):
        return

    def cast_rounding_fp32_to_bf16(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast_impl(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
        quiet_nan = ((bits >> 16) | np.uint32(0x40)).astype(np.uint16)
        return interpreter.TensorHandle(np.where(np.isnan(src.data), quiet_nan, rounded), dst_type.scalar)

    cast_rounding_fp32_to_bf16.rgt_fast_round_to_nearest = True
    builder_class.cast_impl = cast_rounding_fp32_to_bf16


if INTERPRET:
    _let_interpreter_loops_take_runtime_bounds()
    _make_interpreter_round_fp32_to_bf16_to_nearest()

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fp32_matmuls_use_tf32() -> bool:
    """Whether PyTorch's CUDA float32 matmuls may run as TF32, as set by either of PyTorch's switches.

    Since torch 2.9 the old switch (``torch.backends.cuda.matmul.allow_tf32``) raises when read after the new one
    (``fp32_precision``) was set, so the new one is read; it follows the old one too. "none" there inherits the
    global ``torch.backends.fp32_precision``.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch before 2.9: only the old switch exists
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = torch.backends.fp32_precision
    return precision == "tf32"

# Pipelining depth of the row and conv kernels (add_layer_norm, spatial_gate): Triton's CUDA default, named so
# that their launchers and their AOT variants (what the kernel report compiles) agree.
ELEMENTWISE_NUM_STAGES = 3

TRITON_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# The attention kernels take scale * log2(e) as a float32 argument (their softmax runs in base 2).
LARGEST_ATTENTION_SCALE = torch.finfo(torch.float32).max / math.log2(math.e)


def check_attention_scale(op: str, scale) -> None:
    """Reject an attention ``scale`` that is not a real number (Python or NumPy), not finite, or so large that the
    kernels' float32 ``scale * log2(e)`` would be inf (every output NaN). Both paths of both attentions apply it."""
    if isinstance(scale, (torch.SymFloat, torch.SymInt)):
        return  # a value torch.compile traces symbolically: there is nothing to compare yet
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a real number such as head_dim ** -0.5, got {scale!r} "
                        f"({type(scale).__name__})")
    if not (math.isfinite(scale) and abs(scale) <= LARGEST_ATTENTION_SCALE):
        raise ValueError(f"{op}: scale must be a finite real number of magnitude at most "
                         f"{LARGEST_ATTENTION_SCALE:.4g} (the kernels take scale * log2(e) as a float32), "
                         f"got {scale!r}")


def kernel_buffer(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer a kernel fills is allocated here, and looked up here at call time
    (``_common.kernel_buffer``), so that tests can swap in NaN-filled buffers between guard bands: an element a
    kernel leaves unwritten, or a write past either end, then shows up."""
    return torch.empty(shape, dtype=dtype, device=device)


def autograd_records(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an op on these tensors (None allowed): then it may keep them for the
    backward, and an op must not reuse their memory."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def triton_runs_on(t: torch.Tensor) -> bool:
    """True when a Triton kernel can execute on this tensor's device (CUDA, or CPU under the interpreter)."""
    return t.is_cuda or triton_runs_on_device(t.device)


def triton_runs_on_device(device: torch.device) -> bool:
    """:func:`triton_runs_on` for a device, before any tensor is on it."""
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


def on_device_of(t: torch.Tensor):
    """Context for launching on ``t``'s GPU: Triton launches on the current CUDA device, which need not be it."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def cached_outside_compile(build):
    """``functools.cache`` for eager calls; under torch.compile the plain function, which Dynamo traces into the
    graph (it ignores cache wrappers, with a warning that users would see).

    Cached tensors are built outside inference mode: one first built under ``torch.inference_mode`` (as
    ``rgt-fast upscale`` runs) would be an inference tensor, and a later training step in the same process would
    fail when autograd saves it.
    """
    @functools.cache
    def cached(*args):
        with torch.inference_mode(False):
            return build(*args)

    @functools.wraps(build)
    def call(*args):
        return build(*args) if torch.compiler.is_compiling() else cached(*args)

    return call


def score_elements_per_step(device: torch.device) -> int:
    """How many attention scores the plain-PyTorch attentions compute per step.

    On CPU in eager mode, 2**19 (2 MiB in fp32, about one core's L2 cache): with the whole score matrix at once,
    softmax and the second matmul were memory-bound. On this project's 2-core CPU, 2**18 to 2**20 ran within 10%
    of each other and 2**24 up to 3.5x slower. Elsewhere (GPUs, where each step is a kernel launch, and under
    torch.compile, which unrolls the steps), 2**24, which only bounds memory.
    """
    if device.type == "cpu" and not torch.compiler.is_compiling():
        return 1 << 19
    return 1 << 24


class _ValuesTimesProbabilitiesT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v_t, probabilities):
        ctx.save_for_backward(v_t, probabilities)
        return torch.matmul(v_t, probabilities.transpose(-1, -2))

    @staticmethod
    def backward(ctx, grad_out_t):
        v_t, probabilities = ctx.saved_tensors
        return torch.matmul(grad_out_t, probabilities), torch.matmul(grad_out_t.transpose(-1, -2), v_t)


def values_times_probabilities_t(v_t: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """The transposed attention output v^T p^T, (..., D, M), of (..., D, N) values and (..., M, N) probabilities.

    Its backward forms p's gradient as dO v^T in p's own layout. Autograd's matmul backward forms it transposed,
    and softmax's backward then copies it: a transposing copy of every score, which was 16% of L-SA's backward
    on CPU.
    """
    return _ValuesTimesProbabilitiesT.apply(v_t, probabilities)


# A fused op can take the nn.Linear that reads its output (``proj_weight``, ``proj_bias``): autograd then keeps
# only the op's inputs, and the op's backward kernel recomputes the linear's input for its weight gradient.

def project_if_given(rows: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """A fused op's output: its rows, or the linear layer after the op applied to them when the op was given one,
    in the rows' dtype: what autocast runs it in (the rows are already in the autocast dtype there; the weight and
    bias are cast as autocast casts them)."""
    if weight is None:
        return rows
    # One 2-D matmul with the bias added inside (addmm), also where the rows are a strided view (the gate inside
    # fc1's output): PyTorch's linear runs such 3-D input as a matmul and then a separate bias add.
    projected = torch.nn.functional.linear(rows.flatten(0, -2), weight.to(rows.dtype),
                                           None if bias is None else bias.to(rows.dtype))
    return projected.view(*rows.shape[:-1], weight.shape[0])


def _projection_parameter_grads(dout: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dweight, dbias) of the projection from its output's gradient and its input rows (recomputed): in the
    rows' dtype, then cast to each parameter's, as autocast's linear and the cast of its parameters give them."""
    drows = dout.reshape(-1, dout.shape[-1])
    dweight = drows.t().matmul(rows.reshape(-1, rows.shape[-1])).to(weight.dtype)
    return dweight, None if bias is None else drows.sum(0).to(bias.dtype)


def backward_through_projection(dout: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                                launch_backward) -> tuple:
    """The gradients of an op whose output went through :func:`project_if_given`, plus (dweight, dbias) of the
    projection (None without one). ``launch_backward(drows, write_rows)`` runs the op's own backward from the
    gradient of its rows and returns (*its gradients, rows): the rows the projection read, which its backward
    kernel writes again when ``write_rows``, since autograd did not keep them."""
    if weight is None:
        *grads, _ = launch_backward(dout, False)
        return (*grads, None, None)
    *grads, rows = launch_backward(dout.matmul(weight.to(dout.dtype)), True)
    return (*grads, *_projection_parameter_grads(dout, rows, weight, bias))


def check_projection(op: str, in_features: int, device: torch.device, weight, bias) -> None:
    """Clear errors for a ``proj_weight`` / ``proj_bias`` pair that is not an nn.Linear's over ``in_features``."""
    if weight is None:
        if bias is not None:
            raise ValueError(f"{op}: proj_bias was given without proj_weight; pass both (the weight and bias of "
                             f"the nn.Linear that reads the output) or neither")
        return
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != in_features:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{op}: proj_weight must be (out_features, {in_features}), the weight of an nn.Linear "
                         f"reading the op's {in_features} output channels, got {shape}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{op}: proj_bias must have shape ({weight.shape[0]},) to match proj_weight, got {shape}")
    for name, t in (("proj_weight", weight), ("proj_bias", bias)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}; convert it with .float()")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but the input is on {device}; move the module to the "
                             f"input's device")


def tokens_as_image(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) tokens as a (B, C, H, W) image in channels-last layout: a view, where the reference's NCHW image
    is a transposing copy. On CPU, a depthwise 3x3 conv ran 7x and a dense one 1.5x faster on it, and its
    output goes back to tokens through :func:`image_as_tokens` without a copy."""
    batch, _, channels = x.shape
    return x.view(batch, height, width, channels).permute(0, 3, 1, 2)


def image_as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); a view for channels-last images."""
    batch, channels, height, width = x.shape
    return x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)


def row_alignment(*tensors: torch.Tensor, max_bytes: int = 16) -> int:
    """ROW_ALIGN for (B, N, C) tensors whose rows a kernel reads or writes: their batch and token strides' common
    power of two, up to ``max_bytes`` (by default 16, one vector load) of the narrowest dtype, and at least 1."""
    max_elements = max(1, max_bytes // min(t.element_size() for t in tensors))
    return stride_alignment([stride for t in tensors for stride in t.stride()[:2]], max_elements)


def rows_per_tile(row_width: int, tile_elements: int) -> int:
    """How many rows of ``row_width`` (padded) elements make a register tile of about ``tile_elements``."""
    return max(1, tile_elements // row_width)


def stride_alignment(strides, max_elements: int) -> int:
    """The largest power of two, at most ``max_elements``, that divides every one of ``strides`` (in elements):
    the ROW_ALIGN a launcher hands to :func:`aligned_stride`."""
    alignment = max_elements
    for stride in strides:
        while stride % alignment:
            alignment //= 2
    return alignment


@triton.jit
def aligned_stride(stride, ROW_ALIGN: tl.constexpr):
    """``stride``, which the launcher found to be a multiple of ROW_ALIGN (:func:`stride_alignment`), in a form
    Triton's alignment analysis sees through: it ignores ``tl.multiple_of`` on scalar arguments, and strides that
    are not multiples of 16 (RGT's 180- and 540-channel rows) are otherwise taken as odd.

    Rows then load in vectors of up to ROW_ALIGN elements (as far as the channel mask allows) instead of one
    16-bit element per instruction; only loads of 4 bytes or more can become the asynchronous copies that Triton
    pipelines across a loop.
    """
    return (stride // ROW_ALIGN) * ROW_ALIGN


@triton.jit
def aligned_row_strides(stride_b, stride_n, ROW_ALIGN: tl.constexpr):
    """The batch and token strides of a (B, N, C) tensor through :func:`aligned_stride`."""
    return aligned_stride(stride_b, ROW_ALIGN), aligned_stride(stride_n, ROW_ALIGN)


@triton.jit
def token_offsets(tokens, tokens_per_image, stride_b, stride_n, ROW_ALIGN: tl.constexpr):
    """Element offsets of flat (32-bit) token indices over a batch of (B, N, ...) tensors with these strides
    (multiples of ROW_ALIGN).

    The indices stay 32-bit, where division is cheap (B * N < 2**31); the offsets are 64-bit, since tokens x
    channels passes 2**31 on large images.
    """
    stride_b, stride_n = aligned_row_strides(stride_b, stride_n, ROW_ALIGN)
    image = tokens // tokens_per_image
    return image.to(tl.int64) * stride_b + (tokens - image * tokens_per_image).to(tl.int64) * stride_n


@triton.jit
def tile_offsets(tokens, channels, tokens_per_image, stride_b, stride_n, stride_c, ROW_ALIGN: tl.constexpr):
    """(tokens, channels) element offsets of a (B, N, C) tensor, 64-bit throughout: with a channel stride other
    than 1 (a channel-major view) the channel term alone passes 2**31 on large images."""
    return (token_offsets(tokens, tokens_per_image, stride_b, stride_n, ROW_ALIGN)[:, None]
            + channels.to(tl.int64)[None, :] * stride_c)


@triton.jit
def normalise_rows(values, valid, eps, CHANNELS: tl.constexpr):
    """LayerNorm of each row of the fp32 tile ``values`` over its ``valid`` lanes (zeros elsewhere, which the
    sums then ignore): (mean, normalised rows, 1 / std)."""
    mean = tl.sum(values, axis=1) / CHANNELS
    centred = tl.where(valid, values - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / CHANNELS + eps)
    return mean, centred * rstd[:, None], rstd


@triton.jit
def layer_norm_input_grad(dx_hat, x_hat, rstd, CHANNELS: tl.constexpr):
    """Gradient of LayerNorm's input from that of its normalised rows (``dx_hat``: after the weight)."""
    return rstd[:, None] * (dx_hat - (tl.sum(dx_hat, axis=1) / CHANNELS)[:, None]
                            - x_hat * (tl.sum(dx_hat * x_hat, axis=1) / CHANNELS)[:, None])


@triton.jit
def round_to_tf32(x):
    """fp32 values rounded to the nearest TF32 value (10 mantissa bits; ties away from zero).

    A TF32 MMA reads only the top 10 mantissa bits of its fp32 operands: Triton hands them over unrounded, so
    the MMA truncates, an error biased towards zero that adds up along a dot instead of cancelling (measured on an
    H100: L-SA gradients with up to 6 times the error of PyTorch's TF32 matmuls). cuBLAS rounds to nearest, as
    this does: adding half a TF32 unit to the magnitude bits, then clearing the 13 bits the MMA ignores.
    Infinities come through unchanged. A NaN's payload would carry into the exponent (CUDA's canonical NaN,
    0x7FFFFFFF, would become -0.0), so NaNs take the quiet NaN's bit instead, which is among the bits the MMA reads.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x1000) & 0xFFFFE000
    return tl.where(x == x, rounded, bits | 0x400000).to(tl.float32, bitcast=True)


@triton.jit
def mma_operand(x, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """A tl.dot operand as the MMA should see it: fp32 under the interpreter (``UPCAST``, see INTERPRET), where
    everything multiplies in full fp32; on a GPU, fp32 rounded to nearest TF32 when the dot runs in TF32."""
    if UPCAST:
        x = x.to(tl.float32)
    elif x.dtype == tl.float32 and INPUT_PRECISION == "tf32":
        x = round_to_tf32(x)
    return x


def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling division for launch grids and tile counts. triton.cdiv does the same, but in Triton 3.6 it is a
    constexpr function and costs about 1.5 us per host call (measured), which launchers paid several times per op."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), without triton.next_power_of_2's constexpr-call cost."""
    return 1 << max(0, n - 1).bit_length()


def next_power_of_2_at_least_16(n: int) -> int:
    """Padded head-dim tile: a power of two and >= 16, the smallest K that tl.dot accepts."""
    return max(16, next_power_of_2(n))


@dataclass(frozen=True)
class KernelVariant:
    """One compilable instance of a @triton.jit kernel, for ahead-of-time reports.

    ``signature`` maps every argument name to a Triton type string ("*bf16", "i32", "fp32", "constexpr");
    ``constexprs`` gives the value of each constexpr argument. ``config`` is a short human label
    (for example "bf16 BLOCK_M=64 BLOCK_N=64 D=32 warps=4 stages=2").
    """

    kernel: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    config: str
    uses_dot: bool = True
    extra_options: dict = field(default_factory=dict)


def aot_signature(fn, constexprs: dict, pointer_types: Mapping[str, str], float_args=(),
                  unit_stride_suffix: str | None = None) -> tuple[dict, dict]:
    """Signature and constexprs of ``fn`` as Triton's launcher builds them for the model's tensors.

    ``pointer_types`` maps pointer arguments to element types ("bf16", "fp32", ...), ``float_args`` names the
    fp32 scalars; other arguments are i32. Strides named ``stride_*<unit_stride_suffix>`` are 1 for every tensor
    the model passes, and Triton specialises an integer argument equal to 1 into a constexpr, so they are
    compiled that way here too.
    """
    signature, constexprs = {}, dict(constexprs)
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = "*" + pointer_types[name]
        elif unit_stride_suffix and name.startswith("stride_") and name.endswith(unit_stride_suffix):
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in float_args:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature, constexprs
