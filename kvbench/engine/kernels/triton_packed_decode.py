"""Triton kernel of `packed_decode_attention` (launched by `kvbench.engine.kernels.packed_decode`).

Pass 1 (`packed_decode_split`), one program per (KV head, chunk of slots), reads each slot's key and value either
from packed b-bit codes (dequantised in registers: code * scale + zero) or from the fp tail, and leaves the same
partial softmax state as `decode_split`; pass 2 is `triton_decode_attention.decode_reduce` unchanged.
Code c of a slot's row starts at bit b*c of the row's bytes (`kvbench.engine.quant.packing`): byte (b*c) // 8,
shift (b*c) % 8, and 3-bit codes may continue in the next byte.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _slots(
    kv, cols, col_ok, dims, dim_ok, num_q,
    codes_ptr, sc_h, sc_t, scale_ptr, zero_ptr, ss_h, ss_a, ss_b, fp_ptr, sf_h, sf_t, sf_d,
    BITS: tl.constexpr, GROUP: tl.constexpr, TOKEN_AXIS: tl.constexpr, HAS_Q: tl.constexpr, HAS_FP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """`[BLOCK_N, BLOCK_D]` fp32: slots `cols` of KV head `kv`, codes below `num_q`, the fp tail from there."""
    x = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if HAS_Q:
        in_q = (col_ok & (cols < num_q))[:, None] & dim_ok[None, :]
        bit = dims * BITS
        byte = bit // 8
        shift = bit % 8
        row = codes_ptr + kv * sc_h + cols[:, None] * sc_t
        word = tl.load(row + byte[None, :], mask=in_q, other=0).to(tl.int32)
        if BITS == 3:  # a 3-bit code may straddle two bytes
            spill = in_q & ((shift + BITS) > 8)[None, :]
            word = word | (tl.load(row + byte[None, :] + 1, mask=spill, other=0).to(tl.int32) << 8)
        code = (word >> shift[None, :]) & ((1 << BITS) - 1)
        if TOKEN_AXIS:  # per-channel groups of GROUP consecutive slots: params [Hkv, n / G, d]
            param = kv * ss_h + (cols // GROUP)[:, None] * ss_a + dims[None, :] * ss_b
        else:  # per-slot groups of GROUP consecutive channels: params [Hkv, n, d / G]
            param = kv * ss_h + cols[:, None] * ss_a + (dims // GROUP)[None, :] * ss_b
        scale = tl.load(scale_ptr + param, mask=in_q, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + param, mask=in_q, other=0.0).to(tl.float32)
        x = tl.where(in_q, code.to(tl.float32) * scale + zero, x)
    if HAS_FP:
        in_fp = (col_ok & (cols >= num_q))[:, None] & dim_ok[None, :]
        offsets = kv * sf_h + (cols - num_q)[:, None] * sf_t + dims[None, :] * sf_d
        x = tl.where(in_fp, tl.load(fp_ptr + offsets, mask=in_fp, other=0.0).to(tl.float32), x)
    return x


@triton.jit
def packed_decode_split(
    q_ptr, valid_ptr, bias_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    kc_ptr, ks_ptr, kz_ptr, kf_ptr, vc_ptr, vs_ptr, vz_ptr, vf_ptr,
    num_slots, num_kq, num_vq, group, chunk, num_splits, scale_log2e,
    sq_h, sq_d, svl_h, svl_t, sb_h, sb_t,
    skc_h, skc_t, sks_h, sks_a, sks_b, skf_h, skf_t, skf_d,
    svc_h, svc_t, svs_h, svs_a, svs_b, svf_h, svf_t, svf_d,
    K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_TOKEN_AXIS: tl.constexpr, K_HAS_Q: tl.constexpr,
    K_HAS_FP: tl.constexpr,
    V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_TOKEN_AXIS: tl.constexpr, V_HAS_Q: tl.constexpr,
    V_HAS_FP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    kv = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < group
    heads = kv * group + g
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + heads[:, None] * sq_h + dims[None, :] * sq_d, mask=g_ok[:, None] & dim_ok[None, :], other=0.0)
    q = q.to(tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, num_slots)
    run_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        k = _slots(
            kv, cols, col_ok, dims, dim_ok, num_kq, kc_ptr, skc_h, skc_t, ks_ptr, kz_ptr, sks_h, sks_a, sks_b,
            kf_ptr, skf_h, skf_t, skf_d, K_BITS, K_GROUP, K_TOKEN_AXIS, K_HAS_Q, K_HAS_FP, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        v = _slots(
            kv, cols, col_ok, dims, dim_ok, num_vq, vc_ptr, svc_h, svc_t, vs_ptr, vz_ptr, svs_h, svs_a, svs_b,
            vf_ptr, svf_h, svf_t, svf_d, V_BITS, V_GROUP, V_TOKEN_AXIS, V_HAS_Q, V_HAS_FP, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        # Dequantised values are fp32; IEEE dots keep the result equal to the fp32 torch reference.
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2e
        visible = col_ok
        if HAS_VALID:
            visible = visible & (tl.load(valid_ptr + kv * svl_h + cols * svl_t, mask=col_ok, other=0) != 0)
        if HAS_BIAS:
            s += tl.load(bias_ptr + kv * sb_h + cols * sb_t, mask=col_ok, other=0.0)[None, :] * 1.4426950408889634
        s = tl.where(visible[None, :], s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp2(run_max - safe_max)
        p = tl.exp2(s - safe_max[:, None])
        run_sum = run_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        run_max = new_max
    part = heads * num_splits + split
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=g_ok[:, None] & dim_ok[None, :])
    tl.store(part_max_ptr + part, run_max, mask=g_ok)
    tl.store(part_sum_ptr + part, run_sum, mask=g_ok)
