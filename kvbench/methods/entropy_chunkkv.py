from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.methods.base import register_method
from kvbench.methods.chunkkv import ChunkKV, chunk_means, chunk_selection


def chunk_entropies(layer: torch.Tensor, chunk: int) -> torch.Tensor:
    """Normalised entropy in [0, 1] of the scores inside each chunk of `chunk` consecutive entries of `layer [n]`
    (the last chunk shorter), `[ceil(n / chunk)]`. A chunk with a negative score is first shifted so that its
    minimum is 0; the shifted scores, divided by their sum, form the distribution, and its entropy is divided by
    log(chunk size). A chunk of one slot, or one whose shifted scores are all 0, has entropy 0."""
    values = []
    for block in layer.float().split(chunk):
        shifted = block - block.min().clamp(max=0.0)
        total = shifted.sum()
        if block.shape[0] < 2 or total <= 0:
            values.append(torch.zeros((), device=layer.device))
            continue
        probs = shifted / total
        entropy = -torch.special.xlogy(probs, probs).sum() / math.log(block.shape[0])
        values.append(entropy.clamp(0.0, 1.0))
    return torch.stack(values)


def entropy_gated_caps(layer: torch.Tensor, chunk: int, spiky_keep: int) -> list[int]:
    """How many slots each chunk of `layer [n]` may keep: `spiky_keep` for a chunk that is important (mean score
    >= the median of the chunk means) and spiky (entropy < the median of the chunk entropies), the whole chunk
    otherwise. Medians are the lower middle value for an even count (`torch.median`), as kvpress."""
    means, entropies = chunk_means(layer, chunk), chunk_entropies(layer, chunk)
    gated = (means >= means.median()) & (entropies < entropies.median())
    return [spiky_keep if spiky else chunk for spiky in gated.tolist()]


@register_method("entropy_chunkkv")
@dataclass
class EntropyGatedChunkKV(ChunkKV):
    """Entropy-gated ChunkKV (kvpress `EntropyGatedChunkKVPress`, built on ChunkKV: Liu et al., 2025, "ChunkKV:
    Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference", arXiv 2502.00299), as a
    wrapper over any scoring method.

    As `chunkkv`, the base's scores are summed over the KV heads and the selectable slots are cut into chunks of
    `chunk_length` ranked by mean score, one index set for all heads of a layer, the base's protected tail kept.
    Each chunk's normalised entropy of its slot scores gates it: a chunk whose mean is at least the median chunk
    mean and whose entropy is below the median chunk entropy (important but spiky: its score comes from a few
    slots) keeps only its best `low_entropy_chunk_length` slots; every other chunk is kept whole. Chunks are
    visited best first until the budget is spent, the last one partly (its best slots); budget the gate leaves
    unspent goes to the best slots not yet kept, so exactly the budget is kept.

    kvpress's press vs kvbench: kvpress budgets int(kv_len x (1 - ratio)) over all slots; kvbench the method's
    budget over the slots before the base's protected tail. kvpress's entropy adds 1e-8 inside the logarithm and
    the normaliser; kvbench uses p log p with 0 log 0 = 0 (an all-zero chunk has entropy 0 in both). Ties in the
    chunk ranking go to the earlier chunk (kvpress: unstable argsort).

    Hyperparameters: base=snapkv, base_params={}, chunk_length=10 and low_entropy_chunk_length=4 (kvpress).
    """

    chunk_length: int = 10
    low_entropy_chunk_length: int = 4

    def validate(self) -> None:
        if not self.chunk_length > self.low_entropy_chunk_length >= 1:
            raise ValueError(
                "entropy_chunkkv needs chunk_length > low_entropy_chunk_length >= 1, "
                f"got chunk_length={self.chunk_length}, low_entropy_chunk_length={self.low_entropy_chunk_length}"
            )
        self.refuse_decode_budget()

    def choose(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        if scores.shape[1] == 0:
            return chunk_selection(scores, self.chunk_length, keep)
        caps = entropy_gated_caps(scores.float().sum(dim=0), self.chunk_length, self.low_entropy_chunk_length)
        return chunk_selection(scores, self.chunk_length, keep, caps)
