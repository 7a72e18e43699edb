from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.engine.cache import PAD_POSITION, KVLayer
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores, ScoringMethod


def keydiff_scores(keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """KeyDiff's score of each key `[Hkv, L, d] -> [Hkv, L]`: minus the cosine similarity between the key and the
    anchor, the mean of the head's L2-normalised keys (only the `valid` `[Hkv, L]` slots count). fp32."""
    keys = keys.float()
    unit = torch.nn.functional.normalize(keys, p=2, dim=-1)
    if valid is None:
        anchor = unit.mean(dim=1, keepdim=True)
    else:
        weights = valid.to(unit.dtype)[..., None]
        anchor = (unit * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    return -torch.nn.functional.cosine_similarity(keys, anchor, dim=-1)


@register_method("keydiff")
@dataclass
class KeyDiff(ScoringMethod):
    """KeyDiff (Park, Jones, Morse, Goel, Lee, Lott, 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for
    Long-Context LLM Inference in Resource-Constrained Environments", arXiv 2504.15364; kvpress `KeyDiffPress`).

    Geometrically distinctive keys tend to draw high attention, so each KV head keeps the keys least similar to
    its anchor: the mean of the head's L2-normalised keys; score s_i = -cos(k_i, anchor) (post-RoPE keys, as
    kvpress and the paper). Attention-free and query-agnostic: no window, no sinks or recent slots forced.

    Paper vs peer: the paper evicts block by block while prefilling (the cache never exceeds the budget plus one
    block); kvpress's press scores the whole prompt at once and reaches the paper's mode through its BlockPress.
    kvbench follows the press (one scoring of the whole prompt); the anchor and the score are the paper's.

    Hyperparameters: none of its own; decode_budget=null and decode_interval=16 as every scorer (re-scoring while
    decoding recomputes the anchor over the slots held, the paper's streaming rule).
    """

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        valid = layer.positions != PAD_POSITION
        scores = keydiff_scores(layer.keys[0], valid)
        return LayerScores(scores.masked_fill(~valid, float("-inf")))
