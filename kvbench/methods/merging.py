from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.cache import KVCache
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scoring import keep_with_window
from kvbench.methods.wrapped import ScorerWrapper

EPS = 1e-6


def merge_evicted(
    keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, similarity_threshold: float, merge_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MergingPress's fold for one layer: keys/values `[Hkv, L, d]`, kept slots `[Hkv, n]`. Returns the kept slots'
    new values `[Hkv, n, d]` and each kept slot's received weight W `[Hkv, n]`.

    Every evicted slot e picks the kept slot t whose key is most cosine-similar; it merges when that similarity s is
    >= `similarity_threshold` and among the top `merge_fraction` (count rounded up) of its head's merging slots by s,
    with weight w_e = max(s, 0) ||v_e|| / (||v_e|| + ||v_t|| + eps); then v_t' = (v_t + sum_e w_e v_e) / (1 + W_t),
    W_t = sum_e w_e. So (1 + W_t) v_t' = v_t + sum_e w_e v_e: the weighted value mass is preserved."""
    num_heads, length, dim = values.shape
    evicted_mask = torch.ones((num_heads, length), dtype=torch.bool, device=values.device)
    evicted_mask.scatter_(1, kept, False)
    evicted = torch.nonzero(evicted_mask)[:, 1].view(num_heads, -1)  # every head evicts L - n slots
    kept_values = values.gather(1, kept[:, :, None].expand(-1, -1, dim)).float()
    if evicted.shape[1] == 0 or kept.shape[1] == 0:
        return kept_values.to(values.dtype), kept_values.new_zeros(kept.shape)
    unit = torch.nn.functional.normalize(keys.float(), dim=-1, eps=EPS)
    kept_unit = unit.gather(1, kept[:, :, None].expand(-1, -1, dim))
    evicted_unit = unit.gather(1, evicted[:, :, None].expand(-1, -1, dim))
    similarity, target = (evicted_unit @ kept_unit.transpose(1, 2)).max(dim=-1)  # [Hkv, m]
    merging = similarity >= similarity_threshold
    if merge_fraction < 1.0:
        ranked = torch.sort(similarity.masked_fill(~merging, float("-inf")), dim=-1, descending=True, stable=True)
        allowed = torch.ceil(merging.sum(dim=-1).float() * merge_fraction).long()  # [Hkv]
        top = torch.arange(merging.shape[1], device=values.device)[None, :] < allowed[:, None]
        chosen = torch.zeros_like(merging).scatter(1, ranked.indices, top)
        merging &= chosen
    evicted_values = values.gather(1, evicted[:, :, None].expand(-1, -1, dim)).float()
    evicted_norm = evicted_values.norm(dim=-1)
    target_norm = kept_values.norm(dim=-1).gather(1, target)
    weight = similarity.clamp(min=0) * merging * evicted_norm / (evicted_norm + target_norm + EPS)
    received = kept_values.new_zeros(kept.shape).scatter_add(1, target, weight)
    mass = kept_values.new_zeros(kept_values.shape).scatter_add(
        1, target[:, :, None].expand(-1, -1, dim), weight[:, :, None] * evicted_values
    )
    merged = (kept_values + mass) / (1.0 + received[:, :, None])
    return merged.to(values.dtype), received


@register_method("merging")
@dataclass
class Merging(ScorerWrapper):
    """Merge-on-evict over any scorer (NVIDIA kvpress `MergingPress`, after Token Merging, Bolya et al. ICLR 2023,
    and D2O, Wan et al. 2024): the base chooses the kept slots as usual (top-scored + protected tail, exactly the
    budget); each evicted slot's VALUE is then folded into the kept slot of the same head whose key is most
    cosine-similar (`merge_evicted`: weight max(s, 0) ||v_e|| / (||v_e|| + ||v_t||), kept value renormalised by
    1 + the weights received). Keys and positions are unchanged (RoPE-safe); bytes = the kept slots. At the end of
    prefill only. `merge_fraction` < 1 merges only the most similar evicted slots: kvpress takes those above the
    (1 - merge_fraction) quantile of the similarities, kvbench the top ceil(fraction x count).

    Record: merging_weight_mean (the mean weight W a kept slot received).

    Hyperparameters: base=snapkv, base_params={}; similarity_threshold=0.0, merge_fraction=1.0 (kvpress's
    defaults).
    """

    keeps_slot_subset: ClassVar[bool] = False  # kept values are rewritten
    plain_kv_layers: ClassVar[bool] = True

    similarity_threshold: float = 0.0
    merge_fraction: float = 1.0

    def validate(self) -> None:
        if not 0.0 <= self.similarity_threshold <= 1.0:
            raise ValueError(f"merging similarity_threshold must be in [0, 1], got {self.similarity_threshold}")
        if not 0.0 < self.merge_fraction <= 1.0:
            raise ValueError(f"merging merge_fraction must be in (0, 1], got {self.merge_fraction}")
        self.refuse_decode_budget()

    def label_extras(self) -> list[str]:
        own = {"similarity_threshold": self.similarity_threshold, "merge_fraction": self.merge_fraction}
        return [f"{key}={value}" for key, value in own.items() if getattr(type(self), key) != value]

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        budgets = self.layer_budgets(ctx, len(cache.layers))
        weights = []
        for layer_idx, (layer, budget) in enumerate(zip(cache.layers, budgets, strict=True)):
            if budget >= layer.get_seq_length():
                continue
            verdict = self.layer_scores(layer_idx, layer, budget, ctx)
            kept = keep_with_window(verdict.scores, budget, verdict.protected)
            values, received = merge_evicted(
                layer.keys[0], layer.values[0], kept, self.similarity_threshold, self.merge_fraction
            )
            layer.keep(kept)
            layer.values = values[None]
            weights.append(received.flatten().cpu())  # layers of a multi-device model sit on their own devices
        if weights:
            ctx.record["merging_weight_mean"] = float(torch.cat(weights).mean())
