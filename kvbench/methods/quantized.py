"""`QuantizedMethod`: the base of quantised-storage methods (kivi, rtn), optionally over an eviction method.

Composition (one way): an eviction method chooses the slots, the quantiser decides how the kept slots are
stored. `method=kivi method.base=snapkv budget=128` runs SnapKV's selection at its budget (`method.base_params`
passes SnapKV's hyperparameters), then stores what SnapKV kept with KIVI's codec; KIVI's per-channel key groups
then run over G consecutive KEPT slots (their positions need not be contiguous). Without `base` every prompt
token is kept and the budget is not swept (rows record `budget: null`); bit widths sweep through the method's
own fields (`-m method.k_bits=2,4`). A base that evicts during decoding (h2o, tova, streamingllm, or a
`decode_budget`) evicts from the quantised layers: kept slots are dequantised, gathered and re-encoded
(`kvbench.engine.quant.layer`).

Life cycle: the base's `setup`/`compress`/`before_forward` run as they would alone (on the fp prefill cache, so
its scores are those of the unquantised keys), then `after_compress` converts every layer to a `QuantKVLayer`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvbench.engine.cache import KVCache
from kvbench.engine.quant.codecs import UniformCodec
from kvbench.engine.quant.layer import quantize_cache
from kvbench.methods.base import CompressionContext, Method, build_method


def head_dim_of(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


@dataclass
class QuantizedMethod(Method, ABC):
    compresses: ClassVar[bool] = True  # the stored cache differs from the full one: a full-cache row is added

    base: str | None = field(default=None, kw_only=True)
    base_params: dict[str, Any] = field(default_factory=dict, kw_only=True)

    @abstractmethod
    def codec(self) -> UniformCodec: ...

    def __post_init__(self) -> None:
        self.codec().check()
        self.base_params = {str(key): value for key, value in dict(self.base_params or {}).items()}
        self.evictor: Method | None = None
        if self.base is not None:
            self.evictor = build_method({"name": self.base, **self.base_params})
            if isinstance(self.evictor, QuantizedMethod) or not self.evictor.compresses:
                raise ValueError(
                    f"method.base must be an eviction method (e.g. snapkv, pyramidkv, h2o), got '{self.base}'"
                )
        elif self.base_params:
            raise ValueError("method.base_params needs method.base (an eviction method, e.g. snapkv)")

    @property
    def takes_budget(self) -> bool:
        """Budgets apply to the base eviction method; a quantiser alone keeps every token."""
        return self.evictor is not None

    def check_model(self, config: Any) -> None:
        self.codec().check_head_dim(head_dim_of(config))

    def window_queries_needed(self) -> int:
        return self.evictor.window_queries_needed() if self.evictor else 0

    def prefill_observer(self) -> Any:
        return self.evictor.prefill_observer() if self.evictor else None

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        if self.evictor:
            self.evictor.setup(cache, ctx)

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        if self.evictor:
            self.evictor.compress(cache, ctx)

    def after_compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        codec = self.codec()
        quantize_cache(cache, codec, packed_decode=ctx.kernels == "triton")
        ctx.record["quant"] = codec.describe()

    def before_forward(self, cache: KVCache, ctx: CompressionContext, num_new: int) -> None:
        if self.evictor:
            self.evictor.before_forward(cache, ctx, num_new)
