"""kvbench's attention function, registered with transformers' `AttentionInterface` as "kvbench".

A model loaded with `attn_implementation="kvbench"` calls `kvbench_attention` in every layer with the
post-RoPE queries and the layer's cached keys/values. Because "kvbench" has no entry in transformers'
mask interface, transformers builds no mask; this function builds it from the original positions the
`KVCache` stores, so layers and heads of different lengths need no special casing.

Runs pass their cache as the keyword argument `kvbench_cache=` of the model's forward; transformers
forwards it here. Without it (e.g. `model.generate`), the function is plain causal attention.
Registered once at import; no model class is modified.

Single-token decode steps use the split-K Triton kernel (`kvbench.engine.kernels.decode_attention`) instead of
SDPA when the cache says `decode_kernels = "triton"` (the runner sets it on every job's cache from the run's
resolved `kernels`); its mask is the same (visible slots as `valid`, a logit bias as `bias`).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kvbench.engine.architecture import ProbeRecorder
from kvbench.engine.cache import KVCache, KVLayer

CACHE_KWARG = "kvbench_cache"
PROBE_KWARG = "kvbench_probe"
ATTN_IMPLEMENTATION = "kvbench"


class AttentionObserver(Protocol):
    """Sees every layer's attention inputs; methods use it to collect queries or attention statistics."""

    def on_attention(
        self,
        layer_idx: int,
        query: torch.Tensor,
        layer: KVLayer,
        query_positions: torch.Tensor,
        scaling: float,
    ) -> None: ...


def _bottom_right_causal_mask(
    q_len: int, k_len: int, device: torch.device, window: int | None = None, chunk: int | None = None
) -> torch.Tensor:
    """`[1, 1, q, k]`: the last `q_len` of `k_len` consecutive positions attend causally (within `window` positions,
    itself included, or within the query's `chunk`-sized block)."""
    rows = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    cols = torch.arange(k_len, device=device)[None, :]
    mask = cols <= rows
    if window is not None:
        mask &= cols > rows - window
    if chunk is not None:
        mask &= cols >= rows - rows % chunk
    return mask[None, None]


def softcapped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's logit soft-capping, `softcap * tanh(s / softcap)` (identity without a cap)."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def with_sinks_softmax(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim; with `sinks` (one logit per query head, broadcast to `scores[..., :1]`), the sink
    joins the normalisation and its probability is dropped (gpt-oss's attention sinks: mass without a value)."""
    if sinks is None:
        return scores.softmax(dim=-1)
    combined = torch.cat([scores, sinks.to(scores.dtype).expand_as(scores[..., :1])], dim=-1)
    return combined.softmax(dim=-1)[..., :-1]


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scaling: float,
    backend: str = "sdpa",
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention for `query [1, H, q, d]` over `key/value [1, Hkv, L, d(v)]` (GQA without expanding the cache).

    `mask` is boolean (True = attend) or additive float, broadcastable to `[1, Hkv or 1, q, L]`. `softcap` caps the
    logits before the softmax, `sinks` (`[H]`) adds one value-less logit per query head; both take the explicit
    path (SDPA has neither). Returns `[1, H, q, dv]`.
    """
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    group = num_heads // num_kv_heads
    if mask is not None and mask.shape[1] > 1 and group > 1:
        mask = mask.repeat_interleave(group, dim=1)
    if backend == "eager" or softcap is not None or sinks is not None or key.shape[-1] != value.shape[-1]:
        q = query.float().unflatten(1, (num_kv_heads, group))
        scores = softcapped(torch.einsum("bhgqd,bhkd->bhgqk", q, key.float()) * scaling, softcap)
        if is_causal:
            mask = _bottom_right_causal_mask(query.shape[2], key.shape[2], query.device)
        if mask is not None:
            per_head = mask.shape[1] == num_heads
            mask = mask.unflatten(1, (num_kv_heads, group)) if per_head else mask[:, :, None]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        sink_logits = None if sinks is None else sinks.float().reshape(1, num_kv_heads, group, 1, 1)
        probs = with_sinks_softmax(scores, sink_logits)
        out = torch.einsum("bhgqk,bhkd->bhgqd", probs, value.float())
        return out.flatten(1, 2).to(query.dtype)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=group > 1
    )


def decode_step_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token `[1, H, 1, d]` over `key/value [1, Hkv, L, d]` with the Triton decode kernel.

    `mask` is what `KVLayer.attention_mask` returns for one query (`[1, Hkv or 1, 1, L]`, boolean or additive
    float with -inf for hidden slots) or None. Returns `[1, H, 1, d]`.
    """
    from kvbench.engine.kernels.decode_attention import decode_attention_triton

    valid, bias = decode_mask_rows(mask, key.shape[1])
    out = decode_attention_triton(
        query[0, :, 0], key[0], value[0], scaling, valid=valid, bias=bias, softcap=softcap, sinks=sinks
    )
    return out[None, :, None]


def decode_mask_rows(mask: torch.Tensor | None, num_kv_heads: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A one-query mask (`[1, Hkv or 1, 1, L]`) as the decode kernels' `valid` (boolean) or `bias` (additive)."""
    if mask is None:
        return None, None
    rows = mask[0, :, 0].expand(num_kv_heads, -1)
    return (rows, None) if mask.dtype == torch.bool else (None, rows)


def decode_step_packed(query: torch.Tensor, layer: KVLayer, operands: tuple, mask: torch.Tensor | None, scaling: float):
    """One query token over a quantised layer's packed codes (`kernels.packed_decode`), `[1, H, 1, d]`."""
    from kvbench.engine.kernels.packed_decode import packed_decode_attention_triton

    valid, bias = decode_mask_rows(mask, layer.num_heads)
    return packed_decode_attention_triton(query[0, :, 0], operands, scaling, valid=valid, bias=bias)[None, :, None]


def check_layer_kwargs(layer: KVLayer, layer_idx: int, kwargs: dict) -> None:
    """The window the module passes must be the one the layer's spec (read at load) holds: a model whose modules
    disagree with its config is refused rather than decoded differently."""
    passed = kwargs.get("sliding_window")
    if passed is not None and passed != layer.spec.window:
        raise ValueError(
            f"layer {layer_idx} attends with sliding_window={passed} but its cache layer was built as "
            f"{layer.spec.kind} (window {layer.spec.window}); the model's config and modules disagree"
        )


def kvbench_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    backend = getattr(module.config, "kvbench_attn_backend", "sdpa")
    softcap = kwargs.get("softcap") or None
    sinks = kwargs.get("s_aux")
    cache: KVCache | None = kwargs.get(CACHE_KWARG)
    probe: ProbeRecorder | None = kwargs.get(PROBE_KWARG)
    if probe is not None:
        probe.record(module, query, key, value, scaling, kwargs)
    if cache is None:
        # Plain attention over consecutive positions (e.g. `model.generate`, the load-time probe), honouring the
        # window, cap and sinks the module passes.
        q_len, k_len = query.shape[2], key.shape[2]
        window = kwargs.get("sliding_window")
        mask = attention_mask if attention_mask is not None and attention_mask.dtype == torch.bool else None
        if mask is None and ((q_len > 1 and q_len != k_len) or (window is not None and k_len > window)):
            mask = _bottom_right_causal_mask(q_len, k_len, query.device, window)
        is_causal = mask is None and q_len > 1
        out = attend(query, key, value, mask, is_causal, scaling, backend, softcap, sinks)
        return out.transpose(1, 2).contiguous(), None

    row_inputs = getattr(cache, "row_attention_inputs", None)
    if row_inputs is None:
        out = cached_attention(module, query, key, value, cache, scaling, backend, softcap, sinks, kwargs)
    else:
        # A per-row batch (`kvbench.engine.batched.PerRowBatch`): every row attends over its own batch-1 cache, with
        # the K/V its own layer's `update` returned, exactly as that row's batch-1 forward would.
        out = torch.cat(
            [
                cached_attention(
                    module, query[row : row + 1], k, v, row_cache, scaling, backend, softcap, sinks, kwargs
                )
                for row, (row_cache, k, v) in enumerate(row_inputs(module.layer_idx))
            ]
        )
    return out.transpose(1, 2).contiguous(), None


def cached_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: KVCache,
    scaling: float,
    backend: str,
    softcap: float | None,
    sinks: torch.Tensor | None,
    kwargs: dict,
) -> torch.Tensor:
    """Attention of `query` `[B, H, q, d]` over the K/V `cache`'s layer `module.layer_idx` returned from its `update`,
    `[B, H, q, dv]`: the mask from the stored positions, a paged layer's read subset, the Triton or packed decode
    kernels the cache asks for, then the cache's observers and the layer's `drop_unreachable`. One function for a
    batch-1 cache, a stacked batch and each row of a per-row batch, so all three attend alike."""
    layer = cache.layers[module.layer_idx]
    check_layer_kwargs(layer, module.layer_idx, kwargs)
    mask, is_causal = layer.attention_mask(cache.step_positions)
    # A layer that reads a query-dependent subset of its slots (Quest's pages, `kvbench.engine.layers.paged`) narrows
    # K/V and the mask for a one-token query.
    read_subset = getattr(layer, "read_subset", None)
    if read_subset is not None and query.shape[2] == 1:
        key, value, mask = read_subset(query, key, value, mask)
    triton_step = query.shape[2] == 1 and cache.decode_kernels == "triton"
    # Quantised layers (kvbench.engine.quant) with one packed segment + fp tail per tensor: the kernel reads the codes
    # (it has no soft-cap or sinks: such layers read their K/V dequantised).
    exact_packed = softcap is None and sinks is None
    packed = layer.packed_operands() if triton_step and exact_packed and hasattr(layer, "packed_operands") else None
    # A packed-decode layer returned no K/V: read them dequantised. (Only an EMPTY return means that: layers such as
    # kv_direct's and mikv's return more slots than `get_seq_length()` counts, recomputed or low-precision ones.)
    if packed is None and key.shape[-2] == 0 and layer.get_seq_length() > 0:
        key, value = layer.keys, layer.values
    if packed is not None:
        out = decode_step_packed(query, layer, packed, mask, scaling)
    elif triton_step and key.shape[-1] == value.shape[-1]:
        out = decode_step_triton(query, key, value, mask, scaling, softcap, sinks)
    else:
        out = attend(query, key, value, mask, is_causal, scaling, backend, softcap, sinks)
    for observer in cache.observers:
        observer.on_attention(module.layer_idx, query, layer, cache.step_positions, scaling)
    # Sliding-window / chunked layers free what no later query can see (transformers' sliding layers do the same).
    layer.drop_unreachable(cache.seen_tokens)
    return out


AttentionInterface.register(ATTN_IMPLEMENTATION, kvbench_attention)
