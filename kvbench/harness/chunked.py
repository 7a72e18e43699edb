"""Chunked prefill with compression (`prefill_chunk=n`): the prompt is fed `n` tokens at a time and the job's
method compresses the cache after every chunk that leaves it over budget, so during the prefill a layer holds
at most budget + n slots per KV head (PyramidKV: its own layer budget + n) instead of the whole prompt.

The cache is compressed between chunks, so, unlike the one-shot prefill, this prefill cannot be shared by the
budgets of a sweep: every job prefills its own cache. Each compression gets a `CompressionContext` built from
the prompt so far (`prompt_len` = tokens seen, `input_ids` = those tokens) and the latest window queries (a
`QueryRecorder` keeps the last `window_queries_needed()` queries across chunks). The method's
`chunked_prefill_observer()` watches every chunk; `setup` runs once afterwards, in `runner.run_job`.
Which methods support it, and what each does per chunk, is in their docstrings (`supports_chunked_prefill`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from kvbench.engine.architecture import describe
from kvbench.engine.cache import KVCache
from kvbench.engine.generation import Prefill, QueryRecorder, forward_tokens
from kvbench.engine.measure import Stopwatch
from kvbench.engine.models import LoadedModel
from kvbench.harness.budget import entries_for
from kvbench.methods.base import METHODS, CompressionContext, Method

ONESHOT = "oneshot"


@dataclass
class ChunkedPrefill(Prefill):
    """A prefill compressed chunk by chunk; it belongs to one job, whose cache it already is."""

    chunk: int = 0
    max_cache_len: int = 0  # most slots any layer held per KV head during the prefill (after a chunk's forward)
    compressions: int = 0  # compress calls made between chunks
    compress_seconds: float = 0.0  # time inside those calls (not counted in `seconds`)
    kv_bytes_full: int = 0  # what the uncompressed cache of the prompt would take
    prefill_stats: Any = None  # the method's chunked-prefill observer


def supports_chunked_prefill(method: Method) -> bool:
    """Declared in the method's own class body; methods that never compress (full) trivially support it."""
    return not method.compresses or bool(vars(type(method)).get("supports_chunked_prefill", False))


def chunked_methods() -> list[str]:
    classes = {name: METHODS.get(name) for name in METHODS.names()}
    return [name for name, cls in classes.items() if cls.compresses and vars(cls).get("supports_chunked_prefill")]


def parse_prefill_chunk(value: Any) -> int | None:
    """`prefill_chunk`: null (one-shot prefill) or a positive int (tokens per chunk); one-line errors."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"prefill_chunk must be a positive int (tokens per chunk) or null, got {value!r}")
    return value


def check_chunked_methods(prefill_chunk: int | None, methods: list[Method]) -> None:
    """Fail in one line, naming the methods that support it, if a method cannot run a chunked prefill."""
    if prefill_chunk is None:
        return
    for method in methods:
        if not supports_chunked_prefill(method):
            raise ValueError(
                f"method {method.name} does not support chunked prefill (prefill_chunk={prefill_chunk}). "
                f"Methods that do: {', '.join(chunked_methods())}; or set prefill_chunk=null."
            )


def prefill_mode(prefill_chunk: int | None) -> str:
    """The row's `prefill_mode`: "oneshot" or "chunked:<n>"."""
    return ONESHOT if prefill_chunk is None else f"chunked:{prefill_chunk}"


def chunked_prefill(
    lm: LoadedModel,
    token_ids: list[int],
    chunk: int,
    method: Method,
    budget: int | float | None,
    stopwatch: Stopwatch,
    seed: int = 0,
    cache_dir: Any = None,
    kernels: str = "torch",
) -> ChunkedPrefill:
    """Prefill `token_ids` in chunks of `chunk` tokens for one (method, budget) job, compressing between chunks.

    `budget` is resolved against the whole prompt, as in the one-shot path, so both modes end at the same
    number of entries.
    """
    if not supports_chunked_prefill(method):
        raise ValueError(f"method {method.name} does not support chunked prefill")
    total = len(token_ids)
    entries = entries_for(budget, total)
    base_ctx = CompressionContext.for_prompt(
        lm,
        total if entries is None else entries,
        total,
        seed=seed,
        cache_dir=cache_dir,
        kernels=kernels,
    )
    compresses = method.compresses and entries is not None and entries < total
    if compresses and any(not spec.attends or spec.kind != "full_attention" for spec in lm.layer_specs):
        raise ValueError(
            f"prefill_chunk with compression needs a model whose every layer is full attention; this one has "
            f"{describe(lm.layer_specs)} (run it with a one-shot prefill, prefill_chunk=null)"
        )
    cache = KVCache(lm.layer_specs)
    window = min(method.window_queries_needed(), total)
    recorder = QueryRecorder(window) if window > 0 else None
    observer = method.chunked_prefill_observer()
    if observer is not None and hasattr(observer, "bind_model"):
        observer.bind_model(lm)
    cache.observers.extend(obs for obs in (recorder, observer) if obs is not None)
    max_len, compressions, compress_seconds = 0, 0, 0.0
    with stopwatch.phase("prefill") as phase:
        for start in range(0, total, chunk):
            logits = forward_tokens(lm, cache, token_ids[start : start + chunk])
            seen = min(total, start + chunk)
            longest = max(layer.get_seq_length() for layer in cache.layers)
            max_len = max(max_len, longest)
            if compresses and longest > entries:
                stopwatch.sync()
                began = time.perf_counter()
                ctx = dataclasses.replace(
                    base_ctx,
                    budget=entries,
                    prompt_len=seen,
                    input_ids=list(token_ids[:seen]),
                    window_queries=[recorder.queries.get(i) for i in range(len(cache.layers))] if recorder else [],
                    window_positions=recorder.positions if recorder else None,
                    scaling=recorder.scaling if recorder else base_ctx.scaling,
                    prefill_stats=observer,
                )
                method.compress(cache, ctx)
                stopwatch.sync()
                compress_seconds += time.perf_counter() - began
                compressions += 1
    cache.observers.clear()
    return ChunkedPrefill(
        cache=cache,
        last_logits=logits,
        window_queries=[recorder.queries.get(i) for i in range(len(cache.layers))] if recorder else [],
        window_positions=recorder.positions if recorder else None,
        scaling=recorder.scaling if recorder else 1.0,
        seconds=phase.seconds - compress_seconds,
        peak_mem_bytes=phase.peak_mem_bytes,
        chunk=chunk,
        max_cache_len=max_len,
        compressions=compressions,
        compress_seconds=compress_seconds,
        kv_bytes_full=lm.full_kv_bytes(total) + cache.kv_bytes_by_type().get("state", 0),
        prefill_stats=observer,
    )


def prefill_fields(pre: Prefill, prompt_len: int) -> dict[str, Any]:
    """Row fields describing how the prompt was prefilled."""
    if isinstance(pre, ChunkedPrefill):
        return {
            "prefill_mode": prefill_mode(pre.chunk),
            "prefill_max_cache_len": pre.max_cache_len,
            "prefill_compressions": pre.compressions,
        }
    return {"prefill_mode": ONESHOT, "prefill_max_cache_len": prompt_len, "prefill_compressions": 0}
