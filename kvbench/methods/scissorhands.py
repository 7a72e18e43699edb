from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.engine.cache import KVLayer
from kvbench.engine.kernels.window_attention import window_attention
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores, ScoringMethod


def low_attention_counts(
    queries: torch.Tensor, layer: KVLayer, query_positions: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per KV head and slot, over the history queries `[H, w, d]` of the slot's GQA group: how many times the
    slot was visible and received less than the uniform share 1/t of the query's attention (t = slots that
    query sees), and the attention it received in total. Both `[Hkv, L]`, fp32."""
    probs = window_attention(queries, layer.keys[0], query_positions, layer.positions, scaling)  # [H, w, L]
    num_kv = layer.num_heads
    visible = layer.positions[:, None, :] <= query_positions.to(layer.device)[None, :, None]  # [Hkv, w, L]
    visible = visible.repeat_interleave(probs.shape[0] // num_kv, dim=0)  # [H, w, L]
    share = 1.0 / visible.sum(dim=-1, keepdim=True).clamp(min=1)
    low = (visible & (probs < share)).float().sum(dim=1)  # [H, L]
    received = probs.sum(dim=1)
    return low.unflatten(0, (num_kv, -1)).sum(dim=1), received.unflatten(0, (num_kv, -1)).sum(dim=1)


@register_method("scissorhands")
@dataclass
class Scissorhands(ScoringMethod):
    """Scissorhands (Liu et al., NeurIPS 2023, "Scissorhands: Exploiting the Persistence of Importance Hypothesis
    for LLM KV Cache Compression at Test Time", arXiv 2305.17118).

    Persistence of importance: a token that mattered over the last `history_window` queries keeps mattering. For
    each slot the paper counts, over the history window, how often its attention was BELOW the average 1/t (t =
    the tokens the query sees) and drops the tokens counted most often; the last `recent` slots are never
    dropped. GQA: the count runs over every query head of the KV head's group. Ties between equal counts go to
    the slot that received more attention in the window (a documented choice: the count alone ties often;
    KVCache-Factory's selector ranks by that attention sum alone), then to the earlier slot. The score is
    -count + attention / (w * g + 1), which orders by count first since the attention term is below 1.

    Budget: each KV head keeps the `recent` last slots plus the budget - recent slots of lowest count. The
    paper's fixed-budget generation (compress when the cache holds B tokens, dropping m at once, with the
    attention of the last w steps) is the scorers' decode budget: `decode_budget=B` keeps every layer within B
    slots, re-scoring with the latest `history_window` queries down to B - `decode_interval` (m) when full.

    Hyperparameters: history_window=32 (w), recent=32 (r), plus every scorer's decode_budget (B) and
    decode_interval (m). The paper gives no single default for w and r; these follow SnapKV's window.
    """

    history_window: int = 32
    recent: int = 32

    def validate(self) -> None:
        if self.history_window < 1 or self.recent < 0:
            raise ValueError(
                f"scissorhands needs history_window >= 1 and recent >= 0, got {self.history_window}, {self.recent}"
            )

    def window_queries_needed(self) -> int:
        return self.history_window

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        """-(low-attention count) plus the tie-breaking attention term, for the slots before the recent ones."""
        queries = ctx.window_queries[layer_idx][:, -self.history_window :]
        positions = ctx.window_positions[-queries.shape[1] :]
        low, received = low_attention_counts(queries, layer, positions, ctx.scaling)
        rows = queries.shape[1] * (queries.shape[0] // layer.num_heads)
        recent = min(self.recent, budget)
        prefix = layer.get_seq_length() - recent
        scores = -low + received / (rows + 1)
        return LayerScores(scores[:, :prefix], protected=recent)
