from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kvbench.engine.cache import KVCache
from kvbench.methods.adakv import adaptive_keep_mask
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores
from kvbench.methods.scoring import mask_to_indices, round_preserving_sum
from kvbench.methods.wrapped import ScorerWrapper


def global_head_budgets(verdicts: list[LayerScores], selectable: list[int], sinks: int) -> list[list[int]]:
    """Per layer and KV head, how many scored slots to keep: the global top sum_l Hkv * selectable_l of the scores,
    each head's scores first normalised to sum 1 over its non-sink slots (the share of that head's utility a slot
    carries; a head with negative scores is first shifted to start at 0); the first `sinks` slots of every head
    come first (share 2, above any share)."""
    flat, owners = [], []
    for layer_idx, verdict in enumerate(verdicts):
        scores = verdict.scores.float().clone()
        scores[:, :sinks] = 0.0
        scores = scores - scores.amin(dim=-1, keepdim=True).clamp(max=0)  # negative scorers (knorm): shift to >= 0
        share = scores / scores.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        share[:, :sinks] = 2.0
        flat.append(share.flatten().cpu())
        heads = torch.arange(scores.shape[0]).repeat_interleave(scores.shape[1])
        owners.append(layer_idx * 1_000_000 + heads)
    total = sum(v.scores.shape[0] * s for v, s in zip(verdicts, selectable, strict=True))
    order = torch.sort(torch.cat(flat), descending=True, stable=True).indices[:total]
    winners = torch.cat(owners)[order]
    return [
        [int((winners == layer_idx * 1_000_000 + head).sum()) for head in range(v.scores.shape[0])]
        for layer_idx, v in enumerate(verdicts)
    ]


def curve_head_budgets(curve: np.ndarray, ratio: float, verdicts: list[LayerScores], selectable: list[int]):
    """Per layer and KV head budgets from an LU-KV curve `[99, L, Hkv]` of prune ratios at compression ratios
    1%..99%: the keep rates of the row for `ratio`, scaled so that each layer keeps exactly Hkv * selectable_l."""
    row = curve[min(98, max(0, round(ratio * 100) - 1))]
    budgets = []
    for layer_idx, (verdict, keep) in enumerate(zip(verdicts, selectable, strict=True)):
        rates = [max(0.0, 1.0 - float(p)) for p in row[layer_idx]]
        total = sum(rates) or 1.0
        heads = round_preserving_sum([r * keep * len(rates) / total for r in rates], keep * len(rates))
        budgets.append([min(b, verdict.scores.shape[1]) for b in heads])
    return budgets


@register_method("lukv")
@dataclass
class LUKV(ScorerWrapper):
    """LU-KV (arXiv 2602.08585, "Predicting Future Utility: Global Combinatorial Optimization for Task-Agnostic KV
    Cache Eviction"; kvpress LUKVPress): per-layer and per-head budgets over any scorer (`method.base`, default
    expected_attention as kvpress), each head keeping its own top-scored slots.

    The paper's budgets are an offline curve per model and scorer (kvpress downloads one `.npy` of shape
    [99, L, Hkv], prune ratios at compression ratios 1%..99%, for Llama-3.1-8B + ExpectedAttention only).
    `curve`: a path to such a file; the row for this prompt's compression ratio gives each head's keep rate,
    scaled so that every layer keeps exactly Hkv x its budget (kvpress rounds per layer and does not free the
    pruned slots: it masks them). `curve: null` (no curve offline, the default) is kvbench's documented choice
    [labelled: not the paper's curve]: the global allocation is solved on this prompt instead, the top
    sum_l Hkv x (budget_l - protected) slots over all layers and heads by the base's scores normalised per head
    (a slot's share of its head's utility), so budgets move across layers and heads; the layer total is no longer
    fixed, the cache total is exact. The first `sink` slots are always kept (kvpress: sink=4, window=1; the base's
    protected tail plays the window).

    Hyperparameters: base=expected_attention, base_params={} (kvpress uses epsilon=0.02), curve=null, sink=4.
    """

    base: str = field(default="expected_attention", kw_only=True)

    curve: str | None = None
    sink: int = 4

    def validate(self) -> None:
        if self.sink < 0:
            raise ValueError(f"lukv sink must be >= 0, got {self.sink}")
        self.refuse_decode_budget()

    def label_extras(self) -> list[str]:
        return [f"curve={self.curve}"] if self.curve else []

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        budgets = self.layer_budgets(ctx, len(cache.layers))
        verdicts, selectable = [], []
        for layer_idx, (layer, budget) in enumerate(zip(cache.layers, budgets, strict=True)):
            verdict = self.layer_scores(layer_idx, layer, min(budget, layer.get_seq_length()), ctx)
            verdict.scores = verdict.scores.float().clone()
            verdict.scores[:, : self.sink] = float("inf")  # within every head's top, whatever its budget
            verdicts.append(verdict)
            selectable.append(max(0, min(budget, layer.get_seq_length()) - verdict.protected))
        if self.curve is not None:
            ratio = 1.0 - ctx.budget / ctx.prompt_len
            heads = curve_head_budgets(np.load(self.curve, allow_pickle=False), ratio, verdicts, selectable)
        else:
            heads = global_head_budgets(verdicts, selectable, self.sink)
        for layer, verdict, layer_heads in zip(cache.layers, verdicts, heads, strict=True):
            if sum(layer_heads) + verdict.protected * len(layer_heads) >= layer.get_seq_length() * len(layer_heads):
                continue
            layer.keep(*mask_to_indices(adaptive_keep_mask(verdict.scores, layer_heads, verdict.protected)))
        flat = [b for layer_heads in heads for b in layer_heads]
        ctx.record["lukv_head_budget_min"] = min(flat)
        ctx.record["lukv_head_budget_max"] = max(flat)
