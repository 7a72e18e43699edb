from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.kernels.window_attention import window_attention
from kvbench.methods.base import CompressionContext, Method, register_method


def sink_and_recent(length: int, budget: int, n_initial: int, device: torch.device | str) -> torch.Tensor:
    """Slot indices of the first `n_initial` and the last `budget - n_initial` slots (a StreamingLLM window)."""
    sinks = torch.arange(min(n_initial, budget), device=device)
    return torch.cat([sinks, torch.arange(length - (budget - sinks.numel()), length, device=device)])


def lazy_score(layer: KVLayer, queries: torch.Tensor, positions: torch.Tensor, scaling: float, kept: torch.Tensor):
    """The attention the last queries `[H, n, d]` pay to the slots `kept`, averaged over heads and queries."""
    probs = window_attention(queries, layer.keys[0], positions, layer.positions, scaling)  # [H, n, L]
    return float(probs.mean(dim=(0, 1))[kept].sum())


@register_method("simlayerkv")
@dataclass
class SimLayerKV(Method):
    """SimLayerKV (Zhang et al., 2024, "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction",
    arXiv 2410.13846; kvpress SimLayerKVPress).

    "Lazy" layers attend almost only to the first and the most recent tokens. At the end of prefill a layer is
    lazy when the attention its last `n_last` prompt queries pay (averaged over every query head and those
    queries) to the slots a StreamingLLM window would keep exceeds `lazy_threshold`; a lazy layer then keeps
    that window, the `n_initial` first slots and the budget - n_initial most recent ones, every other layer keeps
    its whole cache. The budget is thus the lazy layers' window (kvpress: n_initial + n_recent): the realised total
    is budget x lazy layers + T x the others, reported in `kept_entries` and `method_record`
    (`simlayerkv_lazy_layers`). Generated tokens are appended to every layer (the prefill mode of the paper, as
    kvpress; the paper's decode mode re-decides at every step).

    Where kvbench differs from kvpress: kvpress keeps n_initial + n_recent - n_last slots in a lazy layer and its
    lazy test counts n_recent recent slots; here the test counts and the layer keeps exactly the budget.

    Hyperparameters: lazy_threshold=0.9 (the paper's value for Llama-3; kvpress recommends 0.65 for Llama-2, 0.8
    for Mistral, 0.85 for Qwen and defaults to 1.0, which disables it), n_last=1 (kvpress), n_initial=4.
    """

    keeps_slot_subset: ClassVar[bool] = True
    plain_kv_layers: ClassVar[bool] = True

    lazy_threshold: float = 0.9
    n_last: int = 1
    n_initial: int = 4

    def validate(self) -> None:
        if not 0.0 <= self.lazy_threshold <= 1.0:
            raise ValueError(f"simlayerkv lazy_threshold must be in [0, 1], got {self.lazy_threshold}")
        if self.n_last < 1 or self.n_initial < 0:
            raise ValueError(f"simlayerkv needs n_last >= 1 and n_initial >= 0, got {self.n_last}, {self.n_initial}")

    def window_queries_needed(self) -> int:
        return self.n_last

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        lazy = 0
        for layer_idx, layer in enumerate(cache.layers):
            length = layer.get_seq_length()
            if ctx.budget >= length:
                continue
            kept = sink_and_recent(length, ctx.budget, self.n_initial, layer.device)
            queries = ctx.window_queries[layer_idx][:, -self.n_last :]
            score = lazy_score(layer, queries, ctx.window_positions[-queries.shape[1] :], ctx.scaling, kept)
            if score > self.lazy_threshold:
                layer.keep(kept.expand(layer.num_heads, -1))
                lazy += 1
        ctx.record["simlayerkv_lazy_layers"] = lazy
