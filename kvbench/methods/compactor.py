from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.cache import KVLayer
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.leverage import gaussian_sketch, leverage_scores, pre_rope_keys, zscore
from kvbench.methods.noncausal import NonCausalAttention, recorded_sums
from kvbench.methods.scorer import LayerScores, ScoringMethod
from kvbench.methods.scoring import pool_scores


def sink_split(length: int, start: int, end: int) -> tuple[int, int]:
    """(first, last) slots protected at each end of a layer of `length` slots: the start first (kvpress)."""
    first = min(start, length)
    return first, min(end, max(0, length - first))


@register_method("compactor")
@dataclass
class Compactor(ScoringMethod):
    """Compactor (Chari and Van Durme, 2025, "Compactor: Calibrated Query-Agnostic KV Cache Compression with
    Approximate Leverage Scores", arXiv 2507.08143; kvpress `CompactorPress`).

    The first `sink_size_start` and last `sink_size_end` slots are always kept; the slots between them (the
    middle) are scored by blending the two scorers of `leverage` and `noncausal`, both computed on the middle
    alone (leverage centred over it, non-causal chunks tiled from its first slot, pooling padded at its ends):
    score = blending * z(leverage) + z(non-causal attention x value norm). Each KV head keeps its sinks and its
    best middle slots, `budget` in all (if the budget is below the sinks, the earliest sinks).

    Paper vs peer: as kvpress, blending=null means the compression ratio, here 1 - budget / the layer's length
    (kvpress: "a good heuristic"), and the leverage uses a Cholesky solve; the sinks score +inf (kvpress: the best
    middle score, so a middle slot may tie with them). The non-causal part differs from kvpress as `noncausal`
    does (scaled logits unless `scaled=false`, no padding in the last chunk); the sketch is seeded.

    Hyperparameters (kvpress defaults): sink_size_start=8, sink_size_end=4, chunk_size=256, sketch_dimension=48,
    blending=null, scaled=true. Prefill only: a `decode_budget` is refused.
    """

    compresses_bounded_layers: ClassVar[bool] = False  # its non-causal part scores the one-shot prefill's slots

    sink_size_start: int = 8
    sink_size_end: int = 4
    chunk_size: int = 256
    sketch_dimension: int = 48
    blending: float | None = None
    scaled: bool = True

    def validate(self) -> None:
        if self.chunk_size < 1 or self.sketch_dimension < 1:
            raise ValueError(
                f"compactor needs chunk_size >= 1 and sketch_dimension >= 1, got {self.chunk_size}, "
                f"{self.sketch_dimension}"
            )
        if self.decode_budget is not None:
            raise ValueError("compactor scores the prefill's queries only; decode_budget is not supported")

    def prefill_observer(self) -> NonCausalAttention:
        return NonCausalAttention(self.chunk_size, self.sink_size_start, self.sink_size_end, self.scaled)

    def rope_dependent(self) -> bool:
        return True  # leverage over keys un-rotated with the model's one RoPE

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        length = layer.get_seq_length()
        first, last = sink_split(length, self.sink_size_start, self.sink_size_end)
        middle = slice(first, length - last)
        sums = recorded_sums(ctx.prefill_stats, layer_idx, layer, self.name)
        scores = torch.full(sums.shape, float("inf"), device=sums.device)
        if middle.stop > middle.start:
            keys = pre_rope_keys(layer, ctx, self.name)[:, middle]
            phi = gaussian_sketch(keys.shape[0], keys.shape[-1], self.sketch_dimension, ctx.seed, layer_idx)
            leverage = zscore(leverage_scores(keys, phi))
            attention = sums[:, middle] * layer.values[0, :, middle].float().norm(dim=-1)
            attention = zscore(pool_scores(attention, 3, "avg"))
            blending = self.blending if self.blending is not None else 1.0 - budget / length
            scores[:, middle] = blending * leverage + attention
        return LayerScores(scores)
