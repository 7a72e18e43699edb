from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.kernels.window_attention import window_attention
from kvbench.methods.base import CompressionContext, Method, register_method
from kvbench.methods.scoring import topk_keep


def keep_top_by_last_query(
    layer: KVLayer, query: torch.Tensor, query_position: torch.Tensor, scaling: float, budget: int
) -> None:
    """Keep the `budget` slots the query `[H, 1, d]` attends to most, averaged over ALL query heads.

    One index set for the whole layer (every KV head keeps the same positions), in original order.
    """
    if layer.get_seq_length() <= budget:
        return
    probs = window_attention(query, layer.keys[0], query_position, layer.positions, scaling)  # [H, 1, L]
    averaged = probs[:, 0].mean(dim=0, keepdim=True)  # [1, L]
    layer.keep(topk_keep(averaged, budget).expand(layer.num_heads, -1))


class LastQueryEvictor:
    """After each layer's attention: while the layer exceeds the budget, keep the top-budget slots by the
    last query's attention (the layer holds budget + new tokens only inside that attention call)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        keep_top_by_last_query(layer, query[0, :, -1:], query_positions[-1:], scaling, self.budget)


@register_method("tova")
@dataclass
class TOVA(Method):
    """TOVA, Token Omission Via Attention (Oren et al., 2024, "Transformers are Multi-State RNNs";
    schwartz-lab-NLP/TOVA).

    After attention at each layer, while the cache exceeds the budget, the slots are ranked by the LAST
    query's attention averaged over ALL query heads of the layer, and the top-budget are kept: one index set
    shared by every KV head, in original order. The prompt is reduced to the budget with the last prompt
    token's attention row (the prefill's per-layer reductions do not change the next layer's inputs, so doing
    it after the prefill is exact); then every decode step evicts one slot right after that layer's attention,
    as the official cache's `reduce` does. No forced sinks or recent window.

    Hyperparameters: decode_evict=true (false: prefill only, the question tail and generated tokens are
    appended, as in harnesses that compress the context once).
    """

    keeps_slot_subset: ClassVar[bool] = True
    plain_kv_layers: ClassVar[bool] = True
    batchable: ClassVar[bool] = True  # tested (decode_evict=true, per-row batches): tests/test_batched.py

    decode_evict: bool = True

    def window_queries_needed(self) -> int:
        return 1

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        if self.decode_evict:
            cache.observers.append(LastQueryEvictor(ctx.budget))

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        last_position = ctx.window_positions[-1:]
        for layer_idx, layer in enumerate(cache.layers):
            last_query = ctx.window_queries[layer_idx][:, -1:]
            keep_top_by_last_query(layer, last_query, last_position, ctx.scaling, ctx.budget)
