from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.generation import forward_tokens
from kvbench.engine.hub import cache_name, default_cache_dir
from kvbench.methods.base import CompressionContext, Method, register_method
from kvbench.methods.scoring import mask_to_indices

PROFILE_VERSION = 1


class RepeatAttention:
    """Observer of a forward over [bos] + x + x: per query head, the mean attention from the second copy's
    tokens to the same token in the first copy (echo) and to the token after it (induction)."""

    def __init__(self, offset: int, period: int) -> None:
        self.offset, self.period = offset, period
        self.echo: dict[int, torch.Tensor] = {}
        self.induction: dict[int, torch.Tensor] = {}

    def on_attention(self, layer_idx, query, layer: KVLayer, query_positions, scaling) -> None:
        num_kv = layer.num_heads
        q = query[0].float().unflatten(0, (num_kv, -1))  # [Hkv, g, n, d]
        logits = torch.einsum("hgqd,hkd->hgqk", q, layer.keys[0].float()) * scaling
        visible = layer.positions[:, None, None, :] <= query_positions.to(layer.device)[None, None, :, None]
        probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1).flatten(0, 1)  # [H, n, n]
        # Slot i of the forward is token i: the second copy's token at row r repeats the one at r - period.
        rows = torch.arange(self.offset + self.period, self.offset + 2 * self.period, device=layer.device)
        self.echo[layer_idx] = probs[:, rows, rows - self.period].mean(dim=-1)
        # The last token's successor in the first copy is the second copy's first token: left out.
        self.induction[layer_idx] = probs[:, rows[:-1], rows[:-1] - self.period + 1].mean(dim=-1)


def profile_heads(lm: Any, period: int, samples: int, seed: int) -> dict[str, list[list[float]]]:
    """Echo and induction scores `[L][H]` per query head, averaged over `samples` random token sequences
    repeated twice (after BOS when the tokenizer has one)."""
    tokenizer = lm.tokenizer
    special = set(tokenizer.all_special_ids or [])
    vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    num_layers = lm.config.num_hidden_layers
    echo = torch.zeros((num_layers, lm.config.num_attention_heads))
    induction = torch.zeros_like(echo)
    for _ in range(samples):
        tokens = vocab[torch.randint(len(vocab), (period,), generator=generator)].tolist()
        cache = KVCache(lm.layer_specs)
        observer = RepeatAttention(len(prefix), period)
        cache.observers.append(observer)
        forward_tokens(lm, cache, prefix + tokens + tokens)
        for layer_idx in observer.echo:  # attention layers only: a linear-attention / SSM layer's row stays 0
            echo[layer_idx] += observer.echo[layer_idx].cpu() / samples
            induction[layer_idx] += observer.induction[layer_idx].cpu() / samples
    return {"echo": echo.tolist(), "induction": induction.tolist()}


def top_heads(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean `[L, Hkv]` mask of the round(fraction * L * Hkv) highest scores (at least one if fraction > 0)."""
    count = max(1, round(fraction * scores.numel())) if fraction > 0 else 0
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices[: min(count, scores.numel())]
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view_as(scores)


@register_method("razor")
@dataclass
class RazorAttention(Method):
    """RazorAttention (Tang et al., 2024, "RazorAttention: Efficient KV Cache Compression Through Retrieval
    Heads"). Training-free, query-agnostic, with a one-off head profile per model.

    Retrieval heads keep the full cache. They are the echo heads (attending to the previous occurrence of
    the current token) and induction heads (attending to the token after it), found once per model on
    `profile_samples` random token sequences of `profile_tokens` tokens repeated twice; the top
    `induction_fraction` of KV heads by induction score and the top `echo_fraction` by echo score (the
    paper's 14% + 1%). A query head's score is per KV head the MAX over its GQA group (a KV head that serves
    one retrieval query head must keep everything). The profile is cached as JSON under
    `<cache_dir>/razor/` (default $KVBENCH_CACHE or ~/.cache/kvbench, / <model>), keyed by the model's identity
    and the profiling settings.

    Every other KV head keeps `n_sink` sink slots, the most recent slots, and ONE compensation token for all
    dropped slots: k = mean of the dropped keys (post-RoPE), v = mean of their values, whose attention
    weight counts n_drop times (`extras["logit_bias"] = log(n_drop)`, so its logit is q.k/sqrt(d) +
    log n_drop); it sits at the last dropped slot's position so every later query sees it.

    Budget: the paper sizes the recent buffer as max(S0, T/C). Here the budget B is the number of entries
    each NON-retrieval KV head keeps (n_sink sinks + B - n_sink - 1 recent + the compensation token); a
    fractional budget 1/C reproduces T/C and the S0 floor is left to the budget sweep. Retrieval heads keep
    all T slots, so the realised total exceeds B * L * Hkv; rows report it (`kept_entries`, and
    `method_record` razor_retrieval_heads / razor_kept_fraction). Generated tokens are appended to every head.

    Hyperparameters: induction_fraction=0.14, echo_fraction=0.01, n_sink=4, compensation=true (false drops
    the remote slots without a compensation token, the paper's ablation), profile_tokens=256,
    profile_samples=4, profile_seed=0.
    """

    keeps_slot_subset: ClassVar[bool] = False  # adds a compensation slot and a logit bias to plain layers
    plain_kv_layers: ClassVar[bool] = True

    induction_fraction: float = 0.14
    echo_fraction: float = 0.01
    n_sink: int = 4
    compensation: bool = True
    profile_tokens: int = 256
    profile_samples: int = 4
    profile_seed: int = 0

    def validate(self) -> None:
        for name in ("induction_fraction", "echo_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"razor {name} must be in [0, 1], got {getattr(self, name)}")
        if self.n_sink < 0 or self.profile_tokens < 2 or self.profile_samples < 1:
            raise ValueError("razor needs n_sink >= 0, profile_tokens >= 2 and profile_samples >= 1")

    def profile_path(self, lm: Any, cache_dir: Path | None) -> Path:
        identity = json.dumps(lm.identity, sort_keys=True, default=str)
        settings = f"{PROFILE_VERSION}-{self.profile_tokens}-{self.profile_samples}-{self.profile_seed}"
        digest = hashlib.sha256(f"{identity}|{settings}".encode()).hexdigest()[:16]
        return Path(cache_dir or default_cache_dir(lm)) / "razor" / f"{cache_name(lm.name)}-{digest}.json"

    def head_profile(self, lm: Any, cache_dir: Path | None) -> dict[str, list[list[float]]]:
        path = self.profile_path(lm, cache_dir)
        if path.exists():
            return json.loads(path.read_text())
        profile = profile_heads(lm, self.profile_tokens, self.profile_samples, self.profile_seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({**profile, "identity": lm.identity}, default=str))
        temporary.replace(path)  # atomic: parallel runs never read a half-written profile
        return profile

    def retrieval_heads(self, ctx: CompressionContext, num_layers: int) -> torch.Tensor:
        """Boolean `[L, Hkv]` over the `num_layers` layers the method is handed: the KV heads that keep their full
        cache, ranked among those layers (the profile covers every layer of the model)."""
        profile = self.head_profile(ctx.lm, ctx.cache_dir)
        num_kv = ctx.num_kv_heads
        rows = [ctx.model_layer_index(i) for i in range(num_layers)]
        per_kv = {
            kind: torch.tensor(profile[kind])[rows].unflatten(1, (num_kv, -1)).amax(dim=-1)
            for kind in ("echo", "induction")
        }
        return top_heads(per_kv["induction"], self.induction_fraction) | top_heads(per_kv["echo"], self.echo_fraction)

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        retrieval = self.retrieval_heads(ctx, len(cache.layers))
        for layer_idx, layer in enumerate(cache.layers):
            compress_layer(layer, retrieval[layer_idx], ctx.budget, self.n_sink, self.compensation)
        kept = cache.kept_entries()
        ctx.record["razor_retrieval_heads"] = int(retrieval.sum())
        ctx.record["razor_kept_fraction"] = kept / (ctx.prompt_len * len(cache.layers) * ctx.num_kv_heads)


def compress_layer(layer: KVLayer, retrieval: torch.Tensor, budget: int, n_sink: int, compensation: bool) -> None:
    """Keep every slot of the retrieval heads; the others keep sinks + recent slots + a compensation token."""
    length = layer.get_seq_length()
    if budget >= length or bool(retrieval.all()):
        return
    slots = 1 if compensation else 0
    sinks = min(n_sink, max(0, budget - slots))
    recent = max(0, budget - sinks - slots)
    dropped = range(sinks, length - recent)
    n_drop = len(dropped)
    mask = torch.ones((layer.num_heads, length), dtype=torch.bool, device=layer.device)
    squeeze = ~retrieval.to(layer.device)
    mask[squeeze, sinks : length - recent] = False
    comp_slot = length - recent - 1  # the last dropped slot carries the compensation token
    if compensation and n_drop > 0:
        mask[squeeze, comp_slot] = True
        mean_k = layer.keys[0, :, sinks : length - recent].float().mean(dim=1).to(layer.keys.dtype)
        mean_v = layer.values[0, :, sinks : length - recent].float().mean(dim=1).to(layer.values.dtype)
        bias = torch.zeros((layer.num_heads, length), dtype=torch.float32, device=layer.device)
        bias[squeeze, comp_slot] = math.log(n_drop)
        # Write the compensation token before the gather so that it follows its slot like any other state.
        layer.keys = layer.keys.clone()
        layer.values = layer.values.clone()
        layer.keys[0, squeeze, comp_slot] = mean_k[squeeze]
        layer.values[0, squeeze, comp_slot] = mean_v[squeeze]
        previous = layer.extras.get("logit_bias")
        layer.extras["logit_bias"] = bias if previous is None else previous.float() + bias
    layer.keep(*mask_to_indices(mask))
