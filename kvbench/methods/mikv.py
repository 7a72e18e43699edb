"""MiKV ("No Token Left Behind", Yang et al. 2024, arXiv 2402.18096) as a wrapper over any eviction method: what the
base keeps stays in the cache dtype, what it evicts is kept at `lo_bits` in kvbench's packed storage."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from kvbench.engine.cache import PAD_POSITION, KVCache, KVLayer
from kvbench.engine.quant.segments import SegmentStore, UniformSegment
from kvbench.methods.base import CompressionContext, Method, register_method
from kvbench.methods.wrapped import build_base, normalise_params

LO_BITS = (2, 3, 4, 8, 16)
# Methods that do not only choose slots (`KVLayer.keep`): their caches cannot be split into kept/demoted sets.
NOT_SELECTORS = ("full", "kv_direct", "mikv", "razor")


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


class MiKVObserver:
    """The base method's prefill observer and MiKV's own, as one (a sweep shares both)."""

    def __init__(self, base: Any, balance: bool) -> None:
        self.base = base
        self.queries = MaxQuery() if balance else None

    def bind_model(self, lm: Any) -> None:
        if hasattr(self.base, "bind_model"):
            self.base.bind_model(lm)

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        for observer in (self.base, self.queries):
            if observer is not None:
                observer.on_attention(layer_idx, query, layer, query_positions, scaling)


class MiKVLayer(KVLayer):
    """A layer whose plain K/V tensors hold the base's kept (high-precision) slots, and whose `low` stores hold
    every slot the base evicted, quantised per token (`UniformSegment`, one scale/zero per slot and head) or, at
    lo_bits=16, unchanged (`FPSegment`). The base sees only the high-precision slots (its own cache); attention
    sees both, merged into position order, so lo_bits=16 attends over exactly the full cache's tensors.

    Keys are stored as beta * k and read back as k^ / beta: q . (k^ / beta) = (q / beta) . k^, the balancer's
    "divide queries by beta", without touching the model.
    """

    def __init__(self, lo_bits: int, beta: torch.Tensor | None, drop: bool) -> None:
        super().__init__()
        self.lo_bits, self.beta, self.drop = lo_bits, beta, drop
        self.low_keys: SegmentStore | None = None
        self.low_values: SegmentStore | None = None
        self.low_positions: torch.Tensor | None = None
        self.merged_positions: torch.Tensor | None = None

    @classmethod
    def from_layer(cls, layer: KVLayer, lo_bits: int, beta: torch.Tensor | None, drop: bool) -> MiKVLayer:
        new = cls(lo_bits, beta, drop)
        new.__dict__.update({k: v for k, v in vars(layer).items() if k not in ("lo_bits", "beta", "drop")})
        heads = layer.keys.shape[1]
        new.low_keys = SegmentStore(layer.keys[0, :, :0])
        new.low_values = SegmentStore(layer.values[0, :, :0])
        new.low_positions = torch.empty((heads, 0), dtype=torch.long, device=layer.device)
        return new

    def low_count(self) -> int:
        return 0 if self.low_positions is None else self.low_positions.shape[1]

    def demote(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Append slots `[Hkv, m, d]` (padding slots: PAD_POSITION) to the low-precision stores."""
        if keys.shape[1] == 0:
            return
        if self.beta is not None:
            keys = keys * self.beta[:, None, :].to(keys.dtype)
        for store, data in ((self.low_keys, keys), (self.low_values, values)):
            store.append_fp(data.contiguous())
            if self.lo_bits != 16:
                store.encode_oldest_fp(data.shape[1], self.encoder)
        self.low_positions = torch.cat([self.low_positions, positions], dim=1)

    def encoder(self, x: torch.Tensor) -> UniformSegment:
        return UniformSegment.encode(x, self.lo_bits, x.shape[-1], "channel")  # per token and head

    def keep(self, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """The base's eviction: kept slots stay, the others are demoted (dropped with drop=true)."""
        if not self.drop:
            length = self.get_seq_length()
            kept = torch.zeros((self.num_heads, length), dtype=torch.bool, device=self.device)
            indices = indices.to(self.device)
            if valid is None:
                kept.scatter_(1, indices, True)
            else:  # padded entries point at slot 0: only the valid ones mark a slot as kept
                valid = valid.to(self.device)
                rows = torch.arange(self.num_heads, device=self.device)[:, None].expand_as(indices)
                kept[rows[valid], indices[valid]] = True
            kept |= self.positions == PAD_POSITION  # padding is never demoted
            evicted = ~kept
            counts = evicted.sum(dim=1)
            width = int(counts.max()) if length else 0
            if width:
                order = torch.sort((~evicted).to(torch.int8), dim=1, stable=True).indices[:, :width]
                real = torch.arange(width, device=self.device)[None, :] < counts[:, None]
                gather = order[None, :, :, None].expand(1, -1, -1, self.keys.shape[-1])
                keys = self.keys.gather(2, gather)[0].masked_fill(~real[:, :, None], 0)
                values = self.values.gather(2, gather)[0].masked_fill(~real[:, :, None], 0)
                positions = self.positions.gather(1, order).masked_fill(~real, PAD_POSITION)
                self.demote(keys, values, positions)
        super().keep(indices, valid)

    def update(self, key_states, value_states, *args, positions: torch.Tensor, **kwargs):
        keys, values = super().update(key_states, value_states, positions=positions)
        self.merged_positions = None
        if self.low_count() == 0:
            return keys, values
        low_keys = self.low_keys.materialize(keys.dtype)
        if self.beta is not None:
            low_keys = low_keys / self.beta[:, None, :].to(keys.dtype)
        low_values = self.low_values.materialize(values.dtype)
        merged = torch.cat([self.low_positions, self.positions], dim=1)
        order = torch.sort(merged, dim=1, stable=True).indices  # position order (padding last)
        self.merged_positions = merged.gather(1, order)
        gather = order[None, :, :, None].expand(1, -1, -1, keys.shape[-1])
        keys = torch.cat([low_keys[None], keys], dim=2).gather(2, gather)
        values = torch.cat([low_values[None], values], dim=2).gather(2, gather)
        return keys, values

    def attention_mask(self, query_positions: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        if self.merged_positions is None:
            return super().attention_mask(query_positions)
        padded = bool((self.merged_positions == PAD_POSITION).any())
        if query_positions.shape[0] == 1 and not padded:
            return None, False
        same = bool((self.merged_positions == self.merged_positions[:1]).all())
        key_pos = self.merged_positions[:1] if same else self.merged_positions
        mask = key_pos[:, None, :] <= query_positions.to(self.device)[None, :, None]
        return mask[None], False

    def copy(self) -> MiKVLayer:
        other = MiKVLayer.from_layer(super().copy(), self.lo_bits, self.beta, self.drop)
        other.low_keys, other.low_values = self.low_keys.clone(), self.low_values.clone()
        other.low_positions = self.low_positions.clone()
        return other

    def lengths(self) -> torch.Tensor:
        low = (self.low_positions != PAD_POSITION).sum(dim=-1) if self.low_count() else 0
        return super().lengths() + low

    def high_entries(self) -> int:
        return int(super().lengths().sum())

    def low_nbytes(self) -> int:
        return self.low_keys.nbytes() + self.low_values.nbytes()

    def beta_nbytes(self) -> int:
        return 0 if self.beta is None else self.beta.numel() * 2  # stored as fp16

    def nbytes(self) -> int:
        return super().nbytes() + self.low_nbytes() + self.beta_nbytes()

    def logical_nbytes(self) -> int:
        return super().logical_nbytes() + self.low_nbytes() + self.beta_nbytes()


class RecordAfterForward:
    """Observer appended after the base's: at the last layer, writes MiKV's record for the row."""

    def __init__(self, cache_ref: Any, ctx: CompressionContext, last_layer: int) -> None:
        self.cache_ref, self.ctx, self.last_layer = cache_ref, ctx, last_layer

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        if layer_idx == self.last_layer:
            MiKV._record(self.cache_ref(), self.ctx)


@register_method("mikv")
@dataclass
class MiKV(Method):
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

    base: str = "h2o"
    base_params: dict[str, Any] = field(default_factory=dict)
    lo_bits: int = 2
    balance: bool = True
    drop: bool = False

    def __post_init__(self) -> None:
        self.base_params = normalise_params(self.base_params)
        if self.base in NOT_SELECTORS:
            raise ValueError(
                f"mikv cannot wrap '{self.base}' (it does not evict by choosing slots). Valid bases: any eviction "
                f"method except {', '.join(NOT_SELECTORS)}."
            )
        self.inner = build_base(self.name, self.base, self.base_params, kind=Method)
        if not self.inner.compresses:
            raise ValueError(f"mikv cannot wrap '{self.base}': it never evicts")

    def validate(self) -> None:
        if self.lo_bits not in LO_BITS:
            raise ValueError(f"unsupported lo_bits {self.lo_bits}. Valid lo_bits: {', '.join(map(str, LO_BITS))}.")

    def params(self) -> dict[str, Any]:
        return {**super().params(), "base_params": dict(self.base_params)}

    def label(self) -> str:
        extras = [f"lo_bits={self.lo_bits}"]
        extras += [] if self.balance else ["balance=False"]
        extras += ["drop=True"] if self.drop else []
        extras += [f"{key}={value}" for key, value in sorted(self.base_params.items())]
        return f"{self.name}[{self.base}]({','.join(extras)})"

    def window_queries_needed(self) -> int:
        return self.inner.window_queries_needed()

    def prefill_observer(self) -> MiKVObserver:
        return MiKVObserver(self.inner.prefill_observer(), self.balance)

    def inner_ctx(self, ctx: CompressionContext) -> CompressionContext:
        stats = ctx.prefill_stats
        base_stats = stats.base if isinstance(stats, MiKVObserver) else stats
        return CompressionContext(**{**vars(ctx), "prefill_stats": base_stats})

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        self.validate()
        stats = ctx.prefill_stats
        for idx, layer in enumerate(cache.layers):
            beta = None
            if self.balance and not self.drop and self.lo_bits != 16:
                if not isinstance(stats, MiKVObserver) or stats.queries is None:
                    raise ValueError("mikv balance=true needs its prefill observer (the prompt's queries)")
                beta = balancer(stats.queries.max_query[idx], layer.keys[0])
            cache.layers[idx] = MiKVLayer.from_layer(layer, self.lo_bits, beta, self.drop)
        self.inner.setup(cache, self.inner_ctx(ctx))
        # Last in line after every forward (after the base's own observers evicted): the record shows the split
        # the cache holds between steps. A weak reference, so the cache is freed with its job.
        cache.observers.append(RecordAfterForward(weakref.ref(cache), ctx, len(cache.layers) - 1))
        self._record(cache, ctx)

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        self.inner.compress(cache, self.inner_ctx(ctx))
        self._record(cache, ctx)

    def after_compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        self.inner.after_compress(cache, self.inner_ctx(ctx))

    def before_forward(self, cache: KVCache, ctx: CompressionContext, num_new: int) -> None:
        self.inner.before_forward(cache, self.inner_ctx(ctx), num_new)

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
