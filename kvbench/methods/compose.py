"""One way to build a method over another one (`method.base=<name>`, `method.base_params={...}`).

`Composed` is the base of every wrapper: the scorer wrappers (adakv, kvcrush, prefixkv: `ScorerWrapper`), the
quantised-storage methods (kivi, rtn, gear, rotatekv, octopus: `QuantizedMethod`, base optional), kv_distill and
mikv. It builds the base from `base` + `base_params` (a Hydra DictConfig becomes a plain dict), refuses itself,
an unknown name or a base of the wrong kind in one line listing the valid bases, and forwards the base's life
cycle: window queries, prefill observer, setup, compress, after_compress, before_forward, model checks, and the
budget / fresh-prefill properties. A wrapper overrides only what it changes.

What a wrapper accepts is a `BaseKind`: a test on the base's class, read from the registry before the base is
built, so a refusal never depends on the base's own dependencies. The tests use the capabilities every method
declares (`Method.keeps_slot_subset`, `Method.plain_kv_layers`) or the scorer interface, never name lists.

A wrapper with its own prefill observer (mikv's query maxima, rotatekv's sink finder) returns it from
`own_prefill_observer`; the shared prefill then watches both (`ComposedObserver`), the base sees only its own
(`base_context`) and the wrapper reads its own with `own_stats`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvbench.engine.cache import KVCache
from kvbench.methods.base import METHODS, CompressionContext, Method, build_method


def normalise_params(params: Any) -> dict[str, Any]:
    """`method.base_params` as a plain dict with string keys (Hydra passes a DictConfig or null)."""
    return {str(key): value for key, value in dict(params or {}).items()}


@dataclass(frozen=True)
class BaseKind:
    """What a wrapper accepts as `method.base`: `accepts` tests the base's registered class; `reason` says, in the
    refusal, why a refused base does not fit (e.g. "not a scoring method")."""

    accepts: Callable[[type[Method]], bool]
    reason: str

    def valid(self, wrapper: str) -> list[str]:
        """The registered methods `wrapper` can wrap (never itself), sorted."""
        return sorted(name for name in METHODS.names() if name != wrapper and self.accepts(METHODS.get(name)))


# A base that only keeps a subset of the cache's slots, unchanged (kv_distill, mikv).
SLOT_SUBSET = BaseKind(lambda cls: cls.keeps_slot_subset, "it does not keep a subset of the cache's slots as plain K/V")


def build_base(wrapper: str, base: str, params: dict[str, Any], kind: BaseKind) -> Method:
    """The base method of `wrapper`, built from its name and hyperparameters; a base that is the wrapper itself,
    unknown, or not of `kind` fails in one line naming it and listing the valid bases."""
    valid = f"Valid bases: {', '.join(kind.valid(wrapper))}."
    if base not in METHODS:
        raise ValueError(f"unknown {wrapper} base '{base}'. {valid}")
    if not kind.accepts(METHODS.get(base)):
        raise ValueError(f"{wrapper} cannot wrap '{base}' ({kind.reason}). {valid}")
    if base == wrapper:  # a wrapper of its own kind (adakv is a scoring method) still cannot wrap itself
        raise ValueError(f"{wrapper} cannot wrap itself. {valid}")
    return build_method({"name": base, **params})


class ComposedObserver:
    """The base's prefill observer and the wrapper's own as one (a budget sweep shares both); either may be None.
    The base's sees every attention call first, as it would alone."""

    def __init__(self, base: Any, own: Any) -> None:
        self.base, self.own = base, own

    def bind_model(self, lm: Any) -> None:
        for observer in (self.base, self.own):
            if hasattr(observer, "bind_model"):
                observer.bind_model(lm)

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        for observer in (self.base, self.own):
            if hasattr(observer, "on_attention"):
                observer.on_attention(layer_idx, query, layer, query_positions, scaling)


@dataclass
class Composed(Method):
    """A method over a base method (`base`, `base_params`), see the module docstring. Subclasses set `base_kind`
    (and, for a required base, a default `base`); `base_optional` lets `base` be null (the wrapper alone)."""

    base_kind: ClassVar[BaseKind]
    base_optional: ClassVar[bool] = False

    # Keyword-only so that subclasses' own fields keep their positional order.
    base: str | None = field(default=None, kw_only=True)
    base_params: dict[str, Any] = field(default_factory=dict, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.base_params = normalise_params(self.base_params)
        self.inner: Method | None = None
        if self.base is not None:
            self.inner = build_base(self.name, self.base, self.base_params, self.base_kind)
            return
        valid = f"Valid bases: {', '.join(self.base_kind.valid(self.name))}."
        if not self.base_optional:
            raise ValueError(f"{self.name} needs method.base. {valid}")
        if self.base_params:
            raise ValueError(f"method.base_params needs method.base. {valid}")

    # ------------------------------------------------------------------ identity

    def params(self) -> dict[str, Any]:
        return {**super().params(), "base_params": dict(self.base_params)}

    def label_extras(self) -> list[str]:
        """The wrapper's own hyperparameters shown in its label (`key=value`). Default: none."""
        return []

    def label(self) -> str:
        """`name[base]`, then the wrapper's `label_extras` and the base's hyperparameters."""
        extras = self.label_extras() + [f"{key}={value}" for key, value in sorted(self.base_params.items())]
        return f"{self.name}[{self.base}]" + (f"({','.join(extras)})" if extras else "")

    @property
    def takes_budget(self) -> bool:
        """Budgets apply to the base: a wrapper without one (a quantiser alone) keeps every token."""
        return self.inner is not None and self.inner.takes_budget

    @property
    def needs_fresh_prefill(self) -> bool:
        """As the base: a wrapper compresses with its base, so it needs what the base needs."""
        return self.inner is not None and self.inner.needs_fresh_prefill

    def check_model(self, config: Any) -> None:
        """The base's model checks (methods that have some define `check_model`)."""
        if hasattr(self.inner, "check_model"):
            self.inner.check_model(config)

    def rope_dependent(self) -> bool:
        return self.inner is not None and self.inner.rope_dependent()

    def handles_bounded_layers(self) -> bool:
        return self.compresses_bounded_layers and (self.inner is None or self.inner.handles_bounded_layers())

    # ------------------------------------------------------------------ prefill

    def window_queries_needed(self) -> int:
        return self.inner.window_queries_needed() if self.inner is not None else 0

    def own_prefill_observer(self) -> Any:
        """The wrapper's own prefill observer, beside the base's (None: the base's alone)."""
        return None

    def prefill_observer(self) -> Any:
        base = self.inner.prefill_observer() if self.inner is not None else None
        own = self.own_prefill_observer()
        return base if own is None else ComposedObserver(base, own)

    def own_stats(self, ctx: CompressionContext) -> Any:
        """The wrapper's own prefill observer after the prefill (None when it has none)."""
        stats = ctx.prefill_stats
        return stats.own if isinstance(stats, ComposedObserver) else None

    def base_context(self, ctx: CompressionContext) -> CompressionContext:
        """The context the base sees: its own prefill observer; the same `record` dict."""
        stats = ctx.prefill_stats
        if not isinstance(stats, ComposedObserver):
            return ctx
        return dataclasses.replace(ctx, prefill_stats=stats.base)

    # ------------------------------------------------------------------ life cycle (the base's)

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        if self.inner is not None:
            self.inner.setup(cache, self.base_context(ctx))

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        if self.inner is not None:
            self.inner.compress(cache, self.base_context(ctx))

    def after_compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        if self.inner is not None:
            self.inner.after_compress(cache, self.base_context(ctx))

    def before_forward(self, cache: KVCache, ctx: CompressionContext, num_new: int) -> None:
        if self.inner is not None:
            self.inner.before_forward(cache, self.base_context(ctx), num_new)

    # ------------------------------------------------------------------ batched decode

    def batch_refusal(self) -> str | None:
        """The wrapper's own refusal, then its base's: a composition batches when both are tested batchable."""
        own = super().batch_refusal()
        if own is not None or self.inner is None:
            return own
        base = self.inner.batch_refusal()
        return None if base is None else f"its base {self.inner.name}: {base}"
