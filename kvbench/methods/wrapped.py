"""`ScorerWrapper`: the base of AdaKV, KVCrush and PrefixKV, which wrap a scoring method (`method.base`,
`method.base_params`) and decide themselves what is kept from its scores (built as every wrapper is:
`kvbench.methods.compose`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.methods.base import CompressionContext
from kvbench.methods.compose import BaseKind, Composed
from kvbench.methods.scorer import LayerScores, ScoringMethod

# A base that ranks slots (`ScoringMethod`).
SCORER = BaseKind(lambda cls: issubclass(cls, ScoringMethod), "not a scoring method")


@dataclass
class ScorerWrapper(Composed, ScoringMethod):
    """A scoring method built over another one (`method.base`, `method.base_params`): the base scores, the
    wrapper decides what is kept. Scoring, window queries, prefill statistics and layer budgets are the base's
    unless the wrapper overrides them; wrappers compress once after prefill (no `decode_budget`)."""

    base_kind: ClassVar[BaseKind] = SCORER
    keeps_slot_subset: ClassVar[bool] = True  # what is kept is a subset of the base's scored slots (`keep`)
    plain_kv_layers: ClassVar[bool] = True

    base: str = field(default="snapkv", kw_only=True)

    def refuse_decode_budget(self) -> None:
        if self.decode_budget is not None or getattr(self.inner, "decode_budget", None) is not None:
            raise ValueError(f"{self.name} compresses at the end of prefill only; decode_budget is not supported")

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        # The wrapper keeps slots itself (from the base's scores and budgets), not the base's `compress`.
        ScoringMethod.compress(self, cache, ctx)

    def layer_budgets(self, ctx: CompressionContext, num_layers: int) -> list[int]:
        return self.inner.layer_budgets(self.base_context(ctx), num_layers)

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        return self.inner.layer_scores(layer_idx, layer, budget, self.base_context(ctx))
