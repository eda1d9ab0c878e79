"""L-SA (rectangle-window self-attention) of RGT as one fused op: both branches, shifts, padding, position bias.

``lsa_attention(qkv, H, W, num_heads, split_size, shifted, bias_table_0, bias_table_1, scale)`` returns the
concatenated branch outputs (B, H*W, C) of the L-SA attention core, before ``get_v`` and ``proj``.

Kernel design
-------------
Windows are index arithmetic: in-window offset ``t`` of window ``w`` sits at rolled position
(window row * Hw + t // Ww, window col * Ww + t % Ww); undoing the roll adds the shift modulo the padded size, and
positions outside H x W load as zeros through the load masks (padded keys still take part in the softmax, as in
the reference). No padded, rolled or partitioned copy of q, k, v or of the output exists: each output row is
written once, straight to its image token and channel. The bias is gathered from the table by the relative index
of each (query, key) pair, and the shift mask (-100) comes from region ids computed from the rolled coordinates.

Each branch is its own launch with the window shape as compile-time constants (coordinate divisions become
shifts). Tiles are BLOCK_M queries x BLOCK_N keys of one window; the head dim is padded to a power of two by
masked loads.

* forward: grid (query blocks of all windows, batch x heads/2); online softmax over the key blocks of the window;
  stores the base-2 logsumexp per query token.
* backward, three launches per branch:
  - dq: same grid; recomputes P, writes dq and delta = rowsum(dO * O) (read by the next two).
  - dk/dv: grid (key blocks of all windows, batch x heads/2), FlashAttention-2 style loop over the query blocks.
  - dS sum for the position-bias gradient: each program keeps one (query block, key block) pair of the window
    and sums its dS over a chunk of (batch, window) items in registers; _table_grad adds the chunks and then the
    pairs of each relative offset in a fixed order (bitwise reproducible, no atomics).

The Triton path takes split sizes that are powers of two (RGT's [8, 32]); other split sizes, float64 and padded
maps of 2**31 tokens or more run the PyTorch path, which is also the CPU path outside the interpreter.
"""
from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    INTERPRET,
    SUPPORTED_DTYPES,
    TRITON_DTYPE_NAMES,
    KernelVariant,
    aligned_row_strides,
    aot_signature,
    autograd_records,
    cached_outside_compile,
    cdiv,
    check_attention_scale,
    fp32_matmuls_use_tf32,
    next_power_of_2_at_least_16,
    mma_operand,
    on_device_of,
    row_alignment,
    score_elements_per_step,
    triton_runs_on,
    values_times_probabilities_t,
)

SHIFT_MASK_VALUE = -100.0
LOG2E = 1.4426950408889634
# Scores run in base 2 (exp2 is the native instruction), so the table and the mask are scaled by log2(e).
_MASK_LOG2 = tl.constexpr(SHIFT_MASK_VALUE * LOG2E)
# Window and token indices are 32-bit on the GPU (see _window_tokens). The interpreter checks every 32-bit add and
# multiply for overflow, which made L-SA's forward and backward 1.5x slower there; there they are 64-bit.
_INDEX = tl.constexpr(tl.int64 if INTERPRET else tl.int32)


# Image sizes and strides are not specialized on (divisibility by 16 would compile a kernel per image size, and
# RGT's 540-channel rows are not 16-byte aligned anyway); ROW_ALIGN gives the kernels the alignment they use.
_SHAPE_ARGUMENTS = [
    "stride_qkv_b", "stride_qkv_t", "stride_out_b", "stride_out_t", "stride_grad_out_b", "stride_grad_out_t",
    "stride_grad_qkv_b", "stride_grad_qkv_t", "H", "W", "padded_H", "padded_W", "windows_per_row", "num_windows",
    "num_items", "items_per_program",
]


@triton.jit
def _dot(a, b, acc, UPCAST_DOT_OPERANDS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    return tl.dot(mma_operand(a, UPCAST_DOT_OPERANDS, INPUT_PRECISION),
                  mma_operand(b, UPCAST_DOT_OPERANDS, INPUT_PRECISION), acc, input_precision=INPUT_PRECISION)


@triton.jit
def _window_tokens(window, offsets, H, W, padded_H, padded_W, windows_per_row,
                   WIN_ROWS: tl.constexpr, WIN_COLS: tl.constexpr, SHIFTED: tl.constexpr):
    """Shift-region id, image token index (int64) and in-image flag of in-window offsets of a window.

    The arithmetic is 32-bit on the GPU (maps of 2**31 tokens or more take the PyTorch path); only the token index
    widens, to be multiplied by a row stride. 64-bit operations take two instructions and two registers each: with
    them the sm_90a bf16 forward needed 101-134 registers per thread, and in 32 bits 80-107.
    """
    offsets = offsets.to(_INDEX)
    window = window.to(_INDEX)
    window_row = window // windows_per_row
    rolled_row = window_row * WIN_ROWS + offsets // WIN_COLS
    rolled_col = (window - window_row * windows_per_row) * WIN_COLS + offsets % WIN_COLS
    if SHIFTED:
        # torch.roll(shifts=-s) puts padded position p + s (mod L) at rolled position p, and rolling the
        # output back by +s returns it there: both directions are this one map.
        row = rolled_row + WIN_ROWS // 2
        row = tl.where(row >= padded_H, row - padded_H, row)
        col = rolled_col + WIN_COLS // 2
        col = tl.where(col >= padded_W, col - padded_W, col)
        row_region = (rolled_row >= padded_H - WIN_ROWS).to(_INDEX) + \
            (rolled_row >= padded_H - WIN_ROWS // 2).to(_INDEX)
        col_region = (rolled_col >= padded_W - WIN_COLS).to(_INDEX) + \
            (rolled_col >= padded_W - WIN_COLS // 2).to(_INDEX)
        region = 3 * row_region + col_region
    else:
        row = rolled_row
        col = rolled_col
        region = offsets
    return region.to(tl.int32), (row * W + col).to(tl.int64), (row < H) & (col < W)


@triton.jit
def _bias_and_mask(table_head_ptr, q_offsets, k_offsets, q_region, k_region,
                   WIN_ROWS: tl.constexpr, WIN_COLS: tl.constexpr, SHIFTED: tl.constexpr):
    """Position bias plus shift mask (base-2 units) of a score tile; arguments come broadcast to its orientation.

    The table row of a pair, (dr + WIN_ROWS - 1) * (2 WIN_COLS - 1) + dc + WIN_COLS - 1, is a query term minus a
    key term, so the tile costs one subtraction per score.
    """
    TABLE_COLS: tl.constexpr = 2 * WIN_COLS - 1
    q_offsets = q_offsets.to(_INDEX)
    k_offsets = k_offsets.to(_INDEX)
    q_term = (q_offsets // WIN_COLS) * TABLE_COLS + q_offsets % WIN_COLS + (WIN_ROWS - 1) * TABLE_COLS + WIN_COLS - 1
    k_term = (k_offsets // WIN_COLS) * TABLE_COLS + k_offsets % WIN_COLS
    bias = tl.load(table_head_ptr + (q_term - k_term))
    if SHIFTED:
        bias = tl.where(q_region != k_region, bias + _MASK_LOG2, bias)
    return bias


@triton.jit
def _program_block(BRANCH: tl.constexpr, WIN_ROWS: tl.constexpr, WIN_COLS: tl.constexpr,
                   EMBED_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Window, first in-window offset, batch, head and first channel of the program's block of BLOCK tokens
    on a (blocks of all windows, batch x heads/2) grid."""
    WINDOW_TOKENS: tl.constexpr = WIN_ROWS * WIN_COLS
    HEADS_PER_BRANCH: tl.constexpr = EMBED_DIM // HEAD_DIM // 2
    window = tl.program_id(0) // (WINDOW_TOKENS // BLOCK)
    start = (tl.program_id(0) % (WINDOW_TOKENS // BLOCK)) * BLOCK
    batch = tl.program_id(1) // HEADS_PER_BRANCH
    branch_head = tl.program_id(1) % HEADS_PER_BRANCH
    head = BRANCH * HEADS_PER_BRANCH + branch_head
    channel = BRANCH * (EMBED_DIM // 2) + branch_head * HEAD_DIM
    return window, start, batch, head, channel


@triton.jit
def _query_block(qkv_ptr, stride_qkv_b, stride_qkv_t, H, W, padded_H, padded_W, windows_per_row,
                 BRANCH: tl.constexpr, WIN_ROWS: tl.constexpr, WIN_COLS: tl.constexpr, SHIFTED: tl.constexpr,
                 EMBED_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The program's query block on the forward and dq grid, and its q tile.

    Returns (window, batch, head, channel, offs_m, offs_d, d_valid, q_region, q_token, q_in_image, q_mask,
    qkv_base, q); qkv_base points at the head's q channels of the batch item's token 0 (k and v follow at
    +EMBED_DIM and +2 EMBED_DIM).
    """
    window, q_start, batch, head, channel = _program_block(BRANCH, WIN_ROWS, WIN_COLS, EMBED_DIM, HEAD_DIM,
                                                           BLOCK_M)
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_region, q_token, q_in_image = _window_tokens(
        window, offs_m, H, W, padded_H, padded_W, windows_per_row, WIN_ROWS, WIN_COLS, SHIFTED)
    q_mask = q_in_image[:, None] & d_valid[None, :]
    qkv_base = qkv_ptr + batch.to(tl.int64) * stride_qkv_b + channel + offs_d[None, :]
    q = tl.load(qkv_base + q_token[:, None] * stride_qkv_t, mask=q_mask, other=0.0)
    return window, batch, head, channel, offs_m, offs_d, d_valid, q_region, q_token, q_in_image, q_mask, qkv_base, q


@triton.jit
def _key_block_scores(q, qkv_base, stride_qkv_t, table_head_ptr, window, k_start, offs_m, q_region, d_valid,
                      H, W, padded_H, padded_W, windows_per_row, scale_log2e,
                      WIN_ROWS: tl.constexpr, WIN_COLS: tl.constexpr, SHIFTED: tl.constexpr,
                      EMBED_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      UPCAST_DOT_OPERANDS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(k, v, base-2 scores with bias and mask) of the key block at k_start against the q tile.

    Shared by the forward and dq: dq recomputes the forward's probabilities against the stored logsumexp, so the
    two score computations must not drift apart.
    """
    offs_n = k_start + tl.arange(0, BLOCK_N)
    k_region, k_token, k_in_image = _window_tokens(
        window, offs_n, H, W, padded_H, padded_W, windows_per_row, WIN_ROWS, WIN_COLS, SHIFTED)
    k_ptrs = qkv_base + EMBED_DIM + k_token[:, None] * stride_qkv_t
    kv_mask = k_in_image[:, None] & d_valid[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(k_ptrs + EMBED_DIM, mask=kv_mask, other=0.0)
    scores = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32),
                  UPCAST_DOT_OPERANDS, INPUT_PRECISION) * scale_log2e
    scores += _bias_and_mask(table_head_ptr, offs_m[:, None], offs_n[None, :], q_region[:, None],
                             k_region[None, :], WIN_ROWS, WIN_COLS, SHIFTED)
    return k, v, scores


@triton.jit(do_not_specialize=_SHAPE_ARGUMENTS)
def _lsa_fwd_kernel(
    qkv_ptr, out_ptr, lse_ptr, table_ptr,
    stride_qkv_b, stride_qkv_t, stride_out_b, stride_out_t,
    H, W, padded_H, padded_W, windows_per_row, scale_log2e,
    BRANCH: tl.constexpr, WIN_ROWS: tl.constexpr, WIN_COLS: tl.constexpr, SHIFTED: tl.constexpr,
    EMBED_DIM: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT_OPERANDS: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    WINDOW_TOKENS: tl.constexpr = WIN_ROWS * WIN_COLS
    NUM_HEADS: tl.constexpr = EMBED_DIM // HEAD_DIM
    stride_qkv_b, stride_qkv_t = aligned_row_strides(stride_qkv_b, stride_qkv_t, ROW_ALIGN)
    stride_out_b, stride_out_t = aligned_row_strides(stride_out_b, stride_out_t, ROW_ALIGN)
    window, batch, head, channel, offs_m, offs_d, d_valid, q_region, q_token, q_in_image, q_mask, qkv_base, q = \
        _query_block(qkv_ptr, stride_qkv_b, stride_qkv_t, H, W, padded_H, padded_W, windows_per_row,
                     BRANCH, WIN_ROWS, WIN_COLS, SHIFTED, EMBED_DIM, HEAD_DIM, BLOCK_M, BLOCK_D)
    table_head_ptr = table_ptr + head * ((2 * WIN_ROWS - 1) * (2 * WIN_COLS - 1))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for k_start in range(0, WINDOW_TOKENS, BLOCK_N):
        _, v, scores = _key_block_scores(
            q, qkv_base, stride_qkv_t, table_head_ptr, window, k_start, offs_m, q_region, d_valid,
            H, W, padded_H, padded_W, windows_per_row, scale_log2e, WIN_ROWS, WIN_COLS, SHIFTED, EMBED_DIM,
            BLOCK_M, BLOCK_N, UPCAST_DOT_OPERANDS, INPUT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST_DOT_OPERANDS, INPUT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    out_ptrs = out_ptr + batch.to(tl.int64) * stride_out_b + q_token[:, None] * stride_out_t + channel + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask)
    lse_ptrs = lse_ptr + (batch * NUM_HEADS + head).to(tl.int64) * (H * W) + q_token
    tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=q_in_image)


@triton.jit(do_not_specialize=_SHAPE_ARGUMENTS)
def _lsa_bwd_dq_kernel(
    qkv_ptr, out_ptr, grad_out_ptr, lse_ptr, delta_ptr, table_ptr, grad_qkv_ptr,
    stride_qkv_b, stride_qkv_t, stride_out_b, stride_out_t, stride_grad_out_b, stride_grad_out_t,
    stride_grad_qkv_b, stride_grad_qkv_t,
    H, W, padded_H, padded_W, windows_per_row, scale_log2e, scale,
    BRANCH: tl.constexpr, WIN_ROWS: tl.constexpr, WIN_COLS: tl.constexpr, SHIFTED: tl.constexpr,
    EMBED_DIM: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT_OPERANDS: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    WINDOW_TOKENS: tl.constexpr = WIN_ROWS * WIN_COLS
    NUM_HEADS: tl.constexpr = EMBED_DIM // HEAD_DIM
    stride_qkv_b, stride_qkv_t = aligned_row_strides(stride_qkv_b, stride_qkv_t, ROW_ALIGN)
    stride_out_b, stride_out_t = aligned_row_strides(stride_out_b, stride_out_t, ROW_ALIGN)
    stride_grad_out_b, stride_grad_out_t = aligned_row_strides(stride_grad_out_b, stride_grad_out_t, ROW_ALIGN)
    stride_grad_qkv_b, stride_grad_qkv_t = aligned_row_strides(stride_grad_qkv_b, stride_grad_qkv_t, ROW_ALIGN)
    window, batch, head, channel, offs_m, offs_d, d_valid, q_region, q_token, q_in_image, q_mask, qkv_base, q = \
        _query_block(qkv_ptr, stride_qkv_b, stride_qkv_t, H, W, padded_H, padded_W, windows_per_row,
                     BRANCH, WIN_ROWS, WIN_COLS, SHIFTED, EMBED_DIM, HEAD_DIM, BLOCK_M, BLOCK_D)
    grad_out = tl.load(grad_out_ptr + batch.to(tl.int64) * stride_grad_out_b + q_token[:, None] * stride_grad_out_t
                       + channel + offs_d[None, :], mask=q_mask, other=0.0)
    out = tl.load(out_ptr + batch.to(tl.int64) * stride_out_b + q_token[:, None] * stride_out_t
                  + channel + offs_d[None, :], mask=q_mask, other=0.0)
    row_stat_offset = (batch * NUM_HEADS + head).to(tl.int64) * (H * W) + q_token
    # Rows of padded queries are never stored; lse = +inf keeps their probabilities at 0 instead of overflowing.
    lse = tl.load(lse_ptr + row_stat_offset, mask=q_in_image, other=float("inf"))
    delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), 1)
    tl.store(delta_ptr + row_stat_offset, delta, mask=q_in_image)
    table_head_ptr = table_ptr + head * ((2 * WIN_ROWS - 1) * (2 * WIN_COLS - 1))

    grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for k_start in range(0, WINDOW_TOKENS, BLOCK_N):
        k, v, scores = _key_block_scores(
            q, qkv_base, stride_qkv_t, table_head_ptr, window, k_start, offs_m, q_region, d_valid,
            H, W, padded_H, padded_W, windows_per_row, scale_log2e, WIN_ROWS, WIN_COLS, SHIFTED, EMBED_DIM,
            BLOCK_M, BLOCK_N, UPCAST_DOT_OPERANDS, INPUT_PRECISION)
        p = tl.exp2(scores - lse[:, None])
        grad_p = _dot(grad_out, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32),
                      UPCAST_DOT_OPERANDS, INPUT_PRECISION)
        grad_s = p * (grad_p - delta[:, None])
        grad_q = _dot(grad_s.to(k.dtype), k, grad_q, UPCAST_DOT_OPERANDS, INPUT_PRECISION)

    grad_q_ptrs = grad_qkv_ptr + batch.to(tl.int64) * stride_grad_qkv_b + q_token[:, None] * stride_grad_qkv_t \
        + channel + offs_d[None, :]
    tl.store(grad_q_ptrs, (grad_q * scale).to(grad_qkv_ptr.dtype.element_ty), mask=q_mask)


@triton.jit(do_not_specialize=_SHAPE_ARGUMENTS)
def _lsa_bwd_dkdv_kernel(
    qkv_ptr, grad_out_ptr, lse_ptr, delta_ptr, table_ptr, grad_qkv_ptr,
    stride_qkv_b, stride_qkv_t, stride_grad_out_b, stride_grad_out_t, stride_grad_qkv_b, stride_grad_qkv_t,
    H, W, padded_H, padded_W, windows_per_row, scale_log2e, scale,
    BRANCH: tl.constexpr, WIN_ROWS: tl.constexpr, WIN_COLS: tl.constexpr, SHIFTED: tl.constexpr,
    EMBED_DIM: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT_OPERANDS: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """dk, dv of one key block of a window, looping over the query blocks; tiles are (keys x queries)."""
    WINDOW_TOKENS: tl.constexpr = WIN_ROWS * WIN_COLS
    NUM_HEADS: tl.constexpr = EMBED_DIM // HEAD_DIM
    stride_qkv_b, stride_qkv_t = aligned_row_strides(stride_qkv_b, stride_qkv_t, ROW_ALIGN)
    stride_grad_out_b, stride_grad_out_t = aligned_row_strides(stride_grad_out_b, stride_grad_out_t, ROW_ALIGN)
    stride_grad_qkv_b, stride_grad_qkv_t = aligned_row_strides(stride_grad_qkv_b, stride_grad_qkv_t, ROW_ALIGN)
    window, k_start, batch, head, channel = _program_block(BRANCH, WIN_ROWS, WIN_COLS, EMBED_DIM, HEAD_DIM, BLOCK_N)

    offs_n = k_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    k_region, k_token, k_in_image = _window_tokens(
        window, offs_n, H, W, padded_H, padded_W, windows_per_row, WIN_ROWS, WIN_COLS, SHIFTED)
    kv_mask = k_in_image[:, None] & d_valid[None, :]
    qkv_base = qkv_ptr + batch.to(tl.int64) * stride_qkv_b + channel + offs_d[None, :]
    k_ptrs = qkv_base + EMBED_DIM + k_token[:, None] * stride_qkv_t
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(k_ptrs + EMBED_DIM, mask=kv_mask, other=0.0)
    grad_out_base = grad_out_ptr + batch.to(tl.int64) * stride_grad_out_b + channel + offs_d[None, :]
    row_stat_base = (batch * NUM_HEADS + head).to(tl.int64) * (H * W)
    table_head_ptr = table_ptr + head * ((2 * WIN_ROWS - 1) * (2 * WIN_COLS - 1))

    grad_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for q_start in range(0, WINDOW_TOKENS, BLOCK_M):
        offs_m = q_start + tl.arange(0, BLOCK_M)
        q_region, q_token, q_in_image = _window_tokens(
            window, offs_m, H, W, padded_H, padded_W, windows_per_row, WIN_ROWS, WIN_COLS, SHIFTED)
        q_mask = q_in_image[:, None] & d_valid[None, :]
        q = tl.load(qkv_base + q_token[:, None] * stride_qkv_t, mask=q_mask, other=0.0)
        grad_out = tl.load(grad_out_base + q_token[:, None] * stride_grad_out_t, mask=q_mask, other=0.0)
        # Padded query rows get lse = +inf: their probabilities vanish instead of overflowing.
        lse = tl.load(lse_ptr + row_stat_base + q_token, mask=q_in_image, other=float("inf"))
        delta = tl.load(delta_ptr + row_stat_base + q_token, mask=q_in_image, other=0.0)
        scores_t = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32),
                        UPCAST_DOT_OPERANDS, INPUT_PRECISION) * scale_log2e
        scores_t += _bias_and_mask(table_head_ptr, offs_m[None, :], offs_n[:, None], q_region[None, :],
                                   k_region[:, None], WIN_ROWS, WIN_COLS, SHIFTED)
        p_t = tl.exp2(scores_t - lse[None, :])
        grad_v = _dot(p_t.to(grad_out.dtype), grad_out, grad_v, UPCAST_DOT_OPERANDS, INPUT_PRECISION)
        grad_p_t = _dot(v, tl.trans(grad_out), tl.zeros([BLOCK_N, BLOCK_M], tl.float32),
                        UPCAST_DOT_OPERANDS, INPUT_PRECISION)
        grad_s_t = p_t * (grad_p_t - delta[None, :])
        grad_k = _dot(grad_s_t.to(q.dtype), q, grad_k, UPCAST_DOT_OPERANDS, INPUT_PRECISION)

    grad_k_ptrs = grad_qkv_ptr + batch.to(tl.int64) * stride_grad_qkv_b + EMBED_DIM + channel \
        + k_token[:, None] * stride_grad_qkv_t + offs_d[None, :]
    tl.store(grad_k_ptrs, (grad_k * scale).to(grad_qkv_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(grad_k_ptrs + EMBED_DIM, grad_v.to(grad_qkv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=_SHAPE_ARGUMENTS)
def _lsa_bwd_score_grad_sum_kernel(
    qkv_ptr, grad_out_ptr, lse_ptr, delta_ptr, table_ptr, score_grad_partials_ptr,
    stride_qkv_b, stride_qkv_t, stride_grad_out_b, stride_grad_out_t,
    H, W, padded_H, padded_W, windows_per_row, num_windows, num_items, items_per_program, scale_log2e,
    BRANCH: tl.constexpr, WIN_ROWS: tl.constexpr, WIN_COLS: tl.constexpr, SHIFTED: tl.constexpr,
    EMBED_DIM: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT_OPERANDS: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """dS of one (query block, key block) pair summed over a chunk of (batch, window) items.

    The position-bias gradient only needs dS summed over batch and windows per in-window (query, key) pair. A
    program that keeps its pair fixed across items sums in registers (one add per score) and writes once, and
    its bias tile, which depends on in-window positions only, is loaded once.
    """
    WINDOW_TOKENS: tl.constexpr = WIN_ROWS * WIN_COLS
    NUM_HEADS: tl.constexpr = EMBED_DIM // HEAD_DIM
    HEADS_PER_BRANCH: tl.constexpr = NUM_HEADS // 2
    TILES: tl.constexpr = (WINDOW_TOKENS // BLOCK_M) * (WINDOW_TOKENS // BLOCK_N)
    stride_qkv_b, stride_qkv_t = aligned_row_strides(stride_qkv_b, stride_qkv_t, ROW_ALIGN)
    stride_grad_out_b, stride_grad_out_t = aligned_row_strides(stride_grad_out_b, stride_grad_out_t, ROW_ALIGN)
    chunk = tl.program_id(0) // TILES
    q_start = (tl.program_id(0) % TILES) // (WINDOW_TOKENS // BLOCK_N) * BLOCK_M
    k_start = (tl.program_id(0) % (WINDOW_TOKENS // BLOCK_N)) * BLOCK_N
    head = BRANCH * HEADS_PER_BRANCH + tl.program_id(1)
    channel = BRANCH * (EMBED_DIM // 2) + tl.program_id(1) * HEAD_DIM

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n = k_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    table_head_ptr = table_ptr + head * ((2 * WIN_ROWS - 1) * (2 * WIN_COLS - 1))
    bias = _bias_and_mask(table_head_ptr, offs_m[:, None], offs_n[None, :], 0, 0, WIN_ROWS, WIN_COLS, False)

    score_grad_sum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first_item = chunk * items_per_program
    # A for loop, not a while loop, so that Triton pipelines the next item's loads under this item's work.
    for item in range(first_item, tl.minimum(first_item + items_per_program, num_items)):
        batch = item // num_windows
        window = item % num_windows
        q_region, q_token, q_in_image = _window_tokens(
            window, offs_m, H, W, padded_H, padded_W, windows_per_row, WIN_ROWS, WIN_COLS, SHIFTED)
        k_region, k_token, k_in_image = _window_tokens(
            window, offs_n, H, W, padded_H, padded_W, windows_per_row, WIN_ROWS, WIN_COLS, SHIFTED)
        qkv_base = qkv_ptr + batch.to(tl.int64) * stride_qkv_b + channel + offs_d[None, :]
        q_mask = q_in_image[:, None] & d_valid[None, :]
        kv_mask = k_in_image[:, None] & d_valid[None, :]
        q = tl.load(qkv_base + q_token[:, None] * stride_qkv_t, mask=q_mask, other=0.0)
        grad_out = tl.load(grad_out_ptr + batch.to(tl.int64) * stride_grad_out_b + q_token[:, None] * stride_grad_out_t
                           + channel + offs_d[None, :], mask=q_mask, other=0.0)
        k_ptrs = qkv_base + EMBED_DIM + k_token[:, None] * stride_qkv_t
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(k_ptrs + EMBED_DIM, mask=kv_mask, other=0.0)
        row_stat_offset = (batch * NUM_HEADS + head).to(tl.int64) * (H * W) + q_token
        # Padded query rows get lse = +inf: their probabilities vanish instead of overflowing.
        lse = tl.load(lse_ptr + row_stat_offset, mask=q_in_image, other=float("inf"))
        delta = tl.load(delta_ptr + row_stat_offset, mask=q_in_image, other=0.0)
        scores = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32),
                      UPCAST_DOT_OPERANDS, INPUT_PRECISION) * scale_log2e + bias
        if SHIFTED:
            scores = tl.where(q_region[:, None] != k_region[None, :], scores + _MASK_LOG2, scores)
        p = tl.exp2(scores - lse[:, None])
        grad_p = _dot(grad_out, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32),
                      UPCAST_DOT_OPERANDS, INPUT_PRECISION)
        score_grad_sum += p * (grad_p - delta[:, None])

    partial_ptrs = score_grad_partials_ptr \
        + ((tl.program_id(1) * (tl.num_programs(0) // TILES) + chunk).to(tl.int64) * WINDOW_TOKENS
           + offs_m[:, None]) * WINDOW_TOKENS + offs_n[None, :]
    tl.store(partial_ptrs, score_grad_sum)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and dot class, at RGT's head dim (30, padded to 32), among
# tiles that compile without register spills on sm_80 and sm_90a. Fp32 operands take twice the registers of
# 16-bit ones, and ieee fp32 dots run on the FMA units with whole operand fragments in registers. The 16-bit
# forward tile is the fastest of benchmarks/sweep_tiles.py's candidates on an H200 at the training shape (0.885 ms
# against 1.609 for 128x32 with 8 warps; 101-134 registers then); the others were the largest that fit. A 32x64
# 16-bit dK/dV tile ran 2.90 ms against 3.23 for 16x64 there, but spills on sm_80 (branch 1, unshifted, also with
# 32-bit indices). The ieee dS-sum tile was 64x32 until the indices became 32-bit; with them ptxas spilled 40-192
# bytes there, and 32x32 takes 80-96 registers on both archs.
_CONFIGS = {
    "fwd": {"16-bit": (64, 16, 4, 2), "tf32": (64, 16, 4, 2), "ieee": (32, 32, 4, 2)},
    "dq": {"16-bit": (64, 32, 4, 2), "tf32": (64, 16, 4, 2), "ieee": (32, 32, 4, 2)},
    "dkdv": {"16-bit": (16, 64, 4, 2), "tf32": (16, 64, 4, 2), "ieee": (16, 32, 4, 2)},
    "score_grad_sum": {"16-bit": (64, 64, 4, 2), "tf32": (64, 32, 4, 2), "ieee": (32, 32, 4, 2)},
}
# Programs of the dS-sum kernel each take a chunk of (batch, window) items: fewer programs mean fewer partial sums
# to write and reduce, so the grid keeps only this many programs per multiprocessor. The interpreter runs
# programs one after another at a fixed cost each, so there a handful of long programs is fastest.
_SCORE_GRAD_SUM_PROGRAMS_PER_SM = 4
_SCORE_GRAD_SUM_INTERPRETER_PROGRAMS = 4


def _branch_window(split_size, branch: int) -> tuple[int, int]:
    return (split_size[0], split_size[1]) if branch == 0 else (split_size[1], split_size[0])


def _padded(size: int, split_size) -> int:
    multiple = max(split_size)
    return cdiv(size, multiple) * multiple


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and fp32_matmuls_use_tf32():
        return "tf32"
    return "ieee"


def _dot_class(dtype: torch.dtype, input_precision: str) -> str:
    return input_precision if dtype == torch.float32 else "16-bit"


def _launch_config(kernel: str, dot_class: str, split_size) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); a tile never spans more than one window."""
    block_m, block_n, num_warps, num_stages = _CONFIGS[kernel][dot_class]
    window_tokens = split_size[0] * split_size[1]
    return min(block_m, window_tokens), min(block_n, window_tokens), num_warps, num_stages


# The kernels' ROW_ALIGN claims at most this many bytes. Four is what asynchronous copies need: 2-byte loads of q, k
# and v stalled every iteration of the key loop on global memory (sm_90a, bf16 forward: 206 registers and
# synchronous loads before, 172 and cp.async after). Wider claims (8-byte fp32 pairs) gave ptxas room to cap some
# fp32 kernels at 128 registers, and they spilled on sm_80.
_ROW_ALIGN_BYTES = 4


def _log2_tables(bias_table_0: torch.Tensor, bias_table_1: torch.Tensor) -> torch.Tensor:
    """Both tables as one fp32 (2 * heads/2, entries) buffer in base-2 units, one contiguous row per head."""
    return torch.stack([bias_table_0, bias_table_1]).to(torch.float32).transpose(1, 2).reshape(
        -1, bias_table_0.shape[0]).contiguous() * LOG2E


def _score_grad_sum_chunks(num_items: int, programs_per_chunk: int, device: torch.device) -> int:
    if device.type == "cuda":
        multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
        wanted_programs = _SCORE_GRAD_SUM_PROGRAMS_PER_SM * multiprocessors
    else:
        wanted_programs = _SCORE_GRAD_SUM_INTERPRETER_PROGRAMS
    return max(1, min(num_items, wanted_programs // programs_per_chunk))


@functools.lru_cache(maxsize=None)
def _pairs_by_offset(win_rows: int, win_cols: int, device: torch.device) -> torch.Tensor:
    """(table entries, most pairs) flat (query * N + key) positions of the pairs sharing each relative offset.

    Shorter rows are padded with position N*N, which _table_grad points at a zero.
    """
    window_tokens = win_rows * win_cols
    offset_of_pair = _relative_position_index(win_rows, win_cols, torch.device("cpu")).flatten()
    order = torch.argsort(offset_of_pair, stable=True)
    counts = torch.bincount(offset_of_pair, minlength=(2 * win_rows - 1) * (2 * win_cols - 1))
    first_of_offset = torch.cumsum(counts, 0) - counts
    slot = torch.arange(order.numel()) - first_of_offset[offset_of_pair[order]]
    pairs = torch.full((counts.numel(), int(counts.max())), window_tokens * window_tokens, dtype=torch.long)
    pairs[offset_of_pair[order], slot] = order
    return pairs.to(device)


def _table_grad(score_grad_partials: torch.Tensor, win_rows: int, win_cols: int) -> torch.Tensor:
    """Position-bias table gradient (entries, heads/2) from per-chunk (heads/2, chunks, query, key) dS sums.

    Every reduction here has a fixed order (a sum over chunks, then a gather and a sum over each offset's
    padded pair list), so the gradient is bitwise reproducible run to run.
    """
    score_grad = score_grad_partials.sum(dim=1).flatten(1)
    score_grad = torch.cat([score_grad, score_grad.new_zeros(score_grad.shape[0], 1)], dim=1)
    # Contiguous, as the custom op's fake implementation (empty_like the table) promises torch.compile.
    return score_grad[:, _pairs_by_offset(win_rows, win_cols, score_grad.device)].sum(dim=-1).t().contiguous()


def _forward_triton(qkv, H, W, num_heads, split_size, shifted, bias_table_0, bias_table_1, scale):
    batch, tokens, _ = qkv.shape
    embed_dim = qkv.shape[2] // 3
    head_dim = embed_dim // num_heads
    heads_per_branch = num_heads // 2
    padded_H, padded_W = _padded(H, split_size), _padded(W, split_size)
    window_tokens = split_size[0] * split_size[1]
    input_precision = _input_precision(qkv.dtype)
    block_m, block_n, num_warps, num_stages = _launch_config(
        "fwd", _dot_class(qkv.dtype, input_precision), split_size)
    out = _common.kernel_buffer((batch, tokens, embed_dim), dtype=qkv.dtype, device=qkv.device)
    lse = _common.kernel_buffer((batch, num_heads, tokens), dtype=torch.float32, device=qkv.device)
    if batch == 0:  # no windows to attend
        return out, lse
    tables = _log2_tables(bias_table_0, bias_table_1)
    row_align = row_alignment(qkv, out, max_bytes=_ROW_ALIGN_BYTES)
    for branch in (0, 1):
        win_rows, win_cols = _branch_window(split_size, branch)
        num_windows = (padded_H // win_rows) * (padded_W // win_cols)
        _lsa_fwd_kernel[(num_windows * (window_tokens // block_m), batch * heads_per_branch)](
            qkv, out, lse, tables,
            qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
            H, W, padded_H, padded_W, padded_W // win_cols, scale * LOG2E,
            BRANCH=branch, WIN_ROWS=win_rows, WIN_COLS=win_cols, SHIFTED=shifted,
            EMBED_DIM=embed_dim, HEAD_DIM=head_dim,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=next_power_of_2_at_least_16(head_dim),
            UPCAST_DOT_OPERANDS=INTERPRET, INPUT_PRECISION=input_precision, ROW_ALIGN=row_align,
            num_warps=num_warps, num_stages=num_stages,
        )
    return out, lse


def _backward_triton(grad_out, qkv, out, lse, H, W, num_heads, split_size, shifted, bias_table_0, bias_table_1,
                     scale):
    # The dots pair dO with q, k and v, and tl.dot takes operands of one dtype.
    grad_out = grad_out.to(qkv.dtype)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    batch, tokens, _ = qkv.shape
    embed_dim = qkv.shape[2] // 3
    head_dim = embed_dim // num_heads
    heads_per_branch = num_heads // 2
    padded_H, padded_W = _padded(H, split_size), _padded(W, split_size)
    window_tokens = split_size[0] * split_size[1]
    block_d = next_power_of_2_at_least_16(head_dim)
    input_precision = _input_precision(qkv.dtype)
    dot_class = _dot_class(qkv.dtype, input_precision)
    tables = _log2_tables(bias_table_0, bias_table_1)
    grad_qkv = _common.kernel_buffer((batch, tokens, 3 * embed_dim), dtype=qkv.dtype, device=qkv.device)
    if batch == 0:  # no windows, no scores: the tables get zero gradients (contiguous, as the fake promises)
        return grad_qkv, bias_table_0.new_zeros(bias_table_0.shape), bias_table_1.new_zeros(bias_table_1.shape)
    delta = _common.kernel_buffer((batch, num_heads, tokens), dtype=torch.float32, device=qkv.device)
    shared = dict(SHIFTED=shifted, EMBED_DIM=embed_dim, HEAD_DIM=head_dim, BLOCK_D=block_d,
                  UPCAST_DOT_OPERANDS=INTERPRET, INPUT_PRECISION=input_precision,
                  ROW_ALIGN=row_alignment(qkv, out, grad_out, grad_qkv, max_bytes=_ROW_ALIGN_BYTES))
    windows = [_branch_window(split_size, branch) for branch in (0, 1)]
    num_windows = [(padded_H // win_rows) * (padded_W // win_cols) for win_rows, win_cols in windows]

    # dq first: it also writes delta = rowsum(dO * O), which the other two kernels read.
    block_m, block_n, num_warps, num_stages = _launch_config("dq", dot_class, split_size)
    for branch, (win_rows, win_cols) in enumerate(windows):
        _lsa_bwd_dq_kernel[(num_windows[branch] * (window_tokens // block_m), batch * heads_per_branch)](
            qkv, out, grad_out, lse, delta, tables, grad_qkv,
            qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
            grad_qkv.stride(0), grad_qkv.stride(1),
            H, W, padded_H, padded_W, padded_W // win_cols, scale * LOG2E, scale,
            BRANCH=branch, WIN_ROWS=win_rows, WIN_COLS=win_cols, BLOCK_M=block_m, BLOCK_N=block_n, **shared,
            num_warps=num_warps, num_stages=num_stages,
        )

    block_m, block_n, num_warps, num_stages = _launch_config("dkdv", dot_class, split_size)
    for branch, (win_rows, win_cols) in enumerate(windows):
        _lsa_bwd_dkdv_kernel[(num_windows[branch] * (window_tokens // block_n), batch * heads_per_branch)](
            qkv, grad_out, lse, delta, tables, grad_qkv,
            qkv.stride(0), qkv.stride(1), grad_out.stride(0), grad_out.stride(1),
            grad_qkv.stride(0), grad_qkv.stride(1),
            H, W, padded_H, padded_W, padded_W // win_cols, scale * LOG2E, scale,
            BRANCH=branch, WIN_ROWS=win_rows, WIN_COLS=win_cols, BLOCK_M=block_m, BLOCK_N=block_n, **shared,
            num_warps=num_warps, num_stages=num_stages,
        )

    # Table gradient: dS summed over (batch, window, query, key) per relative offset. A dS-sum program keeps one
    # (query block, key block) pair, sums its dS over a chunk of (batch, window) items in registers and writes
    # that tile once; _table_grad adds the chunks and then the pairs of each offset in a fixed order. Fp32 atomics
    # into the 945-entry table from thousands of programs would change the order of the additions, and so the
    # rounding, from run to run; this way the gradient is bitwise reproducible.
    block_m, block_n, num_warps, num_stages = _launch_config("score_grad_sum", dot_class, split_size)
    tiles = (window_tokens // block_m) * (window_tokens // block_n)
    table_grads = []
    for branch, (win_rows, win_cols) in enumerate(windows):
        num_items = batch * num_windows[branch]
        chunks = _score_grad_sum_chunks(num_items, tiles * heads_per_branch, qkv.device)
        items_per_program = cdiv(num_items, chunks)
        chunks = cdiv(num_items, items_per_program)
        score_grad_partials = _common.kernel_buffer((heads_per_branch, chunks, window_tokens, window_tokens),
                                                    dtype=torch.float32, device=qkv.device)
        _lsa_bwd_score_grad_sum_kernel[(chunks * tiles, heads_per_branch)](
            qkv, grad_out, lse, delta, tables, score_grad_partials,
            qkv.stride(0), qkv.stride(1), grad_out.stride(0), grad_out.stride(1),
            H, W, padded_H, padded_W, padded_W // win_cols, num_windows[branch], num_items, items_per_program,
            scale * LOG2E,
            BRANCH=branch, WIN_ROWS=win_rows, WIN_COLS=win_cols, BLOCK_M=block_m, BLOCK_N=block_n, **shared,
            num_warps=num_warps, num_stages=num_stages,
        )
        table_grads.append(_table_grad(score_grad_partials, win_rows, win_cols))
    return grad_qkv, table_grads[0].to(bias_table_0.dtype), table_grads[1].to(bias_table_1.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Custom op (opaque to torch.compile) and its autograd
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("rgt_fast::lsa_attention", mutates_args=())
def _lsa_attention_op(qkv: torch.Tensor, H: int, W: int, num_heads: int, split_size: list[int], shifted: bool,
                      bias_table_0: torch.Tensor, bias_table_1: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the attention output and the base-2 logsumexp per (batch, head, query token)."""
    with on_device_of(qkv):
        return _forward_triton(qkv, H, W, num_heads, split_size, shifted, bias_table_0, bias_table_1, scale)


@_lsa_attention_op.register_fake
def _lsa_attention_fake(qkv, H, W, num_heads, split_size, shifted, bias_table_0, bias_table_1, scale):
    batch, tokens, channels = qkv.shape
    return (qkv.new_empty(batch, tokens, channels // 3),
            qkv.new_empty(batch, num_heads, tokens, dtype=torch.float32))


@torch.library.custom_op("rgt_fast::lsa_attention_backward", mutates_args=())
def _lsa_attention_backward_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                               H: int, W: int, num_heads: int, split_size: list[int], shifted: bool,
                               bias_table_0: torch.Tensor, bias_table_1: torch.Tensor,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns the gradients of qkv (a new contiguous tensor) and of both bias tables."""
    with on_device_of(qkv):
        return _backward_triton(grad_out, qkv, out, lse, H, W, num_heads, split_size, shifted,
                                bias_table_0, bias_table_1, scale)


@_lsa_attention_backward_op.register_fake
def _lsa_attention_backward_fake(grad_out, qkv, out, lse, H, W, num_heads, split_size, shifted,
                                 bias_table_0, bias_table_1, scale):
    return (qkv.new_empty(qkv.shape), bias_table_0.new_empty(bias_table_0.shape),
            bias_table_1.new_empty(bias_table_1.shape))


def _setup_context(ctx, inputs, output):
    qkv, H, W, num_heads, split_size, shifted, bias_table_0, bias_table_1, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, bias_table_0, bias_table_1)
    ctx.shape_args = (H, W, num_heads, split_size, shifted)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    qkv, out, lse, bias_table_0, bias_table_1 = ctx.saved_tensors
    grad_qkv, grad_table_0, grad_table_1 = torch.ops.rgt_fast.lsa_attention_backward(
        grad_out, qkv, out, lse, *ctx.shape_args, bias_table_0, bias_table_1, ctx.scale)
    return grad_qkv, None, None, None, None, None, grad_table_0, grad_table_1, None


_lsa_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Plain-PyTorch path (CPU outside the interpreter, float64, split sizes the kernels do not take)
# ----------------------------------------------------------------------------------------------------------------

@cached_outside_compile
def _relative_position_index(win_rows: int, win_cols: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(win_rows, device=device).repeat_interleave(win_cols)
    cols = torch.arange(win_cols, device=device).repeat(win_rows)
    return ((rows[:, None] - rows[None, :] + win_rows - 1) * (2 * win_cols - 1)
            + cols[:, None] - cols[None, :] + win_cols - 1)


@cached_outside_compile
def _shift_masks(win_rows: int, win_cols: int, device: torch.device) -> torch.Tensor:
    """(4, N, N) additive masks of an interior window, a last-column window, a last-row window and the last window,
    indexed by 2 * last_row + last_col: interior windows hold one region."""
    def regions(win: int, last: bool) -> torch.Tensor:
        offsets = torch.arange(win, device=device)
        # In the last window of an axis, [L-win, L-shift) is region 1 and [L-shift, L) region 2.
        return 1 + (offsets >= win - win // 2).long() if last else torch.zeros(win, dtype=torch.long, device=device)

    masks = []
    for last_row in (False, True):
        for last_col in (False, True):
            region = (3 * regions(win_rows, last_row)[:, None] + regions(win_cols, last_col)[None, :]).flatten()
            masks.append((region[:, None] != region[None, :]).float() * SHIFT_MASK_VALUE)
    return torch.stack(masks)


def _window_bias_kinds(batch: int, rows_of_windows: int, cols_of_windows: int, columns_outer: bool) -> list[int]:
    """Index into :func:`_shift_masks` of every window, batch-major, then by row and column of windows (by column
    and row with ``columns_outer``)."""
    if columns_outer:
        windows = [(row, col) for col in range(cols_of_windows) for row in range(rows_of_windows)]
    else:
        windows = [(row, col) for row in range(rows_of_windows) for col in range(cols_of_windows)]
    return [2 * (row == rows_of_windows - 1) + (col == cols_of_windows - 1) for row, col in windows] * batch


def _window_steps(kinds: list[int], windows_per_step: int) -> list[tuple[int, int, int]]:
    """(start, stop, kind): runs of consecutive windows that share a bias, at most ``windows_per_step`` long."""
    steps, start = [], 0
    for stop in range(1, len(kinds) + 1):
        if stop == len(kinds) or kinds[stop] != kinds[start] or stop - start == windows_per_step:
            steps.append((start, stop, kinds[start]))
            start = stop
    return steps


def _window_attention(q, k, v_t, bias, scale):
    """(softmax(q k^T * scale + bias) v)^T over (..., heads, N, head_dim) q and k and (..., heads, head_dim, N) v^T.

    The transposed product v^T p^T ran 1.4x faster than p v on CPU BLAS at head dim 30, and the caller
    transposes the output back in a copy it makes anyway. Written out rather than through
    scaled_dot_product_attention: with a float mask, SDPA's CPU math path took 3.6x as long.
    """
    scores = torch.matmul(q, k.transpose(-1, -2) * scale)
    scores.add_(bias)
    return values_times_probabilities_t(v_t, torch.softmax(scores, dim=-1))


class _AxisRun(NamedTuple):
    """Positions along one axis of a branch's padded, rolled map that read consecutive image positions: the
    in-window offsets [first_offset, first_offset + offsets) of windows [first_window, first_window + windows),
    from image position ``source`` on. A run spans whole windows or lies inside one."""

    first_window: int
    windows: int
    first_offset: int
    offsets: int
    source: int

    @property
    def window_slice(self) -> slice:
        return slice(self.first_window, self.first_window + self.windows)

    @property
    def offset_slice(self) -> slice:
        return slice(self.first_offset, self.first_offset + self.offsets)


def _axis_runs(length: int, padded_length: int, window: int, shift: int) -> tuple[_AxisRun, ...]:
    """Position p of the rolled map holds image position (p + shift) mod padded_length, or padding where that is
    >= length: the runs that cover every image position once and no padding."""
    segments = [(0, length - shift, shift)]  # (first position, end position, first image position)
    if shift:
        segments.append((padded_length - shift, min(padded_length, padded_length - shift + length), 0))
    runs = []
    for start, stop, source in segments:
        position = start
        while position < stop:
            first_window, first_offset = divmod(position, window)
            if first_offset or stop - position < window:
                offsets = min(stop - position, window - first_offset)
                runs.append(_AxisRun(first_window, 1, first_offset, offsets, source + position - start))
                position += offsets
            else:
                windows = (stop - position) // window
                runs.append(_AxisRun(first_window, windows, 0, window, source + position - start))
                position += windows * window
    return tuple(runs)


class _BranchGeometry(NamedTuple):
    """Where a branch's windows sit in the image. Windows are stored with the longer axis of windows innermost
    (``columns_outer`` when there are more rows than columns of windows): shifted blocks change bias only at the
    last row and column of windows, so this gives the longest runs of windows that share one bias."""

    window: tuple[int, int]
    grid: tuple[int, int]  # rows and columns of windows
    columns_outer: bool
    padded: bool
    row_runs: tuple[_AxisRun, ...]
    col_runs: tuple[_AxisRun, ...]

    @property
    def window_order(self) -> tuple[int, int]:
        """(outer, inner) counts of windows in storage order."""
        return self.grid[::-1] if self.columns_outer else self.grid

    def tokens_in_image_order(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, outer, inner, heads, win_rows, win_cols, *rest) window storage -> a (B, rows of windows, win_rows,
        columns of windows, win_cols, heads, *rest) view."""
        rest = tuple(range(6, windows.dim()))
        grid = (2, 4, 1, 5) if self.columns_outer else (1, 4, 2, 5)
        return windows.permute(0, *grid, 3, *rest)

    def transposed_in_image_order(self, windows_t: torch.Tensor) -> torch.Tensor:
        """Transposed storage (B, outer, inner, heads, head_dim, win_rows, win_cols), of v and of the outputs, as
        a (B, rows of windows, win_rows, columns of windows, win_cols, heads, head_dim) view."""
        return self.tokens_in_image_order(windows_t.movedim(4, -1))

    def copy_q_k_v(self, qk: torch.Tensor, v_t: torch.Tensor, q_k_v: torch.Tensor, into_windows: bool) -> None:
        """Copy between the branch's q, k and v image (B, H, W, 3, heads, head_dim) and its storage: q and k
        stacked as (2, B, outer, inner, heads, win_rows, win_cols, head_dim), v transposed."""
        self.copy_runs(self.tokens_in_image_order(qk.movedim(0, -2)), q_k_v[:, :, :, :2].movedim(3, -2),
                       into_windows)
        self.copy_runs(self.transposed_in_image_order(v_t), q_k_v[:, :, :, 2], into_windows)

    def copy_runs(self, windows: torch.Tensor, image: torch.Tensor, into_windows: bool) -> None:
        """Copy between an image (B, H, W, *channels) and a view of window storage in image order (B, rows of
        windows, win_rows, columns of windows, win_cols, *channels), one copy per pair of row and column runs."""
        for rows in self.row_runs:
            image_rows = image.narrow(1, rows.source, rows.windows * rows.offsets).unflatten(
                1, (rows.windows, rows.offsets))
            window_rows = windows[:, rows.window_slice, rows.offset_slice]
            for cols in self.col_runs:
                image_part = image_rows.narrow(3, cols.source, cols.windows * cols.offsets).unflatten(
                    3, (cols.windows, cols.offsets))
                window_part = window_rows[:, :, :, cols.window_slice, cols.offset_slice]
                if into_windows:
                    window_part.copy_(image_part)
                else:
                    image_part.copy_(window_part)

    def new_windows(self, like: torch.Tensor, *shape: int) -> torch.Tensor:
        """Window storage; padded slots are zeros (padded keys take part in the softmax)."""
        return (torch.zeros if self.padded else torch.empty)(*shape, dtype=like.dtype, device=like.device)


@cached_outside_compile
def _branch_geometry(H: int, W: int, split_size: tuple[int, int], shifted: bool, branch: int) -> _BranchGeometry:
    win_rows, win_cols = _branch_window(split_size, branch)
    padded_H, padded_W = _padded(H, split_size), _padded(W, split_size)
    grid = (padded_H // win_rows, padded_W // win_cols)
    return _BranchGeometry(
        window=(win_rows, win_cols), grid=grid, columns_outer=grid[0] > grid[1],
        padded=(padded_H, padded_W) != (H, W),
        row_runs=_axis_runs(H, padded_H, win_rows, win_rows // 2 if shifted else 0),
        col_runs=_axis_runs(W, padded_W, win_cols, win_cols // 2 if shifted else 0))


def _windows_of(image, geometries) -> tuple[torch.Tensor, ...]:
    """(qk, v_t) window storage of each branch, filled from the image (B, H, W, 3, 2, heads, head_dim)."""
    batch, heads, head_dim = image.shape[0], image.shape[5], image.shape[6]
    windows = []
    for branch, geometry in enumerate(geometries):
        window_shape = (batch, *geometry.window_order, heads)
        qk = geometry.new_windows(image, 2, *window_shape, *geometry.window, head_dim)
        v_t = geometry.new_windows(image, *window_shape, head_dim, *geometry.window)
        geometry.copy_q_k_v(qk, v_t, image[:, :, :, :, branch], into_windows=True)
        windows += [qk, v_t]
    return tuple(windows)


def _image_of(geometries, image_shape, outputs_t) -> torch.Tensor:
    """The image (B, H, W, 2, heads, head_dim) of both branches' transposed window outputs."""
    image = outputs_t[0].new_empty(image_shape)  # both branches together write every element
    for branch, (geometry, out_t) in enumerate(zip(geometries, outputs_t)):
        geometry.copy_runs(geometry.transposed_in_image_order(out_t), image[:, :, :, branch], into_windows=False)
    return image


class _WindowPartition(torch.autograd.Function):
    """q, k and v of both branches from the qkv image (B, H, W, 3, 2, heads, head_dim), in window storage:
    q and k as (2, B, outer, inner, heads, win_rows, win_cols, head_dim), v transposed as (B, outer, inner, heads,
    head_dim, win_rows, win_cols). Each image token is copied once, straight to its window slot: padding, the
    cyclic shift and the partition make no intermediate copies. The backward copies the gradients back the same
    way; a function of its own so that autograd does not add one zero-filled image-sized gradient per copy."""

    @staticmethod
    def forward(ctx, image, geometries):
        ctx.geometries, ctx.image_shape = geometries, image.shape
        return _windows_of(image, geometries)

    @staticmethod
    def backward(ctx, *grad_windows):
        grad_image = grad_windows[0].new_empty(ctx.image_shape)  # every element belongs to one window slot
        for branch, geometry in enumerate(ctx.geometries):
            grad_qk, grad_v_t = grad_windows[2 * branch:2 * branch + 2]
            geometry.copy_q_k_v(grad_qk, grad_v_t, grad_image[:, :, :, :, branch], into_windows=False)
        return grad_image, None


class _WindowMerge(torch.autograd.Function):
    """The image (B, H, W, 2, heads, head_dim) of both branches' transposed outputs (B, outer, inner, heads,
    head_dim, win_rows, win_cols): undoes the partition, cyclic shift and padding in one copy per run."""

    @staticmethod
    def forward(ctx, geometries, image_shape, *outputs_t):
        ctx.geometries = geometries
        return _image_of(geometries, image_shape, outputs_t)

    @staticmethod
    def backward(ctx, grad_image):
        batch, heads, head_dim = grad_image.shape[0], grad_image.shape[4], grad_image.shape[5]
        grads_t = []
        for branch, geometry in enumerate(ctx.geometries):
            grad_t = geometry.new_windows(grad_image, batch, *geometry.window_order, heads, head_dim,
                                          *geometry.window)
            geometry.copy_runs(geometry.transposed_in_image_order(grad_t), grad_image[:, :, :, branch],
                               into_windows=True)
            grads_t.append(grad_t)
        return None, None, *grads_t


def lsa_attention_torch(qkv, H, W, num_heads, split_size, shifted, bias_table_0, bias_table_1, scale):
    """The reference semantics with PyTorch operations: window storage filled and emptied by copies that do the
    padding and shifts (:class:`_WindowPartition`, :class:`_WindowMerge`), no per-window mask.

    Eager mode attends runs of windows whose scores hold about ``score_elements_per_step``: on CPU they then stay
    in a core's L2 cache, which made the attention 1.5x (idle memory) to 3x (memory shared with a busy core)
    faster than one batched call. Under torch.compile all windows go in one call, with a bias per window,
    since Dynamo would unroll the window loop into a graph as large as the image.
    """
    batch = qkv.shape[0]
    embed_dim = qkv.shape[2] // 3
    heads_per_branch = num_heads // 2
    head_dim = embed_dim // num_heads
    geometries = tuple(_branch_geometry(H, W, tuple(split_size), shifted, branch) for branch in (0, 1))
    qkv_image = qkv.reshape(batch, H, W, 3, 2, heads_per_branch, head_dim)
    # Without an autograd graph the copies run as plain functions: under no_grad, Dynamo breaks the graph at an
    # autograd.Function whose forward stores its context.
    windows = (_WindowPartition.apply(qkv_image, geometries) if autograd_records(qkv_image)
               else _windows_of(qkv_image, geometries))
    outputs_t = []
    for branch, (geometry, table) in enumerate(zip(geometries, (bias_table_0, bias_table_1))):
        win_rows, win_cols = geometry.window
        window_tokens = win_rows * win_cols
        qk, v_t = windows[2 * branch:2 * branch + 2]
        q, k = qk.view(2, -1, heads_per_branch, window_tokens, head_dim).unbind(0)
        v_t = v_t.view(-1, heads_per_branch, head_dim, window_tokens)
        bias = table.t()[:, _relative_position_index(win_rows, win_cols, qkv.device)].to(qkv.dtype)
        biases = bias + _shift_masks(win_rows, win_cols, qkv.device)[:, None].to(qkv.dtype) if shifted else bias[None]
        kinds = _window_bias_kinds(batch, *geometry.grid, geometry.columns_outer) if shifted else [0] * q.shape[0]
        if torch.compiler.is_compiling() or not kinds:  # an empty batch has no windows to step through
            window_biases = biases[torch.tensor(kinds, dtype=torch.long, device=qkv.device)]
            out_t = _window_attention(q, k, v_t, window_biases, scale)
        else:
            windows_per_step = max(1, score_elements_per_step(qkv.device) // (heads_per_branch * window_tokens ** 2))
            steps = _window_steps(kinds, windows_per_step)
            sizes = [stop - start for start, stop, _ in steps]
            kind_biases = biases.unbind(0)
            steps_out_t = [_window_attention(q_step, k_step, v_t_step, kind_biases[kind], scale)
                           for q_step, k_step, v_t_step, (_, _, kind)
                           in zip(q.split(sizes), k.split(sizes), v_t.split(sizes), steps)]
            out_t = steps_out_t[0] if len(steps_out_t) == 1 else torch.cat(steps_out_t)
        outputs_t.append(out_t.view(batch, *geometry.window_order, heads_per_branch, head_dim, *geometry.window))
    image_shape = (batch, H, W, 2, heads_per_branch, head_dim)
    if autograd_records(*outputs_t):
        image = _WindowMerge.apply(geometries, image_shape, *outputs_t)
    else:
        image = _image_of(geometries, image_shape, outputs_t)
    return image.view(batch, H * W, embed_dim)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------

def _check_inputs(qkv, H, W, num_heads, split_size, shifted, bias_table_0, bias_table_1, scale):
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if not qkv.is_floating_point():
        raise TypeError(f"qkv must be a floating-point tensor, got {qkv.dtype}")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must have shape (B, H*W, 3*C), got {tuple(qkv.shape)}")
    for name, value in (("H", H), ("W", W), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if qkv.shape[1] != H * W:
        raise ValueError(f"qkv has {qkv.shape[1]} tokens but H*W = {H}*{W} = {H * W}")
    if qkv.shape[2] % 3 != 0:
        raise ValueError(f"the last dim of qkv must be 3*C ([q | k | v]), got {qkv.shape[2]}")
    embed_dim = qkv.shape[2] // 3
    if embed_dim == 0:
        raise ValueError(f"qkv has no channels (C = 0, shape {tuple(qkv.shape)}); each head needs at least one")
    if num_heads % 2 != 0:
        raise ValueError(f"num_heads must be even (half of the heads per branch), got {num_heads}")
    if embed_dim % num_heads != 0:
        raise ValueError(f"C = {embed_dim} is not divisible by num_heads = {num_heads}")
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv must have unit stride in its last dim, got strides {qkv.stride()}")
    if (not isinstance(split_size, (list, tuple)) or len(split_size) != 2
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in split_size)):
        raise ValueError(f"split_size must hold two positive ints, got {split_size!r}")
    if max(split_size) % min(split_size) != 0:
        raise ValueError(f"split_size entries must divide one another to tile the padded map, got {split_size}")
    if not isinstance(shifted, bool):
        raise TypeError(f"shifted must be a bool, got {type(shifted).__name__}")
    check_attention_scale("lsa_attention", scale)
    table_shape = ((2 * split_size[0] - 1) * (2 * split_size[1] - 1), num_heads // 2)
    for name, table in (("bias_table_0", bias_table_0), ("bias_table_1", bias_table_1)):
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(table).__name__}")
        if not table.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {table.dtype}")
        if tuple(table.shape) != table_shape:
            raise ValueError(f"{name} must have shape {table_shape}, got {tuple(table.shape)}")
        if table.device != qkv.device:
            raise ValueError(f"{name} is on {table.device} but qkv is on {qkv.device}")


# The kernels index the tokens of the padded map in 32 bits.
_MAX_KERNEL_TOKENS = 2**31 - 1


def _kernels_take(qkv: torch.Tensor, H: int, W: int, split_size) -> bool:
    power_of_two = all(s & (s - 1) == 0 for s in split_size)
    return (triton_runs_on(qkv) and qkv.dtype in SUPPORTED_DTYPES and power_of_two
            and split_size[0] * split_size[1] >= 16
            and _padded(H, split_size) * _padded(W, split_size) <= _MAX_KERNEL_TOKENS)


def _python_int(value):
    """NumPy integers as Python ints (the custom op's schema takes ints); symbolic sizes stay symbolic."""
    return value if isinstance(value, torch.SymInt) else int(value)


def lsa_attention(qkv: torch.Tensor, H: int, W: int, num_heads: int, split_size, shifted: bool,
                  bias_table_0: torch.Tensor, bias_table_1: torch.Tensor, scale: float) -> torch.Tensor:
    """Concatenated L-SA branch outputs (B, H*W, C) from the projected ``qkv`` (B, H*W, 3C).

    ``bias_table_b`` is branch b's position-bias table ((2Hw-1)(2Ww-1), num_heads/2); ``scale`` multiplies q.
    ``qkv`` may be a strided view (unit stride in the last dim). Runs the fused Triton kernels where they can run
    (CUDA, or CPU under TRITON_INTERPRET=1) for fp32/bf16/fp16, else the PyTorch path.
    """
    _check_inputs(qkv, H, W, num_heads, split_size, shifted, bias_table_0, bias_table_1, scale)
    H, W, num_heads = (_python_int(value) for value in (H, W, num_heads))
    split_size = [_python_int(size) for size in split_size]
    if _kernels_take(qkv, H, W, split_size):
        out, _ = torch.ops.rgt_fast.lsa_attention(qkv, H, W, num_heads, split_size, shifted,
                                                  bias_table_0, bias_table_1, float(scale))
        return out
    return lsa_attention_torch(qkv, H, W, num_heads, split_size, shifted, bias_table_0, bias_table_1, scale)


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time variants (RGT's split [8, 32], head dim 30)
# ----------------------------------------------------------------------------------------------------------------

_FP32_POINTERS = {"lse_ptr", "delta_ptr", "table_ptr", "score_grad_partials_ptr"}
_FLOAT_SCALARS = {"scale", "scale_log2e"}


def aot_variants(split_size=(8, 32), embed_dim: int = 180, num_heads: int = 6) -> list[KernelVariant]:
    """Every kernel x branch x shift x dtype (fp32 as tf32 and as ieee) at the config the wrappers launch it with."""
    variants = []
    dtype_cases = [(torch.float32, "tf32"), (torch.float32, "ieee"), (torch.bfloat16, "ieee"),
                   (torch.float16, "ieee")]
    kernels = (("fwd", _lsa_fwd_kernel), ("dq", _lsa_bwd_dq_kernel), ("dkdv", _lsa_bwd_dkdv_kernel),
               ("score_grad_sum", _lsa_bwd_score_grad_sum_kernel))
    head_dim = embed_dim // num_heads
    block_d = next_power_of_2_at_least_16(head_dim)
    for name, fn in kernels:
        for dtype, precision in dtype_cases:
            dtype_name = TRITON_DTYPE_NAMES[dtype]
            # As the model calls the kernels: on the qkv projection's contiguous output and (B, N, C) outputs.
            row_align = row_alignment(*(torch.empty(1, 64 * 64, channels, dtype=dtype, device="meta")
                                        for channels in (3 * embed_dim, embed_dim)), max_bytes=_ROW_ALIGN_BYTES)
            block_m, block_n, num_warps, num_stages = _launch_config(
                name, _dot_class(dtype, precision), split_size)
            for branch in (0, 1):
                win_rows, win_cols = _branch_window(split_size, branch)
                for shifted in (False, True):
                    constexprs = {
                        "BRANCH": branch, "WIN_ROWS": win_rows, "WIN_COLS": win_cols, "SHIFTED": shifted,
                        "EMBED_DIM": embed_dim, "HEAD_DIM": head_dim,
                        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d,
                        "UPCAST_DOT_OPERANDS": False, "INPUT_PRECISION": precision, "ROW_ALIGN": row_align,
                    }
                    pointer_types = {arg: "fp32" if arg in _FP32_POINTERS else dtype_name
                                     for arg in fn.arg_names if arg.endswith("_ptr")}
                    signature, constexprs = aot_signature(fn, constexprs, pointer_types, _FLOAT_SCALARS)
                    label = (f"{dtype_name}{'/' + precision if dtype == torch.float32 else ''} branch={branch} "
                             f"shifted={shifted} BLOCK_M={block_m} BLOCK_N={block_n} D={block_d} align={row_align} "
                             f"warps={num_warps} stages={num_stages}")
                    variants.append(KernelVariant(
                        kernel=f"lsa_{name}", fn=fn, signature=signature, constexprs=constexprs,
                        num_warps=num_warps, num_stages=num_stages, config=label,
                        # fp32 dots in ieee precision run on the FMA units by design: no tensor-core instructions.
                        uses_dot=_dot_class(dtype, precision) != "ieee",
                    ))
    return variants
