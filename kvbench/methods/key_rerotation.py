from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvbench.engine import rope
from kvbench.engine.architecture import CHUNKED, SLIDING, config_layer_types, model_type
from kvbench.engine.cache import PAD_POSITION, KVCache, KVLayer
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.compose import SLOT_SUBSET, BaseKind, Composed

# The base's kept slots are renumbered: it must keep slots (unchanged K/V at known positions) to begin with.
SLOT_KEEPER = dataclasses.replace(SLOT_SUBSET, reason="it does not evict by keeping a subset of the cache's slots")


def contiguous_positions(positions: torch.Tensor) -> torch.Tensor:
    """Each head's kept slots renumbered 0..n_h - 1 in slot order (`[Hkv, L]`); padding stays `PAD_POSITION`."""
    real = positions != PAD_POSITION
    renumbered = real.long().cumsum(dim=-1) - 1
    return torch.where(real, renumbered, positions)


def renumber_layer(layer: KVLayer, inv_freq: torch.Tensor) -> bool:
    """Re-rotate the layer's kept keys to contiguous positions (`contiguous_positions`); False when they already
    are."""
    new = contiguous_positions(layer.positions)
    if torch.equal(new, layer.positions):
        return False
    layer.keys = rope.rerotate(layer.keys, layer.positions, new, inv_freq)  # padding: delta 0 (PAD - PAD)
    layer.positions = new
    return True


@register_method("key_rerotation")
@dataclass
class KeyRerotation(Composed):
    """Any slot-keeping method's kept keys re-rotated to contiguous positions (NVIDIA kvpress `KeyRerotationPress`;
    the position mode of StreamingLLM, Xiao et al. 2023, and of FINCH, Corallo & Papotti, TACL 2024), generalising
    `streamingllm rerotate=true` to every base.

    After the base evicts (at the end of prefill and whenever it evicts again while decoding, e.g. h2o, tova,
    streamingllm), each KV head's kept keys, rotated at their original positions p_i, are moved to positions
    0..n_h - 1 in slot order by R(i - p_i) (`kvbench.engine.rope.rerotate`), and the next token takes position
    max_h n_h (over every layer and head), so the query sees the kept context as one contiguous sequence. Heads
    or layers that keep fewer slots (adakv, pyramidkv) are numbered from 0 too and leave a gap before the next
    token (kvpress keeps equal counts per head, so it has no such gap). Values are unchanged; entries and bytes
    are the base's. Refuses RoPE variants whose angles depend on the length, and a base with a `decode_budget`
    (its decode-time re-scoring reads query positions that renumbering would invalidate).

    Hyperparameters: base=snapkv (any method that keeps a subset of slots: snapkv, h2o, tova, streamingllm,
    adakv, knorm, ...), base_params={}.
    """

    base_kind: ClassVar[BaseKind] = SLOT_KEEPER
    plain_kv_layers: ClassVar[bool] = True  # the kept slots' K (re-rotated) and V, plain tensors
    # Keys are rewritten (re-rotated) and positions renumbered: not the base's slots unchanged.
    keeps_slot_subset: ClassVar[bool] = False

    base: str = field(default="snapkv", kw_only=True)

    def rope_dependent(self) -> bool:
        return True  # kept keys are re-rotated with the model's one RoPE

    def check_model(self, config: Any) -> None:
        """Refuse, in one line, models with sliding-window or chunked layers: renumbering moves the one position
        counter every layer shares, and those layers' windows are defined on it."""
        bounded = sorted({kind for kind in config_layer_types(config) if kind in (SLIDING, CHUNKED)})
        if bounded:
            raise ValueError(
                f"key_rerotation renumbers the positions every layer shares; architecture '{model_type(config)}' has "
                f"{', '.join(bounded)} layers whose windows are defined on them"
            )
        super().check_model(config)

    def validate(self) -> None:
        if getattr(self.inner, "decode_budget", None) is not None:
            raise ValueError("key_rerotation cannot wrap a base with a decode_budget (its re-scoring reads positions)")

    def renumber(self, cache: KVCache, ctx: CompressionContext) -> None:
        """Renumber every layer whose kept slots are not contiguous; new tokens continue after the longest head."""
        rope.check_shiftable_rope(ctx.model, "key_rerotation")
        inv_freq = rope.rope_inv_freq(ctx.model)
        changed = [renumber_layer(layer, inv_freq) for layer in cache.layers if layer.is_initialized]
        if any(changed):
            cache.seen_tokens = max(int(layer.lengths().max()) for layer in cache.layers if layer.is_initialized)
            ctx.record["key_rerotation_next_position"] = cache.seen_tokens

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        super().compress(cache, ctx)
        self.renumber(cache, ctx)

    def before_forward(self, cache: KVCache, ctx: CompressionContext, num_new: int) -> None:
        lengths = [layer.get_seq_length() for layer in cache.layers]
        super().before_forward(cache, ctx, num_new)
        # Only an eviction renumbers (a forward appends at the next position, which stays contiguous).
        if any(layer.get_seq_length() < n for layer, n in zip(cache.layers, lengths, strict=True)):
            self.renumber(cache, ctx)
