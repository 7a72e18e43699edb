"""Method interface and registry.

A method is a dataclass whose fields are its hyperparameters (mirrored by `conf/method/<name>.yaml`).
It is created, run on a cache copy, and dropped: per-sample state lives on the cache or in locals, never
on the method object, so one method object serves every sample and two methods can share a process.

Life cycle for one sample:
  0. `prefill_observer()` (optional) watches the one shared prefill, e.g. to sum attention over all prompt
     queries; the runner hands it back as `ctx.prefill_stats`. An observer with a `bind_model(lm)` method
     gets the LoadedModel before the prefill (e.g. to read the model's RoPE).
For each budget of the sweep, on a fresh copy of the prefilled cache:
  1. `setup(cache, ctx)`: attach decode-time observers or per-slot state (`layer.extras`);
  2. `compress(cache, ctx)` once (skipped when the prompt fits the budget), then `after_compress(cache, ctx)`
     (always; quantised storage packs the kept slots there);
  3. `before_forward(cache, ctx, num_new)` before every later forward (question tail, each decode step):
     decode-time methods evict there so the cache stays within budget.
Methods may write numbers worth keeping (e.g. level sizes over time) into `ctx.record`; they land in the
row under `method_record`.

Chunked prefill (`prefill_chunk=n`, see `kvbench.harness.chunked`): methods that set `supports_chunked_prefill = True`
in their own class body (not inherited: a subclass may change what `compress` needs) are compressed after
every chunk that leaves the cache over budget, with a context whose `prompt_len` is the tokens seen so far and
whose window queries are the latest ones; `chunked_prefill_observer()` watches every chunk, and `setup` runs
once after the last chunk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvbench.engine.cache import KVCache
from kvbench.registry import Registry, build_registered


@dataclass
class CompressionContext:
    """What a method may use to compress one prefilled prompt."""

    budget: int  # KV entries per KV head per layer, window included (already resolved for this prompt)
    prompt_len: int  # tokens in the compressed segment (T)
    num_heads: int
    num_kv_heads: int
    # Post-RoPE queries of the last prefilled tokens per layer, `[H, W, d]`, and their positions `[W]`.
    window_queries: list[torch.Tensor] = field(default_factory=list)
    window_positions: torch.Tensor | None = None
    scaling: float = 1.0
    seed: int = 0
    lm: Any = None  # kvbench.engine.models.LoadedModel: model, tokenizer, device (methods that run extra forwards)
    input_ids: list[int] = field(default_factory=list)  # the compressed segment's tokens
    # Where the context ends inside the compressed segment (the rest is the question and answer prefix, Finch's
    # window); None: unknown (chunked prefill, scenarios, direct calls).
    context_end: int | None = None
    prefill_stats: Any = None  # this method's prefill observer, after the prefill
    cache_dir: Any = None  # pathlib.Path for per-model artefacts (e.g. head profiles), outside the repo
    record: dict[str, Any] = field(default_factory=dict)
    kernels: str = "torch"  # "torch" or "triton": which implementation shared kernels should use
    # The model's numbers of the cache layers the method is handed (`engine.cache.LayerSubset` numbers them 0..n-1);
    # None: every layer, in order.
    layers: list[int] | None = None

    @property
    def model(self) -> Any:
        return None if self.lm is None else self.lm.model

    def model_layer_index(self, index: int) -> int:
        """The model's number of the method's cache layer `index`: where its module (o_proj) or its per-model
        calibration is found."""
        return index if self.layers is None else self.layers[index]

    @classmethod
    def for_prompt(
        cls,
        lm: Any,
        budget: int,
        prompt_len: int,
        pre: Any = None,
        layers: list[int] | None = None,
        **fields: Any,
    ) -> CompressionContext:
        """The context for compressing `prompt_len` prefilled tokens of `lm`; `pre` (a `generation.Prefill`)
        supplies the recorded window queries, of the model's `layers` the method is handed (default: all), in
        that order. Other fields (seed, input_ids, kernels, ...) pass through."""
        if pre is not None:
            queries = pre.window_queries
            if layers is not None and queries:
                queries = [queries[i] for i in layers]
            fields.update(window_queries=queries, window_positions=pre.window_positions, scaling=pre.scaling)
        return cls(
            budget=budget,
            prompt_len=prompt_len,
            num_heads=lm.config.num_attention_heads,
            num_kv_heads=lm.num_kv_heads,
            lm=lm,
            layers=None if layers is None else list(layers),
            **fields,
        )


@dataclass
class Method:
    name: ClassVar[str] = ""
    # Methods that never evict (full) do not take part in budget sweeps.
    compresses: ClassVar[bool] = True
    # Whether `compress` may run after every prefill chunk (declared per class, see the module docstring).
    supports_chunked_prefill: ClassVar[bool] = False
    # Whether the method takes part in budget sweeps (quantisers without an eviction base keep every token).
    takes_budget: ClassVar[bool] = True
    # Whether `compress` needs the freshly prefilled full cache of the prompt (it re-runs the model over the prompt
    # or over pseudo queries): such a method compresses once per prompt and cannot re-compress a growing cache
    # (a conversation).
    needs_fresh_prefill: ClassVar[bool] = False
    # Whether the method evicts only by keeping a subset of each layer's slots (`KVLayer.keep`), their K/V and
    # positions unchanged, in plain `KVLayer`s: wrappers that work on the kept set (kv_distill corrects it, mikv
    # demotes the rest) accept such a base (`kvbench.methods.compose`). Declared by every registered method.
    keeps_slot_subset: ClassVar[bool] = False
    # Whether the compressed cache is held in plain `KVLayer`s (K/V tensors and per-slot extras), as every slot-subset
    # method's is, and also the caches of methods that rewrite kept values or add slots: quantised storage can take
    # such a cache over (`kvbench.methods.quantized`). Declared by every registered method.
    plain_kv_layers: ClassVar[bool] = False
    # Whether the method selects slots by position alone, never reading the cached K/V: the only kind that is
    # right on a cache of MLA latents (`LayerSpec.latent`), whose stored "keys" are not the keys queries meet.
    position_only: ClassVar[bool] = False
    # Whether the method can compress sliding-window / chunked layers (`layers=all`), which hold only their window
    # rather than one slot per prompt token; methods whose scoring state is sized by the prompt declare False.
    compresses_bounded_layers: ClassVar[bool] = True
    # Whether the compressed caches of several samples may decode together (`batch_size > 1`,
    # `kvbench.harness.batched`). Declared in the method's own class body (not inherited), True only where batched
    # rows are tested equal to batch-1 rows (tests/test_batched.py).
    batchable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """Check or normalise the fields after construction (subclasses call the parent's). Default: nothing."""

    def window_queries_needed(self) -> int:
        """How many trailing prompt queries per layer `compress` needs (recorded during the one prefill)."""
        return 0

    def prefill_observer(self) -> Any:
        """An attention observer to attach to the shared prefill (None: this method needs none)."""
        return None

    def chunked_prefill_observer(self) -> Any:
        """The observer for a chunked prefill, where slots are evicted between chunks. Default: the same as
        `prefill_observer()`; methods whose observer indexes slots by prompt position override it."""
        return self.prefill_observer()

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        """Prepare a fresh cache copy before compression. Default: nothing."""

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        """Evict at the end of prefill so each layer holds its budget. Default: nothing to do."""

    def after_compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        """Called after `compress` (also when the prompt fit the budget), e.g. to store the kept slots quantised
        (`kvbench.engine.quant`). Default: nothing."""

    def before_forward(self, cache: KVCache, ctx: CompressionContext, num_new: int) -> None:
        """Called before each forward after compression. Default: the cache only grows."""

    def batch_refusal(self) -> str | None:
        """Why this method cannot decode in a batch (None: it can); see `batchable`."""
        if not vars(type(self)).get("batchable", False):
            return "its batched rows are not tested equal to batch-1 rows (batchable methods: " + (
                ", ".join(name for name in METHODS.names() if vars(METHODS.get(name)).get("batchable", False)) + ")"
            )
        return None

    def decode_grows_only(self) -> bool:
        """Whether decoding only appends to the compressed cache: nothing evicted before a forward (`before_forward`)
        or by an attention observer attached in `setup`. Batched decode may then stack several samples' caches
        (`kvbench.engine.batched`); otherwise each row attends over its own cache, which is right for any method, so
        the default is False and methods whose decoding only appends say so."""
        return False

    def rope_dependent(self) -> bool:
        """Whether this method moves, removes or re-applies the rotary embedding of cached keys or queries (it is
        refused on models whose layers do not share one RoPE: NoPE layers, per-layer-type tables)."""
        return False

    def handles_bounded_layers(self) -> bool:
        """Whether `layers=all` may hand this method sliding-window / chunked layers (wrappers ask their base too)."""
        return self.compresses_bounded_layers

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def label(self) -> str:
        """`name`, plus the hyperparameters that differ from the defaults."""
        defaults = type(self)()
        changed = {k: v for k, v in self.params().items() if getattr(defaults, k) != v}
        if not changed:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) + ")"


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    """Class decorator: register a Method dataclass under `name`."""

    def decorator(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator


def build_method(cfg: Any) -> Method:
    """Create a method from its config (`name` + hyperparameters); unknown parameters fail in one line."""
    method = build_registered(METHODS, cfg, "parameter")
    validate = getattr(method, "validate", None)
    if validate is not None:
        validate()
    return method
