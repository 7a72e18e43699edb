"""A transformers `Cache` that physically shrinks and remembers the original position of every kept slot.

Storage is at KV-head granularity, `[1, Hkv, L, d]` per layer, never expanded to query heads. Each slot
carries the position it had in the original sequence (`positions`, `[Hkv, L]`), so

* masks are built from positions (a key is visible to a query iff key position <= query position), which
  stays correct when layers (PyramidKV) or heads (AdaKV, KVzip) hold different numbers of slots;
* new tokens get positions that continue the ORIGINAL sequence (`seen_tokens`), not the compressed length.

Heads of one layer may keep different counts: shorter heads are right-padded with zero K/V and the
position `PAD_POSITION`, which no query can see. `nbytes()` reports what is physically held (padding
included, the capacity reserved for future appends excluded); `reserved_nbytes()` what is allocated (held +
reserved); `logical_nbytes()` what the kept slots alone would take.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

PAD_POSITION = torch.iinfo(torch.int64).max


class KVLayer(CacheLayerMixin):
    """One layer's keys/values `[1, Hkv, L, d]` and their original positions `[Hkv, L]`.

    Storage keeps capacity ahead of the length so a decode step writes one slot instead of copying the layer:
    `keys`, `values` and `positions` are views of the first `L` slots of buffers holding `capacity` slots.
    Growth: `reserve(n)` (the runner calls it once the number of tokens still to come is known) makes room for
    exactly `n` more appends; appends beyond what was reserved grow the buffers by a quarter (at least
    `MIN_SLACK` slots), so unannounced appends cost amortised O(1) copies. Invariant, checked by the tests:
    `capacity <= length + max(pending, MIN_SLACK, GROWTH_FRACTION * length)` where `pending` is what `reserve`
    announced and no append has used yet. `keep` (eviction) still compacts physically: fresh buffers of the kept
    slots plus the pending appends, the old ones are released.

    `copy()` is copy-on-write: the copy shares the buffers until either side writes (appends or compacts), so
    a budget sweep copies only what each job keeps. Methods therefore never modify `keys`/`values`/`positions`
    in place: they assign new tensors (`layer.keys = ...`) or call `keep`.
    """

    is_sliding = False
    is_croppable = False
    MIN_SLACK = 16  # amortised growth: at least this many free slots after a reallocation ...
    GROWTH_FRACTION = 0.25  # ... or this fraction of the length, whichever is larger

    def __init__(self) -> None:
        self._key_buf: torch.Tensor | None = None  # [1, Hkv, capacity, d]
        self._value_buf: torch.Tensor | None = None
        self._position_buf: torch.Tensor | None = None  # [Hkv, capacity]
        self._length = 0
        self._pending = 0  # appends announced by reserve() and not made yet
        self._shared = False  # buffers shared with a copy: the next write reallocates
        super().__init__()
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

    # The public tensors are views of the held slots; assigning one adopts the tensor as that buffer.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._key_buf is None else self._key_buf[:, :, : self._length]

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._key_buf = self._adopt(tensor, tensor.shape[-2] if tensor is not None else 0)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._value_buf is None else self._value_buf[:, :, : self._length]

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._value_buf = self._adopt(tensor, tensor.shape[-2] if tensor is not None else 0)

    @property
    def positions(self) -> torch.Tensor | None:
        return None if self._position_buf is None else self._position_buf[:, : self._length]

    @positions.setter
    def positions(self, tensor: torch.Tensor | None) -> None:
        self._position_buf = self._adopt(tensor, tensor.shape[-1] if tensor is not None else 0)

    def _adopt(self, tensor: torch.Tensor | None, length: int) -> torch.Tensor | None:
        if tensor is not None and self.is_initialized and length != self._length:
            raise ValueError(f"assigned {length} slots to a layer holding {self._length}; use keep() to evict")
        return tensor

    @property
    def capacity(self) -> int:
        """Slots allocated (held + room for appends)."""
        if self._key_buf is None:
            return 0
        return min(self._key_buf.shape[-2], self._value_buf.shape[-2], self._position_buf.shape[-1])

    @property
    def pending(self) -> int:
        """Appends announced by `reserve` that have not been made yet."""
        return self._pending

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[0] != 1:
            raise ValueError(f"kvbench caches hold one sequence (batch size 1), got batch {key_states.shape[0]}")
        self.dtype, self.device = key_states.dtype, key_states.device
        self._length = 0
        self._key_buf = key_states[:, :, :0]
        self._value_buf = value_states[:, :, :0]
        self._position_buf = torch.empty((key_states.shape[1], 0), dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def _reallocate(self, capacity: int) -> None:
        """Move the held slots into fresh buffers of `capacity` slots (the only copy an append may cost)."""
        length = self._length
        keys, values, positions = self.keys, self.values, self.positions
        self._key_buf = keys.new_empty((*keys.shape[:2], capacity, keys.shape[-1]))
        self._value_buf = values.new_empty((*values.shape[:2], capacity, values.shape[-1]))
        self._position_buf = positions.new_empty((positions.shape[0], capacity))
        self._key_buf[:, :, :length] = keys
        self._value_buf[:, :, :length] = values
        self._position_buf[:, :length] = positions
        self._shared = False

    def _set_storage(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Adopt fresh buffers whose first `length` slots are the held ones (after `keep`). Storage subclasses
        (`kvbench.engine.quant`) override it to encode just the held K/V."""
        self._key_buf, self._value_buf, self._position_buf = keys, values, positions
        self._shared = False

    def reserve(self, num_tokens: int) -> None:
        """Announce `num_tokens` more appends: room for exactly that many is made now (at most one copy), or, while
        the buffers are shared with a copy, by the next write (a compressing job thus never copies the full cache)."""
        self._pending = max(0, num_tokens)
        if self.is_initialized and not self._shared and self.capacity < self._length + self._pending:
            self._reallocate(self._length + self._pending)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, positions: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        num_new = key_states.shape[-2]
        start, end = self._length, self._length + num_new
        if self._shared or end > self.capacity:
            pending = max(0, self._pending - num_new)
            slack = pending if pending else max(self.MIN_SLACK, int(end * self.GROWTH_FRACTION))
            self._reallocate(end + (slack if start else pending))  # the first fill takes no slack
        self._key_buf[:, :, start:end] = key_states
        self._value_buf[:, :, start:end] = value_states
        self.append_slot_state(positions, num_new)
        return self.keys, self.values

    def append_slot_state(self, positions: torch.Tensor, num_new: int) -> None:
        """Positions (and zeroed extras) of `num_new` appended slots, and the new length; storage subclasses
        (`kvbench.engine.quant`) that keep K/V elsewhere share it. Grows the position buffer when it is full or
        shared."""
        start, end = self._length, self._length + num_new
        self._pending = max(0, self._pending - num_new)
        if self._shared or end > self._position_buf.shape[-1]:
            slack = self._pending if self._pending else max(self.MIN_SLACK, int(end * self.GROWTH_FRACTION))
            grown = self._position_buf.new_empty((self._position_buf.shape[0], end + slack))
            grown[:, :start] = self._position_buf[:, :start]
            self._position_buf = grown
        self._position_buf[:, start:end] = positions.to(self.device)
        self._length = end
        for name, state in self.extras.items():  # method state is small ([Hkv, L] scalars): grown by concatenation
            self.extras[name] = torch.cat([state, state.new_zeros((state.shape[0], num_new))], dim=1)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self._length

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
        become padding. The new buffers are fresh allocations (kept slots + pending appends), so the old ones
        are released.
        """
        if indices.dim() != 2 or indices.shape[0] != self.num_heads:
            raise ValueError(f"indices must be [Hkv={self.num_heads}, n], got {tuple(indices.shape)}")
        indices = indices.to(self.device)
        kept, capacity = indices.shape[1], indices.shape[1] + self._pending
        keys, values, positions = self.keys, self.values, self.positions
        # Fresh buffers (the old ones are released unless a copy still shares them), room for the pending appends.
        key_buf = keys.new_empty((*keys.shape[:2], capacity, keys.shape[-1]))
        value_buf = values.new_empty((*values.shape[:2], capacity, values.shape[-1]))
        position_buf = positions.new_empty((positions.shape[0], capacity))
        gather = indices[None, :, :, None]
        torch.gather(keys, 2, gather.expand(-1, -1, -1, keys.shape[-1]), out=key_buf[:, :, :kept])
        torch.gather(values, 2, gather.expand(-1, -1, -1, values.shape[-1]), out=value_buf[:, :, :kept])
        torch.gather(positions, 1, indices, out=position_buf[:, :kept])
        self.extras = {name: state.gather(1, indices.to(state.device)) for name, state in self.extras.items()}
        if valid is not None and not bool(valid.all()):
            hidden = ~valid.to(self.device)
            position_buf[:, :kept].masked_fill_(hidden, PAD_POSITION)
            key_buf[:, :, :kept].masked_fill_(hidden[None, :, :, None], 0)
            value_buf[:, :, :kept].masked_fill_(hidden[None, :, :, None], 0)
        self._length = kept
        self._set_storage(key_buf, value_buf, position_buf)
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

    def _bytes_per_slot(self) -> int:
        """Bytes of one slot (key + value) of one KV head."""
        return self.keys.shape[-1] * self.keys.element_size() + self.values.shape[-1] * self.values.element_size()

    def nbytes(self) -> int:
        """Bytes of the held slots (padding included, capacity reserved for future appends excluded)."""
        if not self.is_initialized:
            return 0
        return self.num_heads * self._length * self._bytes_per_slot() + self.attention_state_nbytes()

    def attention_state_nbytes(self) -> int:
        """Bytes of per-slot state that attention reads (a `logit_bias`, RazorAttention's / kv_distill's): held
        with the slots, so counted with them. Scoring bookkeeping (H2O's sums) is the method's, not counted."""
        bias = self.extras.get("logit_bias")
        return 0 if bias is None else bias.numel() * bias.element_size()

    def reserved_nbytes(self) -> int:
        """Bytes allocated for this layer's K/V: held slots plus the capacity reserved for appends. A copy that
        still shares its buffers (copy-on-write) counts them too."""
        if not self.is_initialized:
            return 0
        return self.num_heads * self.capacity * self._bytes_per_slot()

    def logical_nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return int(self.lengths().sum()) * self._bytes_per_slot()

    def copy(self) -> KVLayer:
        """A copy-on-write copy: it shares the buffers until either layer writes; extras are cloned."""
        other = KVLayer()
        if self.is_initialized:
            other.dtype, other.device = self.dtype, self.device
            other._key_buf, other._value_buf, other._position_buf = self._key_buf, self._value_buf, self._position_buf
            other._length = self._length
            other._shared = self._shared = True
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
        # How single-token decode steps over this cache attend: "torch" (SDPA) or "triton" (the split-K kernel).
        self.decode_kernels = "torch"

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
        """An independent copy (copy-on-write layers: nothing is copied until a layer is written); observers are
        not copied."""
        other = KVCache(0)
        other.layers = [layer.copy() for layer in self.layers]
        other.seen_tokens = self.seen_tokens
        other.decode_kernels = self.decode_kernels
        return other

    def _set_storage(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Adopt fresh buffers whose first `length` slots are the held ones (after `keep`). Storage subclasses
        (`kvbench.engine.quant`) override it to encode just the held K/V."""
        self._key_buf, self._value_buf, self._position_buf = keys, values, positions
        self._shared = False

    def reserve(self, num_tokens: int) -> None:
        """Announce `num_tokens` more tokens (tail + decode): every layer makes room for them once."""
        for layer in self.layers:
            layer.reserve(num_tokens)

    def kv_bytes(self) -> int:
        """Bytes of the slots held (what the cache holds; reserved capacity excluded)."""
        return sum(layer.nbytes() for layer in self.layers)

    def reserved_kv_bytes(self) -> int:
        """Bytes allocated: held slots plus capacity reserved for appends (`KVLayer.reserved_nbytes`)."""
        return sum(layer.reserved_nbytes() for layer in self.layers)

    def logical_kv_bytes(self) -> int:
        return sum(layer.logical_nbytes() for layer in self.layers)

    def kept_per_layer(self) -> list[list[int]]:
        """Kept slots per layer per KV head."""
        return [layer.lengths().tolist() for layer in self.layers]

    def kept_entries(self) -> int:
        return int(sum(sum(heads) for heads in self.kept_per_layer()))
