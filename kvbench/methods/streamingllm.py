from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine import rope
from kvbench.engine.cache import KVCache
from kvbench.methods.base import CompressionContext, Method, register_method
from kvbench.methods.window import keep_recent


@register_method("streamingllm")
@dataclass
class StreamingLLM(Method):
    """StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks").

    Keeps the first `n_sink` slots (attention sinks) and the most recent `budget - n_sink`. Compresses once
    at the end of prefill and then before every forward, so the cache never exceeds the budget
    (`decode_evict=false`: prefill only, the question tail and generated tokens are appended, as in harnesses
    that compress the context once, e.g. kvpress's StreamingLLMPress).

    Hyperparameters: n_sink=4; rerotate=false keeps every slot at its original position (kvbench default);
    rerotate=true is the paper's mode: kept keys are re-rotated to contiguous positions 0..len-1 and new
    tokens take their cache index as position; decode_evict=true.

    Chunked prefill (`prefill_chunk`): the same rule after every chunk, so the prompt ends with the one-shot
    slots (sinks + most recent positions); their keys/values above layer 0 differ, since later chunks attended
    to the compressed cache. With rerotate=true the next chunk continues at the cache length, as generated
    tokens do.
    """

    supports_chunked_prefill: ClassVar[bool] = True
    # rerotate=true renumbers the kept keys to contiguous positions: a wrapper sees them as StreamingLLM leaves them.
    keeps_slot_subset: ClassVar[bool] = True
    plain_kv_layers: ClassVar[bool] = True
    position_only: ClassVar[bool] = True
    batchable: ClassVar[bool] = True  # decode_evict true and false; tested: tests/test_batched.py

    n_sink: int = 4
    rerotate: bool = False
    decode_evict: bool = True

    def rope_dependent(self) -> bool:
        return self.rerotate

    def decode_grows_only(self) -> bool:
        return not self.decode_evict

    def _evict(self, cache: KVCache, keep: int, ctx: CompressionContext) -> None:
        keep_recent(cache, max(keep, min(self.n_sink, ctx.budget)), sinks=self.n_sink)
        if self.rerotate:
            self._renumber(cache, ctx)

    def _renumber(self, cache: KVCache, ctx: CompressionContext) -> None:
        rope.check_shiftable_rope(ctx.model, "streamingllm rerotate=true")
        inv_freq = rope.rope_inv_freq(ctx.model)
        for layer in cache.layers:
            contiguous = torch.arange(layer.get_seq_length(), device=layer.device).expand_as(layer.positions)
            layer.keys = rope.rerotate(layer.keys, layer.positions, contiguous, inv_freq)
            layer.positions = contiguous.clone()
        cache.seen_tokens = cache.layers[0].get_seq_length()

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        self._evict(cache, ctx.budget, ctx)

    def before_forward(self, cache: KVCache, ctx: CompressionContext, num_new: int) -> None:
        if self.decode_evict and cache.layers[0].get_seq_length() + num_new > ctx.budget:
            self._evict(cache, ctx.budget - num_new, ctx)
