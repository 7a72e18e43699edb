from __future__ import annotations

import math
from dataclasses import dataclass

from kvbench.engine.cache import KVCache
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.decode_budget import attach_recent_queries, enforce_decode_budget
from kvbench.methods.wrapped import ScorerWrapper


def fraction_cap(seen: int, fraction: float) -> int:
    """Slots per KV head a layer may hold after `seen` tokens when it keeps `fraction` of them (at least 1)."""
    return max(1, math.floor(seen * fraction + 1e-9))


@register_method("compression_ratio_decoding")
@dataclass
class CompressionRatioDecoding(ScorerWrapper):
    """Keep a fixed fraction of every token seen, also while decoding (NVIDIA kvpress
    `CompressionRatioDecodingPress`, a `DecodingPress` whose target size is a fraction of the tokens seen so far).

    The base compresses the prompt to the budget B as usual. Before every later forward (question tail, decode
    steps) each layer may hold at most floor(f * (seen + new)) slots per KV head, f the kept fraction; a layer that
    would exceed it is re-scored by the base and cut to that cap minus `compression_interval` (the decode-budget
    machinery of `kvbench.methods.decode_budget`, with the latest window queries), so the cache tracks f of the
    sequence and is re-scored about every `compression_interval` steps. `compression_ratio=null` (default): f is
    the prefill's kept fraction B / T (a budget holding the prompt then never evicts); a value r: f = 1 - r,
    kvpress's `target_compression_ratio` (removed fraction). kvpress compresses only while decoding and leaves the
    prefill to another press; here the prefill is the base at the budget. Rows: method_record
    decode_rescores (layer re-scorings).

    Hyperparameters: base=snapkv, base_params={}; compression_ratio=null; compression_interval=16 (kvpress: 512,
    for generations far longer than the benchmarks' answers).
    """

    compression_ratio: float | None = None
    compression_interval: int = 16

    def validate(self) -> None:
        ratio = self.compression_ratio
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise ValueError(f"compression_ratio_decoding compression_ratio must be in [0, 1) or null, got {ratio}")
        if isinstance(self.compression_interval, bool) or not isinstance(self.compression_interval, int):
            raise ValueError(f"compression_interval must be a positive int, got {self.compression_interval!r}")
        if self.compression_interval < 1:
            raise ValueError(f"compression_interval must be a positive int, got {self.compression_interval!r}")
        self.refuse_decode_budget()

    def label_extras(self) -> list[str]:
        extras = [] if self.compression_ratio is None else [f"compression_ratio={self.compression_ratio}"]
        if self.compression_interval != type(self).compression_interval:
            extras.append(f"compression_interval={self.compression_interval}")
        return extras

    def kept_fraction(self, ctx: CompressionContext) -> float:
        if self.compression_ratio is not None:
            return 1.0 - self.compression_ratio
        return ctx.budget / ctx.prompt_len if ctx.prompt_len else 1.0

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        super().setup(cache, ctx)
        attach_recent_queries(cache, ctx, self.window_queries_needed())

    def before_forward(self, cache: KVCache, ctx: CompressionContext, num_new: int) -> None:
        cap = max(fraction_cap(cache.seen_tokens + num_new, self.kept_fraction(ctx)), num_new + 1)
        enforce_decode_budget(self, cache, ctx, num_new, cap, min(self.compression_interval, cap - 1))
