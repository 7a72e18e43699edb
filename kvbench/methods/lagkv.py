from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.engine.cache import KVLayer
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores, ScoringMethod


def lag_relative_scores(states: torch.Tensor, lag: int) -> torch.Tensor:
    """LagKV's score of each token of partitions 0..P-2 of `states [Hkv, P, lag, d]` (`[Hkv, P-1, lag]`): the
    token is min-max normalised per channel by the NEXT partition's range, the spread (std over channels) of
    the result is softmaxed over its partition. A channel whose reference range is 0 divides by 1 instead."""
    reference, scored = states[:, 1:], states[:, :-1]
    low = reference.amin(dim=2, keepdim=True)
    spread = reference.amax(dim=2, keepdim=True) - low
    spread = torch.where(spread == 0, torch.ones_like(spread), spread)
    return ((scored - low) / spread).std(dim=-1).softmax(dim=-1)


def lagkv_scores(keys: torch.Tensor, values: torch.Tensor, n_sink: int, lag: int, cross_scoring: bool) -> torch.Tensor:
    """LagKV's scores of a layer's slots `[Hkv, L, d] -> [Hkv, L]` (fp32, higher = keep): 1 for the `n_sink` first
    slots and the tail (the last complete partition plus the remainder, which has no reference yet); each other
    partition's tokens get the mean of their key and value scores (`lag_relative_scores`), as their rank inside
    the partition divided by `lag` unless `cross_scoring` (then the softmax values, comparable across partitions).
    A layer shorter than n_sink + 2 lag has nothing to score: sinks 1, the rest rising with the position."""
    num_heads, length, dim = keys.shape
    keys, values = keys.float(), values.float()
    if length < n_sink + 2 * lag:
        scores = torch.ones((num_heads, length), dtype=torch.float32, device=keys.device)
        if length > n_sink:
            scores[:, n_sink:] = torch.arange(length - n_sink, device=keys.device) / (length - n_sink)
        return scores
    end = n_sink + ((length - n_sink) // lag) * lag
    partitions = (end - n_sink) // lag
    key_score = lag_relative_scores(keys[:, n_sink:end].reshape(num_heads, partitions, lag, dim), lag)
    value_score = lag_relative_scores(values[:, n_sink:end].reshape(num_heads, partitions, lag, dim), lag)
    score = (key_score + value_score) / 2
    if not cross_scoring:
        score = score.argsort(dim=-1).argsort(dim=-1).float() / lag
    sink = torch.ones((num_heads, n_sink), dtype=torch.float32, device=keys.device)
    tail = torch.ones((num_heads, length - end + lag), dtype=torch.float32, device=keys.device)
    return torch.cat([sink, score.reshape(num_heads, -1), tail], dim=-1)


@register_method("lagkv")
@dataclass
class LagKV(ScoringMethod):
    """LagKV (Liang et al., 2025, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are
    Important", arXiv 2504.04704; kvpress `LagKVPress`).

    Attention-free: after the `n_sink` first slots the layer is cut into partitions of `lag_size` slots; each
    partition is judged against the next one (its "lag" reference): keys and values are min-max normalised per
    channel by the reference's range, a token's score is the standard deviation of its normalised channels,
    softmaxed over its partition, keys and values averaged. The sinks and the tail (the last complete partition,
    which has no reference, plus the incomplete remainder) score 1 and are kept first. Each KV head keeps its
    `budget` best slots.

    Paper vs peer: the paper keeps a fixed fraction of every partition, compressing recursively as partitions
    fill; kvbench follows kvpress's press, which ranks each token within its partition (rank / lag_size) and takes
    the global top-`budget` of those ranks, so partitions lose slots evenly (ties between partitions go to the
    earlier slot). `cross_scoring=true` uses the softmax values instead of the ranks (kvpress: "useful with
    AdaKV"). A reference channel with a zero range divides by 1 (kvpress would produce NaN).

    Hyperparameters (kvpress defaults): n_sink=4, lag_size=128, cross_scoring=false; decode_budget=null and
    decode_interval=16 as every scorer.
    """

    n_sink: int = 4
    lag_size: int = 128
    cross_scoring: bool = False

    def validate(self) -> None:
        if self.n_sink < 0 or self.lag_size < 2:
            raise ValueError(
                f"lagkv needs n_sink >= 0 and lag_size >= 2, got n_sink={self.n_sink} lag_size={self.lag_size}"
            )

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        return LayerScores(lagkv_scores(layer.keys[0], layer.values[0], self.n_sink, self.lag_size, self.cross_scoring))
