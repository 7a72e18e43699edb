"""Observation-window scores: how much attention the last prompt queries pay to each key, per KV head.

For window queries `[H, w, d]` and keys `[Hkv, T, d]`: softmax each query row over the keys it may see
(key position <= query position; padding slots never), reduce each key's column over the window rows (sum
or max), then over each GQA group of query heads (mean or max): `[Hkv, T]` fp32. SnapKV, PyramidKV, AdaKV
and H2O's prefill score keys this way.

The torch reference is `window_attention` + row reduction + `aggregate_gqa` (`window_attention.py`), the one
definition of the function; it materialises `[H, w, T]` fp32 probabilities. The Triton version never does:
pass 1 computes each row's max and sum of exponentials (split along T, then combined), pass 2 recomputes
the logits block by block and accumulates the normalised columns. Extra memory: the row statistics
(`O(H * w * splits)`) besides the `[Hkv, T]` output.
"""

from __future__ import annotations

import torch

from kvbench.engine.kernels.dispatch import dot_in_fp32, multiprocessors, on_first_tensor_device, resolve_kernels
from kvbench.engine.kernels.window_attention import GQA_AGGREGATIONS, aggregate_gqa, window_attention

WINDOW_REDUCTIONS = ("sum", "max")


def _check_args(queries: torch.Tensor, keys: torch.Tensor, reduce: str, gqa_agg: str) -> None:
    if reduce not in WINDOW_REDUCTIONS:
        raise ValueError(f"unknown reduce '{reduce}'. Valid reduces: {', '.join(WINDOW_REDUCTIONS)}.")
    if gqa_agg not in GQA_AGGREGATIONS:
        raise ValueError(f"unknown gqa_agg '{gqa_agg}'. Valid gqa_aggs: {', '.join(GQA_AGGREGATIONS)}.")
    if queries.dim() != 3 or keys.dim() != 3 or queries.shape[-1] != keys.shape[-1]:
        raise ValueError(
            f"expected queries [H, w, d] and keys [Hkv, T, d], got {tuple(queries.shape)}, {tuple(keys.shape)}"
        )
    if queries.shape[0] % keys.shape[0]:
        raise ValueError(f"query heads ({queries.shape[0]}) must be a multiple of KV heads ({keys.shape[0]})")


def window_scores_torch(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float,
    reduce: str = "sum",
    gqa_agg: str = "mean",
    num_scored: int | None = None,
) -> torch.Tensor:
    """Reference: the shared scoring helpers, `[Hkv, num_scored or T]` fp32."""
    _check_args(queries, keys, reduce, gqa_agg)
    probs = window_attention(queries, keys, query_positions, key_positions, scaling)
    if num_scored is not None:
        probs = probs[..., :num_scored]
    per_query_head = probs.sum(dim=1) if reduce == "sum" else probs.amax(dim=1)
    return aggregate_gqa(per_query_head, keys.shape[0], gqa_agg)


@on_first_tensor_device
def window_scores_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float,
    reduce: str = "sum",
    gqa_agg: str = "mean",
    num_scored: int | None = None,
    block_n: int = 64,
    block_m: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """Two-pass Triton kernel, same function as `window_scores_torch`.

    `block_n`: keys per block; `block_m`: window rows per pass-1 tile (default: all rows of a GQA group, at
    most 128); `num_splits`: pass-1 chunks along T (default: enough programs for the device).
    """
    from kvbench.engine.kernels import triton_window_scores as kernels

    _check_args(queries, keys, reduce, gqa_agg)
    num_heads, window, head_dim = queries.shape
    num_kv_heads, num_keys, _ = keys.shape
    group = num_heads // num_kv_heads
    rows = group * window
    device = keys.device
    num_scored = num_keys if num_scored is None else max(0, min(num_scored, num_keys))
    out = torch.empty((num_kv_heads, num_scored), dtype=torch.float32, device=device)
    if num_scored == 0:
        return out
    query_positions = query_positions.to(device=device, dtype=torch.int64).contiguous()
    key_positions = key_positions.to(device=device, dtype=torch.int64)
    block_d = max(16, _next_power_of_2(head_dim))
    block_m = block_m or min(128, max(16, _next_power_of_2(rows)))
    block_w = min(64, max(16, _next_power_of_2(window)))
    row_blocks = -(-rows // block_m)
    key_blocks = -(-num_keys // block_n)
    scored_blocks = -(-num_scored // block_n)
    if num_splits is None:
        num_splits = -(-2 * multiprocessors(device) // (num_kv_heads * row_blocks))
    num_splits = max(1, min(num_splits, key_blocks))
    chunk = -(-key_blocks // num_splits) * block_n
    num_splits = -(-num_keys // chunk)
    partial_max = torch.empty((num_kv_heads, num_splits, rows), dtype=torch.float32, device=device)
    partial_sum = torch.empty_like(partial_max)
    row_max = torch.empty((num_kv_heads, rows), dtype=torch.float32, device=device)
    row_sum = torch.empty_like(row_max)
    fp32_dot = dot_in_fp32(queries.dtype)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_FP32=fp32_dot, num_warps=num_warps)
    scale_log2e = scaling * kernels.LOG2E
    kernels.window_row_stats[(num_kv_heads, row_blocks, num_splits)](
        queries, keys, query_positions, key_positions, partial_max, partial_sum,
        num_keys, window, group, rows, chunk, num_splits, scale_log2e,
        *queries.stride(), *keys.stride(), *key_positions.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, **common,
    )  # fmt: skip
    kernels.window_combine_stats[(num_kv_heads, row_blocks)](
        partial_max, partial_sum, row_max, row_sum, rows, num_splits, BLOCK_M=block_m, num_warps=num_warps
    )
    kernels.window_columns[(num_kv_heads, scored_blocks)](
        queries, keys, query_positions, key_positions, row_max, row_sum, out,
        num_scored, window, group, rows, scale_log2e,
        *queries.stride(), *keys.stride(), *key_positions.stride(),
        BLOCK_W=block_w, BLOCK_N=block_n, REDUCE_MAX=reduce == "max", GQA_MAX=gqa_agg == "max", **common,
    )  # fmt: skip
    return out


def window_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float,
    reduce: str = "sum",
    gqa_agg: str = "mean",
    num_scored: int | None = None,
    impl: str = "torch",
) -> torch.Tensor:
    """Per-KV-head window scores `[Hkv, T]` fp32 (see the module docstring); `impl`: auto, triton or torch.

    queries `[H, w, d]` (post-RoPE), keys `[Hkv, T, d]`, query_positions `[w]`, key_positions `[Hkv, T]`
    (`PAD_POSITION` for padding). `num_scored`: score only the first n keys, `[Hkv, n]` (the softmax still
    spans all T; SnapKV skips its window, which it keeps anyway). A row that sees no key at all has no
    softmax: the reference gives NaN, the Triton kernel zeros; SnapKV-style windows always see themselves.
    """
    args = (queries, keys, query_positions, key_positions, scaling, reduce, gqa_agg, num_scored)
    if impl not in ("torch", "triton"):  # runs pass the mode they resolved once (`RunOptions.resolved`)
        impl = resolve_kernels(impl, keys.device)
    if impl == "triton":
        return window_scores_triton(*args)
    return window_scores_torch(*args)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
