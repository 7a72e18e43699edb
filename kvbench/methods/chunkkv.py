from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores
from kvbench.methods.scoring import topk_keep
from kvbench.methods.wrapped import ScorerWrapper


def chunk_means(layer: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean of each run of `chunk` consecutive entries of `layer [n]` (the last run shorter), `[ceil(n / chunk)]`."""
    return torch.stack([block.mean() for block in layer.split(chunk)])


def chunk_selection(scores: torch.Tensor, chunk: int, keep: int, caps: list[int] | None = None) -> torch.Tensor:
    """ChunkKV's kept slots (ascending, `[keep]`) of a layer's scores `[Hkv, n]`: the scores are summed over the
    heads, chunks of `chunk` consecutive slots (the last one shorter) are ranked by their mean, and whole chunks
    are kept best first; the first chunk that no longer fits contributes its best remaining slots, so exactly
    `keep` slots are kept. Ties go to the earlier chunk / slot.

    `caps[i]`, when given, bounds the slots chunk i contributes (its best ones); budget the caps leave unspent
    after every chunk was visited goes to the best slots not yet kept."""
    layer = scores.float().sum(dim=0)
    length = layer.shape[0]
    remaining = min(keep, length)
    if remaining <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    kept = torch.zeros(length, dtype=torch.bool, device=scores.device)
    for index in torch.sort(chunk_means(layer, chunk), descending=True, stable=True).indices.tolist():
        if remaining <= 0:
            break
        start = index * chunk
        block = layer[start : start + chunk]
        take = min(remaining, block.shape[0] if caps is None else min(caps[index], block.shape[0]))
        kept[start + topk_keep(block[None], take)[0]] = True
        remaining -= take
    if remaining > 0:
        leftover = (~kept).nonzero().squeeze(-1)
        kept[leftover[topk_keep(layer[leftover][None], remaining)[0]]] = True
    return kept.nonzero().squeeze(-1)


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

    def choose(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """The `keep` slots (ascending) chosen from the selectable slots' scores `[Hkv, n]`, one set per layer."""
        return chunk_selection(scores, self.chunk_length, keep)

    def select(self, verdict: LayerScores, budget: int, ctx: CompressionContext, layer_idx: int) -> torch.Tensor:
        num_heads, prefix = verdict.scores.shape
        chosen = self.choose(verdict.scores, budget - verdict.protected)
        tail = torch.arange(prefix, prefix + verdict.protected, device=chosen.device)
        return torch.cat([chosen, tail]).expand(num_heads, -1)
