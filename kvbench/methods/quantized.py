"""`QuantizedMethod`: the base of quantised-storage methods (kivi, rtn, gear, rotatekv, octopus), optionally over
an eviction method.

Composition (one way): an eviction method chooses the slots, the quantiser decides how the kept slots are
stored. `method=kivi method.base=snapkv budget=128` runs SnapKV's selection at its budget (`method.base_params`
passes SnapKV's hyperparameters), then stores what SnapKV kept with KIVI's codec; KIVI's per-channel key groups
then run over G consecutive KEPT slots (their positions need not be contiguous). Without `base` every prompt
token is kept and the budget is not swept (rows record `budget: null`); bit widths sweep through the method's
own fields (`-m method.k_bits=2,4`). A base that evicts during decoding (h2o, tova, streamingllm, or a
`decode_budget`) evicts from the quantised layers: kept slots are dequantised, gathered and re-encoded
(`kvbench.engine.quant.layer`).

Life cycle (`kvbench.methods.compose`): the base's `setup`/`compress`/`after_compress`/`before_forward` run as they
would alone (on the fp prefill cache, so its scores are those of the unquantised keys), then `store` converts every
layer to quantised storage (`QuantKVLayer`). Accepted bases: every eviction method whose cache stays plain K/V
layers (`Method.plain_kv_layers`: the slot-subset methods, kv_distill, razor).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from kvbench.engine.cache import KVCache
from kvbench.engine.models import head_dim_of
from kvbench.engine.quant.codecs import UniformCodec
from kvbench.engine.quant.layer import quantize_cache
from kvbench.methods.base import CompressionContext, Method
from kvbench.methods.compose import BaseKind, Composed

# A base whose compressed cache is plain K/V layers, which the quantiser can take over.
EVICTOR = BaseKind(
    lambda cls: cls.compresses and cls.plain_kv_layers,
    "method.base must be an eviction method that leaves plain K/V layers",
)


def check_whole_groups(tail_name: str, tail: Any, group_size: Any, group_changed: bool) -> None:
    """A full-precision tail quantised in whole groups of slots: `tail` must be a positive multiple of
    `group_size`. The one-line error names the value that was changed: the group size when only it differs from
    its default (its valid values then divide the tail), else the tail."""
    values = (tail, group_size)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values) or tail % group_size == 0:
        return  # types, ranges and a zero tail are the codec's own checks
    if group_changed:
        valid = ", ".join(str(g) for g in range(1, tail + 1) if tail % g == 0)
        raise ValueError(
            f"group_size {group_size} does not divide {tail_name} {tail} (the fp tail is quantised in whole groups "
            f"of slots). Valid group sizes: {valid}."
        )
    raise ValueError(
        f"{tail_name} {tail} is not a positive multiple of group_size {group_size}. "
        f"Valid {tail_name}s: {group_size}, {2 * group_size}, {3 * group_size}, ..."
    )


def changed_alone(method: Any, name: str, other: str) -> bool:
    """Whether field `name` differs from its dataclass default while `other` keeps its own."""
    fields = {f.name: f for f in dataclasses.fields(method)}
    return getattr(method, name) != fields[name].default and getattr(method, other) == fields[other].default


@dataclass
class QuantizedMethod(Composed, ABC):
    """A quantiser of the kept slots, optionally over an eviction method (`base`, see the module docstring); the
    base's life cycle is forwarded by `Composed`, `after_compress` then stores every layer quantised."""

    compresses: ClassVar[bool] = True  # the stored cache differs from the full one: a full-cache row is added
    keeps_slot_subset: ClassVar[bool] = False  # the kept slots are stored quantised, not as plain K/V
    plain_kv_layers: ClassVar[bool] = False
    base_kind: ClassVar[BaseKind] = EVICTOR
    base_optional: ClassVar[bool] = True  # alone, a quantiser keeps every token (rows record `budget: null`)

    @abstractmethod
    def codec(self, head_dim: int | None = None) -> UniformCodec:
        """The storage codec; for a model's `head_dim`, groups along channels hold at most one head vector
        (`kvbench.engine.quant.codecs.channel_group_size`), so the defaults run on every head dim."""

    def __post_init__(self) -> None:
        self.codec().check()
        super().__post_init__()

    def label_extras(self) -> list[str]:
        """The quantiser's own hyperparameters that differ from its defaults (`key=value`)."""
        defaults = type(self)()
        own = {k: v for k, v in Method.params(self).items() if k not in ("base", "base_params")}
        return [f"{k}={v}" for k, v in sorted(own.items()) if getattr(defaults, k) != v]

    def label(self) -> str:
        """`name[base](key=value,...)` as every composed method, `name(key=value,...)` alone."""
        if self.base is not None:
            return super().label()
        extras = self.label_extras()
        return self.name + (f"({','.join(extras)})" if extras else "")

    def check_model(self, config: Any) -> None:
        head_dim = head_dim_of(config)
        self.codec(head_dim).check_head_dim(head_dim)
        super().check_model(config)

    def after_compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        super().after_compress(cache, ctx)
        self.store(cache, ctx)

    def store(self, cache: KVCache, ctx: CompressionContext) -> None:
        """Store every layer's kept slots with this method's codec (after the base compressed)."""
        codec = self.codec(cache.layers[0].keys.shape[-1] if cache.layers else None)
        quantize_cache(cache, codec, packed_decode=ctx.kernels == "triton")
        ctx.record["quant"] = codec.describe()
