"""KV-Direct: keep the recent window as K/V, recompute everything older from checkpoints (arXiv 2603.19664).

The K/V of a token at layer l are deterministic functions of layer l's residual-stream input h_l:
K = RoPE_p(k_norm(W_k RMSNorm_l(h_l) + b_k)), V = W_v RMSNorm_l(h_l) + b_v. KV-Direct keeps the K/V of the most
recent `budget` tokens and, for every older token, a checkpoint from which attention recomputes its K/V on
demand, so attention always sees every token. Two checkpoints, both with honest bytes (`kvbench.methods
.kv_direct` rows count them in `kv_bytes`):

* `checkpoint=per_layer` (spec variant A): h_l of every token at every layer, captured with forward pre-hooks on
  each decoder layer's input norm (registered for one forward, removed by themselves; no model class is
  patched). Per token that is L*D elements against 2*L*Hkv*d for its K/V: MORE than the K/V it replaces on GQA
  models (SmolLM2-135M: 30*576 = 17280 vs 2*30*3*64 = 11520 elements, 1.5x), half on MHA models.
* `checkpoint=ids` (variant B, "decoding without a cache"): only the token ids; before every forward the model is
  re-run over the evicted prefix (a fresh causal cache) to rebuild its K/V at every layer. Minimal bytes
  (4 per token), cost of a re-prefill of the prefix per step.

Residual checkpoints are needed for the window tokens too (a token's h_l cannot be recovered from its K/V once
it leaves the window), so `per_layer` holds h_l for every token seen; that is what the rows report.

Bit-identity: a GEMM over a different number of rows may sum in another order (CPU BLAS and cuBLAS pick kernels
per shape; measured on CPU: a one-row product differs from a many-row one by ~1e-6). kvbench therefore recomputes
every token with the product shape of the forward that first computed it (`Recomputer.kv`: the prompt as one
T-row product, each generated token as a one-row product, batched with bmm where that is bit-equal, probed), and
the ids variant replays the original forwards (`replay=exact`); then the recomputed K/V equal the cached ones
(torch.equal) and greedy decoding is token-identical to the full cache. `replay=batched` re-runs the prefix as
one forward (cheaper, not bit-identical). Variant C (the paper's own configuration, no public code) is
not reproduced. Hyperparameters: budget = recent window kept as K/V per layer and KV head; checkpoint=per_layer
(per_layer | ids). Supported: decoder stacks with `input_layernorm`, `self_attn.k_proj/v_proj` (biases, Qwen3's
`k_norm` and Gemma's (1 + w) norms come with the modules), full RoPE (`rotary_emb`); anything else refused in one
line naming the missing part. Hyperparameter replay=exact (ids variant only; exact | batched).

The storage (`CheckpointLayer`, the recomputation and the replay) is `kvbench.engine.layers.checkpoint`; this
module is the policy: the prefill observer, which layers become checkpoint layers, the window trimming and the
row's record.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.layers.checkpoint import (
    CheckpointLayer,
    ForwardCapture,
    PrefixReplay,
    Recomputer,
    UnsupportedArchitecture,
    config_problem,
)
from kvbench.methods.base import CompressionContext, Method, register_method

CHECKPOINTS = ("per_layer", "ids")
REPLAYS = ("exact", "batched")


class PrefillResiduals:
    """Prefill observer: captures every layer's residual input of the one shared prefill (hooks bound in
    `bind_model`, removed after the last layer's attention). A budget sweep shares it; never mutated."""

    def __init__(self) -> None:
        self.residuals: dict[int, torch.Tensor] = {}
        self.capture: ForwardCapture | None = None
        self.num_layers = 0

    def bind_model(self, lm: Any) -> None:
        Recomputer(lm.model)  # refuse unsupported architectures before the prefill
        self.num_layers = lm.config.num_hidden_layers
        self.capture = ForwardCapture(lm.model, on_residual=self._store)

    def _store(self, layer_idx: int, hidden: torch.Tensor) -> None:
        previous = self.residuals.get(layer_idx)
        self.residuals[layer_idx] = hidden.clone() if previous is None else torch.cat([previous, hidden])

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        if layer_idx == self.num_layers - 1 and self.capture is not None:
            self.capture.remove()


@register_method("kv_direct")
@dataclass
class KVDirect(Method):
    """KV-Direct (arXiv 2603.19664, "The Residual Stream Is All You Need"; README + diagram of
    Kaleemullahqasim/KV-Direct, no code released): the recent `budget` tokens keep K/V, older tokens are
    recomputed from checkpoints when attention needs them, so no token is lost. See the module docstring for
    the two checkpoint variants, their bytes (per_layer costs MORE than the K/V it replaces on GQA models), and
    why recomputation is not always bit-identical.

    Hyperparameters: checkpoint=per_layer (per_layer | ids). Rows: `method_record` has kv_direct_recompute_s,
    kv_direct_checkpoint_bytes, kv_direct_window_kv_bytes and kv_direct_full_kv_bytes (what the full K/V of the
    same tokens would take); `kv_bytes` = window K/V + checkpoints.
    """

    keeps_slot_subset: ClassVar[bool] = False  # evicted K/V come back recomputed: no slot is dropped
    plain_kv_layers: ClassVar[bool] = False

    checkpoint: str = "per_layer"
    replay: str = "exact"

    def rope_dependent(self) -> bool:
        return True

    def check_model(self, config: Any) -> None:
        """Refuse, before any sample runs, a model whose config says its K/V cannot be recomputed (one line)."""
        missing = config_problem(config)
        if missing is not None:
            kind = getattr(config, "model_type", type(config).__name__)
            raise UnsupportedArchitecture(f"kv_direct cannot recompute K/V for model_type '{kind}': missing {missing}")

    def validate(self) -> None:
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"unknown checkpoint '{self.checkpoint}'. Valid checkpoints: {', '.join(CHECKPOINTS)}.")
        if self.replay not in REPLAYS:
            raise ValueError(f"unknown replay '{self.replay}'. Valid replays: {', '.join(REPLAYS)}.")

    def prefill_observer(self) -> PrefillResiduals | None:
        return PrefillResiduals() if self.checkpoint == "per_layer" else None

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        self.validate()
        recomputer = Recomputer(ctx.model)
        for idx, layer in enumerate(cache.layers):
            new = CheckpointLayer.from_layer(layer, idx, recomputer, self.checkpoint)
            if self.checkpoint == "per_layer":
                stats = ctx.prefill_stats
                if not isinstance(stats, PrefillResiduals) or idx not in stats.residuals:
                    raise ValueError("kv_direct checkpoint=per_layer needs its prefill observer's residuals")
                new.residuals = stats.residuals[idx]
            else:
                if idx == 0:
                    ids = torch.tensor(ctx.input_ids, dtype=torch.int32, device=layer.device)
                    replay = PrefixReplay(ctx.model, recomputer, ids, self.replay)
                new.replay = replay
            cache.layers[idx] = new
        # After every forward (last layer's append) the record shows the bytes held and the recompute time; a
        # weak reference, so the cache is freed with its job.
        cache_ref = weakref.ref(cache)
        cache.layers[-1].on_update = lambda: self._record(cache_ref(), ctx)
        self._record(cache, ctx)

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        for layer in cache.layers:
            layer.trim_window(ctx.budget)
        self._record(cache, ctx)

    def before_forward(self, cache: KVCache, ctx: CompressionContext, num_new: int) -> None:
        layers: list[CheckpointLayer] = cache.layers  # type: ignore[assignment]
        for layer in layers:
            layer.trim_window(max(0, ctx.budget - num_new))
        if self.checkpoint == "ids":
            ForwardCapture(ctx.model, on_ids=layers[0].replay.append)
        else:
            ForwardCapture(ctx.model, on_residual=lambda idx, h: self._append_residual(layers[idx], h))

    @staticmethod
    def _append_residual(layer: CheckpointLayer, hidden: torch.Tensor) -> None:
        layer.residuals = torch.cat([layer.residuals, hidden.to(layer.residuals.dtype)])

    @staticmethod
    def _record(cache: KVCache | None, ctx: CompressionContext) -> None:
        if cache is None:
            return
        layers: list[CheckpointLayer] = cache.layers  # type: ignore[assignment]
        window = sum(KVLayer.nbytes(layer) for layer in layers)
        tokens = layers[0].evicted_count() + layers[0].get_seq_length()
        per_token = sum(2 * layer.num_heads * layer.keys.shape[-1] * layer.keys.element_size() for layer in layers)
        ctx.record["kv_direct_checkpoint"] = layers[0].checkpoint
        ctx.record["kv_direct_recompute_s"] = layers[0].recomputer.seconds
        ctx.record["kv_direct_checkpoint_bytes"] = sum(layer.checkpoint_nbytes() for layer in layers)
        ctx.record["kv_direct_window_kv_bytes"] = window
        ctx.record["kv_direct_full_kv_bytes"] = tokens * per_token
