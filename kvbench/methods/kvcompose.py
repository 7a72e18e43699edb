from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.cache import IndexMappedObserver, KVCache, KVLayer
from kvbench.engine.generation import forward_tokens
from kvbench.engine.kernels.window_attention import aggregate_gqa, window_attention
from kvbench.methods.base import CompressionContext, Method, register_method
from kvbench.methods.scoring import SweepShared, mask_to_indices, require_one_slot_per_token, sweep_shared_scores

AGGREGATIONS = ("max", "mean")
# Added to the first `keep_token_lower_bound` composite scores so that every layer keeps at least that many.
LOWER_BOUND_BONUS = 1e9


class SecondPassScorer:
    """Observer of the extra pass (the segment's tokens fed again after its own cache): per layer, the attention
    each of the first `length` slots receives from the pass's queries, aggregated over the queries (`task`: max
    or mean), per query head `[H, length]`. The softmax runs over every visible key (the first copy and the
    pass's own causal keys); query rows are taken in blocks so the fp32 probabilities stay small."""

    def __init__(self, length: int, task: str, row_block: int = 256) -> None:
        self.length, self.task, self.row_block = length, task, row_block
        self.scores: dict[int, torch.Tensor] = {}

    def on_attention(self, layer_idx, query, layer: KVLayer, query_positions, scaling) -> None:
        queries = query[0]  # [H, n, d]
        rows = queries.shape[1]
        keys, positions = layer.keys[0], layer.positions
        query_positions = query_positions.to(layer.device)
        total = None
        for lo in range(0, rows, self.row_block):
            probs = window_attention(
                queries[:, lo : lo + self.row_block],
                keys,
                query_positions[lo : lo + self.row_block],
                positions,
                scaling,
            )[..., : self.length]
            block = probs.amax(dim=1) if self.task == "max" else probs.sum(dim=1)
            total = block if total is None else (torch.maximum(total, block) if self.task == "max" else total + block)
        self.scores[layer_idx] = total if self.task == "max" else total / rows


def aggregate(scores: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    """Mean or max of `scores` along `dim`."""
    return scores.amax(dim=dim) if how == "max" else scores.mean(dim=dim)


def composite_scores(scores: torch.Tensor, agg_head: str, lower_bound: int) -> torch.Tensor:
    """KVCompose's composite-token scores `[L, T]` from per-head slot scores `[L, Hkv, T]`: composite token j of a
    layer is every head's j-th best slot, scored by `agg_head` (mean or max) of those heads' j-th best scores; the
    first `lower_bound` composites get a large bonus; layer 0's composites are the maximum over all layers (so the
    first layer is never compressed more than any other, as kvpress does)."""
    ranked = torch.sort(scores.float(), dim=-1, descending=True).values
    composite = aggregate(ranked, agg_head, dim=1)
    composite[:, :lower_bound] += LOWER_BOUND_BONUS
    composite[0] = composite.amax(dim=0)
    return composite


def global_counts(scores: torch.Tensor, total: int) -> torch.Tensor:
    """How many of each row's entries are among the `total` highest of all rows `[R, T]` (ties to the earlier
    entry), `[R]`."""
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices[:total]
    return torch.bincount(torch.div(order, scores.shape[-1], rounding_mode="floor"), minlength=scores.shape[0])


def head_top_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean `[Hkv, T]`: each head's `counts[h]` best slots by its own scores (ties to the earlier slot)."""
    ranks = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    keep = torch.arange(scores.shape[-1], device=scores.device)[None, :] < counts.to(scores.device)[:, None]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter(-1, ranks, keep)


@register_method("kvcompose")
@dataclass
class KVCompose(Method):
    """KVCompose (Akulov et al., 2025, "KVCompose: Efficient Structured KV Cache Compression with Composite
    Tokens", arXiv 2509.05165), following kvpress's `KVComposePress`.

    Scoring needs one extra pass: the compressed segment's tokens are fed again on a scratch copy of the freshly
    prefilled cache (kvpress feeds the context again when no question is registered), and each of the segment's
    T slots is scored per query head by the attention it receives from those queries (`agg_task`: max or mean
    over the queries; softmax over every visible key, fp32), reduced over the GQA group (`agg_group`). With
    `add_v_norm` a slot's score is multiplied by its value's L2 norm; with `add_mean_across_heads` the mean over
    the layer's KV heads is added to every head's scores (stabilises the ranking).

    Composite tokens (`structured=true`, the paper's method): each KV head sorts its slots by its own score;
    composite token j of a layer is the set of every head's j-th best slot, scored by `agg_head` (mean or max)
    over the heads. One global top-(budget x L) over all layers' composite scores gives each layer its count
    c_l (layer 0's composite scores are the elementwise maximum over layers, as kvpress: the first layer keeps the
    most), and every head of layer l keeps its own c_l best slots: the heads hold equal counts (a plain,
    unpadded cache) but different token positions. Layer budgets vary; the total is exactly budget x L x Hkv.
    `structured=false` (kvpress's unstructured variant): one global top-(budget x L x Hkv) over every head's
    sorted scores, so each head keeps its own count (ragged heads, padded; physical and logical bytes reported).
    `keep_token_lower_bound`: every layer (structured) or head keeps at least that many slots.

    Cost: one extra forward of T tokens over a cache of T slots. During it the job holds its uncompressed cache
    (T slots per layer) plus the scratch copy, grown to 2T (kvpress grows its one cache to ~2T in place); the
    sum is recorded as `transient_kv_bytes` and counted in the row's `kv_bytes_peak`. The scores do not depend
    on the budget: a budget sweep computes them once per sample (later rows say kvcompose_scores_shared=true and
    report the same transient peak, the cost of one compression at their budget). Only a freshly prefilled
    prompt is compressed; generated tokens are appended uncompressed.

    Where kvpress and kvbench differ: ties go to the earlier slot (kvpress's topk / argsort leave them to the
    kernel); the scores are fp32 (kvpress: the model's eager attention dtype).

    Hyperparameters (kvpress's defaults): structured=true, agg_task=max, agg_group=mean, agg_head=mean,
    add_v_norm=false, add_mean_across_heads=true, keep_token_lower_bound=0.
    """

    compresses_bounded_layers: ClassVar[bool] = False  # its second pass scores every prompt token of every layer

    needs_fresh_prefill: ClassVar[bool] = True
    keeps_slot_subset: ClassVar[bool] = True  # every head keeps a subset of its slots, unchanged
    plain_kv_layers: ClassVar[bool] = True

    structured: bool = True
    agg_task: str = "max"
    agg_group: str = "mean"
    agg_head: str = "mean"
    add_v_norm: bool = False
    add_mean_across_heads: bool = True
    keep_token_lower_bound: int = 0

    def validate(self) -> None:
        for name in ("agg_task", "agg_group", "agg_head"):
            if getattr(self, name) not in AGGREGATIONS:
                raise ValueError(
                    f"unknown kvcompose {name} '{getattr(self, name)}'. Valid {name}s: {', '.join(AGGREGATIONS)}."
                )
        if self.keep_token_lower_bound < 0:
            raise ValueError(f"kvcompose keep_token_lower_bound must be >= 0, got {self.keep_token_lower_bound}")

    def prefill_observer(self) -> SweepShared:
        return SweepShared()  # the scores do not depend on the budget: one extra pass per sample

    def extra_pass(self, cache: KVCache, ctx: CompressionContext) -> tuple[torch.Tensor, int]:
        """Per-query-head scores `[L, H, T]` of the segment's slots from the second pass, and the bytes held while
        it ran (the job's cache plus the grown scratch copy)."""
        scorer = SecondPassScorer(ctx.prompt_len, self.agg_task)
        # A layer subset (hybrid / sliding models) is a view: the pass runs through a copy of the whole cache and
        # the scorer sees the view's layers under the view's numbering.
        indices = getattr(cache, "indices", None)
        whole = cache.base if indices is not None else cache
        scratch = whole.copy()
        mapped = None if indices is None else IndexMappedObserver([scorer], {real: i for i, real in enumerate(indices)})
        scratch.observers.append(scorer if mapped is None else mapped)
        forward_tokens(ctx.lm, scratch, list(ctx.input_ids))
        transient = whole.kv_bytes() + scratch.kv_bytes()
        del scratch
        return torch.stack([scorer.scores[i] for i in range(len(cache.layers))]), transient

    def head_scores(self, cache: KVCache, ctx: CompressionContext) -> torch.Tensor:
        """Per-KV-head slot scores `[L, Hkv, T]` (group aggregation, value norms, head mean), from the extra pass."""
        started = time.perf_counter()
        per_query_head, transient = self.extra_pass(cache, ctx)
        ctx.record["kvcompose_forward_tokens"] = len(ctx.input_ids)
        ctx.record["kvcompose_seconds"] = time.perf_counter() - started
        ctx.record["transient_kv_bytes"] = transient
        scores = torch.stack([aggregate_gqa(layer, ctx.num_kv_heads, self.agg_group) for layer in per_query_head])
        return self.enhance(scores, [layer.values[0, :, : ctx.prompt_len] for layer in cache.layers])

    def enhance(self, scores: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
        """kvpress's score enhancements on `[L, Hkv, T]`: x the value norms, + the mean over the layer's heads."""
        scores = scores.float().clone()
        if self.add_v_norm:
            scores *= torch.stack([v.float().norm(dim=-1) for v in values]).to(scores.device)
        if self.add_mean_across_heads:
            scores += scores.mean(dim=1, keepdim=True)
        return scores

    def keep_masks(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """Boolean `[L, Hkv, T]` of the kept slots for `budget` entries per KV head and layer on average."""
        num_layers, num_heads, length = scores.shape
        if self.structured:
            counts = global_counts(
                composite_scores(scores, self.agg_head, self.keep_token_lower_bound), budget * num_layers
            )
            counts = counts[:, None].expand(num_layers, num_heads)
        else:
            ranked = torch.sort(scores, dim=-1, descending=True).values
            ranked[..., : self.keep_token_lower_bound] += LOWER_BOUND_BONUS
            counts = global_counts(ranked.flatten(0, 1), budget * num_layers * num_heads).view(num_layers, num_heads)
        return torch.stack([head_top_mask(scores[i], counts[i]) for i in range(num_layers)])

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        require_one_slot_per_token("kvcompose", cache.layers, ctx.prompt_len)
        scores = sweep_shared_scores(ctx, "kvcompose", lambda: self.head_scores(cache, ctx))
        masks = self.keep_masks(scores, ctx.budget)
        per_layer = masks.sum(dim=-1)
        ctx.record["kvcompose_layer_budget_min"] = int(per_layer.min())
        ctx.record["kvcompose_layer_budget_max"] = int(per_layer.max())
        for layer, mask in zip(cache.layers, masks, strict=True):
            layer.keep(*mask_to_indices(mask.to(layer.device)))
