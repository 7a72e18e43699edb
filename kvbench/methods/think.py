from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.cache import PAD_POSITION, KVCache
from kvbench.engine.layers.channel_pruned import ChannelPrunedLayer
from kvbench.methods.base import CompressionContext, Method, register_method
from kvbench.methods.compose import BaseKind, Composed
from kvbench.methods.quantized import EVICTOR


def channel_scores(queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """ThinK's key-channel importance `[Hkv, d]`: mean over the window of q_c^2 (averaged over each KV head's query
    group) times the mean over the held slots of k_c^2, from queries `[H, W, d]`, keys `[Hkv, L, d]` and positions
    `[Hkv, L]` (padding excluded). It orders channels as ||Q_c|| ||K_c|| (the paper's norms) does."""
    num_kv = keys.shape[0]
    q2 = queries.float().pow(2).mean(dim=1).unflatten(0, (num_kv, -1)).mean(dim=1)
    real = (positions != PAD_POSITION).float()[:, :, None]
    k2 = (keys.float().pow(2) * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
    return q2 * k2


def kept_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Each head's `keep` highest-scored channels `[Hkv, keep]`, ascending (ties to the lower channel)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :keep]
    return order.sort(dim=-1).values


@register_method("think")
@dataclass
class ThinK(Composed):
    """ThinK (Xu et al., 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv 2407.21018; NVIDIA kvpress
    `ThinKPress`): prunes the least important key CHANNELS of every KV head, query-driven, after an optional token
    eviction base.

    At the end of prefill (after the base's eviction), channel c of a KV head scores mean_w(q_c^2) x mean_t(k_c^2)
    over the last `window` prompt queries (post-RoPE, averaged over the head's query group) and the held keys
    (kvpress's formula; the same order as the paper's ||Q_c|| ||K_c||); the floor(d x key_channel_compression_ratio)
    lowest channels are pruned. The cache then PHYSICALLY stores only the kept channels of every key
    (`kvbench.engine.layers.channel_pruned`, plus the channel indices): bytes per slot = (c + d) x element size,
    reported in `kv_bytes` / `bits_per_element`; attention reads q . k over the kept channels only. kvpress zeroes
    the pruned channels instead (no memory saved). Keys appended later (question tail, generated tokens) are stored
    with the same kept channels (kvbench's choice: one uniform pruned tensor per layer; kvpress leaves new keys
    whole). Values are untouched.

    Composable with token eviction: `method.base=snapkv` (any eviction method leaving plain K/V layers) evicts at
    the budget first; a base that keeps evicting while decoding (h2o, tova, streamingllm) evicts from the pruned
    layers. Without a base every token is kept and the budget is not swept (rows: budget null). Record:
    think_kept_channels (per head), think_key_channel_fraction.

    Hyperparameters: key_channel_compression_ratio=0.5 (the paper's 40-50% pruning; kvpress's default is 0, i.e.
    off); window=32 (kvpress's window_size); base=null, base_params={}.
    """

    base_kind: ClassVar[BaseKind] = EVICTOR
    base_optional: ClassVar[bool] = True
    keeps_slot_subset: ClassVar[bool] = False  # keys lose channels
    plain_kv_layers: ClassVar[bool] = False  # its own storage (narrower keys)

    key_channel_compression_ratio: float = 0.5
    window: int = 32

    def validate(self) -> None:
        if not 0.0 <= self.key_channel_compression_ratio < 1.0:
            raise ValueError(
                f"think key_channel_compression_ratio must be in [0, 1), got {self.key_channel_compression_ratio}"
            )
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"think window must be a positive int, got {self.window!r}")

    def label(self) -> str:
        # As the quantisers (a base is optional): `think(base=snapkv,...)` with the changed hyperparameters.
        return Method.label(self)

    def window_queries_needed(self) -> int:
        return max(self.window, super().window_queries_needed())

    def after_compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        super().after_compress(cache, ctx)
        dim = cache.layers[0].keys.shape[-1]
        keep = dim - int(dim * self.key_channel_compression_ratio)
        for layer_idx, layer in enumerate(cache.layers):
            queries = ctx.window_queries[layer_idx][:, -self.window :]
            scores = channel_scores(queries, layer.keys[0], layer.positions)
            cache.layers[layer_idx] = ChannelPrunedLayer.from_layer(layer, kept_channels(scores, keep))
        ctx.record["think_kept_channels"] = keep
        ctx.record["think_key_channel_fraction"] = keep / dim
