"""KV-Direct's storage: a recent window of K/V per layer, every older token recomputed on demand from checkpoints
(policy: `kvbench.methods.kv_direct`).

The K/V of a token at layer l are deterministic functions of layer l's residual-stream input h_l:
K = RoPE_p(k_norm(W_k RMSNorm_l(h_l) + b_k)), V = W_v RMSNorm_l(h_l) + b_v. `CheckpointLayer` holds the recent
window as K/V and, for every older token, a checkpoint from which `update` recomputes its K/V, so attention always
sees every token: the residual inputs h_l of every token (`Recomputer`, from hooks of `ForwardCapture`), or only
the token ids, the model re-run over the evicted prefix (`PrefixReplay`).

Bit-identity: a GEMM over a different number of rows may sum in another order (CPU BLAS and cuBLAS pick kernels
per shape; measured on CPU: a one-row product differs from a many-row one by ~1e-6). The K/V are therefore
recomputed with the product shape of the forward that first computed them (`Recomputer.kv`: the prompt as one
T-row product, each generated token as a one-row product, batched with bmm where that is bit-equal, probed), and
the ids replay repeats the original forwards (`replay="exact"`); then the recomputed K/V equal the cached ones
(torch.equal). `replay="batched"` re-runs the prefix as one forward (cheaper, not bit-identical).

Supported: decoder stacks with `input_layernorm`, `self_attn.k_proj/v_proj` (biases, Qwen3's `k_norm` and Gemma's
(1 + w) norms come with the modules), full RoPE (`rotary_emb`); anything else is refused in one line naming the
missing part (`UnsupportedArchitecture`).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from kvbench.engine.attention import CACHE_KWARG
from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.generation import cache_argument
from kvbench.engine.models import head_dim_of

ID_BYTES = 4  # token ids held as int32


class UnsupportedArchitecture(ValueError):
    pass


def partial_rotary(config: Any) -> float:
    """The fraction of head dimensions RoPE rotates (config attribute, or transformers 5's rope_parameters)."""
    rope = getattr(config, "rope_parameters", None) or {}
    value = getattr(config, "partial_rotary_factor", None) or rope.get("partial_rotary_factor")
    return 1.0 if value is None else value


def config_problem(config: Any) -> str | None:
    """What the config alone says `Recomputer` lacks (None: nothing): checked before any model work."""
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return "layers other than full attention (sliding, chunked, linear attention / SSM: layer_types)"
    if float(partial_rotary(config)) != 1.0:
        return "partial rotary dimensions"
    if getattr(config, "kv_lora_rank", None):
        return "per-head K/V projections (multi-head latent attention projects a shared latent)"
    return None


class Recomputer:
    """K/V of one layer from residual-stream inputs, with the model's own modules (norm, projections, RoPE)."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        kind = getattr(config, "model_type", type(model).__name__)
        backbone = getattr(model, "model", None)
        layers = getattr(backbone, "layers", None)
        missing = None
        if layers is None:
            missing = "decoder layer list model.model.layers"
        elif getattr(backbone, "rotary_emb", None) is None:
            missing = "one shared rotary embedding model.model.rotary_emb"
        elif config_problem(config) is not None:
            missing = config_problem(config)
        else:
            for part in ("input_layernorm", "self_attn.k_proj", "self_attn.v_proj"):
                owner = layers[0]
                for name in part.split("."):
                    owner = getattr(owner, name, None)
                if owner is None:
                    missing = f"decoder layer part {part}"
                    break
        if missing is None:
            rope = getattr(sys.modules[type(layers[0].self_attn).__module__], "apply_rotary_pos_emb", None)
            if rope is None:
                missing = "apply_rotary_pos_emb in the attention module's file"
        if missing is not None:
            raise UnsupportedArchitecture(f"kv_direct cannot recompute K/V for model_type '{kind}': missing {missing}")
        self.layers = layers
        self.rotary = backbone.rotary_emb
        self.apply_rope = rope
        self.head_dim = head_dim_of(config)
        self.seconds = 0.0

    @torch.inference_mode()
    def kv(self, layer_idx: int, residuals: torch.Tensor, segments: list[int], count: int) -> tuple[torch.Tensor, ...]:
        """Keys (post-RoPE) and values `[1, Hkv, count, d]` of the first `count` tokens (positions 0..count-1).

        `segments` are the token counts of the forwards that computed them; each is re-projected with the row
        count it had then (a whole multi-token forward, even when only its head is needed; one-token forwards
        batched as one-row products), so the GEMMs match the original ones bit for bit on backends whose result
        depends only on the shape. `residuals [n, D]` must cover the segments that reach `count`.
        """
        start_time = time.perf_counter()
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        rows = residuals[: segment_end(segments, count)]
        # `.forward`: the capture hooks on this norm must not see the recomputation. RMSNorm is row-wise, so any
        # row count gives the same bits.
        x = layer.input_layernorm.forward(rows[None])[0]
        keys = same_shape_projection(attn.k_proj, x, segments)[:count]
        values = same_shape_projection(attn.v_proj, x, segments)[:count]
        shape = (1, count, -1, self.head_dim)
        keys = keys.view(shape)
        k_norm = getattr(attn, "k_norm", None)
        if k_norm is not None:  # Qwen3 / Gemma-3: per-head RMSNorm on keys before RoPE
            keys = k_norm(keys)
        keys = keys.transpose(1, 2)
        values = values.view(shape).transpose(1, 2)
        positions = torch.arange(count, device=x.device)[None]
        cos, sin = self.rotary(x[None], positions)
        _, keys = self.apply_rope(keys, keys, cos, sin)
        if keys.is_cuda:
            torch.cuda.synchronize(keys.device)
        self.seconds += time.perf_counter() - start_time
        return keys, values


def segment_end(segments: list[int], count: int) -> int:
    """End of the first segments that cover `count` tokens."""
    end = 0
    for length in segments:
        if end >= count:
            break
        end += length
    return end


_BMM_MATCHES: dict[tuple, bool] = {}


def bmm_matches_one_row_calls(linear: torch.nn.Module, like: torch.Tensor) -> bool:
    """Whether a batch of one-row products (bmm) gives the bits of separate one-row calls of `linear` on this
    backend and shape (true for SmolLM2's and the tiny model's shapes on CPU; small odd shapes may differ)."""
    key = (tuple(linear.weight.shape), linear.bias is not None, linear.weight.dtype, like.device.type)
    if key not in _BMM_MATCHES:
        probe = torch.randn((5, linear.weight.shape[1]), generator=torch.Generator().manual_seed(0))
        probe = probe.to(device=like.device, dtype=linear.weight.dtype)
        separate = torch.cat([linear(row[None, None])[0] for row in probe])
        _BMM_MATCHES[key] = torch.equal(one_row_bmm(linear, probe), separate)
    return _BMM_MATCHES[key]


def one_row_bmm(linear: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    out = torch.bmm(rows[:, None, :], linear.weight.T.expand(rows.shape[0], -1, -1))[:, 0]
    return out if linear.bias is None else out + linear.bias


def same_shape_projection(linear: torch.nn.Module, x: torch.Tensor, segments: list[int]) -> torch.Tensor:
    """`linear` over the rows of `x [n, D]`, each segment with the row count it had originally: a multi-row
    segment as one product; a run of one-row segments as one batch of one-row products (bmm) where that gives
    the bits of separate one-row calls (probed once per shape), else one call per row."""
    parts: list[torch.Tensor] = []
    singles: list[torch.Tensor] = []

    def flush() -> None:
        if not singles:
            return
        rows = torch.stack(singles)  # [m, D]
        if bmm_matches_one_row_calls(linear, rows):
            parts.append(one_row_bmm(linear, rows))
        else:
            parts.extend(linear(row[None, None])[0] for row in rows)
        singles.clear()

    start = 0
    for length in segments:
        if start >= x.shape[0]:
            break
        if length == 1:
            singles.append(x[start])
        else:
            flush()
            parts.append(linear(x[None, start : start + length])[0])
        start += length
    flush()
    return torch.cat(parts)


class ForwardCapture:
    """Forward pre-hooks for the NEXT model forward only: the embedding's input ids and/or every decoder layer's
    residual input (its input norm's argument). The hooks remove themselves once the last one fired."""

    def __init__(self, model: torch.nn.Module, on_ids=None, on_residual=None) -> None:
        self.handles: list[Any] = []
        self.on_ids, self.on_residual = on_ids, on_residual
        layers = model.model.layers
        self.last = len(layers) - 1 if on_residual is not None else None
        if on_ids is not None:
            self.handles.append(model.get_input_embeddings().register_forward_pre_hook(self._ids))
        if on_residual is not None:
            for idx, layer in enumerate(layers):
                self.handles.append(layer.input_layernorm.register_forward_pre_hook(self._residual(idx)))

    def _ids(self, module, args) -> None:
        self.on_ids(args[0][0].detach())
        if self.last is None:
            self.remove()

    def _residual(self, idx: int):
        def hook(module, args) -> None:
            self.on_residual(idx, args[0][0].detach())
            if idx == self.last:
                self.remove()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class PrefixReplay:
    """ids variant: the token ids seen so far (append-only) and the model, shared by every layer of a cache and by
    its copies (a copy's K/V prefix is the same prefix). `prefix_kv(evicted, segments)` re-runs the model over the
    first `evicted` tokens into a scratch causal cache, once per forward (memo keyed by the prefix length).

    replay=exact repeats the original forwards (the prompt in one forward, each generated token alone), so every
    product has its original shape; replay=batched runs the prefix as one forward (not bit-identical)."""

    def __init__(self, model: torch.nn.Module, recomputer: Recomputer, ids: torch.Tensor, replay: str) -> None:
        self.model, self.recomputer, self.ids, self.replay = model, recomputer, ids, replay
        # (prefix length, {layer: its K/V}): each layer takes its entry once per forward, so nothing outlives it.
        self.memo: tuple[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] | None = None

    def append(self, ids: torch.Tensor) -> None:
        self.ids = torch.cat([self.ids, ids.to(self.ids.device, torch.int32)])

    def prefix_kv(self, layer_idx: int, evicted: int, segments: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer_idx`'s K/V of the first `evicted` tokens (one re-run of the model per forward)."""
        if self.memo is None or self.memo[0] != evicted or layer_idx not in self.memo[1]:
            self.memo = (evicted, self._rerun(evicted, segments))
        kv = self.memo[1].pop(layer_idx)
        if not self.memo[1]:
            self.memo = None
        return kv

    def _rerun(self, evicted: int, segments: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        start = time.perf_counter()
        num_layers = len(self.model.model.layers)
        scratch = KVCache(num_layers)
        chunks = segments if self.replay == "exact" else [evicted]
        done = 0
        with torch.inference_mode():
            for length in chunks:
                if done >= evicted:
                    break
                positions = scratch.next_positions(length, self.ids.device)
                ids = self.ids[done : done + length].to(torch.long)[None]
                caches = {cache_argument(type(self.model.model)): scratch, CACHE_KWARG: scratch}
                self.model.model(input_ids=ids, position_ids=positions[None], **caches)
                done += length
        if self.ids.is_cuda:
            torch.cuda.synchronize(self.ids.device)
        self.recomputer.seconds += time.perf_counter() - start
        return {i: (layer.keys[:, :, :evicted], layer.values[:, :, :evicted]) for i, layer in enumerate(scratch.layers)}


class CheckpointLayer(KVLayer):
    """A layer whose K/V tensors hold only the recent window; older tokens come back through `update`.

    `positions` stay those of the window (what is held as K/V); attention sees [recomputed prefix; window] and
    `attention_mask` covers both. `residuals` (per_layer) holds h_l of every token seen, in position order;
    `replay` (ids variant) the shared token ids and the prefix re-run; its bytes are counted in layer 0 only.
    """

    def __init__(self, layer_idx: int, recomputer: Recomputer, checkpoint: str) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.recomputer = recomputer
        self.checkpoint = checkpoint
        self.residuals: torch.Tensor | None = None
        self.replay: PrefixReplay | None = None
        self.full_positions: torch.Tensor | None = None
        self.on_update = None  # the last layer's callback: the row's record after every forward
        self.tokens = 0  # tokens seen: positions 0..tokens-1, the newest of them in the window
        self.segments: list[int] = []  # token counts of the forwards so far (prefill, tail, decode steps)

    @classmethod
    def from_layer(cls, layer: KVLayer, layer_idx: int, recomputer: Recomputer, checkpoint: str) -> CheckpointLayer:
        length = layer.get_seq_length()
        in_order = torch.arange(length, device=layer.device).expand(layer.num_heads, length)
        if not torch.equal(layer.positions, in_order):
            raise ValueError("kv_direct needs the full prefilled cache (slots 0..T-1 in order, nothing evicted)")
        new = cls(layer_idx, recomputer, checkpoint)
        new.__dict__.update(vars(layer))  # the plain layer's storage and flags (KVLayer has none of our fields)
        new.tokens = length
        new.segments = [new.tokens] if new.tokens else []
        return new

    def evicted_count(self) -> int:
        """Tokens older than the window (their positions are 0..n-1: the window is always the newest tokens)."""
        return self.tokens - self.get_seq_length()

    def trim_window(self, keep: int) -> None:
        """Keep the K/V of the newest `keep` tokens; older ones live on as checkpoints."""
        length = self.get_seq_length()
        if length > keep:
            recent = torch.arange(length - keep, length, device=self.device).expand(self.num_heads, -1)
            self.keep(recent)

    def update(self, key_states, value_states, *args, positions: torch.Tensor, **kwargs):
        evicted = self.evicted_count()
        keys, values = super().update(key_states, value_states, positions=positions)
        self.tokens += key_states.shape[-2]
        self.segments.append(key_states.shape[-2])
        self.full_positions = None
        if evicted > 0:
            if self.checkpoint == "per_layer":
                old_keys, old_values = self.recomputer.kv(self.layer_idx, self.residuals, self.segments, evicted)
            else:
                old_keys, old_values = self.replay.prefix_kv(self.layer_idx, evicted, self.segments)
            self.full_positions = torch.cat([torch.arange(evicted, device=self.device), self.positions[0]])
            keys, values = torch.cat([old_keys, keys], dim=2), torch.cat([old_values, values], dim=2)
        if self.on_update is not None:
            self.on_update()
        return keys, values

    def attention_mask(self, query_positions: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        if self.full_positions is None:
            return super().attention_mask(query_positions)
        if query_positions.shape[0] == 1:
            return None, False  # one new token sees every older one
        mask = self.full_positions[None, :] <= query_positions.to(self.device)[:, None]
        return mask[None, None], False

    def checkpoint_nbytes(self) -> int:
        if self.checkpoint == "per_layer":
            return 0 if self.residuals is None else self.residuals.numel() * self.residuals.element_size()
        if self.replay is None or self.layer_idx != 0:
            return 0
        return self.replay.ids.numel() * ID_BYTES

    def nbytes(self) -> int:
        return super().nbytes() + self.checkpoint_nbytes()

    def logical_nbytes(self) -> int:
        return super().logical_nbytes() + self.checkpoint_nbytes()

    def copy(self) -> CheckpointLayer:
        plain = super().copy()
        other = CheckpointLayer(self.layer_idx, self.recomputer, self.checkpoint)
        other.__dict__.update({k: v for k, v in vars(plain).items()})
        other.tokens, other.segments = self.tokens, list(self.segments)
        other.residuals, other.replay = self.residuals, self.replay  # append-only, prefix-determined: shared
        return other
