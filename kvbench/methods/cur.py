from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.engine.cache import KVLayer
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores, ScoringMethod

LEVERAGE_TYPES = ("key", "value", "kv_avg", "kv_product")
# Columns of the optional random projection (kvpress's fixed r).
PROJECTION_RANK = 20


def local_normalise(energy: torch.Tensor, window: int) -> torch.Tensor:
    """`[Hkv, L]` divided by its sum over consecutive windows of `window` slots (the last one zero-padded)."""
    num_heads, length = energy.shape
    padded = F.pad(energy, (0, (window - length % window) % window)).unflatten(1, (-1, window))
    return (padded / padded.sum(dim=-1, keepdim=True)).flatten(1)[:, :length]


def cur_scores(
    keys: torch.Tensor,
    values: torch.Tensor,
    leverage_type: str,
    local_window: int | None,
    projection: torch.Tensor | None = None,
) -> torch.Tensor:
    """CurDKV's scores `[Hkv, L]` (fp32, each head's summing to 1) of keys / values `[Hkv, L, d]`: the squared row
    norms (after the optional `projection [d, r]`), normalised per local window unless `local_window` is None,
    combined by `leverage_type` (key, value, their mean or their product), then normalised over the sequence."""
    keys, values = keys.float(), values.float()
    if projection is not None:
        keys, values = keys @ projection, values @ projection
    k2, v2 = keys.square().sum(dim=-1), values.square().sum(dim=-1)
    if local_window is not None:
        k2, v2 = local_normalise(k2, local_window), local_normalise(v2, local_window)
    scores = {"key": k2, "value": v2, "kv_avg": (k2 + v2) / 2, "kv_product": k2 * v2}[leverage_type]
    return scores / scores.sum(dim=-1, keepdim=True)


@register_method("cur")
@dataclass
class CUR(ScoringMethod):
    """CurDKV (Sengupta, Chaudhary and Chakraborty, 2025, "Value-Guided KV Compression for LLMs via Approximated CUR
    Decomposition", arXiv 2509.15038; kvpress `CURPress`).

    CUR decomposition keeps the rows of highest leverage; CurDKV approximates the leverage of keys and values by
    their squared row norms (optionally after a Gaussian projection to 20 dims, `use_random_leverage`),
    normalised within local windows of `local_window_size` slots (`use_local_approximation`), combined by
    `leverage_type` (key | value | kv_avg | kv_product) and normalised over the sequence. The first `num_sinks`
    slots are always kept. Each KV head keeps its `budget` best. Query-agnostic, attention-free.

    Paper vs peer: kvbench follows kvpress's press (its row-norm proxy and local windows); the projection is
    drawn from the run seed and the layer index (kvpress: the global RNG), and sinks score +inf (kvpress: 1.0,
    the most any other slot can reach).

    Hyperparameters (kvpress defaults): num_sinks=4, leverage_type=kv_product, use_random_leverage=false,
    use_local_approximation=true, local_window_size=16; decode_budget=null and decode_interval=16 as every scorer.
    """

    num_sinks: int = 4
    leverage_type: str = "kv_product"
    use_random_leverage: bool = False
    use_local_approximation: bool = True
    local_window_size: int = 16

    def validate(self) -> None:
        if self.leverage_type not in LEVERAGE_TYPES:
            raise ValueError(f"unknown leverage_type '{self.leverage_type}'. Valid: {', '.join(LEVERAGE_TYPES)}.")
        if self.local_window_size < 1:
            raise ValueError(f"cur needs local_window_size >= 1, got {self.local_window_size}")

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        keys, values = layer.keys[0], layer.values[0]
        projection = None
        if self.use_random_leverage:
            generator = torch.Generator().manual_seed(ctx.seed * 1_000_003 + layer_idx)
            projection = torch.randn((keys.shape[-1], PROJECTION_RANK), generator=generator) / math.sqrt(
                PROJECTION_RANK
            )
            projection = projection.to(keys.device)
        window = self.local_window_size if self.use_local_approximation else None
        scores = cur_scores(keys, values, self.leverage_type, window, projection)
        scores[:, : self.num_sinks] = float("inf")
        return LayerScores(scores)
