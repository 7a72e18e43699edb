from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvbench.engine.cache import PAD_POSITION, KVCache, KVLayer
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.decode_budget import attach_recent_queries, recent_context
from kvbench.methods.scoring import mask_to_indices
from kvbench.methods.wrapped import ScorerWrapper

JUDGED = "threshold_judged"  # per-slot extra: the slot has left the window and survived its one judgement


def threshold_keep_mask(scores: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep mask `[Hkv, L]`: every slot except the candidates (`[Hkv, L]` bool) whose score (`[Hkv, L]`) is below
    `threshold`."""
    return ~(candidates & (scores < threshold))


@register_method("threshold")
@dataclass
class Threshold(ScorerWrapper):
    """Threshold eviction over any scorer (NVIDIA kvpress `DMSPress` without the trained evictors of Dynamic Memory
    Sparsification, Lancucki et al. 2025, arXiv 2506.05345): a slot is judged once, when it leaves the sliding
    window of the `window` most recent positions, and evicted iff its base score is below `threshold`; slots in the
    window are always kept. How much is kept is an OUTCOME, not a budget: the method takes no `budget` (rows have
    budget null) and its `method_record` reports threshold_kept_entries and threshold_kept_fraction (of the
    compressed segment's slots, right after prefill) and, with decoding=true, threshold_decode_evicted.

    At prefill every slot older than the window is judged (after the compressed segment, i.e. also for
    `compress=context`); with decoding=true the slots that leave the window are judged before every later forward
    (question tail, decode steps), scored by the base with the latest queries (`decode_budget`'s recent queries).
    Heads keep different counts (ragged, padded: `kv_bytes` physical, `kv_bytes_logical` the kept slots). The base's
    own protected tail (SnapKV's observation window) is never judged while it is protected. kvpress scores each
    token once with the hidden states of the forward that produced it; kvbench scores the judged slots with the
    base's usual `layer_scores` at judgement time (SnapKV: the last window queries then).

    Hyperparameters: base=snapkv (scores = summed window attention, so the threshold is on that scale; the right
    value depends on the base), base_params={}; threshold=0.05; window=128 (kvpress's sliding_window_size);
    decoding=false (kvpress's default: prefill only).
    """

    compresses_bounded_layers: ClassVar[bool] = False  # its pooled scores need the prompt's slots

    threshold: float = field(default=0.05, metadata={"min": None})  # on the base's scale, which may be negative
    window: int = 128
    decoding: bool = False

    @property
    def takes_budget(self) -> bool:
        """The amount kept follows from the threshold: no budget sweep."""
        return False

    def validate(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"threshold window must be an int >= 0, got {self.window!r}")
        self.refuse_decode_budget()

    def label_extras(self) -> list[str]:
        own = {"threshold": self.threshold, "window": self.window, "decoding": self.decoding}
        return [f"{key}={value}" for key, value in own.items() if getattr(type(self), key) != value]

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        super().setup(cache, ctx)
        if self.decoding:
            attach_recent_queries(cache, ctx, self.window_queries_needed())

    def judge(self, layer_idx: int, layer: KVLayer, seen: int, ctx: CompressionContext) -> int:
        """Judge the layer's slots that are out of the window (position < seen - window) and not judged yet; returns
        how many were evicted."""
        length = layer.get_seq_length()
        if length == 0:
            return 0
        judged = layer.extras.get(JUDGED)
        if judged is None:
            judged = torch.zeros_like(layer.positions, dtype=torch.bool)
        verdict = self.inner.layer_scores(layer_idx, layer, length, self.base_context(ctx))
        scored = verdict.scores.shape[1]
        scores = torch.full(layer.positions.shape, float("inf"), device=layer.device)
        scores[:, :scored] = verdict.scores.float()
        candidates = (layer.positions < seen - self.window) & (layer.positions != PAD_POSITION) & ~judged
        candidates[:, scored:] = False  # the base's protected tail is judged once it is no longer protected
        keep = threshold_keep_mask(scores, candidates, self.threshold)
        layer.extras[JUDGED] = judged | candidates
        evicted = int((~keep & (layer.positions != PAD_POSITION)).sum())
        if evicted:
            layer.keep(*mask_to_indices(keep & (layer.positions != PAD_POSITION)))
        return evicted

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        """No budget: everything happens in `after_compress`."""

    def after_compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        super().after_compress(cache, ctx)
        for layer_idx, layer in enumerate(cache.layers):
            self.judge(layer_idx, layer, cache.seen_tokens, ctx)
        kept = cache.kept_entries()
        slots = ctx.prompt_len * len(cache.layers) * cache.layers[0].num_heads
        ctx.record["threshold_kept_entries"] = kept
        ctx.record["threshold_kept_fraction"] = kept / slots if slots else 0.0

    def before_forward(self, cache: KVCache, ctx: CompressionContext, num_new: int) -> None:
        super().before_forward(cache, ctx, num_new)
        if not self.decoding:
            return
        scoring = recent_context(cache, ctx)
        evicted = sum(self.judge(i, layer, cache.seen_tokens, scoring) for i, layer in enumerate(cache.layers))
        ctx.record["threshold_decode_evicted"] = ctx.record.get("threshold_decode_evicted", 0) + evicted
