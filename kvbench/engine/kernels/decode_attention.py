"""Decode attention: one new query token per head against a compressed cache whose KV heads hold ragged
numbers of slots, optionally returning the per-key probabilities (H2O, TOVA and other decode-time methods
accumulate them, so they need no second pass over the cache).

Visibility of slot j of KV head h: `j < lengths[h]` (when given), `valid[h, j]` (when given), and a finite
`bias[h, j]` (additive logit bias, e.g. a cache's `logit_bias`; -inf hides). A head that sees no slot
returns zeros (output and probabilities). `softcap` caps the scaled logits, `softcap * tanh(s / softcap)`, before the
bias (Gemma 2); `sinks` (`[H]`) are one extra value-less logit per query head in the softmax (gpt-oss).

The Triton version is split-K ("flash-decoding"): the slots of each KV head are cut into chunks, one
program per (KV head, chunk) computes a partial softmax for all query heads of the GQA group at once (each
K/V block is read once), and a reduction pass merges the chunks; with `return_probs` the first pass writes
the logits into the probability buffer and the reduction pass normalises them in place.
"""

from __future__ import annotations

import torch

from kvbench.engine.kernels.dispatch import dot_in_fp32, multiprocessors, on_first_tensor_device, resolve_kernels


def _check_args(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    if query.dim() != 2 or keys.dim() != 3 or values.shape[:2] != keys.shape[:2]:
        raise ValueError(
            f"expected query [H, d], keys/values [Hkv, L, d], got {tuple(query.shape)}, {tuple(keys.shape)}, "
            f"{tuple(values.shape)}"
        )
    if query.shape[0] % keys.shape[0] or query.shape[1] != keys.shape[2]:
        raise ValueError(f"query heads/dim {tuple(query.shape)} do not fit keys {tuple(keys.shape)}")


def visible_slots(
    num_slots: int, lengths: torch.Tensor | None, valid: torch.Tensor | None, num_kv_heads: int, device
) -> torch.Tensor:
    """`[Hkv, L]` bool: slots below each head's length and marked valid."""
    visible = torch.ones((num_kv_heads, num_slots), dtype=torch.bool, device=device)
    if lengths is not None:
        visible &= torch.arange(num_slots, device=device)[None, :] < lengths.to(device)[:, None]
    if valid is not None:
        visible &= valid.to(device=device, dtype=torch.bool)
    return visible


def split_k_plan(
    num_slots: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_n: int,
    num_splits: int | None,
    device: torch.device,
) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """How a split-K decode kernel partitions the slots: (num_splits, chunk slots per split, and the fp32
    partial accumulator / running max / running sum buffers). By default about 4 programs per multiprocessor."""
    slot_blocks = max(1, -(-num_slots // block_n))
    if num_splits is None:
        num_splits = -(-4 * multiprocessors(device) // num_kv_heads)
    num_splits = max(1, min(num_splits, slot_blocks))
    chunk = -(-slot_blocks // num_splits) * block_n
    num_splits = max(1, -(-num_slots // chunk))
    part_acc = torch.empty((num_heads, num_splits, head_dim), dtype=torch.float32, device=device)
    part_max = torch.empty((num_heads, num_splits), dtype=torch.float32, device=device)
    return num_splits, chunk, part_acc, part_max, torch.empty_like(part_max)


def decode_attention_torch(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    lengths: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    return_probs: bool = False,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference with explicit masking in fp32: out `[H, d]` (query dtype), probs `[H, L]` fp32."""
    _check_args(query, keys, values)
    num_kv_heads, num_slots, _ = keys.shape
    group = query.shape[0] // num_kv_heads
    q = query.float().unflatten(0, (num_kv_heads, group))
    logits = torch.einsum("hgd,hld->hgl", q, keys.float()) * scaling
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if bias is not None:
        logits = logits + bias.float()[:, None, :]
    visible = visible_slots(num_slots, lengths, valid, num_kv_heads, keys.device)
    logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    sees_nothing = ~torch.isfinite(logits).any(dim=-1, keepdim=True)
    if sinks is not None:
        sink = sinks.float().to(keys.device).reshape(num_kv_heads, group, 1)
        probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
    else:
        probs = logits.softmax(dim=-1)
    probs = probs.masked_fill(sees_nothing, 0.0)
    out = torch.einsum("hgl,hld->hgd", probs, values.float()).flatten(0, 1).to(query.dtype)
    return (out, probs.flatten(0, 1)) if return_probs else out


@on_first_tensor_device
def decode_attention_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    lengths: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    return_probs: bool = False,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    block_n: int = 64,
    num_splits: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Split-K Triton kernel, same function as `decode_attention_torch`.

    `block_n`: slots per block; `num_splits`: chunks per KV head (default: a few programs per SM).
    """
    from kvbench.engine.kernels import triton_decode_attention as kernels

    _check_args(query, keys, values)
    num_heads, head_dim = query.shape
    num_kv_heads, num_slots, _ = keys.shape
    group = num_heads // num_kv_heads
    device = keys.device
    out = torch.empty((num_heads, head_dim), dtype=query.dtype, device=device)
    probs = torch.empty((num_heads, num_slots), dtype=torch.float32, device=device) if return_probs else out
    num_splits, chunk, part_acc, part_max, part_sum = split_k_plan(
        num_slots, num_heads, num_kv_heads, head_dim, block_n, num_splits, device
    )
    # Unused optional inputs still need a pointer; the constexpr flags compile their loads away.
    lengths_arg = lengths.to(device=device, dtype=torch.int32) if lengths is not None else part_max
    valid_arg = valid.to(device=device, dtype=torch.int8) if valid is not None else part_max
    bias_arg = bias.to(device=device, dtype=torch.float32) if bias is not None else part_max
    # Sinks enter the reduction in the log2 domain, like every logit.
    sinks_arg = (sinks.to(device=device, dtype=torch.float32) * kernels.LOG2E) if sinks is not None else part_max
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    kernels.decode_split[(num_kv_heads, num_splits)](
        query, keys, values, lengths_arg, valid_arg, bias_arg, probs, part_acc, part_max, part_sum,
        num_slots, group, chunk, num_splits, scaling * kernels.LOG2E, float(softcap or 1.0),
        *query.stride(), *keys.stride(), *values.stride(),
        *(valid_arg.stride() if valid is not None else (0, 0)), *(bias_arg.stride() if bias is not None else (0, 0)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_G=max(16, 1 << (group - 1).bit_length()), BLOCK_N=block_n,
        HAS_LENGTHS=lengths is not None, HAS_VALID=valid is not None, HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None, RETURN_PROBS=return_probs, DOT_FP32=dot_in_fp32(query.dtype),
        num_warps=num_warps,
    )  # fmt: skip
    block_r = 1024
    prob_blocks = max(1, -(-num_slots // block_r)) if return_probs else 1
    kernels.decode_reduce[(num_heads, prob_blocks)](
        part_acc, part_max, part_sum, out, probs, lengths_arg, sinks_arg,
        num_slots, group, num_splits, *out.stride(),
        HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS=1 << (num_splits - 1).bit_length(), BLOCK_R=block_r,
        HAS_LENGTHS=lengths is not None, HAS_SINKS=sinks is not None, RETURN_PROBS=return_probs,
        num_warps=num_warps,
    )  # fmt: skip
    return (out, probs) if return_probs else out


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    lengths: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    return_probs: bool = False,
    impl: str = "torch",
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of `query [H, d]` over `keys/values [Hkv, L, d]` (see the module docstring).

    lengths `[Hkv]` int, valid `[Hkv, L]` bool, bias `[Hkv, L]` float, all optional. Returns out `[H, d]` in
    the query dtype, plus probs `[H, L]` fp32 (zero at hidden slots) when `return_probs`. `impl`: auto,
    triton or torch.
    """
    args = (query, keys, values, scaling, lengths, valid, bias, return_probs, softcap, sinks)
    if resolve_kernels(impl, keys.device) == "triton":
        return decode_attention_triton(*args)
    return decode_attention_torch(*args)
