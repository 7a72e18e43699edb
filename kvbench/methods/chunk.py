from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores
from kvbench.methods.scoring import round_preserving_sum, topk_keep
from kvbench.methods.wrapped import ScorerWrapper


def chunk_budgets(length: int, selectable: int, chunk_length: int) -> list[int]:
    """Kept slots per chunk of `chunk_length` (the last one shorter) when `selectable` of `length` scored slots are
    kept: proportional to each chunk's length, rounded so that they sum to exactly `selectable`."""
    sizes = [min(chunk_length, length - start) for start in range(0, length, chunk_length)]
    return round_preserving_sum([size * selectable / length for size in sizes], selectable)


def chunked_keep(verdict: LayerScores, budget: int, chunk_length: int) -> torch.Tensor:
    """Kept slots `[Hkv, budget]`: per chunk of the scored slots, its share of the top scores, plus the protected
    tail (each row ascending)."""
    scores = verdict.scores
    num_heads, length = scores.shape
    selectable = max(0, budget - verdict.protected)
    kept = []
    for index, share in enumerate(chunk_budgets(length, selectable, chunk_length)):
        start = index * chunk_length
        kept.append(start + topk_keep(scores[:, start : start + chunk_length], share))
    kept.append(torch.arange(length, length + verdict.protected, device=scores.device).expand(num_heads, -1))
    return torch.cat(kept, dim=-1)


@register_method("chunk")
@dataclass
class Chunk(ScorerWrapper):
    """Chunk-wise selection over any scorer (NVIDIA kvpress `ChunkPress`, after FINCH, Corallo & Papotti, TACL 2024):
    the scored slots are cut into consecutive chunks of `chunk_length` and every chunk keeps its own top-scored
    slots, its share of the layer's selectable budget proportional to its length, so the selection covers the
    context uniformly instead of concentrating where the scores are highest.

    kvbench scores the layer ONCE with the base (`layer_scores`) and selects per chunk; kvpress re-runs the press's
    `score` on each chunk's own hidden states and keys. For attention-free per-token scorers (knorm,
    expected_attention) the two are the same; for window scorers (snapkv) kvbench's chunks are judged by the
    prompt's last queries, kvpress's by each chunk's own last tokens (kvbench keeps no per-chunk queries). The
    base's protected tail (SnapKV's window) is kept as with the base alone. kvpress keeps
    max(1, int(chunk * (1 - ratio))) per chunk and so misses the total; kvbench rounds the shares to keep exactly
    the budget.

    Hyperparameters: base=snapkv, base_params={}; chunk_length=1024 (kvpress's default).
    """

    chunk_length: int = 1024

    def validate(self) -> None:
        if isinstance(self.chunk_length, bool) or not isinstance(self.chunk_length, int) or self.chunk_length < 1:
            raise ValueError(f"chunk chunk_length must be a positive int, got {self.chunk_length!r}")
        self.refuse_decode_budget()

    def label_extras(self) -> list[str]:
        return [f"chunk_length={self.chunk_length}"] if self.chunk_length != type(self).chunk_length else []

    def select(self, verdict: LayerScores, budget: int, ctx: CompressionContext, layer_idx: int) -> torch.Tensor:
        return chunked_keep(verdict, budget, self.chunk_length)
