from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.generation import forward_tokens
from kvbench.engine.kernels.window_attention import aggregate_gqa, window_attention
from kvbench.engine.rope import rope_inv_freq, rotate_keys
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores
from kvbench.methods.scoring import SweepShared, pool_scores, shared_slot
from kvbench.methods.snapkv import SnapKV

PSEUDO_MODES = ("forward", "rotate")
PSEUDO_EXTRA = "dapq_pseudo_attention"


class PseudoQueryScorer:
    """Observer of the pseudo-token forward: per layer, each prompt slot's attention from the pseudo queries,
    summed over the pseudo rows, GQA-aggregated, `[Hkv, T]` (softmax over the prompt and the pseudo keys)."""

    def __init__(self, prompt_len: int, gqa_agg: str) -> None:
        self.prompt_len, self.gqa_agg = prompt_len, gqa_agg
        self.scores: dict[int, torch.Tensor] = {}

    def on_attention(self, layer_idx, query, layer: KVLayer, query_positions, scaling) -> None:
        probs = window_attention(query[0], layer.keys[0], query_positions, layer.positions, scaling)
        summed = aggregate_gqa(probs.sum(dim=1), layer.num_heads, self.gqa_agg)
        self.scores[layer_idx] = summed[:, : self.prompt_len]


@register_method("dapq")
@dataclass
class DapQ(SnapKV):
    """DapQ (Tian et al., 2026, "Where Matters More Than What: Decoding-aligned KV Cache Compression via
    Position-aware Pseudo Queries", arXiv 2603.11564).

    SnapKV's selection, but the observation window is replaced by `pseudo_tokens` pseudo queries placed at the
    FUTURE positions T..T+n-1 that the answer will occupy (the paper's finding: a query's position matters
    more than its content for predicting which keys decoding attends to). Scores = attention of the pseudo
    queries over the prompt keys (softmax over the prompt keys, plus the pseudo tokens' own keys, causally,
    in forward mode; fp32), summed over the pseudo rows, GQA-aggregated (`gqa_agg`), pooled (`kernel`, `pool`). Each
    KV head keeps its top-(budget - window) scored slots plus the last `window` prompt slots (kept, as in
    SnapKV, for local context; they are not used as queries). The pseudo tokens never enter the cache.

    Pseudo-token content: the stored copies of the paper available here gave its abstract and summaries
    (positions matter more than content) but not the construction of the pseudo tokens' content, so kvbench
    documents its own choice. `pseudo=rotate` (default): no extra forward; the recorded post-RoPE queries of
    the last n prompt tokens are rotated by +n positions, i.e. exactly the queries those tokens' pre-RoPE
    queries would give at the answer's positions (same "what", future "where"). `pseudo=forward`: the last n
    prompt tokens are re-fed through the model at positions T..T+n-1 on a COPY of the full cache (one extra
    forward of n tokens). On SmolLM2-135M NIAH (1K tokens, compress=prompt, 5 depths, budget 128) rotate kept
    5/5 needles like SnapKV, forward 3/5 (n=32) and 0/5 (n=64), hence the default. The scores do not depend
    on the budget: a sweep computes them once per sample.

    Hyperparameters: pseudo_tokens=32, pseudo=rotate, plus SnapKV's window=32, kernel=7, pool=max,
    gqa_agg=mean.
    """

    needs_fresh_prefill: ClassVar[bool] = True

    pseudo_tokens: int = 32
    pseudo: str = "rotate"

    def rope_dependent(self) -> bool:
        return True

    def validate(self) -> None:
        super().validate()
        if self.pseudo not in PSEUDO_MODES:
            raise ValueError(f"unknown pseudo '{self.pseudo}'. Valid pseudos: {', '.join(PSEUDO_MODES)}.")
        if self.pseudo_tokens < 1:
            raise ValueError(f"dapq pseudo_tokens must be >= 1, got {self.pseudo_tokens}")
        if getattr(self, "decode_budget", None) is not None:
            raise ValueError("dapq compresses at the end of prefill only; decode_budget is not supported")

    def window_queries_needed(self) -> int:
        return self.pseudo_tokens if self.pseudo == "rotate" else 0

    def prefill_observer(self) -> SweepShared:
        return SweepShared()  # the pseudo-query scores do not depend on the budget: computed once per sample

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        """Score the prompt slots with the pseudo queries (only when compression will happen)."""
        super().setup(cache, ctx)
        if ctx.budget >= ctx.prompt_len:
            return
        shared = shared_slot(ctx.prefill_stats)
        key = (ctx.prompt_len, tuple(ctx.input_ids))
        scores = shared.get(key) if shared else None
        if scores is None:
            scores = self.forward_scores(cache, ctx) if self.pseudo == "forward" else self.rotated_scores(cache, ctx)
            if shared:
                shared.put(key, scores)
        else:
            ctx.record["dapq_scores_shared"] = True  # computed by an earlier budget of this sweep
        for layer, layer_scores in zip(cache.layers, scores, strict=True):
            layer.extras[PSEUDO_EXTRA] = layer_scores

    def forward_scores(self, cache: KVCache, ctx: CompressionContext) -> list[torch.Tensor]:
        count = min(self.pseudo_tokens, ctx.prompt_len)
        scratch = cache.copy()  # the pseudo tokens' own K/V land in the copy, never in the compressed cache
        scorer = PseudoQueryScorer(ctx.prompt_len, self.gqa_agg)
        scratch.observers.append(scorer)
        forward_tokens(ctx.lm, scratch, list(ctx.input_ids[-count:]))
        ctx.record["dapq_forward_tokens"] = count
        return [scorer.scores[i] for i in range(len(cache.layers))]

    def rotated_scores(self, cache: KVCache, ctx: CompressionContext) -> list[torch.Tensor]:
        inv_freq = rope_inv_freq(ctx.model)
        count = min(self.pseudo_tokens, ctx.window_positions.shape[0])
        positions = ctx.window_positions[-count:] + count
        scores = []
        for layer, queries in zip(cache.layers, ctx.window_queries, strict=True):
            recent = queries[:, -count:]
            shift = torch.full(recent.shape[:2], count, device=recent.device)
            moved = rotate_keys(recent[None], shift, inv_freq)[0]
            probs = window_attention(moved, layer.keys[0], positions, layer.positions, ctx.scaling)
            scores.append(aggregate_gqa(probs.sum(dim=1), layer.num_heads, self.gqa_agg))
        return scores

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        super().compress(cache, ctx)
        for layer in cache.layers:  # layers that needed no eviction still hold the scores
            layer.extras.pop(PSEUDO_EXTRA, None)

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        """Pooled pseudo-query attention of the slots before the kept window (computed in `setup`)."""
        window = min(self.window, budget)
        pseudo = layer.extras.pop(PSEUDO_EXTRA, None)
        if pseudo is None:
            raise RuntimeError("dapq.layer_scores needs dapq.setup to have run on this cache")
        prefix = layer.get_seq_length() - window
        return LayerScores(pool_scores(pseudo[:, :prefix], self.kernel, self.pool), protected=window)
