from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores
from kvbench.methods.scoring import topk_keep
from kvbench.methods.wrapped import ScorerWrapper


def chunk_selection(scores: torch.Tensor, chunk: int, keep: int) -> torch.Tensor:
    """ChunkKV's kept slots (ascending, `[keep]`) of a layer's scores `[Hkv, n]`: the scores are summed over the
    heads, chunks of `chunk` consecutive slots (the last one shorter) are ranked by their mean, and whole chunks
    are kept best first; the first chunk that no longer fits contributes its best remaining slots, so exactly
    `keep` slots are kept. Ties go to the earlier chunk / slot."""
    layer = scores.float().sum(dim=0)
    length = layer.shape[0]
    starts = list(range(0, length, chunk))
    means = torch.stack([layer[s : s + chunk].mean() for s in starts])
    kept: list[torch.Tensor] = []
    remaining = min(keep, length)
    for index in torch.sort(means, descending=True, stable=True).indices.tolist():
        if remaining <= 0:
            break
        start = starts[index]
        block = layer[start : start + chunk]
        take = min(remaining, block.shape[0])
        kept.append(start + topk_keep(block[None], take)[0])
        remaining -= take
    if not kept:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    return torch.cat(kept).sort().values


@register_method("chunkkv")
@dataclass
class ChunkKV(ScorerWrapper):
    """ChunkKV (Liu et al., 2025, "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM
    Inference", arXiv 2502.00299; kvpress `ChunkKVPress`), as a wrapper over any scoring method.

    Tokens are kept in semantic chunks rather than one by one: the base's scores are summed over the KV heads,
    the selectable slots (before the base's protected tail, e.g. SnapKV's window) are cut into chunks of
    `chunk_length`, and the chunks with the highest mean score are kept whole, one index set for all heads of a
    layer; the protected tail is kept as by the base.

    Paper vs peer: kvpress keeps max(1, int(chunks x (1 - ratio))) whole chunks, so the kept count is a multiple
    of the chunk length; kvbench keeps exactly the budget: whole chunks best first, then the best slots of the
    next chunk. The paper's layer-wise index reuse (adjacent layers sharing one selection) is not applied.

    Hyperparameters: base=snapkv, base_params={}, chunk_length=20 (kvpress).
    """

    chunk_length: int = 20

    def validate(self) -> None:
        if self.chunk_length < 1:
            raise ValueError(f"chunkkv needs chunk_length >= 1, got {self.chunk_length}")
        self.refuse_decode_budget()

    def select(self, verdict: LayerScores, budget: int, ctx: CompressionContext, layer_idx: int) -> torch.Tensor:
        num_heads, prefix = verdict.scores.shape
        chosen = chunk_selection(verdict.scores, self.chunk_length, budget - verdict.protected)
        tail = torch.arange(prefix, prefix + verdict.protected, device=chosen.device)
        return torch.cat([chosen, tail]).expand(num_heads, -1)
