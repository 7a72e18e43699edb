from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.kernels.window_attention import GQA_AGGREGATIONS, aggregate_gqa, window_attention
from kvbench.methods.base import CompressionContext, Method, register_method
from kvbench.methods.scoring import keep_with_window

H2O_SCORE = "h2o_score"  # layer.extras key: attention accumulated per slot, follows the slot through evictions
# fp32 attention probabilities materialised per chunk of query rows (64 MiB): bounds prefill memory.
MAX_CHUNK_ELEMENTS = 1 << 24


def accumulated_attention(
    queries: torch.Tensor,
    layer: KVLayer,
    query_positions: torch.Tensor,
    scaling: float,
    gqa_agg: str = "mean",
    max_chunk_elements: int = MAX_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Attention that queries `[H, q, d]` pay to each slot of `layer`, summed over the queries, `[Hkv, L]`.

    Softmax in fp32 over the visible slots (by original position); each query row's probabilities are
    aggregated over the GQA group (`gqa_agg`) and then summed over rows. Rows are processed in chunks so at
    most `max_chunk_elements` probabilities exist at once (never T x T for a long prompt).
    """
    num_heads, num_queries = queries.shape[0], queries.shape[1]
    keys = layer.keys[0]
    rows = max(1, max_chunk_elements // (num_heads * keys.shape[1]))
    total = torch.zeros((layer.num_heads, keys.shape[1]), dtype=torch.float32, device=keys.device)
    for start in range(0, num_queries, rows):
        chunk = slice(start, start + rows)
        probs = window_attention(queries[:, chunk], keys, query_positions[chunk], layer.positions, scaling)
        total += aggregate_gqa(probs, layer.num_heads, gqa_agg).sum(dim=1)
    return total


class PromptAttentionSums:
    """Prefill observer: per layer, the attention every prompt query pays to each prompt slot, `[Hkv, T]`."""

    def __init__(self, gqa_agg: str) -> None:
        self.gqa_agg = gqa_agg
        self.sums: dict[int, torch.Tensor] = {}

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        sums = accumulated_attention(query[0], layer, query_positions, scaling, self.gqa_agg)
        previous = self.sums.get(layer_idx)
        if previous is not None:  # chunked prefill: earlier chunks' rows, over the slots they could see
            sums[:, : previous.shape[1]] += previous
        self.sums[layer_idx] = sums


class SlotAttentionScores:
    """Chunked-prefill observer: adds each chunk's attention to the per-slot score in `layer.extras`, which
    follows the slots through the evictions between chunks (memory grows with the budget, not the prompt)."""

    def __init__(self, gqa_agg: str) -> None:
        self.gqa_agg = gqa_agg

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        if H2O_SCORE not in layer.extras:  # first chunk: the layer was created by this forward
            layer.extras[H2O_SCORE] = torch.zeros(layer.positions.shape, dtype=torch.float32, device=layer.device)
        layer.extras[H2O_SCORE] += accumulated_attention(query[0], layer, query_positions, scaling, self.gqa_agg)


def keep_heavy_and_recent(layer: KVLayer, budget: int, recent: int) -> None:
    """Keep the `recent` last slots and the top-(budget - recent) accumulated scores among the others."""
    length = layer.get_seq_length()
    if length <= budget:
        return
    scores = layer.extras[H2O_SCORE][:, : length - recent]
    layer.keep(keep_with_window(scores, budget, recent))


class DecodeAccumulator:
    """Decode-time H2O: after each layer's attention, add the new queries' attention to the slots' scores and
    evict the lowest-scoring non-recent slots once the layer exceeds the budget."""

    def __init__(self, budget: int, recent: int, gqa_agg: str) -> None:
        self.budget, self.recent, self.gqa_agg = budget, recent, gqa_agg

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        layer.extras[H2O_SCORE] += accumulated_attention(query[0], layer, query_positions, scaling, self.gqa_agg)
        keep_heavy_and_recent(layer, self.budget, self.recent)


@register_method("h2o")
@dataclass
class H2O(Method):
    """H2O, Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative
    Inference of Large Language Models"; FMInference/H2O, `h2o_hf/utils_real_drop`).

    Each slot's score is the attention it has received, summed (unnormalised) over every query so far: all
    prompt rows (summed in row chunks during the prefill) and then every later query. GQA: each query row's
    probabilities are aggregated over the group (`gqa_agg`) before summing. Each KV head keeps the
    `recent = int(budget * recent_ratio)` most recent slots plus the top-(budget - recent) "heavy hitters"
    among the older slots. Compresses at the end of prefill; with `decode_evict=true` (the paper's real-drop
    H2O) every later forward adds its queries' attention to the kept slots' scores right after the layer's
    attention and evicts back to the budget (one slot per decode step once full), as the official code does;
    the layer holds budget + 1 slots only inside that one attention call. `decode_evict=false` is
    KVCache-Factory's prefill-only variant (generated tokens appended).

    Chunked prefill (`prefill_chunk`): every chunk's queries add their attention, over the slots kept so far
    plus the chunk, to the per-slot scores (`SlotAttentionScores`), and each layer is cut back to its recent +
    heavy slots after every chunk. A slot's score then counts the queries that saw it (as at decode time),
    not every prompt row as in the one-shot prefill.

    Hyperparameters: recent_ratio=0.5 (heavy = recent = budget / 2; the paper's default is 10% + 10% of the
    prompt), decode_evict=true, gqa_agg=mean.
    """

    compresses_bounded_layers: ClassVar[bool] = False  # attention sums sized by the prompt

    supports_chunked_prefill: ClassVar[bool] = True
    keeps_slot_subset: ClassVar[bool] = True
    plain_kv_layers: ClassVar[bool] = True
    batchable: ClassVar[bool] = True  # tested (decode_evict=true, per-row batches): tests/test_batched.py

    recent_ratio: float = 0.5
    decode_evict: bool = True
    gqa_agg: str = "mean"

    def validate(self) -> None:
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1], got {self.recent_ratio}")
        if self.gqa_agg not in GQA_AGGREGATIONS:
            raise ValueError(f"unknown gqa_agg '{self.gqa_agg}'. Valid gqa_aggs: {', '.join(GQA_AGGREGATIONS)}.")

    def recent(self, budget: int) -> int:
        return int(budget * self.recent_ratio)

    def prefill_observer(self) -> PromptAttentionSums:
        return PromptAttentionSums(self.gqa_agg)

    def chunked_prefill_observer(self) -> SlotAttentionScores:
        return SlotAttentionScores(self.gqa_agg)

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        sums = ctx.prefill_stats
        if isinstance(sums, PromptAttentionSums):  # after a chunked prefill the scores are already on the slots
            for layer_idx, layer in enumerate(cache.layers):
                layer.extras[H2O_SCORE] = sums.sums[layer_idx].clone()
        if self.decode_evict:
            cache.observers.append(DecodeAccumulator(ctx.budget, self.recent(ctx.budget), self.gqa_agg))

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        for layer in cache.layers:
            keep_heavy_and_recent(layer, ctx.budget, self.recent(ctx.budget))
