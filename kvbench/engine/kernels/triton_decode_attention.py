"""Triton kernels of `decode_attention` (launched by `kvbench.engine.kernels.decode_attention.decode_attention_triton`).

Pass 1 (`decode_split`), one program per (KV head, chunk of slots): the GQA group's query heads form the
rows of one tile (padded to 16 rows for `tl.dot`), so each K/V block is read once for the whole group; it
leaves an unnormalised partial output, max and sum per (query head, chunk). Pass 2 (`decode_reduce`), one
program per (query head, block of slots): merges the chunks and normalises the probabilities.
Logits are in the log2 domain (scaled by log2 e).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
SPLIT_BLOCK = 16


@triton.jit
def decode_split(
    q_ptr, k_ptr, v_ptr, len_ptr, valid_ptr, bias_ptr, probs_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    num_slots, group, chunk, num_splits, scale_log2e, softcap,
    sq_h, sq_d, sk_h, sk_t, sk_d, sv_h, sv_t, sv_d, svl_h, svl_t, sb_h, sb_t,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_VALID: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    RETURN_PROBS: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    kv = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < group
    heads = kv * group + g
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + heads[:, None] * sq_h + dims[None, :] * sq_d, mask=g_ok[:, None] & dim_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    length = tl.load(len_ptr + kv) if HAS_LENGTHS else num_slots
    start = split * chunk
    # Chunks past a head's length do no work: the ragged heads of a compressed cache cost what they hold.
    end = tl.minimum(start + chunk, length)
    run_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv * sk_h + cols[:, None] * sk_t + dims[None, :] * sk_d, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv * sv_h + cols[:, None] * sv_t + dims[None, :] * sv_d, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") if DOT_FP32 else tl.dot(q, tl.trans(k))
        s = s * scale_log2e
        if HAS_SOFTCAP:
            # cap * tanh(x / cap) on the natural-log logit x = s / log2 e, with tanh(y) = 1 - 2 / (e^(2y) + 1).
            y = s / (1.4426950408889634 * softcap)
            s = softcap * (1.0 - 2.0 / (tl.exp2(2.0 * 1.4426950408889634 * y) + 1.0)) * 1.4426950408889634
        visible = col_ok
        if HAS_VALID:
            visible = visible & (tl.load(valid_ptr + kv * svl_h + cols * svl_t, mask=col_ok, other=0) != 0)
        if HAS_BIAS:
            s += tl.load(bias_ptr + kv * sb_h + cols * sb_t, mask=col_ok, other=0.0)[None, :] * 1.4426950408889634
        s = tl.where(visible[None, :], s, float("-inf"))
        if RETURN_PROBS:
            # The logits wait here for the global max and sum; decode_reduce normalises them in place.
            tl.store(probs_ptr + heads[:, None] * num_slots + cols[None, :], s, mask=g_ok[:, None] & col_ok[None, :])
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp2(run_max - safe_max)
        p = tl.exp2(s - safe_max[:, None])
        run_sum = run_sum * alpha + tl.sum(p, axis=1)
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee") if DOT_FP32 else tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        run_max = new_max
    part = heads * num_splits + split
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=g_ok[:, None] & dim_ok[None, :])
    tl.store(part_max_ptr + part, run_max, mask=g_ok)
    tl.store(part_sum_ptr + part, run_sum, mask=g_ok)


@triton.jit
def decode_reduce(
    part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, probs_ptr, len_ptr, sink_ptr,
    num_slots, group, num_splits, so_h, so_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_SINKS: tl.constexpr, RETURN_PROBS: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    block = tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    chunk_max = tl.load(part_max_ptr + head * num_splits + splits, mask=splits < num_splits, other=float("-inf"))
    chunk_sum = tl.load(part_sum_ptr + head * num_splits + splits, mask=splits < num_splits, other=0.0)
    top = tl.max(chunk_max, axis=0)
    if HAS_SINKS:
        # The sink is one more logit (log2 domain) in the normalisation, with no value: it only adds to the sum.
        sink = tl.load(sink_ptr + head)
        top = tl.maximum(top, sink)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(chunk_sum * tl.exp2(chunk_max - safe_top), axis=0)
    if HAS_SINKS:
        total += tl.exp2(sink - safe_top)
    inv_total = tl.where(total > 0.0, 1.0 / tl.where(total > 0.0, total, 1.0), 0.0)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    if block == 0:
        out = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, num_splits, 16):
            rows = s0 + tl.arange(0, 16)
            rows_ok = rows < num_splits
            weight = tl.exp2(
                tl.load(part_max_ptr + head * num_splits + rows, mask=rows_ok, other=float("-inf")) - safe_top
            )
            acc = tl.load(
                part_acc_ptr + (head * num_splits + rows)[:, None] * HEAD_DIM + dims[None, :],
                mask=rows_ok[:, None] & dim_ok[None, :],
                other=0.0,
            )
            out += tl.sum(acc * weight[:, None], axis=0)
        tl.store(out_ptr + head * so_h + dims * so_d, (out * inv_total).to(out_ptr.dtype.element_ty), mask=dim_ok)
    if RETURN_PROBS:
        length = tl.load(len_ptr + head // group) if HAS_LENGTHS else num_slots
        cols = block * BLOCK_R + tl.arange(0, BLOCK_R)
        # Slots past the head's length were never written by decode_split: they read as -inf, i.e. 0.
        s = tl.load(probs_ptr + head * num_slots + cols, mask=cols < length, other=float("-inf"))
        tl.store(probs_ptr + head * num_slots + cols, tl.exp2(s - safe_top) * inv_total, mask=cols < num_slots)
