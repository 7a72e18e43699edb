"""What each decoder layer of a model holds and how it attends: the per-layer attention spec.

Read once per loaded model (`read_layer_specs`) from two sources that must agree:

* the config: `layer_types` (or, without it, `sliding_window` / `attention_chunk_size` for every layer, as
  transformers' own caches infer it; Qwen2's `use_sliding_window` + `max_window_layers` already produce
  `layer_types`), `attention_chunk_size`, `no_rope_layers`, KV sharing between layers;
* one probe forward of two tokens without a cache, in which kvbench's attention function records what every
  attention module really passes: K/V heads and head dims (MHA configs without `num_key_value_heads`, MLA's
  per-head K/V of different widths, per-layer head dims), `scaling`, `sliding_window`, `softcap` and attention
  sinks (`s_aux`).

A layer is one of: `full_attention`, `sliding_attention` (a query at position p sees keys p - window < pos <= p),
`chunked_attention` (keys of the same `chunk`-sized block as the query, causally), `state` (no per-token KV:
linear attention, SSM or short convolution layers, whose fixed-size state transformers' own layer classes keep) or
`hybrid` (an SSM state and full attention in the same layer, Falcon-H1). Architectures with a layer kvbench cannot
represent are refused by `UnsupportedModel`, one line naming the architecture and what is missing, before any
sample is run.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

FULL = "full_attention"
SLIDING = "sliding_attention"
CHUNKED = "chunked_attention"
STATE = "state"
HYBRID = "hybrid"
# Config layer types whose layer holds a recurrent / conv state and no per-token KV.
STATE_LAYER_TYPES = ("linear_attention", "conv", "mamba", "mamba2", "ssm", "recurrent")
# Attention arguments kvbench's attention function understands; any other keyword that could change what a layer
# computes is refused (see `check_attention_kwargs`).
KNOWN_ATTENTION_KWARGS = frozenset(
    {
        "sliding_window",
        "softcap",
        "s_aux",
        "use_cache",
        "output_router_logits",
        "output_attentions",
        "position_ids",
        "cache_position",
        "position_embeddings",
        "dropout",
        "is_causal",
        "kvbench_cache",
        "kvbench_probe",
        "cache",
        "past_key_values",
        "past_key_value",
        "return_dict",
        "layer_idx",
        "shared_kv_states",
    }
)


class UnsupportedModel(ValueError):
    """A model whose layers kvbench cannot cache faithfully (one-line message)."""


@dataclass(frozen=True)
class LayerSpec:
    """How one decoder layer attends and what its cache holds.

    `kind`: FULL, SLIDING, CHUNKED, STATE or HYBRID. `window` (sliding): the number of positions a query sees,
    itself included; `chunk` (chunked): block size; `softcap`: logits become `softcap * tanh(s / softcap)` before
    the softmax; `sinks`: one learned logit per query head joins the softmax and takes probability mass without a
    value (gpt-oss); `rope`: False for NoPE layers. `num_kv_heads`, `head_dim`, `value_head_dim`: what the layer's
    cache stores per token (0 for STATE layers). `latent`: the cache stores a compressed latent that the module
    expands into per-head K/V after reading it (MLA: DeepSeek V2/V3, Kimi, ...); the three sizes then describe the
    latent as the cache holds it (one "head": the KV latent as keys, the shared RoPE key as values).
    """

    kind: str = FULL
    window: int | None = None
    chunk: int | None = None
    softcap: float | None = None
    sinks: bool = False
    rope: bool = True
    num_kv_heads: int = 0
    head_dim: int = 0
    value_head_dim: int = 0
    latent: bool = False

    @property
    def attends(self) -> bool:
        """The layer caches per-token K/V (every kind but STATE)."""
        return self.kind != STATE

    @property
    def bounded(self) -> bool:
        """The layer never needs more than a fixed number of past slots (sliding window, chunked attention)."""
        return self.kind in (SLIDING, CHUNKED)

    @property
    def has_state(self) -> bool:
        return self.kind in (STATE, HYBRID)

    @property
    def byte_type(self) -> str:
        """The row's per-layer-type byte bucket: `full`, `sliding`, `chunked` or `state` (a hybrid layer's KV is
        `full`, its SSM state `state`)."""
        return {FULL: "full", HYBRID: "full", SLIDING: "sliding", CHUNKED: "chunked", STATE: "state"}[self.kind]

    def max_slots(self, next_position: int) -> int | None:
        """The most slots the layer needs before a query at `next_position` (None: unbounded)."""
        if self.kind == SLIDING:
            return self.window - 1
        if self.kind == CHUNKED:
            return next_position % self.chunk
        return None

    def held_slots(self, num_tokens: int) -> int:
        """Slots an uncompressed cache of this layer holds after `num_tokens` tokens."""
        bound = self.max_slots(num_tokens)
        return num_tokens if bound is None else min(num_tokens, bound)

    def first_needed_position(self, next_position: int) -> int:
        """The oldest position a query at `next_position` or later can still see."""
        if self.kind == SLIDING:
            return next_position - self.window + 1
        if self.kind == CHUNKED:
            return next_position - next_position % self.chunk
        return 0

    def kv_bytes_per_token(self, element_size: int) -> int:
        """Bytes one cached token takes in this layer (K and V of every KV head)."""
        return self.num_kv_heads * (self.head_dim + self.value_head_dim) * element_size


def text_config(config: Any) -> Any:
    """The decoder's config (multimodal configs nest it)."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter is not None else config


def config_layer_types(config: Any) -> list[str]:
    """Each layer's type from the config, inferred as transformers' own caches do when `layer_types` is absent."""
    config = text_config(config)
    count = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        if getattr(config, "sliding_window", None) is not None:
            types = [SLIDING] * count
        elif getattr(config, "attention_chunk_size", None) is not None:
            types = [CHUNKED] * count
        else:
            types = [FULL] * count
    return list(types)


def model_type(config: Any) -> str:
    return str(getattr(text_config(config), "model_type", type(config).__name__))


def check_config(config: Any) -> None:
    """Refuse, before loading weights is of any use, layer kinds kvbench cannot cache (one line)."""
    config = text_config(config)
    arch = model_type(config)
    sharing = getattr(config, "kv_sharing_modes", None)
    if sharing is not None and any(mode == "reuse" for mode in sharing):
        raise UnsupportedModel(
            f"architecture '{arch}' shares KV between layers (kv_sharing_modes 'reuse'): kvbench caches every "
            "attention layer's own KV and cannot compress a shared one; use a config without KV sharing"
        )
    if getattr(config, "num_kv_shared_layers", 0):
        raise UnsupportedModel(
            f"architecture '{arch}' shares KV between its last {config.num_kv_shared_layers} layers "
            "(num_kv_shared_layers): kvbench cannot compress a shared cache; set num_kv_shared_layers=0"
        )
    known = {FULL, SLIDING, CHUNKED, HYBRID, "moe", "mlp", *STATE_LAYER_TYPES}
    unknown = sorted({kind for kind in config_layer_types(config) if kind not in known})
    if unknown:
        raise UnsupportedModel(
            f"architecture '{arch}' has layer type(s) {', '.join(unknown)} that kvbench cannot cache; "
            f"supported: {', '.join(sorted(known))}"
        )


def layer_kind(config_type: str) -> str:
    if config_type in STATE_LAYER_TYPES or config_type in ("moe", "mlp"):
        return STATE
    return config_type


def rope_flags(model: torch.nn.Module, config: Any, modules: dict[int, torch.nn.Module]) -> dict[int, bool]:
    """Which attention layers apply RoPE: a module's `use_rope` (SmolLM3, Llama 4), the config's `no_rope_layers`
    (1 = RoPE), Cohere 2's rule (RoPE on sliding layers only), else every layer."""
    flags: dict[int, bool] = {}
    no_rope = getattr(config, "no_rope_layers", None)
    for index, module in modules.items():
        if hasattr(module, "use_rope"):
            flags[index] = bool(module.use_rope)
        elif no_rope is not None and len(no_rope) == config.num_hidden_layers:
            flags[index] = bool(no_rope[index])
        elif model_type(config) == "cohere2":
            flags[index] = getattr(module, "sliding_window", None) is not None
        else:
            flags[index] = True
    return flags


@functools.cache
def cache_argument(model_class: type) -> str:
    """The keyword a model's forward takes its cache by: `cache` in recent transformers 5.x, which deprecates
    `past_key_values` (removed in 5.40); `past_key_values` in the 5.x releases before `cache` existed."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class StoredShapes(DynamicCache):
    """transformers' own cache for the probe forward, noting what each layer's attention hands the cache (heads,
    key width, value width): MLA modules cache a latent, not the per-head K/V their attention sees."""

    def __init__(self, config: Any) -> None:
        super().__init__(config=config)
        self.shapes: dict[int, tuple[int, int, int]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.shapes[layer_idx] = (key_states.shape[1], key_states.shape[-1], value_states.shape[-1])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class ProbeRecorder:
    """Filled by kvbench's attention function during the probe forward: one record per attention layer."""

    def __init__(self) -> None:
        self.records: dict[int, dict[str, Any]] = {}

    def record(self, module: torch.nn.Module, query, key, value, scaling, kwargs: dict[str, Any]) -> None:
        self.records[module.layer_idx] = {
            "module": module,
            "num_heads": query.shape[1],
            "num_kv_heads": key.shape[1],
            "head_dim": key.shape[-1],
            "value_head_dim": value.shape[-1],
            "scaling": scaling,
            "sliding_window": kwargs.get("sliding_window"),
            "softcap": kwargs.get("softcap"),
            "sinks": kwargs.get("s_aux") is not None,
            "unknown": sorted(k for k, v in kwargs.items() if k not in KNOWN_ATTENTION_KWARGS and v is not None),
        }


@torch.inference_mode()
def read_layer_specs(model: torch.nn.Module, probe_kwarg: str = "kvbench_probe") -> list[LayerSpec]:
    """The per-layer spec of a model loaded with kvbench's attention (see the module docstring)."""
    config = text_config(model.config)
    arch = model_type(config)
    check_config(config)
    recorder = ProbeRecorder()
    device = next(model.parameters()).device
    token = int(getattr(config, "bos_token_id", None) or 0)
    stored = StoredShapes(config)
    ids = torch.tensor([[token, token]], device=device)
    model(input_ids=ids, **{cache_argument(type(model)): stored}, use_cache=True, **{probe_kwarg: recorder})
    records = recorder.records
    types = config_layer_types(config)
    rope = rope_flags(model, config, {index: record["module"] for index, record in records.items()})
    specs: list[LayerSpec] = []
    for index, config_type in enumerate(types):
        kind = layer_kind(config_type)
        record = records.get(index)
        if kind == STATE:
            if record is not None:
                raise UnsupportedModel(
                    f"architecture '{arch}': layer {index} is '{config_type}' in the config but runs attention"
                )
            specs.append(LayerSpec(kind=STATE, rope=False))
            continue
        if record is None:
            raise UnsupportedModel(
                f"architecture '{arch}': layer {index} is '{config_type}' in the config but its attention does not "
                "go through kvbench's attention function"
            )
        if record["unknown"]:
            raise UnsupportedModel(
                f"architecture '{arch}': layer {index}'s attention passes {', '.join(record['unknown'])}, which "
                "kvbench's attention does not implement"
            )
        window = chunk = None
        if kind == SLIDING:
            window = int(config.sliding_window)
        elif kind == CHUNKED:
            chunk = int(config.attention_chunk_size)
        passed = record["sliding_window"]
        if passed is not None and passed != window:
            raise UnsupportedModel(
                f"architecture '{arch}': layer {index} is '{config_type}' in the config (window {window}) but its "
                f"attention passes sliding_window={passed}"
            )
        softcap = record["softcap"]
        seen = (int(record["num_kv_heads"]), int(record["head_dim"]), int(record["value_head_dim"]))
        cached = stored.shapes.get(index, seen)
        specs.append(
            LayerSpec(
                kind=kind,
                window=window,
                chunk=chunk,
                softcap=float(softcap) if softcap else None,
                sinks=record["sinks"],
                rope=rope[index],
                num_kv_heads=cached[0],
                head_dim=cached[1],
                value_head_dim=cached[2],
                latent=cached != seen,
            )
        )
    if not any(spec.attends for spec in specs):
        raise UnsupportedModel(f"architecture '{arch}' has no attention layer: there is no KV cache to compress")
    return specs


def rope_difference(model: torch.nn.Module, specs: list[LayerSpec]) -> str | None:
    """Why one RoPE helper cannot serve every attention layer of this model (None: it can): NoPE layers, or
    rotary tables that differ per layer type (Gemma 3's local / global bases)."""
    attention = [spec for spec in specs if spec.attends]
    if any(not spec.rope for spec in attention):
        return "NoPE layers (no rotary embedding in some layers)"
    tables = [
        name
        for name, buffer in model.named_buffers()
        if name.endswith("inv_freq") and "original" not in name and isinstance(buffer, torch.Tensor)
    ]
    if len(tables) > 1:
        return f"{len(tables)} rotary tables (RoPE differs per layer type)"
    return None


def require_full_attention(specs: list[LayerSpec], arch: str, what: str) -> None:
    """One-line refusal of features that assume every layer is plain full attention."""
    if any(spec.kind != FULL for spec in specs):
        raise UnsupportedModel(
            f"{what} needs every layer to be full attention; architecture '{arch}' has {describe(specs)}"
        )


class LayerShapeConfig:
    """A model's config as one attention layer shape sees it: `num_key_value_heads` and `head_dim` are the layer's
    (MHA configs without `num_key_value_heads`, MLA's K/V widths, per-layer head dims), every other attribute the
    config's. What a method's config check (quantisation groups must divide the head dim) reads."""

    def __init__(self, config: Any, num_key_value_heads: int, head_dim: int) -> None:
        self._config = config
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def layer_shape_configs(config: Any, specs: list[LayerSpec]) -> list[LayerShapeConfig]:
    """One `LayerShapeConfig` per distinct (KV heads, head dim) of the attention layers, keys' and values' dims."""
    attention = [spec for spec in specs if spec.attends]
    shapes = {(spec.num_kv_heads, dim) for spec in attention for dim in (spec.head_dim, spec.value_head_dim)}
    return [LayerShapeConfig(text_config(config), heads, dim) for heads, dim in sorted(shapes)]


LAYER_POLICIES = ("global", "all")


def compressible_layers(specs: list[LayerSpec], policy: str = "global") -> list[int]:
    """The layers a method compresses: `global` (default) the full-attention layers (a hybrid's attention
    included), sliding-window and chunked layers keeping their window; `all` every layer that caches K/V. Linear
    attention / SSM states are never compressed."""
    if policy not in LAYER_POLICIES:
        raise ValueError(f"unknown layers policy '{policy}'. Valid layers: {', '.join(LAYER_POLICIES)}.")
    if policy == "all":
        return [i for i, spec in enumerate(specs) if spec.attends]
    return [i for i, spec in enumerate(specs) if spec.kind in (FULL, HYBRID)]


def describe(specs: list[LayerSpec]) -> str:
    """`12 full_attention, 12 sliding_attention(window 512)`: the layer mix in one phrase (logs, summaries);
    `none` for no layer."""
    counts: dict[str, int] = {}
    for spec in specs:
        label = spec.kind
        if spec.window:
            label += f"(window {spec.window})"
        if spec.chunk:
            label += f"(chunk {spec.chunk})"
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{count} {label}" for label, count in counts.items()) or "none"
