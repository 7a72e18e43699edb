from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.engine.cache import PAD_POSITION, KVLayer
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.expected_attention import QueryStatistics, average_rotation
from kvbench.methods.scorer import LayerScores, ScoringMethod


def capacity_scores(
    anchor: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scored: torch.Tensor, tau: float, epsilon: float
) -> torch.Tensor:
    """CapKV's scores `[Hkv, L]` (fp32, GQA mean) of the `scored` `[Hkv, L]` slots; other slots score 0.

    `anchor [H, d]` is each query head's query anchor, `keys`/`values [Hkv, L, d]`. Per query head:
    w_i = exp(tau cos(anchor, k_i) - max), A = I + sum_i (w_i + epsilon) v_i v_i^T over the scored slots,
    s_i = w_i v_i^T A^-1 v_i (the value is the output-direction proxy u_i)."""
    num_heads, num_kv_heads = anchor.shape[0], keys.shape[0]
    group = num_heads // num_kv_heads
    keys = keys.float().repeat_interleave(group, dim=0)
    values = values.float().repeat_interleave(group, dim=0)
    mask = scored.repeat_interleave(group, dim=0)
    cosine = torch.einsum("hd,hld->hl", F.normalize(anchor.float(), dim=-1), F.normalize(keys, dim=-1))
    logits = (tau * cosine.clamp(-1.0, 1.0)).masked_fill(~mask, float("-inf"))
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp().nan_to_num(0.0)
    scale = (weights + epsilon) * mask
    capacity = torch.eye(values.shape[-1], device=values.device) + torch.einsum(
        "hl,hld,hle->hde", scale, values, values
    )
    solved = torch.linalg.solve(capacity, values.transpose(1, 2))  # A^-1 v_i, [H, d, L]
    leverage = (values.transpose(1, 2) * solved).sum(dim=1)
    return (weights * leverage).unflatten(0, (num_kv_heads, group)).mean(dim=1)


@register_method("cap")
@dataclass
class Cap(ScoringMethod):
    """CapKV (arXiv 2604.25975, "Rethinking KV Cache Eviction via a Unified Information-Theoretic Objective";
    kvpress `CapPress`).

    Under a linear-Gaussian surrogate of attention the information kept by a subset of slots is a log-determinant
    capacity; CapKV approximates each slot's contribution by a weighted leverage score. The query anchor of each
    head is the mean of its pre-RoPE prompt queries (the first `n_sink` positions left out), rotated by the RoPE
    matrix averaged over the next `n_future_positions` positions (as Expected Attention). A slot's relevance is
    w_i = exp(tau cos(anchor, k_i)) (shifted by the maximum), the capacity matrix A = I + sum (w_i + epsilon)
    v_i v_i^T over the non-sink slots, and the score s_i = w_i v_i^T A^-1 v_i, averaged over the GQA group. The
    first `n_sink` positions are always kept. Each KV head keeps its `budget` best. Query-aware through the
    prompt's queries (agnostic to the question in compress=context).

    Paper vs peer: kvbench follows kvpress's press, which departs from the paper in ways its docstring lists:
    keys and anchor L2-normalised (the paper: raw dot products), a per-head max shift, the averaged future RoPE
    rotation of the anchor, and the value v_i as the output-direction proxy; sinks score +inf (kvpress: the best
    score + 1).

    Hyperparameters (kvpress defaults): tau=5.0, n_future_positions=512, n_sink=4, epsilon=1e-6;
    decode_budget=null and decode_interval=16 as every scorer (the prompt's anchor is reused, rotated from the next
    position).
    """

    tau: float = 5.0
    n_future_positions: int = 512
    n_sink: int = 4
    epsilon: float = 1e-6

    def rope_dependent(self) -> bool:
        return True  # future queries are rotated with the model's one RoPE

    def validate(self) -> None:
        if self.n_future_positions < 1 or self.epsilon < 0:
            raise ValueError(
                f"cap needs n_future_positions >= 1 and epsilon >= 0, got {self.n_future_positions}, {self.epsilon}"
            )

    def prefill_observer(self) -> QueryStatistics:
        return QueryStatistics(self.n_sink)

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        stats: QueryStatistics = ctx.prefill_stats
        keys, values = layer.keys[0], layer.values[0]
        head_dim = keys.shape[-1]
        mean, _ = stats.moments(layer_idx, ctx.num_heads, head_dim)
        padding = layer.positions == PAD_POSITION
        next_position = int(layer.positions.masked_fill(padding, -1).max()) + 1
        future = torch.arange(next_position, next_position + self.n_future_positions)
        rotation = average_rotation(*stats.rope(future, keys.device), head_dim)
        anchor = mean.to(keys.device) @ rotation.T  # [H, d]
        sinks = layer.positions < self.n_sink
        scores = capacity_scores(anchor, keys, values, ~(sinks | padding), self.tau, self.epsilon)
        return LayerScores(scores.masked_fill(sinks, float("inf")).masked_fill(padding, float("-inf")))
