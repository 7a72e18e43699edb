from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.cache import KVCache
from kvbench.methods.base import CompressionContext, Method, register_method


def keep_recent(cache: KVCache, keep: int, sinks: int = 0) -> None:
    """Keep the first `sinks` slots and the `keep - sinks` most recent ones in every layer and head."""
    for layer in cache.layers:
        length = layer.get_seq_length()
        if length <= keep:
            continue
        head = torch.arange(min(sinks, keep), device=layer.device)
        tail = torch.arange(length - (keep - head.numel()), length, device=layer.device)
        layer.keep(torch.cat([head, tail]).expand(layer.num_heads, -1))


@register_method("window")
@dataclass
class Window(Method):
    """Window-only eviction: keep the last `budget` slots (one of KV-Direct's baselines).

    Breaks once position 0 (the attention sink) is gone, which is what it is there to show. No hyperparameters.
    Chunked prefill: the same rule after every chunk (the one-shot slots; later chunks saw only the window).
    """

    supports_chunked_prefill: ClassVar[bool] = True
    keeps_slot_subset: ClassVar[bool] = True
    plain_kv_layers: ClassVar[bool] = True
    position_only: ClassVar[bool] = True

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        keep_recent(cache, ctx.budget)
