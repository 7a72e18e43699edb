"""Triton kernels of `window_scores` (launched by `kvbench.engine.kernels.window_scores.window_scores_triton`).

Rows are the window queries of one GQA group flattened to `row = g * w + i` (query head `kv * G + g`,
window index `i`), so one tile covers the whole group and each key block is loaded once per tile.
Logits are kept in the log2 domain (scaled by log2 e) so the kernels use exp2.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _logits(q, k, scale_log2e, DOT_FP32: tl.constexpr):
    """`q [M, D] @ k[N, D]^T` in the log2 domain, fp32 accumulation."""
    if DOT_FP32:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s * scale_log2e


@triton.jit
def window_row_stats(
    q_ptr, k_ptr, qpos_ptr, kpos_ptr, part_max_ptr, part_sum_ptr,
    num_keys, window, group, rows, chunk, num_splits, scale_log2e,
    sq_h, sq_w, sq_d, sk_h, sk_t, sk_d, skp_h, skp_t,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Pass 1: per row, max and sum of exp2 of the visible logits over one chunk of keys."""
    kv = tl.program_id(0)
    row = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    row_ok = row < rows
    g = row // window
    i = row % window
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_offsets = (kv * group + g)[:, None] * sq_h + i[:, None] * sq_w + dims[None, :] * sq_d
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    qpos = tl.load(qpos_ptr + i, mask=row_ok, other=-1)
    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, num_keys)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        k = tl.load(
            k_ptr + kv * sk_h + cols[:, None] * sk_t + dims[None, :] * sk_d,
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        kpos = tl.load(kpos_ptr + kv * skp_h + cols * skp_t, mask=col_ok, other=0)
        visible = col_ok[None, :] & (kpos[None, :] <= qpos[:, None])
        s = tl.where(visible, _logits(q, k, scale_log2e, DOT_FP32), float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        # A row with nothing visible yet keeps max -inf; subtracting 0 instead avoids inf - inf = NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp2(run_max - safe_max) + tl.sum(tl.exp2(s - safe_max[:, None]), axis=1)
        run_max = new_max
    out = (kv * num_splits + split) * rows + row
    tl.store(part_max_ptr + out, run_max, mask=row_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=row_ok)


@triton.jit
def window_combine_stats(
    part_max_ptr, part_sum_ptr, row_max_ptr, row_sum_ptr, rows, num_splits, BLOCK_M: tl.constexpr
):  # fmt: skip
    """Merge the per-chunk row statistics into one max and sum per row."""
    kv = tl.program_id(0)
    row = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = row < rows
    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    for split in range(num_splits):
        offsets = (kv * num_splits + split) * rows + row
        chunk_max = tl.load(part_max_ptr + offsets, mask=row_ok, other=float("-inf"))
        chunk_sum = tl.load(part_sum_ptr + offsets, mask=row_ok, other=0.0)
        new_max = tl.maximum(run_max, chunk_max)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp2(run_max - safe_max) + chunk_sum * tl.exp2(chunk_max - safe_max)
        run_max = new_max
    tl.store(row_max_ptr + kv * rows + row, run_max, mask=row_ok)
    tl.store(row_sum_ptr + kv * rows + row, run_sum, mask=row_ok)


@triton.jit
def window_columns(
    q_ptr, k_ptr, qpos_ptr, kpos_ptr, row_max_ptr, row_sum_ptr, out_ptr,
    num_scored, window, group, rows, scale_log2e,
    sq_h, sq_w, sq_d, sk_h, sk_t, sk_d, skp_h, skp_t,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
    REDUCE_MAX: tl.constexpr, GQA_MAX: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Pass 2: for one block of the first `num_scored` keys, the normalised probabilities reduced over the
    window, then over the GQA group."""
    kv = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < num_scored
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    k = tl.load(
        k_ptr + kv * sk_h + cols[:, None] * sk_t + dims[None, :] * sk_d,
        mask=col_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    kpos = tl.load(kpos_ptr + kv * skp_h + cols * skp_t, mask=col_ok, other=0)
    total = tl.zeros([BLOCK_N], tl.float32)
    for g in range(group):
        head_score = tl.zeros([BLOCK_N], tl.float32)
        for w0 in range(0, window, BLOCK_W):
            i = w0 + tl.arange(0, BLOCK_W)
            i_ok = i < window
            q_offsets = (kv * group + g) * sq_h + i[:, None] * sq_w + dims[None, :] * sq_d
            q = tl.load(q_ptr + q_offsets, mask=i_ok[:, None] & dim_ok[None, :], other=0.0)
            qpos = tl.load(qpos_ptr + i, mask=i_ok, other=-1)
            row_max = tl.load(row_max_ptr + kv * rows + g * window + i, mask=i_ok, other=0.0)
            row_sum = tl.load(row_sum_ptr + kv * rows + g * window + i, mask=i_ok, other=0.0)
            safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
            # Rows that see nothing have sum 0 and no visible p: any finite divisor will do.
            inv_sum = 1.0 / tl.where(row_sum > 0.0, row_sum, 1.0)
            visible = col_ok[None, :] & (kpos[None, :] <= qpos[:, None])
            s = _logits(q, k, scale_log2e, DOT_FP32)
            p = tl.where(visible, tl.exp2(s - safe_max[:, None]) * inv_sum[:, None], 0.0)
            if REDUCE_MAX:
                head_score = tl.maximum(head_score, tl.max(p, axis=0))
            else:
                head_score += tl.sum(p, axis=0)
        if GQA_MAX:
            total = tl.maximum(total, head_score)
        else:
            total += head_score
    if not GQA_MAX:
        total = total / group
    tl.store(out_ptr + kv * num_scored + cols, total, mask=col_ok)
