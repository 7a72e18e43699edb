"""Decode-time budgets for any scorer (`ScoringMethod.decode_budget`, `decode_interval`).

A scorer compresses once at the end of prefill; with `decode_budget=N` it also keeps every layer's cache at
most N slots per KV head during generation. Before a forward that would push a layer past N, the scorer
re-scores that layer (`layer_scores`) and keeps its best N - max(decode_interval, new tokens) slots, so the
cache then grows back to N over the next `decode_interval` steps and the layer is re-scored about every
`decode_interval` steps (1 = every step). The cache never holds more than N slots, not even during attention.

Scorers that read observation-window queries (SnapKV, PyramidKV) re-score with the most recent queries: a
`RecentQueries` observer, seeded with the prompt's window queries, keeps the last `window` queries of every
later forward (question tail, decode steps), which belong to the layer's last slots (the protected window is
always kept, so those slots are still there). The decode cap is the same for every layer (PyramidKV's
per-layer prefill budgets are not rescaled).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kvbench.engine.cache import KVCache
from kvbench.engine.generation import QueryRecorder
from kvbench.methods.base import CompressionContext
from kvbench.methods.scoring import keep_with_window

DECODE_RESCORES = "decode_rescores"  # ctx.record key: layer re-scorings done at decode time


class RecentQueries(QueryRecorder):
    """The last `window` post-RoPE queries per layer: the prompt's window, then every later forward's."""

    def __init__(self, window: int, ctx: CompressionContext) -> None:
        super().__init__(window)
        self.queries = {i: q[:, -window:].clone() for i, q in enumerate(ctx.window_queries)}
        self.positions = None if ctx.window_positions is None else ctx.window_positions[-window:].clone()
        self.scaling = ctx.scaling


def check_decode_budget(decode_budget: int | None, decode_interval: int) -> None:
    if decode_budget is None:
        return
    if isinstance(decode_budget, bool) or not isinstance(decode_budget, int) or decode_budget < 1:
        raise ValueError(f"decode_budget must be a positive int or null, got {decode_budget!r}")
    if not 1 <= decode_interval < decode_budget:
        raise ValueError(f"decode_interval must be in [1, decode_budget={decode_budget}), got {decode_interval!r}")


def attach_recent_queries(cache: KVCache, ctx: CompressionContext, window: int) -> None:
    """Let a window scorer re-score at decode time with the latest `window` queries."""
    if window > 0:
        cache.observers.append(RecentQueries(window, ctx))


def recent_context(cache: KVCache, ctx: CompressionContext) -> CompressionContext:
    """`ctx` with the latest window queries (`attach_recent_queries`) for re-scoring at decode time; `ctx` itself
    when none are recorded."""
    recent = next((obs for obs in cache.observers if isinstance(obs, RecentQueries)), None)
    if recent is None:
        return ctx
    queries = [recent.queries[i] for i in range(len(cache.layers))]
    return dataclasses.replace(ctx, window_queries=queries, window_positions=recent.positions)


def enforce_decode_budget(
    method: Any, cache: KVCache, ctx: CompressionContext, num_new: int, decode_budget: int, decode_interval: int
) -> None:
    """Before a forward of `num_new` tokens: re-score every layer that would exceed `decode_budget`."""
    if num_new > decode_budget:
        raise ValueError(f"decode_budget={decode_budget} cannot hold the {num_new} tokens of one forward")
    target = decode_budget - max(decode_interval, num_new)
    over = [i for i, layer in enumerate(cache.layers) if layer.get_seq_length() + num_new > decode_budget]
    if not over:
        return
    scoring_ctx = dataclasses.replace(recent_context(cache, ctx), budget=target)
    for layer_idx in over:
        layer = cache.layers[layer_idx]
        verdict = method.layer_scores(layer_idx, layer, target, scoring_ctx)
        layer.keep(keep_with_window(verdict.scores, target, verdict.protected))
    ctx.record[DECODE_RESCORES] = ctx.record.get(DECODE_RESCORES, 0) + len(over)
