from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine import rope
from kvbench.engine.cache import KVCache, KVLayer, LayerSubset
from kvbench.engine.kernels.window_attention import aggregate_gqa, window_attention
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores, ScoringMethod
from kvbench.methods.scoring import round_preserving_sum, topk_keep


def chunked_topk(scores: torch.Tensor, keep: int, chunk_length: int | None) -> torch.Tensor:
    """Top-`keep` slots per row of `scores [Hkv, n]`, sorted; with `chunk_length`, each chunk of that many slots
    keeps its share of `keep` (proportional to its length, rounded so that the shares sum to `keep`)."""
    length = scores.shape[1]
    if chunk_length is None or chunk_length >= length:
        return topk_keep(scores, keep)
    starts = list(range(0, length, chunk_length))
    sizes = [min(chunk_length, length - start) for start in starts]
    shares = round_preserving_sum([size * keep / length for size in sizes], keep)
    parts = [
        start + topk_keep(scores[:, start : start + size], share)
        for start, size, share in zip(starts, sizes, shares, strict=True)
    ]
    return torch.cat(parts, dim=-1)


def renumber_contiguous(layer: KVLayer, model: torch.nn.Module) -> None:
    """Re-rotate a layer's kept keys to positions 0..n-1 per head (their order kept) and record those positions."""
    contiguous = torch.arange(layer.get_seq_length(), device=layer.device).expand_as(layer.positions)
    layer.keys = rope.rerotate(layer.keys, layer.positions, contiguous, rope.rope_inv_freq(model))
    layer.positions = contiguous.clone()


@register_method("finch")
@dataclass
class Finch(ScoringMethod):
    """Finch (Corallo & Papotti, TACL 2024, "FINCH: Prompt-guided Key-Value Cache Compression for Large Language
    Models"; kvpress FinchPress).

    SnapKV-like, with the window being the question: the prompt queries after the context (the question and the
    answer prefix, known to the runner as `ctx.context_end`; capped at `max_window`) score the context's keys.
    Each window row's attention is multiplied by the number of keys before it (`normalize_scores`, so rows that see
    more keys are not diluted, as kvpress), averaged over the rows and the GQA group; no pooling. Each KV head keeps
    its top-(budget - window) context keys plus the window; with `chunk_length`, each chunk of that many context
    slots keeps its proportional share (kvpress: each chunk keeps the compression ratio). When the question is not
    in the compressed segment (compress=context) or unknown (chunked prefill, scenarios), the window is the last
    `window` prompt tokens.

    `rerotate=true` (Finch's and kvpress's default): after the selection the kept keys are re-rotated to contiguous
    positions 0..n-1 per head, as kvpress's KeyRerotationPress, and the next token takes position n (the longest
    head), as kvpress's pipeline continues at the compressed length after a FinchPress: the kept keys and what
    follows form one contiguous sequence (on models with layers left uncompressed, later tokens keep their original
    positions). Decode-time re-scoring (`decode_budget`) does not re-rotate. kvpress marks the question with a
    delimiter token it adds to the vocabulary; kvbench uses the prompt's own context/question split instead.

    Hyperparameters: window=32 (fallback), max_window=256, chunk_length=null, normalize_scores=true, rerotate=true.
    """

    window: int = 32
    max_window: int = 256
    chunk_length: int | None = None
    normalize_scores: bool = True
    rerotate: bool = True

    # The kept keys are re-rotated by default (`rerotate`): the slots are kept, not unchanged.
    keeps_slot_subset: ClassVar[bool] = False

    def validate(self) -> None:
        if self.window < 1 or self.max_window < 1:
            raise ValueError(f"finch window and max_window must be >= 1, got {self.window}, {self.max_window}")
        if self.chunk_length is not None and self.chunk_length < 1:
            raise ValueError(f"finch chunk_length must be >= 1 or null, got {self.chunk_length}")

    def window_queries_needed(self) -> int:
        return max(self.window, self.max_window)

    def window_size(self, ctx: CompressionContext, budget: int) -> int:
        """The question's length when it is in the segment (at most max_window), else `window`; at most budget."""
        question = 0 if ctx.context_end is None else ctx.prompt_len - ctx.context_end
        size = min(question, self.max_window) if question > 0 else self.window
        return max(1, min(size, budget, len(ctx.window_positions)))

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        """Normalised window attention of the keys before the window, row and group mean; the window protected."""
        window = self.window_size(ctx, budget)
        queries = ctx.window_queries[layer_idx][:, -window:]
        query_positions = ctx.window_positions[-window:]
        probs = window_attention(queries, layer.keys[0], query_positions, layer.positions, ctx.scaling)
        prefix = layer.get_seq_length() - window
        probs = probs[..., :prefix]
        if self.normalize_scores:  # row r sees the keys before it: scale by their number (kvpress's count)
            visible = (layer.positions[:, None, :] <= query_positions.to(layer.device)[None, :, None]).sum(-1)
            before = (visible - 1).clamp(min=1).float()  # [Hkv, window]
            probs = probs * before.repeat_interleave(probs.shape[0] // layer.num_heads, dim=0)[..., None]
        scores = aggregate_gqa(probs.mean(dim=1), layer.num_heads, "mean")
        return LayerScores(scores, protected=window)

    def rope_dependent(self) -> bool:
        return self.rerotate

    def select(self, verdict: LayerScores, budget: int, ctx: CompressionContext, layer_idx: int) -> torch.Tensor:
        scores = verdict.scores
        prefix = scores.shape[1]
        chosen = chunked_topk(scores, budget - verdict.protected, self.chunk_length)
        window = torch.arange(prefix, prefix + verdict.protected, device=scores.device).expand(scores.shape[0], -1)
        return torch.cat([chosen, window], dim=-1)

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        super().compress(cache, ctx)
        if not self.rerotate:
            return
        rope.check_shiftable_rope(ctx.model, "finch rerotate=true")
        renumbered = [layer for layer in cache.layers if layer.evicted]
        for layer in renumbered:
            renumber_contiguous(layer, ctx.model)
        # Without this the next token would sit at its original position, far past the renumbered keys. Only when
        # every layer was renumbered: layers left alone (uncompressed, or outside a LayerSubset) keep their positions.
        if renumbered and len(renumbered) == len(cache.layers) and not isinstance(cache, LayerSubset):
            cache.seen_tokens = max(int(layer.lengths().max()) for layer in renumbered)
