"""Residual add and LayerNorm in one pass: ``summed = x + delta`` and ``normed = LayerNorm(summed)``.

In an RGT block the attention output is added to the residual stream and the sum is normalised for the MLP
(``norm2``). The reference writes the sum, reads it back for the LayerNorm and writes the normalised tensor;
under autocast, ``fc1`` then reads that fp32 tensor once more to cast it to bf16. Here one kernel reads ``x``
and ``delta`` and writes the sum (in their promoted dtype) and the normalised rows, directly in the dtype the
next matmul consumes: the autocast dtype when autocast is on (the value autocast would have cast to), else
the sum's dtype. Per-row mean and 1/std are kept for the backward, and so are ``x`` and ``delta`` rather than
the sum: the block keeps ``x`` anyway, and under autocast ``delta`` is the bf16 attention output where the sum
is fp32, so the block's saved activations shrink by one bf16 row per token.

The backward kernel recomputes the sum (rounded as the forward rounded it), adds the LayerNorm backward of
``d normed`` to ``d summed`` and writes the gradient of ``x`` (and of ``delta``, when its dtype differs). The
weight and bias gradients are sums over every row: each program sums a fixed chunk of rows into an fp32
partial, and the partials are summed in a fixed order, so they are bitwise identical from run to run (no
atomics; the chunking depends only on the shape).

``layer_norm(x, weight, bias)`` is the same kernels without the add, for the blocks' ``norm1``: under
autocast its output, too, comes out in the dtype the attention's projections read.
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
    TRITON_DTYPES,
    KernelVariant,
    aot_signature,
    autograd_records,
    backward_through_projection,
    cdiv,
    check_projection,
    layer_norm_input_grad,
    next_power_of_2,
    normalise_rows,
    on_device_of,
    project_if_given,
    row_alignment,
    rows_per_tile,
    tile_offsets,
    triton_runs_on,
)

# A whole row is one register tile; RGT's embed dims are 180 (RGT, RGT-S) and 60.
_MAX_CHANNELS = 1024
_ROW_TILE_ELEMENTS = 4096
# The backward holds more row-sized tensors at once: half the tile keeps it well under 255 registers.
_BACKWARD_TILE_ELEMENTS = 2048
_NUM_WARPS = 4
# Programs of the backward: enough to fill a 132-SM GPU several times over, few enough that summing their
# (programs x 2 x C) fp32 partials is negligible.
_BACKWARD_TARGET_PROGRAMS = 1024


@triton.jit
def _summed_rows(x_ptr, delta_ptr, rows, channels, valid, rows_per_image, stride_xb, stride_xn, stride_xc,
                 stride_db, stride_dn, stride_dc, HAS_DELTA: tl.constexpr, SUM_DTYPE: tl.constexpr,
                 ROW_ALIGN: tl.constexpr):
    """``x + delta`` for a tile of rows, rounded to SUM_DTYPE as the reference's add stores it before its LayerNorm
    reads it (``x`` alone without ``delta``), in fp32."""
    x = tl.load(x_ptr + tile_offsets(rows, channels, rows_per_image, stride_xb, stride_xn, stride_xc, ROW_ALIGN),
                mask=valid, other=0.0).to(tl.float32)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + tile_offsets(rows, channels, rows_per_image, stride_db, stride_dn, stride_dc,
                                                 ROW_ALIGN), mask=valid, other=0.0)
        return (x + delta.to(tl.float32)).to(SUM_DTYPE).to(tl.float32)
    return x


@triton.jit
def _add_norm_forward_kernel(
    x_ptr, delta_ptr, weight_ptr, bias_ptr, summed_ptr, normed_ptr, mean_ptr, rstd_ptr,
    stride_xb, stride_xn, stride_xc, stride_db, stride_dn, stride_dc,
    num_rows, rows_per_image, eps,
    CHANNELS: tl.constexpr, CHANNELS_PAD: tl.constexpr, BLOCK_T: tl.constexpr, HAS_DELTA: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_valid = rows < num_rows
    channels = tl.arange(0, CHANNELS_PAD)
    channel_valid = channels < CHANNELS
    valid = row_valid[:, None] & channel_valid[None, :]
    summed = _summed_rows(x_ptr, delta_ptr, rows, channels, valid, rows_per_image, stride_xb, stride_xn, stride_xc,
                          stride_db, stride_dn, stride_dc, HAS_DELTA, summed_ptr.dtype.element_ty, ROW_ALIGN)
    if HAS_DELTA:
        tl.store(summed_ptr + rows.to(tl.int64)[:, None] * CHANNELS + channels[None, :],
                 summed.to(summed_ptr.dtype.element_ty), mask=valid)
    mean, x_hat, rstd = normalise_rows(summed, valid, eps, CHANNELS)
    weight = tl.load(weight_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)
    normed = x_hat * weight[None, :] + bias[None, :]
    tl.store(normed_ptr + rows.to(tl.int64)[:, None] * CHANNELS + channels[None, :],
             normed.to(normed_ptr.dtype.element_ty), mask=valid)
    tl.store(mean_ptr + rows, mean, mask=row_valid)
    tl.store(rstd_ptr + rows, rstd, mask=row_valid)


@triton.jit
def _add_norm_backward_kernel(
    x_ptr, delta_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, dnormed_ptr, dsummed_ptr, dx_ptr, ddelta_ptr,
    normed_ptr, weight_partial_ptr, bias_partial_ptr,
    stride_xb, stride_xn, stride_xc, stride_db, stride_dn, stride_dc,
    stride_gb, stride_gn, stride_gc, stride_sb, stride_sn, stride_sc,
    num_rows, rows_per_image, tiles_per_program,
    CHANNELS: tl.constexpr, CHANNELS_PAD: tl.constexpr, BLOCK_T: tl.constexpr, HAS_DELTA: tl.constexpr,
    SUM_DTYPE: tl.constexpr, HAS_DSUMMED: tl.constexpr, WRITE_DDELTA: tl.constexpr, WRITE_NORMED: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    """With WRITE_NORMED, also the forward's normalised rows again, for the weight gradient of a linear layer
    that reads them (the op's projection)."""
    chunk = tl.program_id(0)
    channels = tl.arange(0, CHANNELS_PAD)
    channel_valid = channels < CHANNELS
    weight = tl.load(weight_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)
    weight_partial = tl.zeros([CHANNELS_PAD], tl.float32)
    bias_partial = tl.zeros([CHANNELS_PAD], tl.float32)
    for tile in range(tiles_per_program):
        rows = (chunk * tiles_per_program + tile) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_valid = rows < num_rows
        valid = row_valid[:, None] & channel_valid[None, :]
        contiguous = rows.to(tl.int64)[:, None] * CHANNELS + channels[None, :]
        # The sum is recomputed from the inputs the block keeps anyway rather than saved (fp32 under autocast).
        summed = _summed_rows(x_ptr, delta_ptr, rows, channels, valid, rows_per_image, stride_xb, stride_xn,
                              stride_xc, stride_db, stride_dn, stride_dc, HAS_DELTA, SUM_DTYPE, ROW_ALIGN)
        mean = tl.load(mean_ptr + rows, mask=row_valid, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_valid, other=0.0)
        x_hat = tl.where(valid, (summed - mean[:, None]) * rstd[:, None], 0.0)
        dnormed = tl.load(dnormed_ptr + tile_offsets(rows, channels, rows_per_image, stride_gb, stride_gn, stride_gc,
                                                     ROW_ALIGN), mask=valid, other=0.0).to(tl.float32)
        weight_partial += tl.sum(dnormed * x_hat, axis=0)
        bias_partial += tl.sum(dnormed, axis=0)
        dx_hat = dnormed * weight[None, :]
        dtotal = layer_norm_input_grad(dx_hat, x_hat, rstd, CHANNELS)
        if HAS_DSUMMED:
            dsummed_offsets = tile_offsets(rows, channels, rows_per_image, stride_sb, stride_sn, stride_sc,
                                           ROW_ALIGN)
            dtotal += tl.load(dsummed_ptr + dsummed_offsets, mask=valid, other=0.0).to(tl.float32)
        tl.store(dx_ptr + contiguous, dtotal.to(dx_ptr.dtype.element_ty), mask=valid)
        if WRITE_DDELTA:
            tl.store(ddelta_ptr + contiguous, dtotal.to(ddelta_ptr.dtype.element_ty), mask=valid)
        if WRITE_NORMED:
            # Last, and with the bias loaded here (a cache hit after the first tile): fewer values live at once.
            bias = tl.load(bias_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)
            tl.store(normed_ptr + contiguous, (x_hat * weight[None, :] + bias[None, :]).to(normed_ptr.dtype.element_ty),
                     mask=valid)
    tl.store(weight_partial_ptr + chunk.to(tl.int64) * CHANNELS + channels, weight_partial, mask=channel_valid)
    tl.store(bias_partial_ptr + chunk.to(tl.int64) * CHANNELS + channels, bias_partial, mask=channel_valid)


def _normed_dtype(summed_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the next matmul reads: autocast's when it is on for this device (it leaves float64 alone), else
    the sum's."""
    if summed_dtype != torch.float64 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return summed_dtype


def _triton_forward(x, delta, weight, bias, eps: float, normed_dtype: torch.dtype, normed_into_delta: bool = False):
    """(summed, normed, mean, rstd); without ``delta`` the rows of ``x`` are normalised and summed is x.
    ``normed_into_delta`` (a contiguous ``delta`` of dtype ``normed_dtype`` that nothing reads afterwards) writes the
    normalised rows over ``delta``: each program reads its rows before it writes them."""
    batch, rows_per_image, channels = x.shape
    num_rows = batch * rows_per_image
    if delta is None:
        summed = x
    else:
        summed = _common.kernel_buffer(x.shape, dtype=torch.promote_types(x.dtype, delta.dtype), device=x.device)
    normed = delta if normed_into_delta else _common.kernel_buffer(x.shape, dtype=normed_dtype, device=x.device)
    mean = _common.kernel_buffer((num_rows,), dtype=torch.float32, device=x.device)
    rstd = _common.kernel_buffer((num_rows,), dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return summed, normed, mean, rstd
    channels_pad = next_power_of_2(channels)
    block_rows = rows_per_tile(channels_pad, _ROW_TILE_ELEMENTS)
    with on_device_of(x):
        _add_norm_forward_kernel[(cdiv(num_rows, block_rows),)](
            x, x if delta is None else delta, weight, bias, summed, normed, mean, rstd, *x.stride(),
            *(x if delta is None else delta).stride(), num_rows, rows_per_image, eps,
            CHANNELS=channels, CHANNELS_PAD=channels_pad, BLOCK_T=block_rows, HAS_DELTA=delta is not None,
            ROW_ALIGN=row_alignment(x, x if delta is None else delta), num_warps=_NUM_WARPS,
            num_stages=ELEMENTWISE_NUM_STAGES,
        )
    return summed, normed, mean, rstd


def _triton_backward(dsummed, dnormed, x, delta, mean, rstd, weight, bias, normed_dtype: torch.dtype,
                     with_normed: bool):
    """(dx, ddelta, dweight, dbias, normed), each input's gradient in its dtype. The kernel recomputes the sum from
    ``x`` and ``delta`` (``x`` alone for a plain LayerNorm: ``delta`` None); ``dsummed`` None means the sum was not
    used (or does not exist). ``ddelta`` is ``dx`` itself when the dtypes agree. ``normed`` is the forward's
    normalised output again, in ``normed_dtype``, when ``with_normed`` (else an empty tensor)."""
    batch, rows_per_image, channels = x.shape
    num_rows = batch * rows_per_image
    dx = _common.kernel_buffer(x.shape, dtype=x.dtype, device=x.device)
    write_ddelta = delta is not None and delta.dtype != x.dtype
    ddelta = _common.kernel_buffer(x.shape, dtype=delta.dtype, device=x.device) if write_ddelta else dx
    normed = _common.kernel_buffer(x.shape if with_normed else (0,), dtype=normed_dtype, device=x.device)
    if num_rows == 0:
        return dx, ddelta, torch.zeros_like(weight), torch.zeros_like(weight), normed
    channels_pad = next_power_of_2(channels)
    block_rows = rows_per_tile(channels_pad, _BACKWARD_TILE_ELEMENTS)
    num_tiles = cdiv(num_rows, block_rows)
    tiles_per_program = max(1, cdiv(num_tiles, _BACKWARD_TARGET_PROGRAMS))
    num_chunks = cdiv(num_tiles, tiles_per_program)
    weight_partial = _common.kernel_buffer((num_chunks, channels), dtype=torch.float32, device=x.device)
    bias_partial = _common.kernel_buffer((num_chunks, channels), dtype=torch.float32, device=x.device)
    delta_rows = x if delta is None else delta
    dsummed_rows = dnormed if dsummed is None else dsummed
    sum_dtype = x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype)
    with on_device_of(x):
        _add_norm_backward_kernel[(num_chunks,)](
            x, delta_rows, mean, rstd, weight, bias, dnormed, dsummed_rows, dx, ddelta,
            normed if with_normed else dx, weight_partial, bias_partial,
            *x.stride(), *delta_rows.stride(), *dnormed.stride(), *dsummed_rows.stride(),
            num_rows, rows_per_image, tiles_per_program,
            CHANNELS=channels, CHANNELS_PAD=channels_pad, BLOCK_T=block_rows, HAS_DELTA=delta is not None,
            SUM_DTYPE=TRITON_DTYPES[sum_dtype], HAS_DSUMMED=dsummed is not None, WRITE_DDELTA=write_ddelta,
            WRITE_NORMED=with_normed, ROW_ALIGN=row_alignment(x, delta_rows, dnormed, dsummed_rows),
            num_warps=_NUM_WARPS, num_stages=ELEMENTWISE_NUM_STAGES,
        )
    # torch's sum over the chunk dimension is a fixed-order reduction: the same bits on every run.
    return dx, ddelta, weight_partial.sum(0).to(weight.dtype), bias_partial.sum(0).to(weight.dtype), normed


def _triton_forward_projected(x, delta, weight, bias, eps: float, normed_dtype: torch.dtype, proj_weight,
                              proj_bias, normed_into_delta: bool = False):
    """(summed, out, mean, rstd): ``out`` is the normalised rows, or the projection of them with ``proj_weight``."""
    summed, normed, mean, rstd = _triton_forward(x, delta, weight, bias, eps, normed_dtype, normed_into_delta)
    return summed, project_if_given(normed, proj_weight, proj_bias), mean, rstd


def _projected_shape(x: torch.Tensor, proj_weight) -> tuple[int, ...]:
    return tuple(x.shape) if proj_weight is None else (*x.shape[:-1], proj_weight.shape[0])


@torch.library.custom_op("rgt_fast::add_layer_norm_forward", mutates_args=())
def _add_layer_norm_forward_op(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               eps: float, normed_dtype: torch.dtype, proj_weight: torch.Tensor | None,
                               proj_bias: torch.Tensor | None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_forward_projected(x, delta, weight, bias, eps, normed_dtype, proj_weight, proj_bias)


@_add_layer_norm_forward_op.register_fake
def _add_layer_norm_forward_fake(x, delta, weight, bias, eps, normed_dtype, proj_weight, proj_bias):
    num_rows = x.shape[0] * x.shape[1]
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, delta.dtype)),
            x.new_empty(_projected_shape(x, proj_weight), dtype=normed_dtype),
            x.new_empty((num_rows,), dtype=torch.float32), x.new_empty((num_rows,), dtype=torch.float32))


@torch.library.custom_op("rgt_fast::add_layer_norm_backward", mutates_args=())
def _add_layer_norm_backward_op(dsummed: torch.Tensor | None, dnormed: torch.Tensor, x: torch.Tensor,
                                delta: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor,
                                normed_dtype: torch.dtype, with_normed: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, ddelta, dweight, dbias, normed = _triton_backward(dsummed, dnormed, x, delta, mean, rstd, weight, bias,
                                                          normed_dtype, with_normed)
    # A custom op may not return one tensor twice: when the dtypes agree the two gradients share values.
    return dx, (ddelta.clone() if ddelta is dx else ddelta), dweight, dbias, normed


@_add_layer_norm_backward_op.register_fake
def _add_layer_norm_backward_fake(dsummed, dnormed, x, delta, mean, rstd, weight, bias, normed_dtype, with_normed):
    return (x.new_empty(x.shape), delta.new_empty(delta.shape), weight.new_empty(weight.shape),
            weight.new_empty(weight.shape), x.new_empty(x.shape if with_normed else (0,), dtype=normed_dtype))


def _save_for_backward(ctx, x, delta, mean, rstd, weight, bias, normed_dtype, proj_weight, proj_bias):
    # The inputs, not the sum: in a block ``x`` is kept for the backward anyway (norm1, the HAI residual), and
    # ``delta`` is the 16-bit attention output where the sum is the fp32 residual stream under autocast. With a
    # projection, not the normalised rows either: the backward kernel writes them again for its weight gradient.
    ctx.save_for_backward(x, delta, mean, rstd, weight, bias, proj_weight, proj_bias)
    ctx.normed_dtype = normed_dtype


def _gradients(launch_backward, ctx, dsummed, dout):
    """(dx, ddelta, dweight, dbias, dproj_weight, dproj_bias) from ``launch_backward`` (a custom op or the
    launcher, with the launcher's arguments); ``delta`` None for a plain LayerNorm."""
    x, delta, mean, rstd, weight, bias, proj_weight, proj_bias = ctx.saved_tensors

    def launch(dnormed, write_normed):
        return launch_backward(dsummed, dnormed, x, delta, mean, rstd, weight, bias, ctx.normed_dtype,
                               write_normed)

    if dout is None:  # only the sum is used further on: no gradient reaches the projection
        return backward_through_projection(torch.zeros_like(x, dtype=ctx.normed_dtype), None, None, launch)
    return backward_through_projection(dout, proj_weight, proj_bias, launch)


def _setup_backward(ctx, inputs, output):
    x, delta, weight, bias, eps, normed_dtype, proj_weight, proj_bias = inputs
    _, _, mean, rstd = output
    _save_for_backward(ctx, x, delta, mean, rstd, weight, bias, normed_dtype, proj_weight, proj_bias)
    ctx.mark_non_differentiable(mean, rstd)


def _add_layer_norm_backward(ctx, dsummed, dout, _dmean, _drstd):
    dx, ddelta, dweight, dbias, dproj_weight, dproj_bias = _gradients(_add_layer_norm_backward_op, ctx, dsummed,
                                                                      dout)
    return dx, ddelta, dweight, dbias, None, None, dproj_weight, dproj_bias


_add_layer_norm_forward_op.register_autograd(_add_layer_norm_backward, setup_context=_setup_backward)


class _AddLayerNorm(torch.autograd.Function):
    """The eager-mode entry, straight to the launchers (the custom ops' dispatch costs CPU time per call)."""

    @staticmethod
    def forward(ctx, x, delta, weight, bias, eps: float, normed_dtype: torch.dtype, proj_weight, proj_bias):
        summed, out, mean, rstd = _triton_forward_projected(x, delta, weight, bias, eps, normed_dtype, proj_weight,
                                                            proj_bias)
        _save_for_backward(ctx, x, delta, mean, rstd, weight, bias, normed_dtype, proj_weight, proj_bias)
        return summed, out

    @staticmethod
    def backward(ctx, dsummed, dout):
        dx, ddelta, dweight, dbias, dproj_weight, dproj_bias = _gradients(_triton_backward, ctx, dsummed, dout)
        return dx, ddelta, dweight, dbias, None, None, dproj_weight, dproj_bias


def layer_norm_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *,
                     proj_weight: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch :func:`layer_norm` with its dtype rules (any float dtypes, any device): computed in float32
    (float64 for float64 ``x``) whatever the parameters' dtypes, as the kernels compute; the output in the
    autocast dtype under autocast, else ``x``'s; each parameter's gradient in its own dtype. The projection, when
    given, runs in the output's dtype."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    normed = torch.nn.functional.layer_norm(x.to(compute_dtype), (x.shape[-1],), weight.to(compute_dtype),
                                            bias.to(compute_dtype), eps).to(_normed_dtype(x.dtype, x.device))
    return project_if_given(normed, proj_weight, proj_bias)


def add_layer_norm_torch(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float, *, proj_weight: torch.Tensor | None = None,
                         proj_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch :func:`add_layer_norm` with its dtype rules (any float dtypes, any device): the sum in the
    promoted dtype of ``x`` and ``delta``, its LayerNorm (and projection) as :func:`layer_norm_torch` computes
    it."""
    summed = x + delta
    return summed, layer_norm_torch(summed, weight, bias, eps, proj_weight=proj_weight, proj_bias=proj_bias)


def _check_inputs(x, delta, weight, bias, eps) -> None:
    """The input checks of :func:`add_layer_norm`, and of :func:`layer_norm` when ``delta`` is None."""
    op = "layer_norm" if delta is None else "add_layer_norm"
    rows = {"x": x} if delta is None else {"x": x, "delta": delta}
    tensors = {**rows, "weight": weight, "bias": bias}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if delta is None and x.dim() != 3:
        raise ValueError(f"layer_norm: x must be (B, N, C), got {tuple(x.shape)}")
    if delta is not None and (x.dim() != 3 or delta.shape != x.shape):
        raise ValueError(f"add_layer_norm: x and delta must both be (B, N, C), got {tuple(x.shape)} and "
                         f"{tuple(delta.shape)}")
    for name, t in rows.items():
        if t.dtype not in SUPPORTED_DTYPES + (torch.float64,):
            raise TypeError(f"{op}: {name} has unsupported dtype {t.dtype}; use float32, bfloat16 or float16 "
                            f"(float64 runs on the PyTorch fallback)")
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (x.shape[2],):
            raise ValueError(f"{op}: {name} must have shape ({x.shape[2]},), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}; convert it with .float()")
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; move them to one device")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"{op}: eps must be a positive finite number, got {eps!r}")


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5, *, proj_weight: torch.Tensor | None = None,
                   proj_bias: torch.Tensor | None = None, reuse_delta: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + delta, LayerNorm(x + delta))`` over the last dim of (B, N, C) tensors.

    Runs the Triton kernels on CUDA (and on CPU under TRITON_INTERPRET=1) for float32/bfloat16/float16 and up to
    1024 channels, and :func:`add_layer_norm_torch` otherwise. The sum has the promoted dtype of ``x`` and
    ``delta``; the normalised tensor has the autocast dtype when autocast is on (what the next matmul would cast
    it to), else the sum's. ``weight`` and ``bias`` may be in another float dtype than the sum.

    With ``proj_weight`` (and optionally ``proj_bias``), the second result is instead the linear layer that reads
    the normalised rows (the MLP's fc1), ``F.linear(normed, proj_weight, proj_bias)`` in the normalised rows' dtype
    as autocast runs it; the normalised rows are then not kept for the backward (its kernel writes them again).

    ``reuse_delta=True`` says that nothing reads ``delta`` afterwards (a block's attention output in inference):
    the Triton kernel then writes the normalised rows over it instead of into a new buffer, when ``delta`` is
    contiguous and already in their dtype, no autograd graph records the op (which would keep ``delta`` for the
    backward), and outside torch.compile. ``delta`` holds them afterwards; otherwise the flag changes nothing.
    """
    _check_inputs(x, delta, weight, bias, eps)
    check_projection("add_layer_norm", x.shape[2], x.device, proj_weight, proj_bias)
    summed_dtype = torch.promote_types(x.dtype, delta.dtype)
    if summed_dtype in SUPPORTED_DTYPES and triton_runs_on(x) and x.shape[2] <= _MAX_CHANNELS:
        normed_dtype = _normed_dtype(summed_dtype, x.device)
        weight, bias = weight.contiguous(), bias.contiguous()  # the kernels index them densely
        if torch.compiler.is_compiling():
            summed, out, _, _ = _add_layer_norm_forward_op(x, delta, weight, bias, float(eps), normed_dtype,
                                                           proj_weight, proj_bias)
            return summed, out
        if (reuse_delta and delta.is_contiguous() and delta.dtype == normed_dtype
                and not autograd_records(x, delta, weight, bias, proj_weight, proj_bias)):
            summed, out, _, _ = _triton_forward_projected(x, delta, weight, bias, float(eps), normed_dtype,
                                                          proj_weight, proj_bias, normed_into_delta=True)
            return summed, out
        return _AddLayerNorm.apply(x, delta, weight, bias, float(eps), normed_dtype, proj_weight, proj_bias)
    return add_layer_norm_torch(x, delta, weight, bias, eps, proj_weight=proj_weight, proj_bias=proj_bias)


@torch.library.custom_op("rgt_fast::layer_norm_forward", mutates_args=())
def _layer_norm_forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                           normed_dtype: torch.dtype, proj_weight: torch.Tensor | None, proj_bias: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, out, mean, rstd = _triton_forward_projected(x, None, weight, bias, eps, normed_dtype, proj_weight, proj_bias)
    return out, mean, rstd


@_layer_norm_forward_op.register_fake
def _layer_norm_forward_fake(x, weight, bias, eps, normed_dtype, proj_weight, proj_bias):
    num_rows = x.shape[0] * x.shape[1]
    return (x.new_empty(_projected_shape(x, proj_weight), dtype=normed_dtype),
            x.new_empty((num_rows,), dtype=torch.float32), x.new_empty((num_rows,), dtype=torch.float32))


@torch.library.custom_op("rgt_fast::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dnormed: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                            weight: torch.Tensor, bias: torch.Tensor, normed_dtype: torch.dtype, with_normed: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, _, dweight, dbias, normed = _triton_backward(None, dnormed, x, None, mean, rstd, weight, bias, normed_dtype,
                                                     with_normed)
    return dx, dweight, dbias, normed


@_layer_norm_backward_op.register_fake
def _layer_norm_backward_fake(dnormed, x, mean, rstd, weight, bias, normed_dtype, with_normed):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape),
            x.new_empty(x.shape if with_normed else (0,), dtype=normed_dtype))


def _launch_layer_norm_backward_op(dsummed, dnormed, x, delta, mean, rstd, weight, bias, normed_dtype, with_normed):
    """The layer_norm backward custom op with the launcher's arguments (no sum, no delta)."""
    dx, dweight, dbias, normed = _layer_norm_backward_op(dnormed, x, mean, rstd, weight, bias, normed_dtype,
                                                         with_normed)
    return dx, None, dweight, dbias, normed


def _setup_layer_norm_backward(ctx, inputs, output):
    x, weight, bias, eps, normed_dtype, proj_weight, proj_bias = inputs
    _, mean, rstd = output
    _save_for_backward(ctx, x, None, mean, rstd, weight, bias, normed_dtype, proj_weight, proj_bias)
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, dout, _dmean, _drstd):
    dx, _, dweight, dbias, dproj_weight, dproj_bias = _gradients(_launch_layer_norm_backward_op, ctx, None, dout)
    return dx, dweight, dbias, None, None, dproj_weight, dproj_bias


_layer_norm_forward_op.register_autograd(_layer_norm_backward, setup_context=_setup_layer_norm_backward)


class _LayerNorm(torch.autograd.Function):
    """The eager-mode entry of :func:`layer_norm`, straight to the launchers."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, normed_dtype: torch.dtype, proj_weight, proj_bias):
        _, out, mean, rstd = _triton_forward_projected(x, None, weight, bias, eps, normed_dtype, proj_weight,
                                                       proj_bias)
        _save_for_backward(ctx, x, None, mean, rstd, weight, bias, normed_dtype, proj_weight, proj_bias)
        return out

    @staticmethod
    def backward(ctx, dout):
        dx, _, dweight, dbias, dproj_weight, dproj_bias = _gradients(_triton_backward, ctx, None, dout)
        return dx, dweight, dbias, None, None, dproj_weight, dproj_bias


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, *,
               proj_weight: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dim of a (B, N, C) tensor, output in the dtype the next matmul reads.

    Under autocast that is the autocast dtype (the value autocast would have cast the fp32 LayerNorm output
    to), which saves the cast's extra pass; otherwise ``x``'s dtype. Triton kernels where they can run (up to
    1024 channels), else :func:`layer_norm_torch`. Parameters may be in another float dtype than ``x``. With
    ``proj_weight`` (and optionally ``proj_bias``), the result is the linear layer that reads the normalised rows
    (L-SA's qkv) instead, as :func:`add_layer_norm` computes it, and the normalised rows are not kept for the
    backward.
    """
    _check_inputs(x, None, weight, bias, eps)
    check_projection("layer_norm", x.shape[2], x.device, proj_weight, proj_bias)
    if x.dtype in SUPPORTED_DTYPES and triton_runs_on(x) and x.shape[2] <= _MAX_CHANNELS:
        weight, bias = weight.contiguous(), bias.contiguous()  # the kernels index them densely
        normed_dtype = _normed_dtype(x.dtype, x.device)
        if torch.compiler.is_compiling():
            return _layer_norm_forward_op(x, weight, bias, float(eps), normed_dtype, proj_weight, proj_bias)[0]
        return _LayerNorm.apply(x, weight, bias, float(eps), normed_dtype, proj_weight, proj_bias)
    return layer_norm_torch(x, weight, bias, eps, proj_weight=proj_weight, proj_bias=proj_bias)


# Embed dims of the models: 180 (RGT, RGT-S), 60, 64 (the built-in demo models).
_AOT_CHANNELS = (180, 60, 64)


def aot_variants() -> list[KernelVariant]:
    """Every kernel x dtype x channel count the launchers can pick, for the AOT report."""
    variants = []
    for dtype in SUPPORTED_DTYPES:
        name = TRITON_DTYPE_NAMES[dtype]
        # The residual stream (x, the sum, its gradient) is fp32 under autocast; the 16-bit dtype is what the
        # attention output, the normalised rows and their gradient carry. A pure 16-bit model has it everywhere.
        for stream in sorted({"fp32", name}):
            for channels in _AOT_CHANNELS:
                channels_pad = next_power_of_2(channels)
                forward_tiles = dict(CHANNELS=channels, CHANNELS_PAD=channels_pad,
                                     BLOCK_T=rows_per_tile(channels_pad, _ROW_TILE_ELEMENTS))
                backward_tiles = dict(forward_tiles, BLOCK_T=rows_per_tile(channels_pad, _BACKWARD_TILE_ELEMENTS))
                pointer_types = {
                    "x_ptr": stream, "delta_ptr": name, "summed_ptr": stream, "normed_ptr": name,
                    "dnormed_ptr": name, "dsummed_ptr": stream, "dx_ptr": stream, "ddelta_ptr": name,
                    "weight_ptr": "fp32", "bias_ptr": "fp32", "mean_ptr": "fp32", "rstd_ptr": "fp32",
                    "weight_partial_ptr": "fp32", "bias_partial_ptr": "fp32",
                }
                stream_dtype = torch.float32 if stream == "fp32" else dtype
                # The backward writes the normalised rows again when a projection follows (fc1 after norm2, qkv
                # after L-SA's norm1), not without one (RG-SA's norm1, the op alone).
                launches = (
                    (_add_norm_forward_kernel, forward_tiles, {"HAS_DELTA": True}),
                    *((_add_norm_backward_kernel, backward_tiles,
                       {"HAS_DELTA": True, "SUM_DTYPE": TRITON_DTYPES[stream_dtype], "HAS_DSUMMED": True,
                        "WRITE_DDELTA": stream != name, "WRITE_NORMED": write_normed})
                      for write_normed in (True, False)),
                    (_add_norm_forward_kernel, forward_tiles, {"HAS_DELTA": False}),
                    *((_add_norm_backward_kernel, backward_tiles,
                       {"HAS_DELTA": False, "SUM_DTYPE": TRITON_DTYPES[stream_dtype], "HAS_DSUMMED": False,
                        "WRITE_DDELTA": False, "WRITE_NORMED": write_normed})
                      for write_normed in (True, False)),
                )
                # As in the model: contiguous (B, N, C) rows, the residual stream's and the 16-bit ones.
                row_align = row_alignment(*(torch.empty(1, 64 * 64, channels, dtype=t, device="meta")
                                            for t in (stream_dtype, dtype)))
                for fn, tiles, flags in launches:
                    flags = {**flags, "ROW_ALIGN": row_align}
                    # Channel strides ("stride_*c") are 1 in the model.
                    signature, constexprs = aot_signature(fn, {**tiles, **flags}, pointer_types, ("eps",),
                                                          unit_stride_suffix="c")
                    config = " ".join([f"{name} stream={stream} C={channels}",
                                       *(f"{k}={v}" for k, v in {**tiles, **flags}.items() if k != "CHANNELS"),
                                       f"warps={_NUM_WARPS}"])
                    variants.append(KernelVariant(kernel=fn.__name__, fn=fn, signature=signature,
                                                  constexprs=constexprs, num_warps=_NUM_WARPS,
                                                  num_stages=ELEMENTWISE_NUM_STAGES, uses_dot=False, config=config))
    return variants
