from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.cache import KVCache
from kvbench.methods.base import CompressionContext, Method, register_method
from kvbench.methods.scoring import keep_with_window


@register_method("random")
@dataclass
class RandomKeep(Method):
    """Random eviction, the floor every scorer must beat.

    Keeps the `window` most recent slots plus `budget - window` slots drawn uniformly at random per KV head
    and layer from a generator seeded with the run seed.

    Hyperparameters: window=32 (recent slots always kept).
    """

    keeps_slot_subset: ClassVar[bool] = True
    plain_kv_layers: ClassVar[bool] = True
    position_only: ClassVar[bool] = True

    window: int = 32

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        generator = torch.Generator().manual_seed(ctx.seed)
        for layer in cache.layers:
            if layer.get_seq_length() <= ctx.budget:  # a sliding / chunked layer already within the budget
                continue
            window = min(self.window, ctx.budget)
            prefix = layer.get_seq_length() - window
            scores = torch.rand((layer.num_heads, prefix), generator=generator).to(layer.device)
            layer.keep(keep_with_window(scores, ctx.budget, window))
