"""Observation-window attention in plain torch: the one definition of the probabilities window scorers read
(SnapKV, PyramidKV, AdaKV, H2O's prefill, TOVA, ...) and the reference of the fused `window_scores` kernel.
Softmax statistics are fp32; the cache is never expanded across a GQA group."""

from __future__ import annotations

import torch

GQA_AGGREGATIONS = ("mean", "max")


def aggregate_gqa(scores: torch.Tensor, num_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """Reduce per-query-head scores `[H, ...]` to per-KV-head scores `[Hkv, ...]` over each GQA group."""
    grouped = scores.unflatten(0, (num_kv_heads, scores.shape[0] // num_kv_heads))
    if how == "mean":
        return grouped.mean(dim=1)
    if how == "max":
        return grouped.amax(dim=1)
    raise ValueError(f"unknown gqa_agg '{how}'. Valid gqa_aggs: {', '.join(GQA_AGGREGATIONS)}.")


def window_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities of window queries `[H, w, d]` over keys `[Hkv, T, d]`, `[H, w, T]`.

    Causal by original position (key visible iff key position <= query position), fp32. Query head h
    attends with KV head h // g, the cache is never expanded. `bias` `[Hkv, T]`: a per-slot logit bias added
    to every query's logit (a cache's `extras["logit_bias"]`).
    """
    num_heads, num_kv_heads = queries.shape[0], keys.shape[0]
    group = num_heads // num_kv_heads
    q = queries.float().unflatten(0, (num_kv_heads, group))
    logits = torch.einsum("hgwd,htd->hgwt", q, keys.float()) * scaling
    if bias is not None:
        logits = logits + bias.float()[:, None, None, :]
    # Query positions come from the model's first device; a layer of a model split over devices keeps its own.
    visible = key_positions[:, None, None, :] <= query_positions.to(key_positions.device)[None, None, :, None]
    logits = logits.masked_fill(~visible, float("-inf"))
    return logits.softmax(dim=-1).flatten(0, 1)
