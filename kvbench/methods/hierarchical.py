from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.cache import PAD_POSITION, KVCache, KVLayer
from kvbench.engine.kernels.window_attention import aggregate_gqa, window_attention
from kvbench.methods.base import CompressionContext, Method, register_method
from kvbench.methods.scoring import topk_keep

LEVEL = "hier_level"
COUNT = "hier_count"
NUM_LEVELS = 4
NEW_TOKEN_LEVEL = 1
# Priority = level * LEVEL_WEIGHT + position: lower level first, then older first. Protected slots: maximal.
LEVEL_WEIGHT = 1 << 40
PROTECTED = torch.iinfo(torch.int64).max


def target_levels(counts: torch.Tensor) -> torch.Tensor:
    """Counts -> target level: >= 10 -> 3, 5..9 -> 2, 1..4 -> 1, 0 -> 0."""
    return (counts >= 1).long() + (counts >= 5).long() + (counts >= 10).long()


def topk_hits(probs: torch.Tensor, k: int) -> torch.Tensor:
    """How often each slot is among the top-k of a row: `probs [Hkv, rows, L]` -> counts `[Hkv, L]`.

    Slots a row cannot see (probability 0, e.g. padding or future slots) never count.
    """
    k = min(k, probs.shape[-1])
    top = probs.topk(k, dim=-1)
    hits = torch.zeros_like(probs).scatter_(-1, top.indices, (top.values > 0).to(probs.dtype))
    return hits.sum(dim=1)


def group_attention(query: torch.Tensor, layer: KVLayer, query_positions: torch.Tensor, scaling: float):
    """Attention probabilities of `query [H, q, d]` over the layer's slots, mean over each GQA group,
    `[Hkv, q, L]` (fp32, causal by position, padding hidden)."""
    probs = window_attention(query, layer.keys[0], query_positions, layer.positions, scaling)
    return aggregate_gqa(probs, layer.num_heads, "mean")


class PopularityTracker:
    """Per-cache state of the policy, attached as an attention observer: counts every query row's top-k slots
    and gives freshly appended slots level 1. Lives on the cache, never on the method object."""

    def __init__(self, topk: int) -> None:
        self.topk = topk
        self.fed = 0  # tokens fed after compression (question tail + generated tokens)
        self.window_start = 0  # first position fed since the last profiling window (protected)
        self.profiles = 0

    def on_attention(self, layer_idx, query, layer: KVLayer, query_positions, scaling) -> None:
        fresh = (layer.positions[:, :, None] == query_positions.to(layer.device)[None, None, :]).any(dim=-1)
        layer.extras[LEVEL] = layer.extras[LEVEL].masked_fill(fresh, NEW_TOKEN_LEVEL)
        probs = group_attention(query[0], layer, query_positions, scaling)
        layer.extras[COUNT] = layer.extras[COUNT] + topk_hits(probs, self.topk)


def tracker_of(cache: KVCache) -> PopularityTracker:
    for observer in cache.observers:
        if isinstance(observer, PopularityTracker):
            return observer
    raise RuntimeError("hierarchical: setup() was not called on this cache")


def level_sizes(cache: KVCache) -> list[float]:
    """Mean number of slots per level over layers and KV heads (padding excluded)."""
    sizes = torch.zeros(NUM_LEVELS)
    for layer in cache.layers:
        real = layer.positions != PAD_POSITION
        levels = layer.extras[LEVEL][real].long().cpu()
        sizes += torch.bincount(levels, minlength=NUM_LEVELS)[:NUM_LEVELS].float()
    heads = sum(layer.num_heads for layer in cache.layers)
    return [round(float(v) / heads, 3) for v in sizes]


@register_method("hierarchical")
@dataclass
class Hierarchical(Method):
    """Hierarchical popularity policy (S3-FIFO / MLFQ inspired; from a seed project, no public code).

    State per (layer, KV head, slot) in `layer.extras`: a level 0..3 and a counter c. Each query fed after
    compression (decode steps, and the question tail in compress=context) attends over the cache; per KV
    head (mean over the GQA group) its top-`topk` slots get c += 1. Every `period` fed tokens each slot's
    level moves ONE step toward its target (c >= 10 -> 3, 5..9 -> 2, 1..4 -> 1, 0 -> 0) and c is reset.
    Whenever the cache would exceed the budget, slots are evicted per KV head from the lowest non-empty
    level, oldest (smallest original position) first, protecting the `n_sink` first positions and the tokens
    fed since the last profiling window; protection is best effort: once no unprotected slot is left, the
    oldest recent tokens go, so the budget always holds. New tokens start at level 1.
    Prompt slots start from a prefill profile: the same top-k counting over the last `window` prompt
    queries, mapped through the same thresholds (directly to the target level). Every KV head keeps the
    same number of slots (no padding); masks are per head.

    `method_record["level_sizes"]` = [[fed_tokens, n0, n1, n2, n3], ...] (mean slots per level over layers
    and KV heads, after that step's eviction) at the start, after compression, every `record_every` fed
    tokens and at each profiling window;
    `scripts/plot_popularity.py` draws it.

    Hyperparameters: topk=32, period=40 (W), window=40 (prefill profile rows, the same scale as W), n_sink=4,
    record_every=10, decode_evict=true (false: only the prompt is reduced, by its prefill-profile levels;
    later tokens are appended).
    """

    keeps_slot_subset: ClassVar[bool] = True
    plain_kv_layers: ClassVar[bool] = True

    topk: int = 32
    period: int = 40
    window: int = 40
    n_sink: int = 4
    record_every: int = 10
    decode_evict: bool = True

    def validate(self) -> None:
        if min(self.topk, self.period, self.window, self.record_every) < 1 or self.n_sink < 0:
            raise ValueError("hierarchical needs topk, period, window, record_every >= 1 and n_sink >= 0")

    def window_queries_needed(self) -> int:
        return self.window

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        """Prefill profile -> initial levels of the prompt slots; attach the per-cache tracker."""
        for layer_idx, layer in enumerate(cache.layers):
            queries = ctx.window_queries[layer_idx][:, -self.window :]
            positions = ctx.window_positions[-queries.shape[1] :]
            probs = group_attention(queries, layer, positions, ctx.scaling)
            layer.extras[LEVEL] = target_levels(topk_hits(probs, self.topk)).float()
            layer.extras[COUNT] = torch.zeros_like(layer.extras[LEVEL])
        tracker = PopularityTracker(self.topk)
        tracker.window_start = cache.seen_tokens
        cache.observers.append(tracker)
        ctx.record["level_sizes"] = []
        self.record(cache, ctx, force=True)

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        self.evict(cache, ctx.budget, protect_from=cache.seen_tokens)
        self.record(cache, ctx, force=True)

    def before_forward(self, cache: KVCache, ctx: CompressionContext, num_new: int) -> None:
        tracker = tracker_of(cache)
        profiled = tracker.fed // self.period > tracker.profiles
        if profiled:
            self.promote(cache)
            tracker.profiles = tracker.fed // self.period
            tracker.window_start = cache.seen_tokens
        if self.decode_evict:
            self.evict(cache, ctx.budget - num_new, protect_from=tracker.window_start)
        tracker.fed += num_new
        self.record(cache, ctx, force=profiled)

    def promote(self, cache: KVCache) -> None:
        """End of a profiling window: every level moves one step toward its target; counters reset."""
        for layer in cache.layers:
            level = layer.extras[LEVEL]
            step = torch.sign(target_levels(layer.extras[COUNT]).float() - level)
            layer.extras[LEVEL] = level + step
            layer.extras[COUNT] = torch.zeros_like(layer.extras[COUNT])

    def evict(self, cache: KVCache, capacity: int, protect_from: int) -> None:
        """Shrink every layer to at most `capacity` slots per KV head."""
        capacity = max(capacity, 0)
        for layer in cache.layers:
            length = layer.get_seq_length()
            if length <= capacity:
                continue
            layer.keep(topk_keep(self.keep_priority(layer, protect_from), capacity))

    def keep_priority(self, layer: KVLayer, protect_from: int) -> torch.Tensor:
        """Higher = kept longer. Unprotected: level, then position; then recent (protected) tokens by
        position; sinks last of all."""
        positions = layer.positions
        level = layer.extras[LEVEL].long()
        priority = level * LEVEL_WEIGHT + positions
        recent = positions >= protect_from
        priority = torch.where(recent, NUM_LEVELS * LEVEL_WEIGHT + positions, priority)
        return priority.masked_fill(positions < self.n_sink, PROTECTED)

    def record(self, cache: KVCache, ctx: CompressionContext, force: bool = False) -> None:
        tracker = tracker_of(cache)
        if not force and tracker.fed % self.record_every:
            return
        entry = [tracker.fed, *level_sizes(cache)]
        history = ctx.record.setdefault("level_sizes", [])
        if not history or history[-1] != entry:
            history.append(entry)
