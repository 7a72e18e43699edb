from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.methods.adakv import adaptive_keep_mask, head_budgets
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores
from kvbench.methods.scoring import mask_to_indices, topk_keep
from kvbench.methods.wrapped import ScorerWrapper

# What architectures name the attention output projection (Llama-likes, LFM2 / Falcon, GPT-NeoX).
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense")


def output_projection(model: torch.nn.Module, layer_idx: int) -> torch.Tensor:
    """The weight `[hidden, H * d]` of model layer `layer_idx`'s attention output projection (`o_proj`)."""
    for module in model.modules():
        if getattr(module, "layer_idx", None) != layer_idx or "attention" not in type(module).__name__.lower():
            continue  # a layer's SSM / conv mixer may carry the same index and an out_proj
        for name in OUTPUT_PROJECTIONS:
            if isinstance(getattr(module, name, None), torch.nn.Linear):
                return getattr(module, name).weight.detach()
    raise ValueError(f"criticalkv needs the attention output projection (o_proj) of layer {layer_idx}; none found")


def projected_value_norms(values: torch.Tensor, weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """||W_o^h v_i||_1 per slot `[Hkv, L]` (fp32): each query head's slice of the output projection applied to the
    values of its KV head, the L1 norm over the hidden size, averaged over the GQA group. One head at a time, so
    at most `[L, hidden]` exists at once."""
    num_kv_heads, length, head_dim = values.shape
    group = num_heads // num_kv_heads
    per_head = weight.float().T.reshape(num_heads, head_dim, -1)  # W_o^h: [d, hidden]
    norms = torch.stack([(values[h // group].float() @ per_head[h]).abs().sum(dim=-1) for h in range(num_heads)])
    return norms.unflatten(0, (num_kv_heads, group)).mean(dim=1)


def two_stage_scores(scores: torch.Tensor, norms: torch.Tensor, first: list[int], epsilon: float) -> torch.Tensor:
    """CriticalKV's merged scores `[Hkv, n]`: head h's top-`first[h]` base scores (stage 1) score +inf; every
    other slot scores (s + epsilon) * ||W_o v||_1 (stage 2). Slots the base rules out (-inf) stay -inf."""
    merged = torch.where(torch.isneginf(scores), scores, (scores + epsilon) * norms)
    for head, count in enumerate(first):
        merged[head, topk_keep(scores[head : head + 1], count)[0]] = float("inf")
    return merged


def check_critical(method: ScorerWrapper, epsilon: float, first_stage_ratio: float) -> None:
    if not 0.0 <= first_stage_ratio <= 1.0 or epsilon < 0:
        raise ValueError(
            f"{method.name} needs first_stage_ratio in [0, 1] and epsilon >= 0, got {first_stage_ratio}, {epsilon}"
        )
    method.refuse_decode_budget()


@register_method("criticalkv")
@dataclass
class CriticalKV(ScorerWrapper):
    """CriticalKV (Feng et al., 2025, "Identify Critical KV Cache in LLM Inference from an Output Perturbation
    Perspective", arXiv 2502.03805; kvpress `CriticalKVPress`), as a wrapper over any scoring method.

    Attention weights alone ignore how much a slot can move the output: the perturbation a slot causes is
    bounded by its attention times ||W_o v||_1 (its value through the head's slice of the output projection, L1
    norm over the hidden size). Two-stage selection per layer: of the selectable B' = budget - the base's
    protected tail, each KV head first keeps its floor(first_stage_ratio * B') best slots by the base's scores,
    then fills the rest by (s + epsilon) * ||W_o v||_1 (GQA mean). The base's protected tail (SnapKV's window)
    is kept as by the base.

    Paper vs peer: kvbench follows kvpress's press; the stage split is applied to the selectable slots (kvpress:
    to the whole kept count, whose top includes SnapKV's window). Bases whose scores are already value-weighted
    (expected_attention with use_vnorm) count the value twice (kvpress warns the same); z-normalised scores
    (leverage, noncausal, compactor) can be negative, where the product reverses the value's effect (as kvpress).

    Hyperparameters: base=snapkv, base_params={}, epsilon=1e-4, first_stage_ratio=0.5 (kvpress).
    """

    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def validate(self) -> None:
        check_critical(self, self.epsilon, self.first_stage_ratio)

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        verdict = super().layer_scores(layer_idx, layer, budget, ctx)
        scored = verdict.scores.shape[-1]
        weight = output_projection(ctx.model, ctx.model_layer_index(layer_idx))
        norms = projected_value_norms(layer.values[0, :, :scored], weight, ctx.num_heads)
        first = int(max(0, budget - verdict.protected) * self.first_stage_ratio)
        merged = two_stage_scores(verdict.scores, norms, [first] * layer.num_heads, self.epsilon)
        return LayerScores(merged, verdict.protected)


@register_method("criticaladakv")
@dataclass
class CriticalAdaKV(ScorerWrapper):
    """CriticalAdaKV (Feng et al., 2025, arXiv 2502.03805; kvpress `CriticalAdaKVPress`): CriticalKV's two-stage
    selection inside Ada-KV's head-adaptive budgets, over any scoring method.

    Per layer, head budgets b_h come from the base's scores exactly as `adakv` allocates them (alpha mixes the
    adaptive share with the uniform one; the layer total is exact); then each head keeps its
    floor(first_stage_ratio * b_h) best slots by the base's scores and fills the rest of b_h by
    (s + epsilon) * ||W_o v||_1. Heads keep different counts (padded; physical and logical bytes reported).

    Paper vs peer: kvpress allocates head budgets from the top scores of all heads after forcing each head's
    top alpha share (its AdaKV safeguard) and masks evicted slots in attention instead of freeing them; kvbench
    uses its `adakv` allocation and frees the slots.

    Hyperparameters: base=snapkv, base_params={}, alpha=0.2 (adakv's), epsilon=1e-4, first_stage_ratio=0.5.
    """

    alpha: float = 0.2
    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"criticaladakv alpha must be in [0, 1], got {self.alpha}")
        check_critical(self, self.epsilon, self.first_stage_ratio)

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        budgets = self.layer_budgets(ctx, len(cache.layers))
        flat: list[int] = []
        for layer_idx, (layer, budget) in enumerate(zip(cache.layers, budgets, strict=True)):
            if budget >= layer.get_seq_length():
                continue
            verdict = self.layer_scores(layer_idx, layer, budget, ctx)
            scored = verdict.scores.shape[-1]
            heads = head_budgets(verdict.scores, max(0, budget - verdict.protected), self.alpha)
            norms = projected_value_norms(
                layer.values[0, :, :scored],
                output_projection(ctx.model, ctx.model_layer_index(layer_idx)),
                ctx.num_heads,
            )
            first = [int(b * self.first_stage_ratio) for b in heads]
            merged = two_stage_scores(verdict.scores, norms, first, self.epsilon)
            layer.keep(*mask_to_indices(adaptive_keep_mask(merged, heads, verdict.protected)))
            flat.extend(heads)
        if flat:
            ctx.record["criticaladakv_head_budget_min"] = min(flat)
            ctx.record["criticaladakv_head_budget_max"] = max(flat)
