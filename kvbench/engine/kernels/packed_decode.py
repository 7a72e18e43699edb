"""Decode attention over a quantised layer: one query token per head against keys and values that are each
stored as packed b-bit codes (`kvbench.engine.quant.UniformSegment`, slots 0..n_q-1) followed by an fp tail, with the
packed and fp boundaries of keys and values independent (KIVI: the key tail holds 0..R-1 slots, the value tail R).

`packed_decode_attention_torch` dequantises and calls `decode_attention_torch` (the reference); the Triton
version dequantises inside the kernel, so the codes are read once and no fp copy of the cache is made.
`valid` / `bias` as in `kvbench.engine.kernels.decode_attention`.
"""

from __future__ import annotations

import torch

from kvbench.engine.kernels.decode_attention import decode_attention_torch, split_k_plan
from kvbench.engine.kernels.dispatch import on_first_tensor_device, resolve_kernels
from kvbench.engine.quant.segments import UniformSegment

# (key codes, key fp tail, value codes, value fp tail): `QuantKVLayer.packed_operands()`
PackedOperands = tuple[UniformSegment | None, torch.Tensor | None, UniformSegment | None, torch.Tensor | None]


def _materialize(codes: UniformSegment | None, tail: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    parts = ([codes.materialize(dtype)] if codes is not None else []) + ([tail.to(dtype)] if tail is not None else [])
    return torch.cat(parts, dim=1)


def packed_decode_attention_torch(
    query: torch.Tensor,
    operands: PackedOperands,
    scaling: float,
    valid: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: dequantise to fp32, then `decode_attention_torch`. Returns `[H, d]` in the query dtype."""
    kq, kf, vq, vf = operands
    keys, values = _materialize(kq, kf, torch.float32), _materialize(vq, vf, torch.float32)
    return decode_attention_torch(query, keys, values, scaling, valid=valid, bias=bias)


def _tensor_args(codes: UniformSegment | None, tail: torch.Tensor | None, dummy: torch.Tensor) -> tuple:
    """Pointers and strides of one of keys/values for the kernel (dummies for missing parts)."""
    if codes is not None:
        ptrs = (codes.packed, codes.scale, codes.zero)
        strides = (codes.packed.stride(0), codes.packed.stride(1), *codes.scale.stride())
    else:
        ptrs, strides = (dummy, dummy, dummy), (0, 0, 0, 0, 0)
    fp = tail if tail is not None else dummy
    fp_strides = tail.stride() if tail is not None else (0, 0, 0)
    return ptrs, strides, fp, fp_strides


@on_first_tensor_device
def packed_decode_attention_triton(
    query: torch.Tensor,
    operands: PackedOperands,
    scaling: float,
    valid: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    block_n: int = 32,
    num_splits: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """Split-K Triton kernel reading packed codes; same function as `packed_decode_attention_torch`."""
    from kvbench.engine.kernels import triton_decode_attention, triton_packed_decode

    kq, kf, vq, vf = operands
    num_heads, head_dim = query.shape
    num_kq = kq.num_slots if kq is not None else 0
    num_vq = vq.num_slots if vq is not None else 0
    num_slots = num_kq + (kf.shape[1] if kf is not None else 0)
    if num_slots != num_vq + (vf.shape[1] if vf is not None else 0):
        raise ValueError("keys and values hold different numbers of slots")
    num_kv_heads = (kq.packed if kq is not None else kf).shape[0]
    group = num_heads // num_kv_heads
    device = query.device
    out = torch.empty((num_heads, head_dim), dtype=query.dtype, device=device)
    num_splits, chunk, part_acc, part_max, part_sum = split_k_plan(
        num_slots, num_heads, num_kv_heads, head_dim, block_n, num_splits, device
    )
    valid_arg = valid.to(device=device, dtype=torch.int8) if valid is not None else part_max
    bias_arg = bias.to(device=device, dtype=torch.float32) if bias is not None else part_max
    (kc, ks, kz), k_strides, k_fp, kf_strides = _tensor_args(kq, kf, part_max)
    (vc, vs, vz), v_strides, v_fp, vf_strides = _tensor_args(vq, vf, part_max)
    block_d = max(16, 1 << (head_dim - 1).bit_length())

    def meta(codes: UniformSegment | None, tail: torch.Tensor | None) -> tuple:
        if codes is None:
            return 8, 1, False, False, tail is not None
        return codes.bits, codes.group_size, codes.axis == "token", True, tail is not None

    k_bits, k_group, k_token, k_has_q, k_has_fp = meta(kq, kf)
    v_bits, v_group, v_token, v_has_q, v_has_fp = meta(vq, vf)
    triton_packed_decode.packed_decode_split[(num_kv_heads, num_splits)](
        query, valid_arg, bias_arg, part_acc, part_max, part_sum,
        kc, ks, kz, k_fp, vc, vs, vz, v_fp,
        num_slots, num_kq, num_vq, group, chunk, num_splits, scaling * triton_decode_attention.LOG2E,
        *query.stride(), *(valid_arg.stride() if valid is not None else (0, 0)),
        *(bias_arg.stride() if bias is not None else (0, 0)),
        *k_strides, *kf_strides, *v_strides, *vf_strides,
        K_BITS=k_bits, K_GROUP=k_group, K_TOKEN_AXIS=k_token, K_HAS_Q=k_has_q, K_HAS_FP=k_has_fp,
        V_BITS=v_bits, V_GROUP=v_group, V_TOKEN_AXIS=v_token, V_HAS_Q=v_has_q, V_HAS_FP=v_has_fp,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_G=max(16, 1 << (group - 1).bit_length()), BLOCK_N=block_n,
        HAS_VALID=valid is not None, HAS_BIAS=bias is not None, num_warps=num_warps,
    )  # fmt: skip
    triton_decode_attention.decode_reduce[(num_heads, 1)](
        part_acc, part_max, part_sum, out, part_max, part_max, part_max,
        num_slots, group, num_splits, *out.stride(),
        HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS=1 << (num_splits - 1).bit_length(), BLOCK_R=16,
        HAS_LENGTHS=False, HAS_SINKS=False, RETURN_PROBS=False, num_warps=num_warps,
    )  # fmt: skip
    return out


def packed_decode_attention(
    query: torch.Tensor,
    operands: PackedOperands,
    scaling: float,
    valid: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    impl: str = "torch",
) -> torch.Tensor:
    """Attention of `query [H, d]` over packed keys/values (see the module docstring); `impl`: auto/triton/torch."""
    if resolve_kernels(impl, query.device) == "triton":
        return packed_decode_attention_triton(query, operands, scaling, valid, bias)
    return packed_decode_attention_torch(query, operands, scaling, valid, bias)
