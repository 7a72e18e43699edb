from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.cache import KVCache
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scoring import mask_to_indices, round_preserving_sum
from kvbench.methods.wrapped import ScorerWrapper


def head_budgets(scores: torch.Tensor, selectable: int, alpha: float) -> list[int]:
    """AdaKV's per-head budgets for one layer; they sum to exactly `Hkv * selectable`.

    The layer's top `Hkv * selectable` scores across all heads give each head a count n_h; the budget mixes it
    with the uniform share: n_h * (1 - alpha) + alpha * selectable, rounded so that the sum is preserved.
    """
    num_heads, length = scores.shape
    total = num_heads * selectable
    order = torch.sort(scores.flatten().float(), descending=True, stable=True).indices[:total]
    counts = torch.bincount(torch.div(order, length, rounding_mode="floor"), minlength=num_heads)
    mixed = [float(n) * (1.0 - alpha) + alpha * selectable for n in counts.tolist()]
    return round_preserving_sum(mixed, total)


def adaptive_keep_mask(scores: torch.Tensor, budgets: list[int], protected: int) -> torch.Tensor:
    """Boolean keep mask `[Hkv, n + protected]`: each head's top-b_h scored slots plus the protected tail."""
    num_heads, length = scores.shape
    ranks = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros((num_heads, length + protected), dtype=torch.bool, device=scores.device)
    for head, budget in enumerate(budgets):
        mask[head, ranks[head, :budget]] = True
    mask[:, length:] = True
    return mask


@register_method("adakv")
@dataclass
class AdaKV(ScorerWrapper):
    """Ada-KV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
    Efficient LLM Inference"), as a wrapper over any scoring method (`kvbench.methods.scorer.ScoringMethod`).

    Per layer, the base method's scores of all KV heads compete for the layer's Hkv * B' selectable slots
    (B' = layer budget - the base's protected tail, e.g. SnapKV's window); head h wins n_h of them and keeps
    b_h = round(n_h * (1 - alpha) + alpha * B') of its own top-scored slots plus the protected tail. The
    rounding preserves the sum, so every layer holds exactly Hkv * budget entries (the official code rounds
    each head independently and can miss the total by a few). Layer budgets come from the base (uniform for
    SnapKV, pyramidal for PyramidKV: the official "pyram_mode").

    Heads of a layer keep different counts: shorter heads are padded (`KVLayer.keep(..., valid)`), so rows
    report the physical bytes (`kv_bytes`, padding included) and the logical ones (`kv_bytes_logical`).

    Hyperparameters: base=snapkv (any registered ScoringMethod: snapkv, pyramidkv, knorm, ...);
    base_params={} (the base's hyperparameters, e.g. `method.base_params={window:64,pool:avg}` on the command
    line); alpha=0.2 (the official setting for GQA models; the paper's default without GQA is 0.5).
    """

    batchable: ClassVar[bool] = True  # tested: tests/test_batched.py (head-padded layers stack like any other)
    alpha: float = 0.2

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"adakv alpha must be in [0, 1], got {self.alpha}")
        self.refuse_decode_budget()

    def label_extras(self) -> list[str]:
        return [f"alpha={self.alpha}"] if self.alpha != type(self).alpha else []

    def decode_grows_only(self) -> bool:
        """No decode budget (refused); the base's decode-time work, if any, is the base's."""
        return self.inner is None or self.inner.decode_grows_only()

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        budgets = self.layer_budgets(ctx, len(cache.layers))
        per_layer_heads: list[list[int]] = []
        for layer_idx, (layer, budget) in enumerate(zip(cache.layers, budgets, strict=True)):
            if budget >= layer.get_seq_length():
                continue
            verdict = self.layer_scores(layer_idx, layer, budget, ctx)
            selectable = max(0, budget - verdict.protected)
            heads = head_budgets(verdict.scores, selectable, self.alpha)
            per_layer_heads.append(heads)
            layer.keep(*mask_to_indices(adaptive_keep_mask(verdict.scores, heads, verdict.protected)))
        if per_layer_heads:
            flat = [b for heads in per_layer_heads for b in heads]
            ctx.record["adakv_head_budget_min"] = min(flat)
            ctx.record["adakv_head_budget_max"] = max(flat)
