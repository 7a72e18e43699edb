"""Building the base method of a wrapper (`method.base=<name>`, `method.base_params={...}`): AdaKV, KVCrush,
PrefixKV and MiKV wrap another method with the same two hyperparameters and refuse what they cannot wrap."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.methods.base import METHODS, CompressionContext, Method, build_method
from kvbench.methods.scorer import LayerScores, ScoringMethod


def normalise_params(params: Any) -> dict[str, Any]:
    """`method.base_params` as a plain dict with string keys (Hydra passes a DictConfig or null)."""
    return {str(key): value for key, value in dict(params or {}).items()}


def scorers() -> list[str]:
    """Registered methods that rank slots (`ScoringMethod`): what scorer wrappers accept as base."""
    return sorted(name for name in METHODS.names() if issubclass(METHODS.get(name), ScoringMethod))


def build_base(wrapper: str, base: str, params: dict[str, Any], kind: type = ScoringMethod) -> Method:
    """The wrapped method; one line naming the bad base and the valid ones when it is not a `kind`."""
    if base == wrapper:
        raise ValueError(f"{wrapper} cannot wrap itself; choose a scoring method as method.base")
    method = build_method({"name": base, **params})
    if not isinstance(method, kind):
        valid = scorers() if kind is ScoringMethod else sorted(METHODS.names())
        raise ValueError(f"{wrapper} cannot wrap '{base}' (not a scoring method). Valid bases: {', '.join(valid)}.")
    return method


@dataclass
class ScorerWrapper(ScoringMethod):
    """A scoring method built over another one (`method.base`, `method.base_params`): the base scores, the
    wrapper decides what is kept. Scoring, window queries, prefill statistics and layer budgets are the base's
    unless the wrapper overrides them; wrappers compress once after prefill (no `decode_budget`)."""

    base: str = "snapkv"
    base_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.base_params = normalise_params(self.base_params)
        self.scorer = build_base(self.name, self.base, self.base_params)

    def refuse_decode_budget(self) -> None:
        if self.decode_budget is not None or getattr(self.scorer, "decode_budget", None) is not None:
            raise ValueError(f"{self.name} compresses at the end of prefill only; decode_budget is not supported")

    def params(self) -> dict[str, Any]:
        return {**super().params(), "base_params": dict(self.base_params)}

    def label_extras(self) -> list[str]:
        """The wrapper's own non-default hyperparameters shown in its label."""
        return []

    def label(self) -> str:
        extras = self.label_extras() + [f"{key}={value}" for key, value in sorted(self.base_params.items())]
        return f"{self.name}[{self.base}]" + (f"({','.join(extras)})" if extras else "")

    def window_queries_needed(self) -> int:
        return self.scorer.window_queries_needed()

    def prefill_observer(self) -> Any:
        return self.scorer.prefill_observer()

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        self.scorer.setup(cache, ctx)

    def layer_budgets(self, ctx: CompressionContext, num_layers: int) -> list[int]:
        return self.scorer.layer_budgets(ctx, num_layers)

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        return self.scorer.layer_scores(layer_idx, layer, budget, ctx)
