from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.kernels.window_attention import GQA_AGGREGATIONS, aggregate_gqa, window_attention
from kvbench.methods.base import CompressionContext, Method, register_method

MERGE_MODES = ("bernoulli", "expected")


def merge_probabilities(scores: torch.Tensor, sinks: int, recent: int) -> torch.Tensor:
    """CaM's merge probability of every slot evicted by the start + recent rule: scores `[Hkv, L]` (attention
    received), sinks `[0, sinks)` and the last `recent` slots kept. p_j = A_j / mean(A over the kept slots) of the
    same head, clamped to [0, 1] (an all-zero kept row gives 0; a zero mean with mass on j gives 1). `[Hkv, E]`."""
    length = scores.shape[1]
    kept_mean = torch.cat([scores[:, :sinks], scores[:, length - recent :]], dim=1).float().mean(dim=1)
    ratio = scores[:, sinks : length - recent].float() / kept_mean[:, None]
    return torch.nan_to_num(ratio, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)


def cascade_merge(values: torch.Tensor, weights: torch.Tensor, first: int, merge_budget: int) -> torch.Tensor:
    """Fold the evicted slots `first .. first + E - 1` (in order) into the slots that follow them: values `[Hkv, L, d]`,
    weights `[Hkv, E]` (the merge decision m_j of each evicted slot). Slot j adds m_j v_j / n_j to each of the next
    n_j = min(merge_budget, L - 1 - j) slots; v_j is its value at that moment (what earlier evictions folded into it
    included), so the mass reaches the kept slots. Per head: sum of the kept slots' values afterwards = their sum
    before + sum_j m_j v_j (at eviction). Returns fp32 `[Hkv, L, d]`."""
    merged = values.float().clone()
    length = merged.shape[1]
    for offset in range(weights.shape[1]):
        j = first + offset
        end = min(j + merge_budget, length - 1)
        share = (weights[:, offset] / (end - j))[:, None] * merged[:, j]  # [Hkv, d]
        merged[:, j + 1 : end + 1] += share[:, None, :]
    return merged


def cam_evict(
    layer: KVLayer,
    scores: torch.Tensor,
    budget: int,
    start_ratio: float,
    merge_budget: int,
    merge: str,
    generator: torch.Generator | None,
    record: dict[str, Any],
) -> None:
    """Cut `layer` (one slot order for every head) to `budget` slots: the first int(budget * start_ratio) and the most
    recent rest are kept; every slot between them is evicted in position order, its value merged forward with
    probability p (`merge_probabilities`; `merge=expected` adds p v instead of a Bernoulli draw)."""
    length = layer.get_seq_length()
    if length <= budget:
        return
    sinks = int(budget * start_ratio)
    recent = budget - sinks
    probabilities = merge_probabilities(scores, sinks, recent)
    weights = torch.bernoulli(probabilities, generator=generator) if merge == "bernoulli" else probabilities
    merged = cascade_merge(layer.values[0], weights, sinks, merge_budget)
    kept = torch.cat(
        [torch.arange(sinks, device=layer.device), torch.arange(length - recent, length, device=layer.device)]
    )
    values = merged[:, kept].to(layer.values.dtype)
    layer.keep(kept[None, :].expand(layer.num_heads, -1))
    layer.values = values[None]
    record["cam_evictions"] = record.get("cam_evictions", 0) + int(weights.numel())
    record["cam_merged_weight"] = record.get("cam_merged_weight", 0.0) + float(weights.sum())


def attention_received(
    queries: torch.Tensor, layer: KVLayer, query_positions: torch.Tensor, scaling: float, gqa_agg: str
) -> torch.Tensor:
    """Attention each slot of `layer` receives from queries `[H, q, d]`, GQA-aggregated, averaged over the queries."""
    probs = window_attention(queries, layer.keys[0], query_positions, layer.positions, scaling)
    return aggregate_gqa(probs, layer.num_heads, gqa_agg).mean(dim=1)


class CamDecode:
    """Decode-time CaM: after each layer's attention, a layer over the budget evicts (and merges) back to it with the
    attention the forward's queries paid (the layer holds budget + new tokens only inside that attention call)."""

    def __init__(self, method: Cam, budget: int, seed: int, record: dict[str, Any]) -> None:
        self.method, self.budget, self.seed, self.record = method, budget, seed, record
        self.generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self.generators:
            self.generators[key] = torch.Generator(device=device).manual_seed(self.seed + 1)
        return self.generators[key]

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        if layer.get_seq_length() <= self.budget:
            return
        scores = attention_received(query[0], layer, query_positions, scaling, self.method.gqa_agg)
        m, generator = self.method, self.generator(layer.device)
        cam_evict(layer, scores, self.budget, m.start_ratio, m.merge_budget, m.merge, generator, self.record)


@register_method("cam")
@dataclass
class Cam(Method):
    """CaM (Zhang et al., ICML 2024, "CaM: Cache Merging for Memory-efficient LLMs Inference"; official code
    zyxxmu/cam, KVCache-Factory `CAMKVCluster`): eviction with the evicted VALUES merged into the slots kept.

    Eviction rule (the official code's local/streaming variant): each layer keeps its first int(budget x
    start_ratio) slots and the most recent rest; every slot leaving the recent window is evicted. Its merge
    probability is p = A_e / mean(A over the kept slots) (A: attention the slot receives, per KV head), clamped to
    [0, 1]; a Bernoulli(p) draw m (seeded) decides, and m v_e / n is added to each of the n = min(merge_budget,
    slots after it) following slots. Keys and positions are unchanged; bytes = the kept slots. At the end of prefill
    the evictions run in position order over the prompt with A = the mean attention of the last `window` prompt
    queries (as KVCache-Factory's prefill pass, which also folds forward in a sequential sweep); during the question
    tail and decoding, A is the attention the forward's queries pay, and the layer is cut back right after its
    attention (as h2o's decode eviction). Mass: per head, the kept values' sum grows by exactly sum_e m_e v_e (each
    v_e as it was when evicted, folds it received included), the property the tests check.

    Departures, documented: the official decode code divides by merge_budget even when fewer slots follow (mass
    lost); kvbench divides by the slots that receive. KVCache-Factory's prefill pass normalises by the MAX kept
    score and then keeps SnapKV's top-k, which does not keep the slots the mass was merged into; kvbench keeps the
    merge targets (start + recent) as the paper does. `merge=expected` adds p v_e (the draw's expectation) for a
    deterministic run.

    Hyperparameters: start_ratio=0.1 (KVCache-Factory's start_budget_ratio, here of the budget), merge_budget=32
    (the official code's), window=32 (prefill scoring queries, KVCache-Factory's window_size), merge=bernoulli,
    gqa_agg=mean. Record: cam_evictions, cam_merged_weight (sum of the merge weights m).
    """

    keeps_slot_subset: ClassVar[bool] = False  # kept values are rewritten
    plain_kv_layers: ClassVar[bool] = True

    start_ratio: float = 0.1
    merge_budget: int = 32
    window: int = 32
    merge: str = "bernoulli"
    gqa_agg: str = "mean"

    def validate(self) -> None:
        if not 0.0 <= self.start_ratio < 1.0:
            raise ValueError(f"cam start_ratio must be in [0, 1), got {self.start_ratio}")
        for name in ("merge_budget", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"cam {name} must be an int >= 1, got {value!r}")
        if self.merge not in MERGE_MODES:
            raise ValueError(f"unknown cam merge '{self.merge}'. Valid merges: {', '.join(MERGE_MODES)}.")
        if self.gqa_agg not in GQA_AGGREGATIONS:
            raise ValueError(f"unknown gqa_agg '{self.gqa_agg}'. Valid gqa_aggs: {', '.join(GQA_AGGREGATIONS)}.")

    def window_queries_needed(self) -> int:
        return self.window

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        cache.observers.append(CamDecode(self, ctx.budget, ctx.seed, ctx.record))

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        generator = None
        for layer_idx, layer in enumerate(cache.layers):
            if layer.get_seq_length() <= ctx.budget:
                continue
            if generator is None:
                generator = torch.Generator(device=layer.device).manual_seed(ctx.seed)
            window = min(self.window, ctx.window_queries[layer_idx].shape[1])
            queries = ctx.window_queries[layer_idx][:, -window:]
            scores = attention_received(queries, layer, ctx.window_positions[-window:], ctx.scaling, self.gqa_agg)
            cam_evict(layer, scores, ctx.budget, self.start_ratio, self.merge_budget, self.merge, generator, ctx.record)
