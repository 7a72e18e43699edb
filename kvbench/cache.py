"""A transformers `Cache` that physically shrinks and remembers the original position of every kept slot.

Storage is at KV-head granularity, `[1, Hkv, L, d]` per layer, never expanded to query heads. Each slot
carries the position it had in the original sequence (`positions`, `[Hkv, L]`), so

* masks are built from positions (a key is visible to a query iff key position <= query position), which
  stays correct when layers (PyramidKV) or heads (AdaKV, KVzip) hold different numbers of slots;
* new tokens get positions that continue the ORIGINAL sequence (`seen_tokens`), not the compressed length.

Heads of one layer may keep different counts: shorter heads are right-padded with zero K/V and the
position `PAD_POSITION`, which no query can see. `nbytes()` reports what is physically held (padding
included); `logical_nbytes()` what the kept slots alone would take.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

PAD_POSITION = torch.iinfo(torch.int64).max


class KVLayer(CacheLayerMixin):
    """One layer's keys/values `[1, Hkv, L, d]` and their original positions `[Hkv, L]`."""

    is_sliding = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.positions: torch.Tensor | None = None
        # Per-slot method state `[Hkv, L]` (e.g. H2O's accumulated attention, popularity levels) that follows the
        # slots through evictions. New slots get 0. The entry "logit_bias" is added to each slot's attention
        # logit (RazorAttention's compensation token counts n times: bias log n).
        self.extras: dict[str, torch.Tensor] = {}
        # False while the slots are exactly positions 0..L-1 in order (a plain causal cache).
        self.evicted = False
        # True when heads hold different positions (per-head selection); masks are then per head.
        self.per_head = False
        # True when some slots are padding (heads of different lengths).
        self.padded = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[0] != 1:
            raise ValueError(f"kvbench caches hold one sequence (batch size 1), got batch {key_states.shape[0]}")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.positions = torch.empty((key_states.shape[1], 0), dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, positions: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.append_slot_state(positions, key_states.shape[-2])
        return self.keys, self.values

    def append_slot_state(self, positions: torch.Tensor, num_new: int) -> None:
        """Positions (and zeroed extras) of `num_new` appended slots; storage subclasses share it."""
        num_heads = self.positions.shape[0]
        self.positions = torch.cat([self.positions, positions.to(self.device).expand(num_heads, -1)], dim=1)
        for name, state in self.extras.items():
            self.extras[name] = torch.cat([state, state.new_zeros((state.shape[0], num_new))], dim=1)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    @property
    def num_heads(self) -> int:
        return self.keys.shape[1]

    def lengths(self) -> torch.Tensor:
        """Kept (non-padding) slots per KV head, `[Hkv]`."""
        return (self.positions != PAD_POSITION).sum(dim=-1)

    def keep(self, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Keep slots `indices` (`[Hkv, n]`, each row in ascending slot order) and free the rest.

        `valid` (`[Hkv, n]` bool) marks real entries when heads keep different counts; invalid entries
        become padding. The new tensors are fresh allocations, so the old ones are released.
        """
        if indices.dim() != 2 or indices.shape[0] != self.num_heads:
            raise ValueError(f"indices must be [Hkv={self.num_heads}, n], got {tuple(indices.shape)}")
        gather = indices.to(self.device)[None, :, :, None]
        self.keys = self.keys.gather(2, gather.expand(-1, -1, -1, self.keys.shape[-1])).contiguous()
        self.values = self.values.gather(2, gather.expand(-1, -1, -1, self.values.shape[-1])).contiguous()
        self.positions = self.positions.gather(1, indices.to(self.device)).contiguous()
        self.extras = {name: state.gather(1, indices.to(state.device)) for name, state in self.extras.items()}
        if valid is not None and not bool(valid.all()):
            valid = valid.to(self.device)
            self.positions = self.positions.masked_fill(~valid, PAD_POSITION)
            self.keys = self.keys.masked_fill(~valid[None, :, :, None], 0)
            self.values = self.values.masked_fill(~valid[None, :, :, None], 0)
            self.padded = True
        else:
            self.padded = bool((self.positions == PAD_POSITION).any())
        self.evicted = True
        self.per_head = self.padded or not bool((self.positions == self.positions[:1]).all())

    def attention_mask(self, query_positions: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """Mask `[1, Hkv or 1, q, L]` for queries at `query_positions`, and is_causal.

        Boolean (True = attend), or additive float (-inf = hidden) when slots carry a logit bias. Returns
        (None, True) when a plain causal mask is exact and (None, False) when every key is visible.
        """
        q_len = query_positions.shape[0]
        k_len = self.get_seq_length()
        bias = self.extras.get("logit_bias")
        if bias is None:
            if not self.evicted and q_len == k_len:
                return None, q_len > 1
            if q_len == 1 and not self.padded:
                return None, False
        key_pos = self.positions if (self.per_head or bias is not None) else self.positions[:1]
        mask = key_pos[:, None, :] <= query_positions.to(self.device)[None, :, None]
        if bias is not None:
            additive = bias[:, None, :].to(torch.float32).expand_as(mask)
            mask = additive.masked_fill(~mask, float("-inf"))
        return mask[None], False

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def logical_nbytes(self) -> int:
        per_slot = (self.keys.shape[-1] * self.keys.element_size()) + (
            self.values.shape[-1] * self.values.element_size()
        )
        return int(self.lengths().sum()) * per_slot

    def copy(self) -> KVLayer:
        other = KVLayer()
        if self.is_initialized:
            other.dtype, other.device = self.dtype, self.device
            other.keys, other.values = self.keys.clone(), self.values.clone()
            other.positions = self.positions.clone()
            other.is_initialized = True
        other.extras = {name: state.clone() for name, state in self.extras.items()}
        other.evicted, other.per_head, other.padded = self.evicted, self.per_head, self.padded
        return other


class KVCache(Cache):
    """Per-layer `KVLayer`s plus the running original position counter.

    Call `next_positions(n)` before every forward of `n` tokens and pass its result as `position_ids`:
    it tells the layers which positions the appended slots have and advances `seen_tokens`.
    `observers` are called by kvbench's attention function after each layer's attention.
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[KVLayer() for _ in range(num_layers)])
        self.seen_tokens = 0
        self.step_positions: torch.Tensor | None = None
        self.observers: list = []

    def next_positions(self, num_tokens: int, device: torch.device | str) -> torch.Tensor:
        self.step_positions = torch.arange(self.seen_tokens, self.seen_tokens + num_tokens, device=device)
        self.seen_tokens += num_tokens
        return self.step_positions

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step_positions is None or self.step_positions.shape[0] != key_states.shape[-2]:
            raise RuntimeError("KVCache.next_positions(n) must be called before each forward of n tokens")
        return self.layers[layer_idx].update(key_states, value_states, positions=self.step_positions)

    def copy(self) -> KVCache:
        """An independent copy (tensors cloned); observers are not copied."""
        other = KVCache(0)
        other.layers = [layer.copy() for layer in self.layers]
        other.seen_tokens = self.seen_tokens
        return other

    def kv_bytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def logical_kv_bytes(self) -> int:
        return sum(layer.logical_nbytes() for layer in self.layers)

    def kept_per_layer(self) -> list[list[int]]:
        """Kept slots per layer per KV head."""
        return [layer.lengths().tolist() for layer in self.layers]

    def kept_entries(self) -> int:
        return int(sum(sum(heads) for heads in self.kept_per_layer()))
