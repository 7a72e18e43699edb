"""Helpers shared by the scoring methods, written once: pooling, top-k keep and per-layer budget allocation.
GQA aggregation and observation-window attention are engine functions (`kvbench.engine.kernels.window_attention`),
shared with the fused kernels whose torch reference they are. All softmax statistics are fp32."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

POOLINGS = ("max", "avg", "none")


def pool_scores(scores: torch.Tensor, kernel: int, kind: str) -> torch.Tensor:
    """1-D pooling along the token axis of `[Hkv, N]` with stride 1 and padding kernel//2 (length kept)."""
    if kind == "none" or kernel <= 1:
        return scores
    if kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be odd to keep the length, got {kernel}")
    x = scores[:, None, :]
    if kind == "max":
        return F.max_pool1d(x, kernel_size=kernel, stride=1, padding=kernel // 2)[:, 0]
    if kind == "avg":
        return F.avg_pool1d(x, kernel_size=kernel, stride=1, padding=kernel // 2)[:, 0]
    raise ValueError(f"unknown pool '{kind}'. Valid pools: {', '.join(POOLINGS)}.")


def topk_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row `[Hkv, N] -> [Hkv, k]`, sorted ascending (original order).

    Ties go to the earlier slot (stable), so selections are deterministic.
    """
    k = max(0, min(k, scores.shape[-1]))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=-1).values


def keep_with_window(prefix_scores: torch.Tensor, budget: int, window: int) -> torch.Tensor:
    """Top-(budget - window) of `prefix_scores [Hkv, T - window]` plus the last `window` slots, `[Hkv, budget]`."""
    num_heads, prefix_len = prefix_scores.shape
    chosen = topk_keep(prefix_scores, budget - window)
    recent = torch.arange(prefix_len, prefix_len + window, device=prefix_scores.device).expand(num_heads, -1)
    return torch.cat([chosen, recent], dim=-1)


def round_preserving_sum(values: list[float], total: int) -> list[int]:
    """Round to integers whose sum is exactly `total` (largest remainder; ties to the earlier entry)."""
    floors = [int(v // 1) for v in values]
    missing = total - sum(floors)
    by_remainder = sorted(range(len(values)), key=lambda i: (-(values[i] - floors[i]), i))
    for i in by_remainder[: max(0, missing)]:
        floors[i] += 1
    return floors


def pyramid_layer_budgets(budget: int, window: int, prompt_len: int, num_layers: int, beta: float) -> list[int]:
    """PyramidKV's per-layer budgets (window included), arithmetic from the most at layer 0 down to the least.

    Uses a float step and sum-preserving rounding, so the layer average is exactly `budget`. Falls back to
    the uniform (SnapKV) allocation when the prompt is shorter than 2 * (budget - window).
    """
    selectable = budget - window
    if num_layers == 1 or selectable <= 0 or prompt_len < 2 * selectable:
        return [budget] * num_layers
    least = selectable / beta
    most = 2 * selectable - least
    if most >= prompt_len - window:
        most = prompt_len - window
        least = 2 * selectable - most
    step = (most - least) / (num_layers - 1)
    raw = [most - layer * step for layer in range(num_layers)]
    return [b + window for b in round_preserving_sum(raw, selectable * num_layers)]


def mask_to_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept slots of a boolean mask `[Hkv, L]` as `KVLayer.keep` arguments: indices `[Hkv, m]` (each row's kept
    slots in ascending order, then padding) and `valid [Hkv, m]`, with m the largest per-head count.

    For methods whose KV heads keep different numbers of slots (AdaKV, KVzip, RazorAttention).
    """
    counts = mask.sum(dim=-1)
    width = int(counts.max()) if mask.numel() else 0
    # A stable sort of "not kept" puts each row's kept slots first, still in slot order.
    indices = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return indices.masked_fill(~valid, 0), valid


class SweepShared:
    """A prefill "observer" that watches nothing: the runner creates one per method object and sample and hands
    it to every budget of the sweep as `ctx.prefill_stats`, so budget-independent scores that need extra
    forwards (KVzip's reconstruction scores, DapQ's pseudo-query attention) are computed once per sample."""

    def __init__(self) -> None:
        self.value: Any = None
        self.key: Any = None

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        return None

    def get(self, key: Any) -> Any:
        return self.value if self.key == key else None

    def put(self, key: Any, value: Any) -> None:
        self.key, self.value = key, value


def shared_slot(ctx_prefill_stats: Any) -> SweepShared | None:
    """The sweep-shared holder in `ctx.prefill_stats`, or None (direct calls, chunked prefill)."""
    return ctx_prefill_stats if isinstance(ctx_prefill_stats, SweepShared) else None


def sweep_shared_scores(ctx: Any, name: str, compute: Callable[[], Any]) -> Any:
    """Budget-independent scores of this prompt: `compute()` once per sample, then reused by every later budget of
    the sweep (`SweepShared`). The record `compute` wrote is replayed with `<name>_scores_shared=True` on reuse."""
    shared = shared_slot(ctx.prefill_stats)
    key = (ctx.prompt_len, tuple(ctx.input_ids))
    cached = shared.get(key) if shared else None
    if cached is not None:
        scores, record = cached
        ctx.record.update(record, **{f"{name}_scores_shared": True})  # computed by an earlier budget of this sweep
        return scores
    scores = compute()
    if shared:
        shared.put(key, (scores, dict(ctx.record)))
    return scores


def require_one_slot_per_token(name: str, layers: Any, prompt_len: int) -> None:
    """Methods that score every prompt token of every layer with an extra pass need the untouched prefill."""
    if any(layer.get_seq_length() != prompt_len or layer.evicted for layer in layers):
        raise ValueError(f"{name} compresses a full prefilled cache (one slot per prompt token in every layer)")
