"""RG-SA cross-attention: every image token attends to a small map of representative tokens.

``rgsa_attention(q, k, v, scale)`` computes ``softmax(q k^T * scale) v`` per head, with no mask and no bias,
for q of shape (B, N, heads, Dqk), k of shape (B, N', heads, Dqk) and v of shape (B, N', heads, Dv). N is the
whole image (up to ~1e6 tokens at inference), N' the recursively generalised map (16 in training, up to a few
thousand at inference). The output is (B, N, heads, Dv) and contiguous, so ``out.view(B, N, heads * Dv)`` feeds
the output projection with no copy.

Design:

* Forward: one program per (query block, batch, head) streams the key/value map through an online softmax
  (FlashAttention-2), so nothing of size N x N' exists. Programs are numbered head-fastest, so the programs
  that run side by side read the same token rows of the token-major q and write the same rows of out, and
  those rows' cache sectors are fetched from DRAM once rather than once per head.
* Backward (recomputes scores from the saved per-row logsumexp):
  - dK and dV are sums over all N queries into the N' map. A single program per key block would serialise
    that sum over N (in training: N' = 16, so only B * heads = 192 programs, each looping over 4096 queries).
    Instead the queries are cut into chunks; each (key block, chunk, batch, head) program writes an fp32
    partial into a scratch buffer, and a second kernel sums the partials over chunks in a fixed order and
    casts them. There are no atomics, so dK and dV are bitwise identical from run to run. The chunk count
    targets ``_BACKWARD_TARGET_PROGRAMS`` programs, a constant rather than the SM count so that the result
    does not depend on which GPU computed it.
  - When the whole map fits in one key block of the dK/dV tiles (N' <= 64 in 16-bit; the training map has 16
    keys), the program that owns a query chunk sees every key of each query, so it also computes dQ and
    delta = rowsum(dO * O) itself: q, dO and O are then read once for all three gradients.
  - Otherwise a separate dQ kernel (one program per query block, looping over all keys: no races) computes
    delta and dQ, and stores delta for the dK/dV kernel.
* Head dims of any size (15/30 in RGT) are padded to a power-of-two tile >= 16 inside the kernels with masked
  loads; nothing is padded in memory. q, k, v and dO are read through their strides: they may be any views
  (those whose strides would overflow 32-bit in-tile offsets are copied first).
* Tiles are a fixed function of N' and the operand precision (no autotuning), because the query chunking,
  and with it the bitwise value of dK and dV, must not depend on timing. ``aot_variants()`` lists every tile
  configuration the launchers can pick, for ``python -m rgt_fast.kernels.report``.
* Eager calls go through a torch.autograd.Function straight to the launchers. Under torch.compile the same
  launchers run inside the custom ops ``rgt_fast::rgsa_attention_forward`` / ``_backward`` (with fake
  implementations and a registered autograd formula), which the compiler treats as opaque: no graph break.
"""
from __future__ import annotations

import math
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
    aot_signature,
    cdiv,
    check_attention_scale,
    fp32_matmuls_use_tf32,
    next_power_of_2_at_least_16,
    mma_operand,
    on_device_of,
    score_elements_per_step,
    triton_runs_on,
    values_times_probabilities_t,
)

# The kernels work in base 2 (exp2 and log2 are single instructions); lse is stored as a natural log.
_LOG2_E = tl.constexpr(math.log2(math.e))
_LN_2 = tl.constexpr(math.log(2.0))

# The tiles below are sized, and checked for spills, for RGT's head dims (5 to 30); far larger heads would not
# fit them in registers.
_MAX_HEAD_DIM = 128
# (BLOCK_M, largest BLOCK_N, num_warps, num_stages) per kernel and operand precision, for maps of at most
# _SMALL_MAP keys (training) and for larger ones. Chosen from kernel times on an H200 among the tiles that
# compile without register spills on sm_80 and sm_90a (python -m rgt_fast.kernels.report); the 16-bit forward of
# large maps from benchmarks/sweep_tiles.py at N' = 1024 (128x32: 0.962 ms against 1.110 for 128x64). FMA dots ("ieee")
# hold whole operand tiles per thread, hence their smaller tiles. A map of N' <= BLOCK_N keys is one key
# block, which selects the fused dQ/dK/dV backward.
# The dK/dV tiles of small maps are one warp each where registers allow: in the [16, BLOCK_M] x [BLOCK_M, D]
# products every warp of a larger program computes the same 16-row accumulators, and one-warp programs ran
# the training shape's backward 1.5x faster.
_SMALL_MAP = 16
_TILE_TABLE = {
    ("forward", "16bit"): ((128, 64, 4, 2), (128, 32, 4, 2)),
    ("forward", "tf32"): ((128, 64, 4, 2), (128, 32, 4, 2)),
    ("forward", "ieee"): ((64, 64, 4, 2), (64, 64, 4, 2)),
    ("dq", "16bit"): ((64, 64, 4, 2), (64, 64, 4, 2)),
    ("dq", "tf32"): ((64, 64, 4, 2), (64, 64, 4, 2)),
    ("dq", "ieee"): ((32, 32, 4, 2), (32, 32, 4, 2)),
    ("dkdv", "16bit"): ((16, 16, 1, 2), (64, 64, 4, 2)),
    ("dkdv", "tf32"): ((16, 16, 1, 2), (32, 32, 4, 1)),
    ("dkdv", "ieee"): ((32, 16, 4, 1), (32, 16, 4, 1)),
}
# The kernels add 32-bit in-tile offsets (a row index times the row stride plus a head-dim index times its
# stride) to 64-bit bases per batch, head and query block: 64-bit tiles of offsets made some configs spill.
# Views whose strides would take those offsets past 2**31 (channel-major views of very large maps) are read
# from compact copies instead; see _compact_if_tile_offsets_overflow.
_MAX_QUERY_TILE_ROWS = max(tiles[0] for pair in _TILE_TABLE.values() for tiles in pair)
_MAX_KEY_TILE_COLS = max(tiles[1] for pair in _TILE_TABLE.values() for tiles in pair)
_SUM_PARTIALS_NUM_WARPS = 4
_SUM_PARTIALS_NUM_STAGES = 2
# tl.dot's input_precision only changes fp32 operands; 16-bit ones get Triton's default.
_DOT_INPUT_PRECISION = {"16bit": "tf32", "tf32": "tf32", "ieee": "ieee"}
# Enough programs to fill a 132-SM H100/H200 (about once with the one-warp small-map tiles, several times with
# four-warp ones) without a large scratch buffer of partials (num_chunks x B x heads x N' x (Dqk + Dv) fp32).
# On the H200 the training backward was no faster with 4x as many programs, whose partials take longer to sum.
_BACKWARD_TARGET_PROGRAMS = 1024
# A chunk shorter than this many query blocks spends more on writing its partial than on accumulating it.
_MIN_QUERY_BLOCKS_PER_CHUNK = 4
_SUM_PARTIALS_BLOCK_ROWS = 64


@triton.jit
def _dot_operand(x, DTYPE: tl.constexpr, UPCAST_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Rounding to the storage dtype first keeps the interpreter's numerics equal to the GPU's MMA inputs, except on
    # the TF32 path: the interpreter multiplies in full fp32, the GPU rounds to TF32 (tests/test_kernel_casts.py).
    return mma_operand(x.to(DTYPE), UPCAST_DOTS, DOT_PRECISION)


@triton.jit
def _query_block(num_heads, num_queries, num_query_blocks, BLOCK_M: tl.constexpr):
    """(batch, head, first query, row offsets, row validity) of the program's query block.

    Programs are numbered head-fastest, so the programs that run side by side share their token rows.
    """
    pid = tl.program_id(0)
    head = pid % num_heads
    query_block = (pid // num_heads) % num_query_blocks
    batch = pid // (num_heads * num_query_blocks)
    first_query = query_block * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    row_valid = first_query + rows < num_queries
    return batch, head, first_query, rows, row_valid


@triton.jit
def _load_key_block(k_base, v_base, keys, key_valid, dqk, dv, stride_kn, stride_kd, stride_vn, stride_vd,
                    DQK: tl.constexpr, DV: tl.constexpr):
    """k^T (DQK_PAD x BLOCK_N) and v (BLOCK_N x DV_PAD) of the key block ``keys``; zeros where not ``key_valid``."""
    k_t = tl.load(k_base + keys[None, :] * stride_kn + dqk[:, None] * stride_kd,
                  mask=(dqk[:, None] < DQK) & key_valid[None, :], other=0.0)
    v = tl.load(v_base + keys[:, None] * stride_vn + dv[None, :] * stride_vd,
                mask=key_valid[:, None] & (dv[None, :] < DV), other=0.0)
    return k_t, v


@triton.jit
def _forward_key_block(acc, row_max, row_sum, q, k_t, v, keys, num_keys, scale_log2, dtype,
                       DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr, MASK_KEYS: tl.constexpr):
    """One online-softmax step of the forward over the key block ``keys`` (its k^T and v loaded):
    (acc, row_max, row_sum) updated."""
    scores = tl.dot(q, _dot_operand(k_t, dtype, UPCAST_DOTS, DOT_PRECISION), input_precision=DOT_PRECISION)
    scores *= scale_log2
    if MASK_KEYS:
        scores = tl.where((keys < num_keys)[None, :], scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    probs = tl.exp2(scores - new_max[:, None])
    rescale = tl.exp2(row_max - new_max)
    row_sum = row_sum * rescale + tl.sum(probs, axis=1)
    acc = acc * rescale[:, None] + tl.dot(_dot_operand(probs, dtype, UPCAST_DOTS, DOT_PRECISION),
                                          _dot_operand(v, dtype, UPCAST_DOTS, DOT_PRECISION),
                                          input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _rgsa_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_on, stride_oh, stride_od,
    num_heads, num_queries, num_keys, num_query_blocks,
    scale_log2,
    DQK: tl.constexpr, DV: tl.constexpr, DQK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
):
    batch, head, first_query, rows, row_valid = _query_block(num_heads, num_queries, num_query_blocks, BLOCK_M)
    dtype = q_ptr.dtype.element_ty
    dqk = tl.arange(0, DQK_PAD)
    dv = tl.arange(0, DV_PAD)
    key_cols = tl.arange(0, BLOCK_N)

    q_base = (q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
              + first_query.to(tl.int64) * stride_qn)
    q = tl.load(q_base + rows[:, None] * stride_qn + dqk[None, :] * stride_qd,
                mask=row_valid[:, None] & (dqk[None, :] < DQK), other=0.0)
    q = _dot_operand(q, dtype, UPCAST_DOTS, DOT_PRECISION)
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    # Only a last, partial key block needs its scores masked: with 16-bit operands the whole blocks skip a select
    # per score (a fifth of the loop's instructions at BLOCK_N = 64). Fp32 tiles take twice the registers, and a
    # second copy of the step made them spill: they mask every block.
    whole_blocks_end = 0
    if dtype != tl.float32:
        whole_blocks_end = (num_keys // BLOCK_N) * BLOCK_N
    # Each whole block's k and v are loaded one iteration ahead, so that their global-memory latency overlaps the
    # previous block's work. Triton's pipeliner would not do it: rows of 15 (and, at most strides, 30) 16-bit
    # channels are only 2-byte aligned, and loads narrower than 4 bytes cannot become asynchronous copies, so they
    # stayed in the iteration that used them and every iteration waited on memory (sm_90a SASS).
    k_t, v = _load_key_block(k_base, v_base, key_cols, key_cols < whole_blocks_end, dqk, dv,
                             stride_kn, stride_kd, stride_vn, stride_vd, DQK, DV)
    for first_key in range(0, whole_blocks_end, BLOCK_N):
        next_keys = first_key + BLOCK_N + key_cols
        next_k_t, next_v = _load_key_block(k_base, v_base, next_keys, next_keys < whole_blocks_end, dqk, dv,
                                           stride_kn, stride_kd, stride_vn, stride_vd, DQK, DV)
        acc, row_max, row_sum = _forward_key_block(acc, row_max, row_sum, q, k_t, v, first_key + key_cols, num_keys,
                                                   scale_log2, dtype, DOT_PRECISION, UPCAST_DOTS, MASK_KEYS=False)
        k_t, v = next_k_t, next_v
    for first_key in range(whole_blocks_end, num_keys, BLOCK_N):
        keys = first_key + key_cols
        k_t, v = _load_key_block(k_base, v_base, keys, keys < num_keys, dqk, dv,
                                 stride_kn, stride_kd, stride_vn, stride_vd, DQK, DV)
        acc, row_max, row_sum = _forward_key_block(acc, row_max, row_sum, q, k_t, v, keys, num_keys,
                                                   scale_log2, dtype, DOT_PRECISION, UPCAST_DOTS, MASK_KEYS=True)

    out = acc / row_sum[:, None]
    out_base = (out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
                + first_query.to(tl.int64) * stride_on)
    tl.store(out_base + rows[:, None] * stride_on + dv[None, :] * stride_od, out.to(dtype),
             mask=row_valid[:, None] & (dv[None, :] < DV))
    lse_base = lse_ptr + (batch * num_heads + head).to(tl.int64) * num_queries + first_query
    tl.store(lse_base + rows, (row_max + tl.log2(row_sum)) * _LN_2, mask=row_valid)


@triton.jit
def _rgsa_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_dob, stride_don, stride_doh, stride_dod,
    stride_dqb, stride_dqn, stride_dqh, stride_dqd,
    num_heads, num_queries, num_keys, num_query_blocks,
    scale, scale_log2,
    DQK: tl.constexpr, DV: tl.constexpr, DQK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
):
    batch, head, first_query, rows, row_valid = _query_block(num_heads, num_queries, num_query_blocks, BLOCK_M)
    dtype = q_ptr.dtype.element_ty
    dqk = tl.arange(0, DQK_PAD)
    dv = tl.arange(0, DV_PAD)
    key_cols = tl.arange(0, BLOCK_N)
    q_mask = row_valid[:, None] & (dqk[None, :] < DQK)
    o_mask = row_valid[:, None] & (dv[None, :] < DV)

    batch64 = batch.to(tl.int64)
    head64 = head.to(tl.int64)
    first_query64 = first_query.to(tl.int64)
    q = tl.load(q_ptr + batch64 * stride_qb + head64 * stride_qh + first_query64 * stride_qn
                + rows[:, None] * stride_qn + dqk[None, :] * stride_qd, mask=q_mask, other=0.0)
    dout = tl.load(dout_ptr + batch64 * stride_dob + head64 * stride_doh + first_query64 * stride_don
                   + rows[:, None] * stride_don + dv[None, :] * stride_dod, mask=o_mask, other=0.0)
    out = tl.load(out_ptr + batch64 * stride_ob + head64 * stride_oh + first_query64 * stride_on
                  + rows[:, None] * stride_on + dv[None, :] * stride_od, mask=o_mask, other=0.0)
    delta = tl.sum(dout.to(tl.float32) * out.to(tl.float32), axis=1)
    row_stats = (batch * num_heads + head).to(tl.int64) * num_queries + first_query + rows
    tl.store(delta_ptr + row_stats, delta, mask=row_valid)
    lse_log2 = tl.load(lse_ptr + row_stats, mask=row_valid, other=0.0) * _LOG2_E
    q = _dot_operand(q, dtype, UPCAST_DOTS, DOT_PRECISION)
    dout = _dot_operand(dout, dtype, UPCAST_DOTS, DOT_PRECISION)

    k_base = k_ptr + batch64 * stride_kb + head64 * stride_kh
    v_base = v_ptr + batch64 * stride_vb + head64 * stride_vh
    dq = tl.zeros([BLOCK_M, DQK_PAD], tl.float32)
    for first_key in range(0, num_keys, BLOCK_N):
        keys = first_key + key_cols
        key_valid = keys < num_keys
        k = tl.load(k_base + keys[:, None] * stride_kn + dqk[None, :] * stride_kd,
                    mask=key_valid[:, None] & (dqk[None, :] < DQK), other=0.0)
        v_t = tl.load(v_base + keys[None, :] * stride_vn + dv[:, None] * stride_vd,
                      mask=key_valid[None, :] & (dv[:, None] < DV), other=0.0)
        k = _dot_operand(k, dtype, UPCAST_DOTS, DOT_PRECISION)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        probs = tl.where(key_valid[None, :], tl.exp2(scores - lse_log2[:, None]), 0.0)
        dprobs = tl.dot(dout, _dot_operand(v_t, dtype, UPCAST_DOTS, DOT_PRECISION), input_precision=DOT_PRECISION)
        dscores = probs * (dprobs - delta[:, None])
        dq += tl.dot(_dot_operand(dscores, dtype, UPCAST_DOTS, DOT_PRECISION), k, input_precision=DOT_PRECISION)

    tl.store(dq_ptr + batch64 * stride_dqb + head64 * stride_dqh + first_query64 * stride_dqn
             + rows[:, None] * stride_dqn + dqk[None, :] * stride_dqd, (dq * scale).to(dtype), mask=q_mask)


@triton.jit
def _rgsa_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, dk_partial_ptr, dv_partial_ptr,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_dob, stride_don, stride_doh, stride_dod,
    stride_dqb, stride_dqn, stride_dqh, stride_dqd,
    num_heads, num_batch_heads, num_queries, num_keys, num_key_blocks, num_chunks, chunk_len,
    scale, scale_log2,
    DQK: tl.constexpr, DV: tl.constexpr, DQK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FUSED_DQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
):
    # Key block varies fastest, then head, so concurrently running programs share the token rows they read.
    pid = tl.program_id(0)
    key_block = pid % num_key_blocks
    head = (pid // num_key_blocks) % num_heads
    chunk = (pid // (num_key_blocks * num_heads)) % num_chunks
    batch = pid // (num_key_blocks * num_heads * num_chunks)
    dtype = q_ptr.dtype.element_ty

    rows = tl.arange(0, BLOCK_M)
    dqk = tl.arange(0, DQK_PAD)
    dv = tl.arange(0, DV_PAD)
    keys = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_valid = keys < num_keys

    batch64 = batch.to(tl.int64)
    head64 = head.to(tl.int64)
    k = tl.load(k_ptr + batch64 * stride_kb + head64 * stride_kh
                + keys[:, None] * stride_kn + dqk[None, :] * stride_kd,
                mask=key_valid[:, None] & (dqk[None, :] < DQK), other=0.0)
    v = tl.load(v_ptr + batch64 * stride_vb + head64 * stride_vh
                + keys[:, None] * stride_vn + dv[None, :] * stride_vd,
                mask=key_valid[:, None] & (dv[None, :] < DV), other=0.0)
    k = _dot_operand(k, dtype, UPCAST_DOTS, DOT_PRECISION)
    v = _dot_operand(v, dtype, UPCAST_DOTS, DOT_PRECISION)

    dk = tl.zeros([BLOCK_N, DQK_PAD], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    chunk_start = chunk * chunk_len
    chunk_end = tl.minimum(chunk_start + chunk_len, num_queries)
    # Scalar 64-bit bases advanced once per block keep row offsets in 32 bits for N of any size.
    chunk_start64 = chunk_start.to(tl.int64)
    q_block = q_ptr + batch64 * stride_qb + head64 * stride_qh + chunk_start64 * stride_qn
    dout_block = dout_ptr + batch64 * stride_dob + head64 * stride_doh + chunk_start64 * stride_don
    out_block = out_ptr + batch64 * stride_ob + head64 * stride_oh + chunk_start64 * stride_on
    dq_block = dq_ptr + batch64 * stride_dqb + head64 * stride_dqh + chunk_start64 * stride_dqn
    stats_base = (batch * num_heads + head).to(tl.int64) * num_queries
    q_offsets = rows[:, None] * stride_qn + dqk[None, :] * stride_qd
    dout_offsets = rows[:, None] * stride_don + dv[None, :] * stride_dod
    for first_query in range(chunk_start, chunk_end, BLOCK_M):
        queries = first_query + rows
        row_valid = queries < chunk_end
        q_mask = row_valid[:, None] & (dqk[None, :] < DQK)
        o_mask = row_valid[:, None] & (dv[None, :] < DV)
        q = tl.load(q_block + q_offsets, mask=q_mask, other=0.0)
        dout = tl.load(dout_block + dout_offsets, mask=o_mask, other=0.0)
        lse_log2 = tl.load(lse_ptr + stats_base + queries, mask=row_valid, other=0.0) * _LOG2_E
        if FUSED_DQ:
            out = tl.load(out_block + rows[:, None] * stride_on + dv[None, :] * stride_od, mask=o_mask, other=0.0)
            delta = tl.sum(dout.to(tl.float32) * out.to(tl.float32), axis=1)
        else:
            delta = tl.load(delta_ptr + stats_base + queries, mask=row_valid, other=0.0)
        q = _dot_operand(q, dtype, UPCAST_DOTS, DOT_PRECISION)
        dout = _dot_operand(dout, dtype, UPCAST_DOTS, DOT_PRECISION)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        probs = tl.where(row_valid[:, None] & key_valid[None, :], tl.exp2(scores - lse_log2[:, None]), 0.0)
        probs_operand = _dot_operand(probs, dtype, UPCAST_DOTS, DOT_PRECISION)
        dv_acc += tl.dot(tl.trans(probs_operand), dout, input_precision=DOT_PRECISION)
        dprobs = tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION)
        dscores = _dot_operand(probs * (dprobs - delta[:, None]), dtype, UPCAST_DOTS, DOT_PRECISION)
        dk += tl.dot(tl.trans(dscores), q, input_precision=DOT_PRECISION)
        if FUSED_DQ:
            dq = tl.dot(dscores, k, input_precision=DOT_PRECISION) * scale
            tl.store(dq_block + rows[:, None] * stride_dqn + dqk[None, :] * stride_dqd, dq.to(dtype), mask=q_mask)
        q_block += BLOCK_M * stride_qn
        dout_block += BLOCK_M * stride_don
        out_block += BLOCK_M * stride_on
        dq_block += BLOCK_M * stride_dqn

    # Partials keep the padded head dim so the stores need only a row mask.
    partial_row = (chunk.to(tl.int64) * num_batch_heads + batch64 * num_heads + head64) * num_keys + keys
    tl.store(dk_partial_ptr + partial_row[:, None] * DQK_PAD + dqk[None, :], dk * scale,
             mask=key_valid[:, None])
    tl.store(dv_partial_ptr + partial_row[:, None] * DV_PAD + dv[None, :], dv_acc, mask=key_valid[:, None])


@triton.jit
def _rgsa_sum_key_partials_kernel(
    dk_partial_ptr, dv_partial_ptr, dk_ptr, dv_ptr,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    num_heads, num_keys, num_rows, num_chunks,
    DQK: tl.constexpr, DV: tl.constexpr, DQK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_valid = rows < num_rows
    key = rows % num_keys
    head = (rows // num_keys) % num_heads
    batch = rows // (num_keys * num_heads)
    dqk = tl.arange(0, DQK_PAD)
    dv = tl.arange(0, DV_PAD)

    dk = tl.zeros([BLOCK_ROWS, DQK_PAD], tl.float32)
    dv_acc = tl.zeros([BLOCK_ROWS, DV_PAD], tl.float32)
    dk_partial = dk_partial_ptr + rows[:, None] * DQK_PAD + dqk[None, :]
    dv_partial = dv_partial_ptr + rows[:, None] * DV_PAD + dv[None, :]
    # Chunks are summed in index order, which makes dK and dV bitwise reproducible.
    for _ in range(num_chunks):
        dk += tl.load(dk_partial, mask=row_valid[:, None], other=0.0)
        dv_acc += tl.load(dv_partial, mask=row_valid[:, None], other=0.0)
        dk_partial += num_rows.to(tl.int64) * DQK_PAD
        dv_partial += num_rows.to(tl.int64) * DV_PAD

    batch64 = batch.to(tl.int64)
    dk_row = batch64 * stride_dkb + key * stride_dkn + head * stride_dkh
    dv_row = batch64 * stride_dvb + key * stride_dvn + head * stride_dvh
    tl.store(dk_ptr + dk_row[:, None] + dqk[None, :] * stride_dkd, dk.to(dk_ptr.dtype.element_ty),
             mask=row_valid[:, None] & (dqk[None, :] < DQK))
    tl.store(dv_ptr + dv_row[:, None] + dv[None, :] * stride_dvd, dv_acc.to(dv_ptr.dtype.element_ty),
             mask=row_valid[:, None] & (dv[None, :] < DV))


class _Tiles(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def launch_options(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps, num_stages=self.num_stages)

    def label(self) -> str:
        return f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} warps={self.num_warps} stages={self.num_stages}"


def _operand_precision(dtype: torch.dtype) -> str:
    """How the kernels' dots run: "16bit" MMAs, "tf32" MMAs, or exact fp32 FMAs ("ieee")."""
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if fp32_matmuls_use_tf32() else "ieee"


def _tiles(kernel: str, num_keys: int, operand_precision: str) -> _Tiles:
    small_map_tiles, large_map_tiles = _TILE_TABLE[(kernel, operand_precision)]
    block_m, max_block_n, num_warps, num_stages = small_map_tiles if num_keys <= _SMALL_MAP else large_map_tiles
    return _Tiles(block_m, min(max_block_n, next_power_of_2_at_least_16(num_keys)), num_warps, num_stages)


def _compact_if_tile_offsets_overflow(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` if every in-tile offset of ``rows`` rows of it fits in 32 bits, else a contiguous copy."""
    largest = (rows - 1) * abs(t.stride(1)) + (_MAX_HEAD_DIM - 1) * abs(t.stride(3))
    return t if largest < 2**31 else t.contiguous()


def _kernel_readable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k and v as both launchers hand them to the kernels (keys are indexed from the map's first row)."""
    return (_compact_if_tile_offsets_overflow(q, _MAX_QUERY_TILE_ROWS),
            *(_compact_if_tile_offsets_overflow(t, t.shape[1] + _MAX_KEY_TILE_COLS) for t in (k, v)))


def _query_chunking(num_queries: int, work_per_chunk: int, block_m: int, requested_chunk_len: int) -> tuple[int, int]:
    """Chunk length (a multiple of block_m) and chunk count for the dK/dV partial sums.

    ``work_per_chunk`` is the number of programs each chunk gives (key blocks x batch x heads).
    """
    if requested_chunk_len > 0:
        chunk_len = cdiv(requested_chunk_len, block_m) * block_m
    else:
        wanted_chunks = cdiv(_BACKWARD_TARGET_PROGRAMS, work_per_chunk)
        chunk_len = max(_MIN_QUERY_BLOCKS_PER_CHUNK * block_m,
                        cdiv(cdiv(num_queries, wanted_chunks), block_m) * block_m)
    return chunk_len, cdiv(num_queries, chunk_len)


def _head_dim_constexprs(dqk: int, dv: int) -> dict:
    return dict(DQK=dqk, DV=dv, DQK_PAD=next_power_of_2_at_least_16(dqk), DV_PAD=next_power_of_2_at_least_16(dv))


def _triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    q, k, v = _kernel_readable(q, k, v)
    batch, num_queries, num_heads, dqk = q.shape
    num_keys, dv = k.shape[1], v.shape[3]
    out = _common.kernel_buffer((batch, num_queries, num_heads, dv), dtype=q.dtype, device=q.device)
    lse = _common.kernel_buffer((batch, num_heads, num_queries), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    precision = _operand_precision(q.dtype)
    tiles = _tiles("forward", num_keys, precision)
    num_query_blocks = cdiv(num_queries, tiles.block_m)
    with on_device_of(q):
        _rgsa_forward_kernel[(num_query_blocks * batch * num_heads,)](
            q, k, v, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            num_heads, num_queries, num_keys, num_query_blocks,
            scale * _LOG2_E.value,
            **_head_dim_constexprs(dqk, dv), **tiles.launch_options(),
            DOT_PRECISION=_DOT_INPUT_PRECISION[precision], UPCAST_DOTS=INTERPRET,
        )
    return out, lse


def _triton_backward(dout, q, k, v, out, lse, scale: float, requested_chunk_len: int):
    q, k, v = _kernel_readable(q, k, v)
    dout = _compact_if_tile_offsets_overflow(dout, _MAX_QUERY_TILE_ROWS)
    batch, num_queries, num_heads, dqk = q.shape
    num_keys, dv = k.shape[1], v.shape[3]
    dq = _common.kernel_buffer(q.shape, dtype=q.dtype, device=q.device)
    dk = _common.kernel_buffer(k.shape, dtype=k.dtype, device=k.device)
    dv_grad = _common.kernel_buffer(v.shape, dtype=v.dtype, device=v.device)
    if batch * num_heads == 0:
        return dq, dk, dv_grad
    if num_queries == 0:
        return dq, dk.zero_(), dv_grad.zero_()

    precision = _operand_precision(q.dtype)
    dkdv_tiles = _tiles("dkdv", num_keys, precision)
    num_key_blocks = cdiv(num_keys, dkdv_tiles.block_n)
    fused_dq = num_key_blocks == 1
    batch_heads = batch * num_heads
    head_dims = _head_dim_constexprs(dqk, dv)
    common = dict(**head_dims, DOT_PRECISION=_DOT_INPUT_PRECISION[precision], UPCAST_DOTS=INTERPRET)
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *dq.stride())

    with on_device_of(q):
        if fused_dq:
            delta = lse  # unread: the fused kernel derives delta from dO and O itself
        else:
            delta = _common.kernel_buffer(lse.shape, dtype=lse.dtype, device=lse.device)
            dq_tiles = _tiles("dq", num_keys, precision)
            num_query_blocks = cdiv(num_queries, dq_tiles.block_m)
            _rgsa_backward_dq_kernel[(num_query_blocks * batch_heads,)](
                q, k, v, out, dout, lse, delta, dq, *strides,
                num_heads, num_queries, num_keys, num_query_blocks, scale, scale * _LOG2_E.value,
                **dq_tiles.launch_options(), **common,
            )

        chunk_len, num_chunks = _query_chunking(num_queries, num_key_blocks * batch_heads, dkdv_tiles.block_m,
                                                requested_chunk_len)
        dk_partial = _common.kernel_buffer((num_chunks, batch_heads, num_keys, head_dims["DQK_PAD"]),
                                           dtype=torch.float32, device=q.device)
        dv_partial = _common.kernel_buffer((num_chunks, batch_heads, num_keys, head_dims["DV_PAD"]),
                                           dtype=torch.float32, device=q.device)
        _rgsa_backward_dkdv_kernel[(num_key_blocks * num_heads * num_chunks * batch,)](
            q, k, v, out, dout, lse, delta, dq, dk_partial, dv_partial, *strides,
            num_heads, batch_heads, num_queries, num_keys, num_key_blocks, num_chunks, chunk_len,
            scale, scale * _LOG2_E.value,
            FUSED_DQ=fused_dq, **dkdv_tiles.launch_options(), **common,
        )

        num_rows = batch_heads * num_keys
        _rgsa_sum_key_partials_kernel[(cdiv(num_rows, _SUM_PARTIALS_BLOCK_ROWS),)](
            dk_partial, dv_partial, dk, dv_grad, *dk.stride(), *dv_grad.stride(),
            num_heads, num_keys, num_rows, num_chunks,
            **head_dims, BLOCK_ROWS=_SUM_PARTIALS_BLOCK_ROWS, num_warps=_SUM_PARTIALS_NUM_WARPS,
            num_stages=_SUM_PARTIALS_NUM_STAGES,
        )
    return dq, dk, dv_grad


@torch.library.custom_op("rgt_fast::rgsa_attention_forward", mutates_args=())
def _rgsa_attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                               backward_query_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    # backward_query_chunk is only read by the backward; it is an input so that autograd can save it.
    return _triton_forward(q, k, v, scale)


@_rgsa_attention_forward_op.register_fake
def _rgsa_attention_forward_fake(q, k, v, scale, backward_query_chunk):
    batch, num_queries, num_heads, _ = q.shape
    return (q.new_empty((batch, num_queries, num_heads, v.shape[3])),
            q.new_empty((batch, num_heads, num_queries), dtype=torch.float32))


@torch.library.custom_op("rgt_fast::rgsa_attention_backward", mutates_args=())
def _rgsa_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, scale: float,
                                backward_query_chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_backward(dout, q, k, v, out, lse, scale, backward_query_chunk)


@_rgsa_attention_backward_op.register_fake
def _rgsa_attention_backward_fake(dout, q, k, v, out, lse, scale, backward_query_chunk):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_for_backward(ctx, q, k, v, out, lse, scale, backward_query_chunk):
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.backward_query_chunk = backward_query_chunk


def _setup_backward(ctx, inputs, output):
    q, k, v, scale, backward_query_chunk = inputs
    out, lse = output
    _save_for_backward(ctx, q, k, v, out, lse, scale, backward_query_chunk)
    ctx.mark_non_differentiable(lse)


def _input_gradients(launch_backward, ctx, dout):
    """The gradients of every forward input, from ``launch_backward`` (the custom op or the launcher)."""
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = launch_backward(dout, q, k, v, out, lse, ctx.scale, ctx.backward_query_chunk)
    return dq, dk, dv, None, None


def _rgsa_attention_backward(ctx, dout, _dlse):
    return _input_gradients(_rgsa_attention_backward_op, ctx, dout)


_rgsa_attention_forward_op.register_autograd(_rgsa_attention_backward, setup_context=_setup_backward)


class _RGSAAttention(torch.autograd.Function):
    """The eager-mode entry: the custom ops' Python dispatch and checks cost more CPU time per call than the
    training-shape kernels take on the GPU, so eager calls go straight to the launchers."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, backward_query_chunk: int):
        out, lse = _triton_forward(q, k, v, scale)
        _save_for_backward(ctx, q, k, v, out, lse, scale, backward_query_chunk)
        return out

    @staticmethod
    def backward(ctx, dout):
        return _input_gradients(_triton_backward, ctx, dout)


def rgsa_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain-PyTorch RG-SA attention with the layouts of :func:`rgsa_attention` (any dtype, any device).

    Queries go in slices of about ``score_elements_per_step`` scores: on CPU they then stay in a core's L2 cache,
    and at inference N x N' scores would not fit in memory at once. Matmul-softmax-matmul rather than
    scaled_dot_product_attention: on CPU its math path took 1.15x (N' = 16) to 1.7x (N' = 256) as long. The
    output is formed transposed, v^T p^T, which CPU BLAS ran faster than p v at these head dims.
    """
    batch, _, num_heads, _ = q.shape
    num_keys = k.shape[1]
    rows_per_slice = max(1, score_elements_per_step(q.device) // max(1, batch * num_heads * num_keys))
    scaled_k_t = k.permute(0, 2, 3, 1) * scale
    v_t = v.permute(0, 2, 3, 1)
    outs_t = [values_times_probabilities_t(v_t, torch.softmax(torch.matmul(q_slice.transpose(1, 2), scaled_k_t), -1))
              for q_slice in q.split(rows_per_slice, dim=1)]
    out_t = outs_t[0] if len(outs_t) == 1 else torch.cat(outs_t, dim=3)  # cat would copy even one slice
    return out_t.permute(0, 3, 1, 2).contiguous()


def _check_inputs(q, k, v, scale, backward_query_chunk) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rgsa_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    shapes = "q (B, N, heads, Dqk), k (B, N', heads, Dqk), v (B, N', heads, Dv)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"rgsa_attention: {name} must be 4-D, got shape {tuple(t.shape)}; expected {shapes}. "
                             f"View a (B, N, heads*D) projection as (B, N, heads, D).")
    if q.dtype not in SUPPORTED_DTYPES + (torch.float64,):
        raise TypeError(f"rgsa_attention: unsupported dtype {q.dtype}; use float32, bfloat16 or float16 "
                        f"(float64 runs on the PyTorch fallback). Convert with .to(torch.bfloat16).")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"rgsa_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
                        f"convert them with .to(q.dtype).")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"rgsa_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}; "
                         f"move them with .to(q.device).")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"rgsa_attention: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}; "
                         f"expected {shapes}.")
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ValueError(f"rgsa_attention: head counts (dim 2) differ: q {q.shape[2]}, k {k.shape[2]}, "
                         f"v {v.shape[2]}; expected {shapes}.")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"rgsa_attention: q and k head dims (dim 3) differ: {q.shape[3]} vs {k.shape[3]}; "
                         f"expected {shapes}.")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"rgsa_attention: k and v must have the same number of key tokens N' (dim 1), got "
                         f"{k.shape[1]} and {v.shape[1]}.")
    if k.shape[1] < 1:
        raise ValueError("rgsa_attention: the key map is empty (N' = 0); softmax over no keys is undefined.")
    if q.shape[3] < 1 or v.shape[3] < 1:
        raise ValueError(f"rgsa_attention: head dims must be >= 1, got Dqk={q.shape[3]}, Dv={v.shape[3]}.")
    check_attention_scale("rgsa_attention", scale)
    chunk = backward_query_chunk
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1):
        raise ValueError(f"rgsa_attention: backward_query_chunk must be None (chosen from the shapes) or an int "
                         f">= 1, got {chunk!r}.")


def rgsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                   backward_query_chunk: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per head: q (B, N, heads, Dqk), k (B, N', heads, Dqk), v (B, N', heads, Dv).

    Returns a contiguous (B, N, heads, Dv) tensor. Runs the Triton kernels on CUDA (and on CPU under
    TRITON_INTERPRET=1) for float32/bfloat16/float16 and head dims up to 128, and :func:`rgsa_attention_torch`
    otherwise.
    ``backward_query_chunk`` overrides how many queries each dK/dV partial sums (tests use it to force many
    partials on small inputs); by default it is chosen from the shapes. The PyTorch path sums no partials: it
    checks the value and has no use for it.
    """
    _check_inputs(q, k, v, scale, backward_query_chunk)
    if q.dtype in SUPPORTED_DTYPES and triton_runs_on(q) and max(q.shape[3], v.shape[3]) <= _MAX_HEAD_DIM:
        chunk = int(backward_query_chunk or 0)  # 0: chosen from the shapes
        if torch.compiler.is_compiling():
            out, _ = _rgsa_attention_forward_op(q, k, v, float(scale), chunk)
            return out
        return _RGSAAttention.apply(q, k, v, float(scale), chunk)
    return rgsa_attention_torch(q, k, v, scale)


# Head dims the RGT models use: embed 180 with 6 heads and the q/k channels halved, and the embed-60 variant.
_AOT_HEAD_DIMS = ((15, 30), (5, 10))
# Key counts that reach every tile choice: the small-map tiles, BLOCK_N 32 and 64, and several key blocks.
_AOT_KEY_COUNTS = (16, 17, 33, 65)
# fp32 runs with TF32 MMAs or, when torch disallows TF32, with exact FMA dots that use no tensor cores.
_AOT_PRECISIONS = ((torch.bfloat16, "16bit"), (torch.float16, "16bit"), (torch.float32, "tf32"),
                   (torch.float32, "ieee"))


def _aot_variant(fn, io_types: dict, constexprs: dict, num_warps: int, num_stages: int, uses_dot: bool,
                config: str) -> KernelVariant:
    # Head-dim strides ("stride_*d") are 1 in every tensor the model passes.
    signature, constexprs = aot_signature(fn, constexprs, io_types, ("scale", "scale_log2"), unit_stride_suffix="d")
    return KernelVariant(kernel=fn.__name__, fn=fn, signature=signature, constexprs=constexprs,
                         num_warps=num_warps, num_stages=num_stages, uses_dot=uses_dot, config=config)


def aot_variants() -> list[KernelVariant]:
    """Every kernel x dtype x tile configuration the launchers above can pick, for the AOT report."""
    variants = {}
    for dtype, precision in _AOT_PRECISIONS:
        name = TRITON_DTYPE_NAMES[dtype]
        label = f"{name}/{precision}" if dtype == torch.float32 else name
        common = dict(DOT_PRECISION=_DOT_INPUT_PRECISION[precision], UPCAST_DOTS=False)
        for dqk, dv in _AOT_HEAD_DIMS:
            head_dims = _head_dim_constexprs(dqk, dv)
            io_types = dict(q_ptr=name, k_ptr=name, v_ptr=name, out_ptr=name, dout_ptr=name, dq_ptr=name,
                            dk_ptr=name, dv_ptr=name, lse_ptr="fp32", delta_ptr="fp32",
                            dk_partial_ptr="fp32", dv_partial_ptr="fp32")
            launches = []
            for num_keys in _AOT_KEY_COUNTS:
                dkdv_tiles = _tiles("dkdv", num_keys, precision)
                fused_dq = cdiv(num_keys, dkdv_tiles.block_n) == 1
                launches.append((_rgsa_forward_kernel, _tiles("forward", num_keys, precision), {}))
                if not fused_dq:
                    launches.append((_rgsa_backward_dq_kernel, _tiles("dq", num_keys, precision), {}))
                launches.append((_rgsa_backward_dkdv_kernel, dkdv_tiles, {"FUSED_DQ": fused_dq}))
            for fn, tiles, flags in launches:
                config = " ".join([f"{label} D={dqk}/{dv}", tiles.label(),
                                   *(f"{flag}={value}" for flag, value in flags.items())])
                constexprs = dict(**head_dims, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, **flags, **common)
                # Key counts that share tiles launch the same kernel: keep one entry per configuration.
                variants[(fn.__name__, config)] = _aot_variant(fn, io_types, constexprs, tiles.num_warps,
                                                               tiles.num_stages, precision != "ieee", config)
            if precision != "ieee":  # the partial sums do not depend on how the dots ran
                config = (f"{name} D={dqk}/{dv} BLOCK_ROWS={_SUM_PARTIALS_BLOCK_ROWS} warps={_SUM_PARTIALS_NUM_WARPS} "
                          f"stages={_SUM_PARTIALS_NUM_STAGES}")
                variants[(_rgsa_sum_key_partials_kernel.__name__, config)] = _aot_variant(
                    _rgsa_sum_key_partials_kernel, io_types, dict(**head_dims, BLOCK_ROWS=_SUM_PARTIALS_BLOCK_ROWS),
                    _SUM_PARTIALS_NUM_WARPS, _SUM_PARTIALS_NUM_STAGES, uses_dot=False, config=config)
    return list(variants.values())
