from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores
from kvbench.methods.scoring import keep_with_window
from kvbench.methods.wrapped import ScorerWrapper

ANCHORS = ("random", "zeros", "ones", "mean", "alternate")


def head_signatures(scores: torch.Tensor) -> torch.Tensor:
    """Binary signatures `[N, Hkv]` of N candidates from their scores `[Hkv, N]`: bit h = 1 iff the candidate is
    in the top half (ceil(N / 2), ties to the earlier candidate) of head h's scores among the candidates."""
    num_heads, count = scores.shape
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    bits = torch.zeros((num_heads, count), dtype=torch.bool, device=scores.device)
    bits.scatter_(1, order[:, : (count + 1) // 2], True)
    return bits.T


def anchor(signatures: torch.Tensor, mode: str, seed: int) -> torch.Tensor:
    """The anchor `[Hkv]` the signatures are measured against."""
    width = signatures.shape[1]
    if mode == "zeros":
        return torch.zeros(width, dtype=torch.bool)
    if mode == "ones":
        return torch.ones(width, dtype=torch.bool)
    if mode == "alternate":  # 0101...
        return torch.arange(width) % 2 == 1
    if mode == "mean":  # per-bit majority; a tie counts as 1
        return 2 * signatures.sum(dim=0).cpu() >= signatures.shape[0]
    if mode == "random":
        return torch.randint(0, 2, (width,), generator=torch.Generator().manual_seed(seed)).bool()
    raise ValueError(f"unknown anchor '{mode}'. Valid anchors: {', '.join(ANCHORS)}.")


def crush_pick(scores: torch.Tensor, count: int, mode: str, seed: int) -> torch.Tensor:
    """Indices (into the N candidates of `scores [Hkv, N]`) of `count` representatives: candidates sorted by
    Hamming distance of their signature to the anchor (stable: by position on ties), then every N/count-th,
    i.e. sorted-list indices floor(i * N / count) for i < count."""
    signatures = head_signatures(scores)
    distance = (signatures.cpu() ^ anchor(signatures, mode, seed)[None]).sum(dim=1)
    order = torch.sort(distance, stable=True).indices
    total = order.numel()
    count = min(count, total)
    return order[[i * total // count for i in range(count)]].to(scores.device)


@register_method("kvcrush")
@dataclass
class KVCrush(ScorerWrapper):
    """KVCrush (Jha et al., ACML 2025, "KVCrush: Key Value Cache size-reduction using similarity in
    head-behaviour", arXiv 2503.00022; the paper's code is not public, the anchor modes and the pick step come
    from Intel's OpenVINO GenAI port, `kvcrush.cpp`, which works on 16/32-token blocks: here tokens).

    Per layer the base scorer (any `ScoringMethod`: snapkv, pyramidkv, knorm, ...) keeps B_imp = B - B_crush
    slots per KV head (its own top-k plus its protected window). The candidates are the prefix slots no KV head
    kept. Each candidate gets a binary head signature: bit h = 1 iff it is in the top half of KV head h's base
    scores among the candidates [UNVERIFIED: the paper's bits are per attention head; kvbench's scorers give
    per-KV-head scores, so bits are per KV head]. Candidates are sorted by Hamming distance to an anchor and
    B_crush representatives are taken evenly along that order (the port's step): they stand for groups of
    tokens with similar head behaviour and are kept in every KV head. Each KV head then holds exactly B slots
    (fewer only when there are fewer candidates than B_crush).

    Hyperparameters: base=snapkv, base_params={}, crush_fraction=0.1 (B_crush = int(crush_fraction * B), capped
    so the base keeps its window; documented default [UNVERIFIED], the port's tuned configs use 7-33%),
    anchor=alternate (random | zeros | ones | mean | alternate; random is seeded by the run's seed and the
    layer). With these top-half signatures every bit is 1 for ceil(N/2) of the N candidates, so the per-bit
    majority (`mean`) is always all ones: `anchor=mean` picks exactly what `anchor=ones` picks (tested); it is kept
    because it differs under the port's block signatures.
    """

    crush_fraction: float = 0.1
    anchor: str = "alternate"

    def validate(self) -> None:
        if not 0.0 <= self.crush_fraction < 1.0:
            raise ValueError(f"kvcrush crush_fraction must be in [0, 1), got {self.crush_fraction}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"unknown anchor '{self.anchor}'. Valid anchors: {', '.join(ANCHORS)}.")
        self.refuse_decode_budget()

    def label_extras(self) -> list[str]:
        extras = [f"crush_fraction={self.crush_fraction}"] if self.crush_fraction != type(self).crush_fraction else []
        return extras + ([f"anchor={self.anchor}"] if self.anchor != type(self).anchor else [])

    def crush_keep(self, verdict: LayerScores, budget: int, seed: int) -> torch.Tensor:
        """Kept slots `[Hkv, <= budget]` of one layer: the base's B_imp plus the representatives."""
        crush = min(int(self.crush_fraction * budget), budget - verdict.protected)
        important = keep_with_window(verdict.scores, budget - crush, verdict.protected)
        if crush <= 0:
            return important
        num_heads, prefix = verdict.scores.shape
        taken = torch.zeros(prefix + verdict.protected, dtype=torch.bool, device=important.device)
        taken[important.flatten()] = True
        candidates = torch.nonzero(~taken[:prefix]).flatten()
        if candidates.numel() == 0:
            return important
        picks = candidates[crush_pick(verdict.scores[:, candidates], crush, self.anchor, seed)]
        merged = torch.cat([important, picks.expand(num_heads, -1)], dim=1)
        return merged.sort(dim=1).values

    def select(self, verdict: LayerScores, budget: int, ctx: CompressionContext, layer_idx: int) -> torch.Tensor:
        return self.crush_keep(verdict, budget, ctx.seed * 1000 + layer_idx)
