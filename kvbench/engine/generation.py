"""Prefill and kvbench's own greedy decode loop.

Every forward goes through `forward_tokens`, which asks the cache for the ORIGINAL positions of the new
tokens and passes them as `position_ids` (transformers would otherwise derive them from the compressed
cache length). `model.generate` is never used for compressed runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvbench.engine.architecture import cache_argument
from kvbench.engine.attention import CACHE_KWARG
from kvbench.engine.cache import KVCache
from kvbench.engine.measure import Stopwatch
from kvbench.engine.models import LoadedModel


class QueryRecorder:
    """Attention observer keeping the post-RoPE queries of the last `window` tokens of each layer."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.queries: dict[int, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None
        self.first_layer: int | None = None
        self.scaling = 1.0

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        recent = query[0, :, -self.window :].detach()
        if layer_idx in self.queries:  # chunked prefill: keep the tail across chunks
            recent = torch.cat([self.queries[layer_idx], recent], dim=1)[:, -self.window :]
        self.queries[layer_idx] = recent.clone()
        if self.first_layer is None:  # the first attention layer (layer 0 may be a linear-attention / SSM layer)
            self.first_layer = layer_idx
        if layer_idx == self.first_layer:
            previous = self.positions if self.positions is not None else query_positions[:0]
            self.positions = torch.cat([previous, query_positions])[-self.window :]
        self.scaling = scaling


@dataclass
class Prefill:
    """One prompt prefilled into a full cache: reused (copied) by every method and budget of a sweep."""

    cache: KVCache
    last_logits: torch.Tensor
    window_queries: list[torch.Tensor]
    window_positions: torch.Tensor | None
    scaling: float
    seconds: float
    peak_mem_bytes: int | None


@torch.inference_mode()
def forward_tokens(
    lm: LoadedModel, cache: KVCache, token_ids: list[int], logits_to_keep: int | None = None
) -> torch.Tensor:
    """Append `token_ids` at their original positions; returns the logits of the last one, `[vocab]`, or with
    `logits_to_keep=n` those of the last n, `[n, vocab]` (scoring continuations)."""
    positions = cache.next_positions(len(token_ids), lm.device)
    cache = cache.model_cache  # the model forwards through every layer (a `LayerSubset` is a method's view)
    output = lm.model(
        input_ids=torch.tensor([token_ids], device=lm.device),
        position_ids=positions[None],
        **{cache_argument(type(lm.model)): cache},
        use_cache=True,
        logits_to_keep=logits_to_keep or 1,
        **{CACHE_KWARG: cache},
    )
    return output.logits[0, -1] if logits_to_keep is None else output.logits[0]


def prefill(
    lm: LoadedModel,
    token_ids: list[int],
    window: int,
    stopwatch: Stopwatch,
    observers: list | None = None,
    cache: KVCache | None = None,
) -> Prefill:
    """Prefill `token_ids` into a fresh full cache, recording the last `window` queries of every layer.

    `observers` (methods' prefill observers) see every layer's attention of this one prefill. `cache`: append to
    this cache instead (a prompt whose start is already cached, e.g. reused segments in `kvbench.scenarios`).
    """
    cache = cache if cache is not None else KVCache(lm.layer_specs)
    recorder = QueryRecorder(window) if window > 0 else None
    cache.observers.extend(([recorder] if recorder else []) + list(observers or []))
    with stopwatch.phase("prefill") as phase:
        logits = forward_tokens(lm, cache, token_ids)
    cache.observers.clear()
    # State layers (linear attention, SSM) record nothing: None keeps the list indexed by layer.
    queries = [recorder.queries.get(i) for i in range(len(cache.layers))] if recorder else []
    return Prefill(
        cache=cache,
        last_logits=logits,
        window_queries=queries,
        window_positions=recorder.positions if recorder else None,
        scaling=recorder.scaling if recorder else 1.0,
        seconds=phase.seconds,
        peak_mem_bytes=phase.peak_mem_bytes,
    )


@dataclass
class Decoded:
    tokens: list[int]
    seconds: float  # forwards after the first token
    steps: int
    max_layer_len: int  # largest per-layer cache length seen during decoding
    peak_mem_bytes: int | None


def greedy_decode(
    lm: LoadedModel,
    cache: KVCache,
    first_logits: torch.Tensor,
    max_new_tokens: int,
    before_forward: Callable[[int], None],
    stopwatch: Stopwatch,
    stop_at_eos: bool = True,
    stop: Callable[[list[int]], bool] | None = None,
) -> Decoded:
    """Greedy decoding from `first_logits`; stops at EOS, when `stop(tokens)` says so (e.g. a stop string was
    generated) or after `max_new_tokens` tokens.

    `stop_at_eos=False` always generates `max_new_tokens` (latency benchmarks need a fixed number of steps).
    """
    eos = set(lm.eos_token_ids) if stop_at_eos else set()
    tokens: list[int] = []
    logits = first_logits
    max_len = max(layer.get_seq_length() for layer in cache.layers)
    steps = 0
    with stopwatch.phase("decode") as phase:
        while True:
            token = int(torch.argmax(logits))
            tokens.append(token)
            if token in eos or len(tokens) >= max_new_tokens or (stop is not None and stop(tokens)):
                break
            before_forward(1)
            logits = forward_tokens(lm, cache, [token])
            steps += 1
            max_len = max(max_len, max(layer.get_seq_length() for layer in cache.layers))
    return Decoded(tokens, phase.seconds, steps, max_len, phase.peak_mem_bytes)
