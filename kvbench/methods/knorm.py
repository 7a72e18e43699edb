from __future__ import annotations

from dataclasses import dataclass

from kvbench.engine.cache import PAD_POSITION, KVLayer
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores, ScoringMethod


@register_method("knorm")
@dataclass
class Knorm(ScoringMethod):
    """Knorm (Devoto et al., EMNLP 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression"; NVIDIA kvpress `KnormPress`).

    Keys with a LOW L2 norm tend to receive high attention, so each KV head keeps its `budget` keys with the
    lowest norm (score = -||k||, post-RoPE keys; RoPE preserves the norm). Query-agnostic, needs no attention
    and no observation window; no sinks or recent slots are forced.

    Hyperparameters: none of its own; decode_budget=null and decode_interval=16 as every scorer.
    """

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        scores = -layer.keys[0].float().norm(dim=-1)
        return LayerScores(scores.masked_fill(layer.positions == PAD_POSITION, float("-inf")))
