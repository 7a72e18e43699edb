from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.cache import KVLayer
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.leverage import zscore
from kvbench.methods.scorer import LayerScores, ScoringMethod
from kvbench.methods.scoring import pool_scores


def noncausal_chunk_attention(
    queries: torch.Tensor, keys: torch.Tensor, chunk: int, scaling: float, start: int = 0, end: int = 0
) -> torch.Tensor:
    """Column sums of non-causal attention inside chunks, `[Hkv, L]` (fp32, GQA mean over each group).

    `queries [H, q, d]` are the post-RoPE queries of the layer's last q slots (the whole layer after a one-shot
    prefill), `keys [Hkv, L, d]`. Slots start..L-end-1 are tiled into chunks of `chunk` slots from `start` (the
    last one shorter); every query of a chunk attends to every key of the same chunk, earlier or later (softmax
    of scaling * q.k over the chunk), and each key sums the attention it receives. Slots outside the range score 0.
    """
    num_heads, num_queries = queries.shape[0], queries.shape[1]
    num_kv_heads, length = keys.shape[0], keys.shape[1]
    group = num_heads // num_kv_heads
    first_query = length - num_queries
    sums = torch.zeros((num_kv_heads, length), dtype=torch.float32, device=keys.device)
    for lo in range(start, length - end, chunk):
        hi = min(lo + chunk, length - end)
        rows = slice(max(lo, first_query) - first_query, hi - first_query)
        if rows.stop <= rows.start:
            continue
        block = keys[:, lo:hi].float().repeat_interleave(group, dim=0)  # [H, n, d]
        probs = (scaling * queries[:, rows].float() @ block.transpose(1, 2)).softmax(dim=-1)
        sums[:, lo:hi] = probs.sum(dim=1).unflatten(0, (num_kv_heads, group)).mean(dim=1)
    return sums


class NonCausalAttention:
    """Prefill observer: per layer, `noncausal_chunk_attention` of the prefill's queries over the layer's slots
    (`[Hkv, L]`, budget-independent, shared by a sweep). `start`/`end` leave sinks and recent slots out of the
    tiling (Compactor); `scaled=False` drops the attention scaling (kvpress's unscaled dot products)."""

    def __init__(self, chunk: int, start: int = 0, end: int = 0, scaled: bool = True) -> None:
        self.chunk, self.start, self.end, self.scaled = chunk, start, end, scaled
        self.sums: dict[int, torch.Tensor] = {}

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        length = layer.get_seq_length()
        start, end = min(self.start, length), min(self.end, max(0, length - self.start))
        self.sums[layer_idx] = noncausal_chunk_attention(
            query[0], layer.keys[0], self.chunk, scaling if self.scaled else 1.0, start, end
        )


def recorded_sums(stats: object, layer_idx: int, layer: KVLayer, what: str) -> torch.Tensor:
    """The sums a `NonCausalAttention` observer recorded for a layer, checked against what the layer holds now."""
    sums = stats.sums.get(layer_idx) if isinstance(stats, NonCausalAttention) else None
    if sums is None or sums.shape[-1] != layer.get_seq_length():
        raise ValueError(f"{what} scores the slots of the one-shot prefill it watched; this cache holds other slots")
    return sums


@register_method("noncausal")
@dataclass
class NonCausal(ScoringMethod):
    """Non-causal chunked attention (Chari and Van Durme, 2025, "Compactor: Calibrated Query-Agnostic KV Cache
    Compression with Approximate Leverage Scores", arXiv 2507.08143; kvpress `NonCausalAttnPress`).

    During the prefill every prompt query attends, non-causally, to all keys of its chunk of `chunk_size` slots
    (softmax in fp32); a key's attention summed over the queries (mean over the GQA group) is multiplied by its
    value norm, average-pooled over 3 slots (zero padding counted, as kvpress) and z-normalised over the layer.
    Each KV head keeps its `budget` best. Query-agnostic in compress=context (the context's own queries).

    Paper vs peer: kvpress softmaxes the unscaled dot products q.k and, in its last, padded chunk, fills padding
    keys with -1e-9 instead of -inf (padding then takes attention mass, and padding queries spread uniform
    attention); kvbench uses the model's attention scaling (`scaled=true`; `scaled=false` = kvpress's unscaled
    logits) and a last chunk without padding.

    Hyperparameters: chunk_size=256 (kvpress), scaled=true. Prefill only: a `decode_budget` is refused, as is a
    cache other than the one prefilled (the scores come from the prefill's queries).
    """

    compresses_bounded_layers: ClassVar[bool] = False  # scores the one-shot prefill's slots

    chunk_size: int = 256
    scaled: bool = True

    def validate(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"{self.name} needs chunk_size >= 1, got {self.chunk_size}")
        if self.decode_budget is not None:
            raise ValueError(f"{self.name} scores the prefill's queries only; decode_budget is not supported")

    def prefill_observer(self) -> NonCausalAttention:
        return NonCausalAttention(self.chunk_size, scaled=self.scaled)

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        sums = recorded_sums(ctx.prefill_stats, layer_idx, layer, self.name)
        scores = pool_scores(sums * layer.values[0].float().norm(dim=-1), 3, "avg")
        return LayerScores(zscore(scores))
