"""Scoring methods: rank each layer's slots and keep the best ones (`ScoringMethod`), with the per-layer
verdict type (`LayerScores`). Decode-time budgets for every scorer live in `kvbench.methods.decode_budget`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.methods.base import CompressionContext, Method
from kvbench.methods.decode_budget import attach_recent_queries, check_decode_budget, enforce_decode_budget
from kvbench.methods.scoring import keep_with_window


@dataclass
class LayerScores:
    """A scorer's verdict on one layer: higher = more worth keeping."""

    scores: torch.Tensor  # [Hkv, n] for slots 0..n-1
    protected: int = 0  # the trailing slots n..L-1 (e.g. the observation window) are always kept


@dataclass
class ScoringMethod(Method):
    """A method that ranks each layer's slots; `compress` keeps, per KV head, the protected tail plus the
    top-(budget - protected) scored slots. Wrappers (AdaKV, decode-time budgets) reuse `layer_scores`.

    Every scorer also takes `decode_budget` (null: generated tokens are appended uncompressed) and
    `decode_interval`: during generation each layer stays within `decode_budget` slots per KV head, re-scored
    down to `decode_budget - decode_interval` when full (see `kvbench.methods.decode_budget`). Subclasses that
    override `setup` or `before_forward` call the parent's.
    """

    keeps_slot_subset: ClassVar[bool] = True  # keeps the top-scored slots (`keep`), unchanged
    plain_kv_layers: ClassVar[bool] = True

    # Keyword-only so that subclasses' own fields keep their positional order.
    decode_budget: int | None = field(default=None, kw_only=True)
    decode_interval: int = field(default=16, kw_only=True)

    def __post_init__(self) -> None:
        check_decode_budget(self.decode_budget, self.decode_interval)

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        if self.decode_budget is not None:
            attach_recent_queries(cache, ctx, self.window_queries_needed())

    def before_forward(self, cache: KVCache, ctx: CompressionContext, num_new: int) -> None:
        if self.decode_budget is not None:
            enforce_decode_budget(self, cache, ctx, num_new, self.decode_budget, self.decode_interval)

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        raise TypeError(f"{type(self).__name__} must implement layer_scores")

    def layer_budgets(self, ctx: CompressionContext, num_layers: int) -> list[int]:
        """Entries per KV head for each layer (uniform by default)."""
        return [ctx.budget] * num_layers

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        budgets = self.layer_budgets(ctx, len(cache.layers))
        for layer_idx, (layer, budget) in enumerate(zip(cache.layers, budgets, strict=True)):
            if budget >= layer.get_seq_length():
                continue
            verdict = self.layer_scores(layer_idx, layer, budget, ctx)
            layer.keep(self.select(verdict, budget, ctx, layer_idx))

    def select(self, verdict: LayerScores, budget: int, ctx: CompressionContext, layer_idx: int) -> torch.Tensor:
        """Kept slots `[Hkv, n]` of one layer from its scores (top-k plus the protected tail by default)."""
        return keep_with_window(verdict.scores, budget, verdict.protected)
