from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvbench.engine.cache import PAD_POSITION, KVLayer
from kvbench.engine.rope import rope_cos_sin, rotary_embedding, unrotate
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores, ScoringMethod


def average_rotation(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """mean over positions of the RoPE matrices cos_p I + sin_p P (P = rotate-half), as a `[d, d]` matrix;
    dimensions beyond the rotary ones are left unrotated."""
    rotary_dims = cos.shape[-1]
    half = rotary_dims // 2
    mean_cos, mean_sin = cos.mean(dim=0), sin.mean(dim=0)
    rotate = torch.zeros((rotary_dims, rotary_dims), dtype=cos.dtype, device=cos.device)
    rotate[:half, half:] = -torch.eye(half, dtype=cos.dtype, device=cos.device)
    rotate[half:, :half] = torch.eye(half, dtype=cos.dtype, device=cos.device)
    matrix = torch.eye(head_dim, dtype=cos.dtype, device=cos.device)
    matrix[:rotary_dims, :rotary_dims] = torch.diag(mean_cos) + rotate * mean_sin[None, :]
    return matrix


class QueryStatistics:
    """Prefill observer: running sums of the pre-RoPE queries per layer and head (count, sum q, sum q q^T in
    fp64; O(H d^2) memory per layer). Queries at positions < `skip` (attention sinks, outliers) are left out.
    Post-RoPE queries are un-rotated with the model's own rotary module (`bind_model`)."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.rotary: torch.nn.Module | None = None
        self.scaling = 1.0
        self.count: dict[int, int] = {}
        self.sums: dict[int, torch.Tensor] = {}
        self.outer_sums: dict[int, torch.Tensor] = {}

    def bind_model(self, lm: Any) -> None:
        self.rotary = rotary_embedding(lm.model)

    def rope(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[n, r]` (fp32) of the model's RoPE at `positions`."""
        return rope_cos_sin(self.rotary, positions.to(device))

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        if self.rotary is None:
            raise RuntimeError("QueryStatistics.bind_model(lm) must be called before the prefill")
        self.scaling = scaling
        query_positions = query_positions.to(query.device)  # a layer of a multi-device model: its own device
        kept = query_positions >= self.skip
        if not bool(kept.any()):
            return
        cos, sin = self.rope(query_positions[kept], query.device)
        pre_rope = unrotate(query[0][:, kept].float(), cos, sin).double()  # [H, n, d]
        self.count[layer_idx] = self.count.get(layer_idx, 0) + pre_rope.shape[1]
        sums, outer = pre_rope.sum(dim=1), torch.einsum("hnd,hne->hde", pre_rope, pre_rope)
        if layer_idx in self.sums:
            sums, outer = sums + self.sums[layer_idx], outer + self.outer_sums[layer_idx]
        self.sums[layer_idx], self.outer_sums[layer_idx] = sums, outer

    def moments(self, layer_idx: int, num_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean `[H, d]` and (biased) covariance `[H, d, d]` of the layer's pre-RoPE queries (zeros if none)."""
        count = self.count.get(layer_idx, 0)
        if count == 0:
            return torch.zeros(num_heads, head_dim), torch.zeros(num_heads, head_dim, head_dim)
        mean = self.sums[layer_idx] / count
        covariance = self.outer_sums[layer_idx] / count - mean[:, :, None] * mean[:, None, :]
        return mean.float(), covariance.float()


@register_method("expected_attention")
@dataclass
class ExpectedAttention(ScoringMethod):
    """Expected Attention (Devoto et al., 2025, "Expected Attention: KV Cache Compression by Estimating
    Attention from Future Queries Distribution"; NVIDIA kvpress `ExpectedAttentionPress`).

    Models future queries as Gaussian: mean mu and covariance S of each head's pre-RoPE prompt queries
    (skipping the first `n_sink`), rotated by the RoPE matrix averaged over the next `n_future_positions`
    positions (R_bar; mu' = R_bar mu, S' = R_bar S R_bar^T). A key's expected logit is
    z = s mu'.k + s^2 k^T S' k / 2 (s = the attention scaling, 1/sqrt(d) on Llama: kvpress's
    mu'.k/sqrt(d) + k^T S' k/(2d)); softmax over the non-sink keys, mean over the GQA group, then
    score = (p + epsilon) * ||v||. The first `n_sink` positions are always kept. Query-agnostic in
    compress=context (the statistics come from the context alone); needs no attention weights.

    Hyperparameters (kvpress defaults): n_future_positions=512, n_sink=4, use_covariance=true,
    use_vnorm=true, epsilon=0.0; decode_budget=null and decode_interval=16 as every scorer (at decode time the
    prompt statistics are reused and the averaged rotation starts at the next position).
    """

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def rope_dependent(self) -> bool:
        return True

    def validate(self) -> None:
        if self.n_future_positions < 1 or self.n_sink < 0 or self.epsilon < 0:
            raise ValueError(
                "expected_attention needs n_future_positions >= 1, n_sink >= 0 and epsilon >= 0, got "
                f"{self.n_future_positions}, {self.n_sink}, {self.epsilon}"
            )

    def prefill_observer(self) -> QueryStatistics:
        return QueryStatistics(self.n_sink)

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        stats: QueryStatistics = ctx.prefill_stats
        keys, values = layer.keys[0].float(), layer.values[0].float()  # [Hkv, L, d]
        num_kv_heads, _, head_dim = keys.shape
        mean, covariance = stats.moments(layer_idx, ctx.num_heads, head_dim)
        padding = layer.positions == PAD_POSITION
        next_position = int(layer.positions.masked_fill(padding, -1).max()) + 1
        future = torch.arange(next_position, next_position + self.n_future_positions)
        rotation = average_rotation(*stats.rope(future, keys.device), head_dim)
        mean = (mean.to(keys.device) @ rotation.T).unflatten(0, (num_kv_heads, -1))  # [Hkv, g, d]
        scale = stats.scaling
        logits = scale * torch.einsum("hgd,hld->hgl", mean, keys)
        if self.use_covariance:
            covariance = (rotation @ covariance.to(keys.device) @ rotation.T).unflatten(0, (num_kv_heads, -1))
            quadratic = torch.einsum("hld,hgde,hle->hgl", keys, covariance, keys)
            logits = logits + scale * scale * quadratic / 2
        sinks = layer.positions < self.n_sink
        logits = logits.masked_fill((sinks | padding)[:, None, :], float("-inf"))
        probs = logits.softmax(dim=-1).nan_to_num(0.0).mean(dim=1)  # [Hkv, L]
        scores = (probs + self.epsilon) * values.norm(dim=-1) if self.use_vnorm else probs
        scores = scores.masked_fill(sinks, float("inf")).masked_fill(padding, float("-inf"))
        return LayerScores(scores)
