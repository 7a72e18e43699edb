from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.engine.cache import KVLayer
from kvbench.engine.kernels import window_scores
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores, ScoringMethod
from kvbench.methods.scoring import topk_keep


def sample_without_replacement(
    scores: torch.Tensor, eligible: torch.Tensor, count: int, generator: torch.Generator, temperature: float | None
) -> torch.Tensor:
    """Per row of `scores [Hkv, n]`, `count` distinct eligible slots drawn without replacement, sorted, `[Hkv, count]`.

    Draw probabilities: proportional to the scores (`temperature` None) or softmax(scores / temperature); every
    eligible slot keeps a 1e-12 floor so that a row with fewer positive scores than `count` can still be filled.
    """
    if count <= 0:
        return torch.empty((scores.shape[0], 0), dtype=torch.long, device=scores.device)
    if temperature is None:
        weights = scores.double().clamp(min=0)
    else:
        weights = torch.softmax(scores.double().masked_fill(~eligible, float("-inf")) / temperature, dim=-1)
    weights = (weights + 1e-12).masked_fill(~eligible, 0.0)
    drawn = torch.multinomial(weights.cpu(), count, replacement=False, generator=generator)
    return drawn.sort(dim=-1).values.to(scores.device)


@register_method("nacl")
@dataclass
class NACL(ScoringMethod):
    """NACL (Chen et al., ACL 2024, "NACL: A General and Effective KV Cache Eviction Framework for LLMs at Inference
    Time", arXiv 2408.03675; KVCache-Factory has a selector for it). One eviction at the end of the encoding.

    Proxy-Tokens Eviction: the last `proxy_tokens` prompt tokens (the question in a context-then-question prompt)
    are the proxy queries; a slot's score is the attention they pay it, summed over the proxies and averaged over
    the GQA group. The proxies' own slots are always kept. Random Eviction: of the budget - proxies remaining
    slots, `round(random_ratio * (budget - proxies))` are drawn per KV head (head-wise, seeded by the run seed and
    the layer) without replacement from the slots the proxy ranking did not keep, the rest are the proxy top-k.

    Where the paper and the peer differ: the paper samples "from the scoring function of Proxy-Tokens Eviction";
    `temperature` null draws with probability proportional to the proxy score (that reading), a number draws from
    softmax(score / temperature) (KVCache-Factory's selector). The paper's split between the two budgets is not
    restated here: random_ratio=0.2 is kvbench's choice [UNVERIFIED].

    Hyperparameters: proxy_tokens=32, random_ratio=0.2, temperature=null, plus every scorer's decode budget (a
    decode-time re-scoring keeps the proxy top-k, no random draw).
    """

    proxy_tokens: int = 32
    random_ratio: float = 0.2
    temperature: float | None = None

    def validate(self) -> None:
        if self.proxy_tokens < 1:
            raise ValueError(f"nacl proxy_tokens must be >= 1, got {self.proxy_tokens}")
        if not 0.0 <= self.random_ratio <= 1.0:
            raise ValueError(f"nacl random_ratio must be in [0, 1], got {self.random_ratio}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"nacl temperature must be > 0 or null, got {self.temperature}")

    def window_queries_needed(self) -> int:
        return self.proxy_tokens

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        """Proxy attention summed over the proxies (GQA mean) for the slots before them; the proxies are kept."""
        proxies = min(self.proxy_tokens, budget)
        queries = ctx.window_queries[layer_idx][:, -proxies:]
        scores = window_scores(
            queries,
            layer.keys[0],
            ctx.window_positions[-proxies:],
            layer.positions,
            ctx.scaling,
            reduce="sum",
            gqa_agg="mean",
            num_scored=layer.get_seq_length() - proxies,
            impl=ctx.kernels,
        )
        return LayerScores(scores, protected=proxies)

    def select(self, verdict: LayerScores, budget: int, ctx: CompressionContext, layer_idx: int) -> torch.Tensor:
        """The proxy top-k, a head-wise random draw from the rest, and the proxies' slots, `[Hkv, budget]`."""
        scores = verdict.scores
        num_kv, prefix = scores.shape
        selectable = budget - verdict.protected
        drawn = round(self.random_ratio * selectable)
        top = topk_keep(scores, selectable - drawn)
        eligible = torch.ones_like(scores, dtype=torch.bool).scatter(1, top, False)
        generator = torch.Generator().manual_seed(ctx.seed * 1_000_003 + layer_idx)
        sampled = sample_without_replacement(scores, eligible, drawn, generator, self.temperature)
        proxies = torch.arange(prefix, prefix + verdict.protected, device=scores.device).expand(num_kv, -1)
        chosen = torch.cat([top, sampled], dim=-1).sort(dim=-1).values
        return torch.cat([chosen, proxies], dim=-1)
