"""TreeKV-R: kvbench's documented reconstruction of TreeKV (arXiv 2501.04987); "R" = reconstructed, not the
paper's code (none was released; the spec's rule is implemented, see `TreeKV`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.methods.base import CompressionContext, Method, register_method
from kvbench.methods.h2o import PromptAttentionSums, accumulated_attention

TREEKV_MASS = "treekv_mass"  # layer.extras: attention mass each slot has received (summed over its queries)
TIE_BREAKS = ("newer", "older")


def sweep_evict(
    scores: list[float], region: tuple[int, int], cursor: int, count: int, tie_break: str = "newer"
) -> tuple[list[int], int, list[tuple[int, int]]]:
    """Evict `count` slots from `scores` (one list per KV head) with the moving pair cursor.

    `region = (start, end)`: the evictable slots are start..end-1 of the CURRENT list (the end moves down by one
    per eviction). The cursor compares slots (start + cursor, start + cursor + 1), evicts the lower score (tie:
    `tie_break`), then advances by one; when the pair would reach past the region's end it wraps to the start.
    Returns the kept original indices, the new cursor and the (survivor, evicted) original-index pairs.
    """
    kept = list(range(len(scores)))
    start, end = region
    pairs: list[tuple[int, int]] = []
    for _ in range(count):
        if end - start < 2:
            raise ValueError(f"treekv: the evictable region holds {end - start} slot(s); raise the budget")
        if start + cursor + 1 >= end:
            cursor = 0
        left, right = start + cursor, start + cursor + 1
        a, b = scores[kept[left]], scores[kept[right]]
        newer_loses = b < a or (b == a and tie_break == "newer")
        drop = right if newer_loses else left
        survivor = left if drop == right else right
        pairs.append((kept[survivor], kept[drop]))
        del kept[drop]
        end -= 1
        cursor += 1
    return kept, cursor, pairs


@register_method("treekv")
@dataclass
class TreeKV(Method):
    """TreeKV-R (R = reconstruction): TreeKV (Li et al., IJCAI 2025, "TreeKV: Smooth Key-Value Cache Compression
    with Tree Structures", arXiv 2501.04987) as documented in kvbench's spec; no official code or algorithm text
    was available, so the cursor rule, sink count and window size are kvbench's choices [UNVERIFIED].

    Fixed cache size B per KV head, in prefill and decoding. Importance a_j = S_j / N_j: the attention mass slot
    j has received (each query's probabilities averaged over the GQA group, summed over queries) over the number
    of queries that saw it (seen tokens - position, as a kept slot was visible to every later query), so old
    slots are not favoured as in H2O. The first `n_sink` slots and the newest `window` (default B // 4, at least
    1) are protected; between them a cursor walks adjacent pairs, evicting the less important slot of each
    (tie: the newer) and advancing by one, wrapping to the region's start. One pass thins a region by half, so
    older context, swept more often, ends sparse and recent context dense ("sparse left, dense right"), with
    importance picking the survivor of each pair. Prefill: the rule runs over the prompt with its attention
    statistics until B slots remain; decoding: one eviction per new token before each forward, the cursor kept
    per (layer, KV head).

    Hyperparameters: n_sink=4, window=null (B // 4), tie_break=newer (newer | older).
    """

    compresses_bounded_layers: ClassVar[bool] = False  # attention mass sized by the prompt

    keeps_slot_subset: ClassVar[bool] = True
    plain_kv_layers: ClassVar[bool] = True

    n_sink: int = 4
    window: int | None = None
    tie_break: str = "newer"

    def validate(self) -> None:
        if self.tie_break not in TIE_BREAKS:
            raise ValueError(f"unknown tie_break '{self.tie_break}'. Valid tie_breaks: {', '.join(TIE_BREAKS)}.")
        if self.n_sink < 0 or (self.window is not None and self.window < 1):
            raise ValueError(f"treekv needs n_sink >= 0 and window >= 1, got {self.n_sink}, {self.window}")

    def protected(self, budget: int) -> tuple[int, int]:
        """(sinks, window) for budget B, shrunk so that at least two slots are evictable at size B + 1."""
        window = max(1, budget // 4) if self.window is None else self.window
        window = min(window, max(1, budget - 1))
        sinks = max(0, min(self.n_sink, budget - window - 1))
        return sinks, window

    def prefill_observer(self) -> PromptAttentionSums:
        return PromptAttentionSums("mean")

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        sums = ctx.prefill_stats
        for idx, layer in enumerate(cache.layers):
            layer.extras[TREEKV_MASS] = sums.sums[idx].clone()
            layer.treekv_cursor = [0] * layer.num_heads
        cache.observers.append(MassAccumulator())

    def evict(self, layer: KVLayer, seen: int, count: int, budget: int) -> None:
        sinks, window = self.protected(budget)
        length = layer.get_seq_length()
        visible = (seen - layer.positions).clamp(min=1).float()
        importance = (layer.extras[TREEKV_MASS] / visible).tolist()
        kept_rows = []
        for head in range(layer.num_heads):
            kept, layer.treekv_cursor[head], _ = sweep_evict(
                importance[head], (sinks, length - window), layer.treekv_cursor[head], count, self.tie_break
            )
            kept_rows.append(kept)
        layer.keep(torch.tensor(kept_rows, device=layer.device))

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        for layer in cache.layers:
            if layer.get_seq_length() > ctx.budget:
                self.evict(layer, cache.seen_tokens, layer.get_seq_length() - ctx.budget, ctx.budget)

    def before_forward(self, cache: KVCache, ctx: CompressionContext, num_new: int) -> None:
        for layer in cache.layers:
            over = layer.get_seq_length() + num_new - ctx.budget
            sinks, window = self.protected(ctx.budget)
            # A question tail longer than the window may leave the layer over budget until the next step.
            count = min(over, layer.get_seq_length() - sinks - window - 1)
            if count > 0:
                self.evict(layer, cache.seen_tokens, count, ctx.budget)


class MassAccumulator:
    """After each layer's attention, adds the new queries' attention to the slots' mass."""

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        layer.extras[TREEKV_MASS] += accumulated_attention(query[0], layer, query_positions, scaling, "mean")
