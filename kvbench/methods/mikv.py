"""MiKV ("No Token Left Behind", Yang et al. 2024, arXiv 2402.18096) as a wrapper over any slot-keeping eviction
method: what the base keeps stays in the cache dtype, what it evicts is kept at `lo_bits` in kvbench's packed storage
(the storage: `kvbench.engine.layers.mixed_precision`; this module is the policy)."""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvbench.engine.cache import KVCache
from kvbench.engine.layers.mixed_precision import MiKVLayer
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.compose import SLOT_SUBSET, BaseKind, Composed

LO_BITS = (2, 3, 4, 8, 16)
# Only a base that chooses slots (`KVLayer.keep`, kept slots unchanged) leaves a cache that splits into kept and
# demoted sets.
SLOT_CHOOSER = dataclasses.replace(SLOT_SUBSET, reason="it does not evict by choosing slots")


def balancer(max_query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """MiKV's key outlier balancer beta `[Hkv, d]` (fp16-representable, > 0) from the prompt's per-channel max |q|
    `[H, d]` (post-RoPE) and its keys `[Hkv, n, d]`: beta_c = sqrt(max|q_c| / max|k_c|), max |q| over the query
    heads of each KV head's group; both halves of a RoPE pair (c, c + d/2) share the larger beta so rotation never
    mixes differently scaled channels [UNVERIFIED: kvbench's choice]. Channels without signal get 1."""
    num_kv, dim = keys.shape[0], keys.shape[-1]
    q = max_query.float().unflatten(0, (num_kv, -1)).amax(dim=1)
    k = keys.float().abs().amax(dim=1)
    beta = torch.where((q > 0) & (k > 0), (q / k.clamp(min=1e-30)).sqrt(), torch.ones_like(q))
    half = dim // 2
    paired = torch.maximum(beta[:, :half], beta[:, half:])
    beta = torch.cat([paired, paired], dim=1)
    return beta.to(torch.float16).float().clamp(min=2.0**-14)


class MaxQuery:
    """Prefill observer: per layer, the max |q| per query head and channel over all prompt queries `[H, d]`."""

    def __init__(self) -> None:
        self.max_query: dict[int, torch.Tensor] = {}

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        current = query[0].detach().abs().amax(dim=1).float()
        previous = self.max_query.get(layer_idx)
        self.max_query[layer_idx] = current if previous is None else torch.maximum(previous, current)


class RecordAfterForward:
    """Observer appended after the base's: at the last layer, writes MiKV's record for the row."""

    def __init__(self, cache_ref: Any, ctx: CompressionContext, last_layer: int) -> None:
        self.cache_ref, self.ctx, self.last_layer = cache_ref, ctx, last_layer

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        if layer_idx == self.last_layer:
            MiKV._record(self.cache_ref(), self.ctx)


@register_method("mikv")
@dataclass
class MiKV(Composed):
    """MiKV (Yang et al., 2024, "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed
    Precision Quantization", arXiv 2402.18096; no official code, details from the abstract and summaries), as a
    wrapper over any eviction method that only chooses slots (`method=mikv method.base=h2o`, snapkv, tova,
    streamingllm, pyramidkv, ...).

    The base runs unchanged on the high-precision cache; every slot it evicts, at the end of prefill or during
    decoding (H2O's and TOVA's per-step evictions), is demoted instead: kept at `lo_bits` with asymmetric
    round-to-nearest per token and KV head (one 16-bit scale and minimum per slot and head; kvbench's packed
    `UniformSegment`, 3-bit codes packed as stored by `kvbench.engine.quant`). No token is dropped: every layer holds
    T + generated slots. The key outlier balancer beta (per layer, KV head and channel, from the prompt's max |q|
    and max |k|, see `balancer`) scales keys before quantisation and is undone on read, equivalent to dividing
    queries by beta; its fp16 vectors are counted in the bytes.

    Budget = the base's budget = high-precision entries per KV head (the paper's policy is H2O: recent half +
    heavy half). lo_bits=16 keeps demoted slots unchanged (the cache dtype): equal to the full cache.
    drop=true discards the demoted slots: equal to the base (the ablation the tests use).

    Hyperparameters: base=h2o, base_params={}, lo_bits=2 (2 | 3 | 4 | 8 | 16; the paper's defaults, INT8 for the
    important set and its exact ratios, are [UNVERIFIED]), balance=true, drop=false. Rows: method_record
    mikv_high_entries, mikv_low_entries, mikv_low_bytes, mikv_bits_per_element (8 * kv_bytes / (2 * entries * d)).
    """

    base_kind: ClassVar[BaseKind] = SLOT_CHOOSER
    keeps_slot_subset: ClassVar[bool] = False  # evicted slots stay, demoted to low-bit storage
    plain_kv_layers: ClassVar[bool] = False

    base: str = field(default="h2o", kw_only=True)
    lo_bits: int = 2
    balance: bool = True
    drop: bool = False

    def validate(self) -> None:
        if self.lo_bits not in LO_BITS:
            raise ValueError(f"unsupported lo_bits {self.lo_bits}. Valid lo_bits: {', '.join(map(str, LO_BITS))}.")

    def label_extras(self) -> list[str]:
        extras = [f"lo_bits={self.lo_bits}"]
        extras += [] if self.balance else ["balance=False"]
        return extras + (["drop=True"] if self.drop else [])

    def own_prefill_observer(self) -> MaxQuery | None:
        return MaxQuery() if self.balance else None

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        self.validate()
        queries = self.own_stats(ctx)
        for idx, layer in enumerate(cache.layers):
            beta = None
            if self.balance and not self.drop and self.lo_bits != 16:
                if not isinstance(queries, MaxQuery):
                    raise ValueError("mikv balance=true needs its prefill observer (the prompt's queries)")
                beta = balancer(queries.max_query[idx], layer.keys[0])
            cache.layers[idx] = MiKVLayer.from_layer(layer, self.lo_bits, beta, self.drop)
        super().setup(cache, ctx)
        # Last in line after every forward (after the base's own observers evicted): the record shows the split
        # the cache holds between steps. A weak reference, so the cache is freed with its job.
        cache.observers.append(RecordAfterForward(weakref.ref(cache), ctx, len(cache.layers) - 1))
        self._record(cache, ctx)

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        super().compress(cache, ctx)
        self._record(cache, ctx)

    @staticmethod
    def _record(cache: KVCache | None, ctx: CompressionContext) -> None:
        if cache is None:
            return
        layers: list[MiKVLayer] = cache.layers  # type: ignore[assignment]
        high = sum(layer.high_entries() for layer in layers)
        entries = cache.kept_entries()
        dim = layers[0].keys.shape[-1]
        ctx.record["mikv_high_entries"] = high
        ctx.record["mikv_low_entries"] = entries - high
        ctx.record["mikv_low_bytes"] = sum(layer.low_nbytes() for layer in layers)
        ctx.record["mikv_bits_per_element"] = 8 * cache.kv_bytes() / (2 * entries * dim) if entries else None
