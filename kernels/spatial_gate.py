"""The MLP's spatial gate: GELU, LayerNorm of the second half, depthwise 3x3 conv, product with the first half.

``spatial_gate(hidden, H, W, norm_weight, norm_bias, conv_weight, conv_bias, eps)`` takes the output of the
MLP's ``fc1``, before its GELU, as (B, H*W, 2C) tokens (any strides) and returns (B, H*W, C), contiguous,
ready for ``fc2``. It equals ``x1 * conv(LayerNorm(x2))`` with ``x1, x2 = GELU(hidden).chunk(2, -1)``; the conv
has zero padding and runs on the token map as an H x W image.

The reference writes GELU(hidden), the normalised half, a channel-first copy of it for the conv, the conv
output and the product: five tensors of the size of the output or larger, each written and read back. Here:

* Forward: a norm kernel reads the second half of ``hidden`` once and writes the normalised map (in the input
  dtype, which is where autocast rounds it too, as the conv's bf16 input); a conv kernel reads its 3x3
  neighbourhoods (cache hits after the first), adds the bias, multiplies by GELU of the first half and
  writes the output. Nothing is saved for the backward except ``hidden``, which the reference keeps too. In
  inference (``reuse_hidden``) both maps go into ``hidden`` itself, the normalised map over its second half and
  the output over its first: the op then needs no memory beyond its input.
* Backward: the norm kernel runs again to recompute the normalised map. A conv-backward kernel recomputes
  the conv output, writes the gradient of the first half of ``hidden`` and the conv output's gradient, and
  accumulates the conv weight and bias gradients. A norm-backward kernel applies the transposed conv
  (the 3x3 neighbourhood again), then the LayerNorm and GELU backward, and accumulates the LayerNorm
  weight and bias gradients. Those parameter gradients are sums over every token: each program sums a
  fixed chunk of tokens into an fp32 partial, and the partials are summed in a fixed order afterwards.
  There are no atomics, and the chunking depends only on the shapes, so they are bitwise identical from
  run to run.
* Addresses are 64-bit: 4K x 4K maps with 2 x 180 channels pass 2**31 elements.
"""
from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    ELEMENTWISE_NUM_STAGES,
    SUPPORTED_DTYPES,
    TRITON_DTYPE_NAMES,
    KernelVariant,
    aot_signature,
    autograd_records,
    backward_through_projection,
    cdiv,
    check_projection,
    image_as_tokens,
    layer_norm_input_grad,
    next_power_of_2,
    normalise_rows,
    on_device_of,
    project_if_given,
    row_alignment,
    rows_per_tile,
    tile_offsets,
    tokens_as_image,
    triton_runs_on,
)

_INV_SQRT_2 = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
# A whole token row of the gate (C channels, padded to a power of two) is one register tile in the norm
# kernels; the gate has embed_dim * mlp_ratio / 2 channels, 180 in RGT and RGT-S.
_MAX_CHANNELS = 512
# Elements per register tile of the whole-row kernels (the backward holds more tensors per element), and the
# (tokens x channels) tile of the conv kernels.
_ROW_TILE_ELEMENTS = 4096
_NORM_BACKWARD_TILE_ELEMENTS = 2048
# (BLOCK_T, BLOCK_C, num_warps) of the conv kernels; benchmarks/sweep_tiles.py times others for the backward.
_CONV_TILES = {"forward": (32, 64, 4), "backward": (32, 64, 4)}
_NUM_WARPS = 4
_NORM_BACKWARD_NUM_WARPS = 8
# Enough programs to fill a 132-SM GPU several times over, with few enough partials (programs x 11 x C fp32)
# that summing them is negligible.
_BACKWARD_TARGET_PROGRAMS = 1024


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * _INV_SQRT_2))


@triton.jit
def _gelu_grad(x):
    return 0.5 * (1.0 + tl.erf(x * _INV_SQRT_2)) + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI


@triton.jit
def _wide(index):
    # Token indices stay 32-bit, where division is cheap (B * H * W < 2**31); addresses are 64-bit, since
    # tokens x channels passes 2**31 on 4K x 4K maps.
    return index.to(tl.int64)


@triton.jit
def _pixel_of(tokens, tokens_per_image, width):
    """(row, column) in its image of each flat token index over the batch."""
    within = tokens % tokens_per_image
    row = within // width
    return row, within - row * width


@triton.jit
def _shifted_rows(ptr, tokens, token_valid, row, column, channels, channel_valid, dy, dx, height, width,
                  ROW_STRIDE: tl.constexpr):
    """fp32 rows of the (tokens, channels) map at ``ptr``, whose rows lie ROW_STRIDE elements apart, taken dy rows
    and dx columns away from each token's pixel; zeros where that falls outside the image (the conv's zero
    padding)."""
    inside = token_valid & (row + dy >= 0) & (row + dy < height) & (column + dx >= 0) & (column + dx < width)
    neighbour = tokens + dy * width + dx
    return tl.load(ptr + _wide(neighbour)[:, None] * ROW_STRIDE + channels[None, :],
                   mask=inside[:, None] & channel_valid[None, :], other=0.0).to(tl.float32)


@triton.jit
def _normalised_gate_half(hidden_ptr, stride_hb, stride_hn, stride_hc, tokens, token_valid, channels,
                          tokens_per_image, eps, CHANNELS: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """GELU of the second half of ``hidden`` for a tile of tokens, normalised per token: (x_hat, rstd, x)."""
    channel_valid = channels < CHANNELS
    valid = token_valid[:, None] & channel_valid[None, :]
    second_half = tile_offsets(tokens, CHANNELS + channels, tokens_per_image, stride_hb, stride_hn, stride_hc,
                               ROW_ALIGN)
    x = tl.load(hidden_ptr + second_half, mask=valid, other=0.0).to(tl.float32)
    _, x_hat, rstd = normalise_rows(_gelu(x), valid, eps, CHANNELS)
    return x_hat, rstd, x


@triton.jit
def _gate_norm_kernel(
    hidden_ptr, norm_weight_ptr, norm_bias_ptr, normed_ptr,
    stride_hb, stride_hn, stride_hc,
    num_tokens, tokens_per_image, eps,
    CHANNELS: tl.constexpr, CHANNELS_PAD: tl.constexpr, BLOCK_T: tl.constexpr, ROW_ALIGN: tl.constexpr,
    NORMED_OFFSET: tl.constexpr, MAP_ROW_STRIDE: tl.constexpr,
):
    """The normalised second half of ``hidden``, written at ``normed_ptr + NORMED_OFFSET`` in rows MAP_ROW_STRIDE
    elements apart: a map of its own, or (in place) the second half of a contiguous ``hidden`` itself, where each
    program reads its rows whole before it writes them."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_valid = tokens < num_tokens
    channels = tl.arange(0, CHANNELS_PAD)
    channel_valid = channels < CHANNELS
    x_hat, _, _ = _normalised_gate_half(hidden_ptr, stride_hb, stride_hn, stride_hc, tokens, token_valid,
                                        channels, tokens_per_image, eps, CHANNELS, ROW_ALIGN)
    weight = tl.load(norm_weight_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)
    bias = tl.load(norm_bias_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)
    normed = x_hat * weight[None, :] + bias[None, :]
    tl.store(normed_ptr + NORMED_OFFSET + _wide(tokens)[:, None] * MAP_ROW_STRIDE + channels[None, :],
             normed.to(normed_ptr.dtype.element_ty), mask=token_valid[:, None] & channel_valid[None, :])


@triton.jit
def _conv_of_normed(normed_ptr, conv_weight_ptr, conv_bias_ptr, tokens, token_valid, channels, channel_valid,
                    tokens_per_image, height, width, ROW_STRIDE: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """The depthwise 3x3 conv (zero padding) of the normalised map (rows ROW_STRIDE elements apart) plus its bias,
    at a tile of tokens."""
    row, column = _pixel_of(tokens, tokens_per_image, width)
    acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    acc += tl.load(conv_bias_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)[None, :]
    for tap in tl.static_range(9):
        taps = _shifted_rows(normed_ptr, tokens, token_valid, row, column, channels, channel_valid,
                             tap // 3 - 1, tap % 3 - 1, height, width, ROW_STRIDE)
        weight = tl.load(conv_weight_ptr + channels * 9 + tap, mask=channel_valid, other=0.0).to(tl.float32)
        acc += taps * weight[None, :]
    return acc


@triton.jit
def _gate_conv_kernel(
    hidden_ptr, normed_ptr, conv_weight_ptr, conv_bias_ptr, out_ptr,
    stride_hb, stride_hn, stride_hc,
    num_tokens, tokens_per_image, height, width,
    CHANNELS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ROW_ALIGN: tl.constexpr,
    NORMED_OFFSET: tl.constexpr, MAP_ROW_STRIDE: tl.constexpr,
):
    """The gate at a tile of tokens and channels, from the normalised map that _gate_norm_kernel wrote (same
    NORMED_OFFSET and MAP_ROW_STRIDE); written in rows MAP_ROW_STRIDE elements apart. In place, the output takes
    the first half of ``hidden``: each program reads that half only at its own tile, before writing it."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_valid = tokens < num_tokens
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_valid = channels < CHANNELS
    conv = _conv_of_normed(normed_ptr + NORMED_OFFSET, conv_weight_ptr, conv_bias_ptr, tokens, token_valid, channels,
                           channel_valid, tokens_per_image, height, width, MAP_ROW_STRIDE, BLOCK_T, BLOCK_C)
    valid = token_valid[:, None] & channel_valid[None, :]
    first_half = tl.load(hidden_ptr + tile_offsets(tokens, channels, tokens_per_image, stride_hb, stride_hn, stride_hc,
                                                   ROW_ALIGN), mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + _wide(tokens)[:, None] * MAP_ROW_STRIDE + channels[None, :],
             (_gelu(first_half) * conv).to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _gate_conv_backward_kernel(
    hidden_ptr, normed_ptr, conv_weight_ptr, conv_bias_ptr, dout_ptr, dhidden_ptr, dconv_ptr, gate_ptr,
    conv_weight_partial_ptr, conv_bias_partial_ptr,
    stride_hb, stride_hn, stride_hc,
    stride_ob, stride_on, stride_oc,
    num_tokens, tokens_per_image, height, width, tiles_per_program,
    CHANNELS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, WRITE_GATE: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    """d(first half of hidden) and d(conv output) for a chunk of token tiles; conv weight/bias partials; with
    WRITE_GATE, the gate's output again (which the projection after it needs for its weight gradient)."""
    chunk = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_valid = channels < CHANNELS
    taps_of_rows = tl.arange(0, 16)
    weight_partial = tl.zeros([16, BLOCK_C], tl.float32)
    bias_partial = tl.zeros([BLOCK_C], tl.float32)
    for tile in range(tiles_per_program):
        tokens = (chunk * tiles_per_program + tile) * BLOCK_T + tl.arange(0, BLOCK_T)
        token_valid = tokens < num_tokens
        valid = token_valid[:, None] & channel_valid[None, :]
        conv = _conv_of_normed(normed_ptr, conv_weight_ptr, conv_bias_ptr, tokens, token_valid, channels,
                               channel_valid, tokens_per_image, height, width, CHANNELS, BLOCK_T, BLOCK_C)
        row, column = _pixel_of(tokens, tokens_per_image, width)
        first_half_offsets = tile_offsets(tokens, channels, tokens_per_image, stride_hb, stride_hn, stride_hc,
                                          ROW_ALIGN)
        first_half = tl.load(hidden_ptr + first_half_offsets, mask=valid, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + tile_offsets(tokens, channels, tokens_per_image, stride_ob, stride_on, stride_oc,
                                               ROW_ALIGN), mask=valid, other=0.0).to(tl.float32)
        dfirst = dout * conv * _gelu_grad(first_half)
        tl.store(dhidden_ptr + _wide(tokens)[:, None] * (2 * CHANNELS) + channels[None, :],
                 dfirst.to(dhidden_ptr.dtype.element_ty), mask=valid)
        gelu_first = _gelu(first_half)
        if WRITE_GATE:
            tl.store(gate_ptr + _wide(tokens)[:, None] * CHANNELS + channels[None, :],
                     (gelu_first * conv).to(gate_ptr.dtype.element_ty), mask=valid)
        # Rounded to the storage dtype before use, as the reference's autocast backward rounds it.
        dconv = (dout * gelu_first).to(dconv_ptr.dtype.element_ty)
        tl.store(dconv_ptr + _wide(tokens)[:, None] * CHANNELS + channels[None, :], dconv, mask=valid)
        dconv = dconv.to(tl.float32)
        bias_partial += tl.sum(dconv, axis=0)
        for tap in tl.static_range(9):
            taps = _shifted_rows(normed_ptr, tokens, token_valid, row, column, channels, channel_valid,
                                 tap // 3 - 1, tap % 3 - 1, height, width, CHANNELS)
            weight_partial += tl.where(taps_of_rows[:, None] == tap, tl.sum(taps * dconv, axis=0)[None, :], 0.0)
    partial_row = chunk.to(tl.int64) * 9 * CHANNELS
    tl.store(conv_weight_partial_ptr + partial_row + channels[None, :] * 9 + taps_of_rows[:, None],
             weight_partial, mask=(taps_of_rows[:, None] < 9) & channel_valid[None, :])
    tl.store(conv_bias_partial_ptr + chunk.to(tl.int64) * CHANNELS + channels, bias_partial, mask=channel_valid)


@triton.jit
def _gate_norm_backward_kernel(
    hidden_ptr, norm_weight_ptr, conv_weight_ptr, dconv_ptr, dhidden_ptr,
    norm_weight_partial_ptr, norm_bias_partial_ptr,
    stride_hb, stride_hn, stride_hc,
    num_tokens, tokens_per_image, height, width, tiles_per_program, eps,
    CHANNELS: tl.constexpr, CHANNELS_PAD: tl.constexpr, BLOCK_T: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """Transposed conv, LayerNorm and GELU backward: d(second half of hidden); norm weight/bias partials."""
    chunk = tl.program_id(0)
    channels = tl.arange(0, CHANNELS_PAD)
    channel_valid = channels < CHANNELS
    norm_weight = tl.load(norm_weight_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)
    weight_partial = tl.zeros([CHANNELS_PAD], tl.float32)
    bias_partial = tl.zeros([CHANNELS_PAD], tl.float32)
    for tile in range(tiles_per_program):
        tokens = (chunk * tiles_per_program + tile) * BLOCK_T + tl.arange(0, BLOCK_T)
        token_valid = tokens < num_tokens
        valid = token_valid[:, None] & channel_valid[None, :]
        row, column = _pixel_of(tokens, tokens_per_image, width)
        # The normalised value at token t fed the conv outputs at t - offset for each tap offset.
        dnormed = tl.zeros([BLOCK_T, CHANNELS_PAD], tl.float32)
        for tap in tl.static_range(9):
            dconv = _shifted_rows(dconv_ptr, tokens, token_valid, row, column, channels, channel_valid,
                                  1 - tap // 3, 1 - tap % 3, height, width, CHANNELS)
            weight = tl.load(conv_weight_ptr + channels * 9 + tap, mask=channel_valid, other=0.0).to(tl.float32)
            dnormed += dconv * weight[None, :]
        x_hat, rstd, x = _normalised_gate_half(hidden_ptr, stride_hb, stride_hn, stride_hc, tokens, token_valid,
                                               channels, tokens_per_image, eps, CHANNELS, ROW_ALIGN)
        weight_partial += tl.sum(dnormed * x_hat, axis=0)
        bias_partial += tl.sum(dnormed, axis=0)
        dx_hat = dnormed * norm_weight[None, :]
        dgelu = layer_norm_input_grad(dx_hat, x_hat, rstd, CHANNELS)
        tl.store(dhidden_ptr + _wide(tokens)[:, None] * (2 * CHANNELS) + CHANNELS + channels[None, :],
                 (dgelu * _gelu_grad(x)).to(dhidden_ptr.dtype.element_ty), mask=valid)
    tl.store(norm_weight_partial_ptr + chunk.to(tl.int64) * CHANNELS + channels, weight_partial, mask=channel_valid)
    tl.store(norm_bias_partial_ptr + chunk.to(tl.int64) * CHANNELS + channels, bias_partial, mask=channel_valid)


def _write_normed(hidden: torch.Tensor, normed: torch.Tensor, norm_weight, norm_bias, eps: float, normed_offset: int,
                  map_row_stride: int) -> None:
    batch, tokens_per_image, two_channels = hidden.shape
    channels = two_channels // 2
    channels_pad = next_power_of_2(channels)
    block_t = rows_per_tile(channels_pad, _ROW_TILE_ELEMENTS)
    num_tokens = batch * tokens_per_image
    _gate_norm_kernel[(cdiv(num_tokens, block_t),)](
        hidden, norm_weight, norm_bias, normed, *hidden.stride(), num_tokens, tokens_per_image, eps,
        CHANNELS=channels, CHANNELS_PAD=channels_pad, BLOCK_T=block_t, ROW_ALIGN=row_alignment(hidden),
        NORMED_OFFSET=normed_offset, MAP_ROW_STRIDE=map_row_stride,
        num_warps=_NUM_WARPS, num_stages=ELEMENTWISE_NUM_STAGES,
    )


def _normed(hidden: torch.Tensor, norm_weight, norm_bias, eps: float) -> torch.Tensor:
    """The normalised second half of ``hidden`` as a contiguous (tokens, C) map of its own."""
    channels = hidden.shape[2] // 2
    normed = _common.kernel_buffer((hidden.shape[0] * hidden.shape[1], channels), dtype=hidden.dtype,
                                   device=hidden.device)
    _write_normed(hidden, normed, norm_weight, norm_bias, eps, 0, channels)
    return normed


def _triton_forward(hidden, height: int, width: int, norm_weight, norm_bias, conv_weight, conv_bias,
                    eps: float, in_place: bool) -> torch.Tensor:
    """The gate; ``in_place`` (a contiguous ``hidden`` that nothing reads afterwards) puts the normalised map in
    hidden's second half and returns the gate as a view of its first half, so that the op needs no memory of its
    own."""
    batch, tokens_per_image, two_channels = hidden.shape
    channels = two_channels // 2
    num_tokens = batch * tokens_per_image
    if in_place:
        out, normed, normed_offset, map_row_stride = hidden[..., :channels], hidden, channels, two_channels
    else:
        out = _common.kernel_buffer((batch, tokens_per_image, channels), dtype=hidden.dtype, device=hidden.device)
        normed = _common.kernel_buffer((num_tokens, channels), dtype=hidden.dtype, device=hidden.device)
        normed_offset, map_row_stride = 0, channels
    if num_tokens == 0:
        return out
    with on_device_of(hidden):
        _write_normed(hidden, normed, norm_weight, norm_bias, eps, normed_offset, map_row_stride)
        block_t, block_c, num_warps = _CONV_TILES["forward"]
        _gate_conv_kernel[(cdiv(num_tokens, block_t), cdiv(channels, block_c))](
            hidden, normed, conv_weight, conv_bias, out, *hidden.stride(),
            num_tokens, tokens_per_image, height, width,
            CHANNELS=channels, BLOCK_T=block_t, BLOCK_C=block_c, ROW_ALIGN=row_alignment(hidden),
            NORMED_OFFSET=normed_offset, MAP_ROW_STRIDE=map_row_stride,
            num_warps=num_warps, num_stages=ELEMENTWISE_NUM_STAGES,
        )
    return out


def _tiles_per_program(num_tiles: int) -> int:
    return max(1, cdiv(num_tiles, _BACKWARD_TARGET_PROGRAMS))


def _triton_backward(dout, hidden, height: int, width: int, norm_weight, norm_bias, conv_weight, conv_bias,
                     eps: float, with_gate: bool):
    """(dhidden, dnorm_weight, dnorm_bias, dconv_weight, dconv_bias, gate): ``gate`` is the forward's output,
    recomputed, when ``with_gate`` (else an empty tensor)."""
    batch, tokens_per_image, two_channels = hidden.shape
    channels = two_channels // 2
    num_tokens = batch * tokens_per_image
    device, dtype = hidden.device, hidden.dtype
    dhidden = _common.kernel_buffer((batch, tokens_per_image, two_channels), dtype=dtype, device=device)
    gate = _common.kernel_buffer((batch, tokens_per_image, channels) if with_gate else (0,), dtype=dtype,
                                 device=device)
    if num_tokens == 0:
        return (dhidden, torch.zeros_like(norm_weight), torch.zeros_like(norm_bias), torch.zeros_like(conv_weight),
                torch.zeros_like(conv_bias), gate)
    channels_pad = next_power_of_2(channels)
    with on_device_of(hidden):
        normed = _normed(hidden, norm_weight, norm_bias, eps)
        dconv = _common.kernel_buffer((num_tokens, channels), dtype=dtype, device=device)

        block_t, block_c, num_warps = _CONV_TILES["backward"]
        conv_tiles = _tiles_per_program(cdiv(num_tokens, block_t))
        conv_chunks = cdiv(cdiv(num_tokens, block_t), conv_tiles)
        conv_weight_partial = _common.kernel_buffer((conv_chunks, channels, 9), dtype=torch.float32, device=device)
        conv_bias_partial = _common.kernel_buffer((conv_chunks, channels), dtype=torch.float32, device=device)
        _gate_conv_backward_kernel[(conv_chunks, cdiv(channels, block_c))](
            hidden, normed, conv_weight, conv_bias, dout, dhidden, dconv, gate if with_gate else dconv,
            conv_weight_partial, conv_bias_partial,
            *hidden.stride(), *dout.stride(), num_tokens, tokens_per_image, height, width, conv_tiles,
            CHANNELS=channels, BLOCK_T=block_t, BLOCK_C=block_c, WRITE_GATE=with_gate,
            ROW_ALIGN=row_alignment(hidden, dout), num_warps=num_warps, num_stages=ELEMENTWISE_NUM_STAGES,
        )

        block_t = rows_per_tile(channels_pad, _NORM_BACKWARD_TILE_ELEMENTS)
        norm_tiles = _tiles_per_program(cdiv(num_tokens, block_t))
        norm_chunks = cdiv(cdiv(num_tokens, block_t), norm_tiles)
        norm_weight_partial = _common.kernel_buffer((norm_chunks, channels), dtype=torch.float32, device=device)
        norm_bias_partial = _common.kernel_buffer((norm_chunks, channels), dtype=torch.float32, device=device)
        _gate_norm_backward_kernel[(norm_chunks,)](
            hidden, norm_weight, conv_weight, dconv, dhidden, norm_weight_partial, norm_bias_partial,
            *hidden.stride(), num_tokens, tokens_per_image, height, width, norm_tiles, eps,
            CHANNELS=channels, CHANNELS_PAD=channels_pad, BLOCK_T=block_t, ROW_ALIGN=row_alignment(hidden),
            num_warps=_NORM_BACKWARD_NUM_WARPS, num_stages=ELEMENTWISE_NUM_STAGES,
        )
    # torch's sum over the chunk dimension is a fixed-order reduction: the same bits on every run.
    return (dhidden,
            norm_weight_partial.sum(0).to(norm_weight.dtype), norm_bias_partial.sum(0).to(norm_bias.dtype),
            conv_weight_partial.sum(0).view(conv_weight.shape).to(conv_weight.dtype),
            conv_bias_partial.sum(0).to(conv_bias.dtype), gate)


def _triton_forward_projected(hidden, height: int, width: int, norm_weight, norm_bias, conv_weight, conv_bias,
                              eps: float, proj_weight, proj_bias, in_place: bool = False) -> torch.Tensor:
    gate = _triton_forward(hidden, height, width, norm_weight, norm_bias, conv_weight, conv_bias, eps, in_place)
    return project_if_given(gate, proj_weight, proj_bias)


@torch.library.custom_op("rgt_fast::spatial_gate_forward", mutates_args=())
def _spatial_gate_forward_op(hidden: torch.Tensor, height: int, width: int, norm_weight: torch.Tensor,
                             norm_bias: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
                             eps: float, proj_weight: torch.Tensor | None, proj_bias: torch.Tensor | None
                             ) -> torch.Tensor:
    return _triton_forward_projected(hidden, height, width, norm_weight, norm_bias, conv_weight, conv_bias, eps,
                                     proj_weight, proj_bias)


@_spatial_gate_forward_op.register_fake
def _spatial_gate_forward_fake(hidden, height, width, norm_weight, norm_bias, conv_weight, conv_bias, eps,
                               proj_weight, proj_bias):
    batch, tokens_per_image, two_channels = hidden.shape
    channels = two_channels // 2 if proj_weight is None else proj_weight.shape[0]
    return hidden.new_empty((batch, tokens_per_image, channels))


@torch.library.custom_op("rgt_fast::spatial_gate_backward", mutates_args=())
def _spatial_gate_backward_op(dout: torch.Tensor, hidden: torch.Tensor, height: int, width: int,
                              norm_weight: torch.Tensor, norm_bias: torch.Tensor, conv_weight: torch.Tensor,
                              conv_bias: torch.Tensor, eps: float, with_gate: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    return _triton_backward(dout, hidden, height, width, norm_weight, norm_bias, conv_weight, conv_bias, eps,
                            with_gate)


@_spatial_gate_backward_op.register_fake
def _spatial_gate_backward_fake(dout, hidden, height, width, norm_weight, norm_bias, conv_weight, conv_bias, eps,
                                with_gate):
    gate_shape = (*hidden.shape[:2], hidden.shape[2] // 2) if with_gate else (0,)
    return (hidden.new_empty(hidden.shape), norm_weight.new_empty(norm_weight.shape),
            norm_bias.new_empty(norm_bias.shape), conv_weight.new_empty(conv_weight.shape),
            conv_bias.new_empty(conv_bias.shape), hidden.new_empty(gate_shape))


def _save_for_backward(ctx, hidden, height, width, norm_weight, norm_bias, conv_weight, conv_bias, eps,
                       proj_weight, proj_bias):
    # Only the input: with a projection the gate's output, which its weight gradient needs, is recomputed by the
    # conv backward kernel, so neither it nor anything else of the gate's size is kept.
    ctx.save_for_backward(hidden, norm_weight, norm_bias, conv_weight, conv_bias, proj_weight, proj_bias)
    ctx.height, ctx.width, ctx.eps = height, width, eps


def _setup_backward(ctx, inputs, output):
    _save_for_backward(ctx, *inputs)


def _input_gradients(launch_backward, ctx, dout):
    """The gradients of every forward input, from ``launch_backward`` (the custom op or the launcher)."""
    hidden, norm_weight, norm_bias, conv_weight, conv_bias, proj_weight, proj_bias = ctx.saved_tensors
    dhidden, dnorm_weight, dnorm_bias, dconv_weight, dconv_bias, dproj_weight, dproj_bias = \
        backward_through_projection(dout, proj_weight, proj_bias, lambda dgate, write_gate: launch_backward(
            dgate, hidden, ctx.height, ctx.width, norm_weight, norm_bias, conv_weight, conv_bias, ctx.eps, write_gate))
    return (dhidden, None, None, dnorm_weight, dnorm_bias, dconv_weight, dconv_bias, None, dproj_weight,
            dproj_bias)


def _spatial_gate_backward(ctx, dout):
    return _input_gradients(_spatial_gate_backward_op, ctx, dout)


_spatial_gate_forward_op.register_autograd(_spatial_gate_backward, setup_context=_setup_backward)


class _SpatialGate(torch.autograd.Function):
    """The eager-mode entry, straight to the launchers (the custom ops' dispatch costs CPU time per call)."""

    @staticmethod
    def forward(ctx, hidden, height: int, width: int, norm_weight, norm_bias, conv_weight, conv_bias, eps: float,
                proj_weight, proj_bias):
        inputs = (hidden, height, width, norm_weight, norm_bias, conv_weight, conv_bias, eps, proj_weight, proj_bias)
        _save_for_backward(ctx, *inputs)
        return _triton_forward_projected(*inputs)

    @staticmethod
    def backward(ctx, dout):
        return _input_gradients(_triton_backward, ctx, dout)


def spatial_gate_torch(hidden: torch.Tensor, height: int, width: int, norm_weight: torch.Tensor,
                       norm_bias: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
                       eps: float, *, proj_weight: torch.Tensor | None = None,
                       proj_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch spatial gate with the layouts and dtype rules of :func:`spatial_gate` (any float dtypes, any
    device): computed in float32 (float64 for float64 ``hidden``) whatever the parameters' dtypes, the normalised
    map rounded to ``hidden``'s dtype where the kernels store it, the output in ``hidden``'s dtype, and each
    parameter's gradient in its own dtype. The projection, when given, runs in ``hidden``'s dtype."""
    channels = hidden.shape[2] // 2
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    norm_weight, norm_bias, conv_weight, conv_bias = (
        p.to(compute_dtype) for p in (norm_weight, norm_bias, conv_weight, conv_bias))
    first, second = torch.nn.functional.gelu(hidden.to(compute_dtype)).chunk(2, dim=-1)
    normed = torch.nn.functional.layer_norm(second, (channels,), norm_weight, norm_bias, eps)
    normed = normed.to(hidden.dtype).to(compute_dtype)
    conv = torch.nn.functional.conv2d(tokens_as_image(normed, height, width), conv_weight, conv_bias, padding=1,
                                      groups=channels)
    gate = (first * image_as_tokens(conv)).to(hidden.dtype)
    return project_if_given(gate, proj_weight, proj_bias)


def _check_inputs(hidden, height, width, norm_weight, norm_bias, conv_weight, conv_bias, eps) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"spatial_gate: hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() != 3 or hidden.shape[2] % 2 or hidden.shape[2] == 0:
        raise ValueError(f"spatial_gate: hidden must be (B, H*W, 2C) with an even, positive channel count, got "
                         f"shape {tuple(hidden.shape)}")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)) or value < 1:
            raise ValueError(f"spatial_gate: {name} must be a positive int, got {value!r}")
    if hidden.shape[1] != height * width:
        raise ValueError(f"spatial_gate: hidden has {hidden.shape[1]} tokens per image but the map is "
                         f"{height}x{width} = {height * width}; pass the H and W the tokens came from")
    if hidden.dtype not in SUPPORTED_DTYPES + (torch.float64,):
        raise TypeError(f"spatial_gate: unsupported dtype {hidden.dtype}; use float32, bfloat16 or float16 "
                        f"(float64 runs on the PyTorch fallback)")
    channels = hidden.shape[2] // 2
    expected = {"norm_weight": (channels,), "norm_bias": (channels,), "conv_weight": (channels, 1, 3, 3),
                "conv_bias": (channels,)}
    for name, t in zip(expected, (norm_weight, norm_bias, conv_weight, conv_bias)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected[name]:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"spatial_gate: {name} must have shape {expected[name]} for {2 * channels} hidden "
                             f"channels, got {shape}")
        if not t.is_floating_point():
            raise TypeError(f"spatial_gate: {name} must be a floating-point tensor, got {t.dtype}; convert it "
                            f"with .float()")
        if t.device != hidden.device:
            raise ValueError(f"spatial_gate: {name} is on {t.device} but hidden is on {hidden.device}; move "
                             f"the module with .to(hidden.device)")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"spatial_gate: eps must be a positive finite number, got {eps!r}")


def spatial_gate(hidden: torch.Tensor, height: int, width: int, norm_weight: torch.Tensor,
                 norm_bias: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
                 eps: float = 1e-5, *, proj_weight: torch.Tensor | None = None,
                 proj_bias: torch.Tensor | None = None, reuse_hidden: bool = False) -> torch.Tensor:
    """``x1 * dwconv3x3(LayerNorm(x2))`` with ``x1, x2 = GELU(hidden).chunk(2, -1)``: (B, H*W, 2C) -> (B, H*W, C).

    With ``proj_weight`` (and optionally ``proj_bias``), the linear layer after the gate too, the MLP's fc2:
    ``F.linear(gate, proj_weight, proj_bias)``, computed in ``hidden``'s dtype as autocast computes it. The gate's
    output is then not kept for the backward (the conv backward kernel recomputes it for the projection's weight
    gradient): one (B, H*W, C) activation less per MLP in training.

    Runs the Triton kernels on CUDA (and on CPU under TRITON_INTERPRET=1) for float32/bfloat16/float16 and up to
    512 gate channels, and :func:`spatial_gate_torch` otherwise. Parameters may be in another float dtype than
    ``hidden`` (fp32 parameters under autocast); both paths compute the gate in fp32 (the PyTorch one in fp64 for
    fp64 ``hidden``), return ``hidden``'s dtype and give each parameter's gradient in its own dtype.

    ``reuse_hidden=True`` says that nothing reads ``hidden`` afterwards (an MLP's fc1 output in inference). The
    Triton kernels then write the normalised map and the gate into hidden's own memory instead of two new
    (B, H*W, C) buffers, when ``hidden`` is contiguous and no autograd graph records the op (which would keep
    ``hidden`` for the backward) and outside torch.compile; ``hidden`` holds garbage afterwards, and without a
    projection the result is a view of its first half. Otherwise the flag changes nothing.
    """
    _check_inputs(hidden, height, width, norm_weight, norm_bias, conv_weight, conv_bias, eps)
    check_projection("spatial_gate", hidden.shape[2] // 2, hidden.device, proj_weight, proj_bias)
    if hidden.dtype in SUPPORTED_DTYPES and triton_runs_on(hidden) and hidden.shape[2] // 2 <= _MAX_CHANNELS:
        # The kernels index the parameters densely.
        params = (norm_weight.contiguous(), norm_bias.contiguous(), conv_weight.contiguous(), conv_bias.contiguous())
        args = (hidden, int(height), int(width), *params, float(eps), proj_weight, proj_bias)
        if torch.compiler.is_compiling():
            return _spatial_gate_forward_op(*args)
        if reuse_hidden and hidden.is_contiguous() and not autograd_records(hidden, *params, proj_weight, proj_bias):
            return _triton_forward_projected(*args, in_place=True)
        return _SpatialGate.apply(*args)
    return spatial_gate_torch(hidden, height, width, norm_weight, norm_bias, conv_weight, conv_bias, eps,
                              proj_weight=proj_weight, proj_bias=proj_bias)


# Gate channel counts of the models: 180 (RGT, RGT-S), 60 (embed 60), 64 (the built-in demo models).
_AOT_CHANNELS = (180, 60, 64)


def _conv_launch(direction: str) -> tuple[dict, int]:
    block_t, block_c, num_warps = _CONV_TILES[direction]
    return dict(BLOCK_T=block_t, BLOCK_C=block_c), num_warps


def aot_variants() -> list[KernelVariant]:
    """Every kernel x dtype x channel count the launchers can pick, for the AOT report."""
    variants = []
    for dtype in SUPPORTED_DTYPES:
        name = TRITON_DTYPE_NAMES[dtype]
        for channels in _AOT_CHANNELS:
            channels_pad = next_power_of_2(channels)
            row_tokens = rows_per_tile(channels_pad, _ROW_TILE_ELEMENTS)
            backward_tiles, backward_warps = _conv_launch("backward")
            forward_tiles, forward_warps = _conv_launch("forward")
            # The normalised map and the gate in maps of their own, and in place in hidden (inference).
            map_layouts = (dict(NORMED_OFFSET=0, MAP_ROW_STRIDE=channels),
                           dict(NORMED_OFFSET=channels, MAP_ROW_STRIDE=2 * channels))
            launches = (
                *((_gate_norm_kernel, dict(CHANNELS_PAD=channels_pad, BLOCK_T=row_tokens, **layout), _NUM_WARPS)
                  for layout in map_layouts),
                *((_gate_conv_kernel, {**forward_tiles, **layout}, forward_warps) for layout in map_layouts),
                # With the projection after the gate (the model's MLP) and without it.
                *((_gate_conv_backward_kernel, {**backward_tiles, "WRITE_GATE": write_gate}, backward_warps)
                  for write_gate in (True, False)),
                (_gate_norm_backward_kernel,
                 dict(CHANNELS_PAD=channels_pad, BLOCK_T=rows_per_tile(channels_pad, _NORM_BACKWARD_TILE_ELEMENTS)),
                 _NORM_BACKWARD_NUM_WARPS),
            )
            # As in the model: fc1's contiguous (B, N, 2C) output and a contiguous (B, N, C) gradient.
            row_align = row_alignment(*(torch.empty(1, 64 * 64, width, dtype=dtype, device="meta")
                                        for width in (2 * channels, channels)))
            for fn, tiles, num_warps in launches:
                tiles = {**tiles, "ROW_ALIGN": row_align}
                # Partial sums are fp32, and so are the module parameters under autocast.
                pointer_types = {arg: "fp32" if arg.endswith("partial_ptr") or arg.startswith(("norm_", "conv_"))
                                 else name for arg in fn.arg_names if arg.endswith("_ptr")}
                # Channel strides ("stride_*c") are 1 in the model.
                signature, constexprs = aot_signature(fn, dict(CHANNELS=channels, **tiles), pointer_types, ("eps",),
                                                      unit_stride_suffix="c")
                config = " ".join([f"{name} C={channels}", *(f"{k}={v}" for k, v in tiles.items()),
                                   f"warps={num_warps}"])
                variants.append(KernelVariant(kernel=fn.__name__, fn=fn, signature=signature, constexprs=constexprs,
                                              num_warps=num_warps, num_stages=ELEMENTWISE_NUM_STAGES, uses_dot=False,
                                              config=config))
    return variants
