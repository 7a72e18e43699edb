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

from kvbench.engine.architecture import LayerSpec

try:  # transformers' own layer for recurrent / conv states (linear attention, SSM and hybrid models)
    from transformers.cache_utils import LinearAttentionLayer
except ImportError:  # older transformers: hybrid models are refused (`kvbench.engine.architecture`)
    LinearAttentionLayer = None

PAD_POSITION = torch.iinfo(torch.int64).max
FULL_SPEC = LayerSpec()


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

    is_croppable = False
    # How this layer attends (`kvbench.engine.architecture.LayerSpec`): sliding-window and chunked layers drop the
    # slots no later query can see after every attention call (`drop_unreachable`), as transformers' own sliding
    # layers do, so they never hold more than their window needs.
    spec: LayerSpec = FULL_SPEC
    MIN_SLACK = 16  # amortised growth: at least this many free slots after a reallocation ...
    GROWTH_FRACTION = 0.25  # ... or this fraction of the length, whichever is larger

    def __init__(self, spec: LayerSpec | None = None) -> None:
        if spec is not None and spec is not FULL_SPEC:
            self.spec = spec
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

    @property
    def is_sliding(self) -> bool:
        return self.spec.bounded

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

    def drop_unreachable(self, next_position: int) -> None:
        """Free the slots no query at `next_position` or later can see (sliding-window and chunked layers; a no-op
        for full attention). Slots are in ascending position order per head, so the unreachable ones lead."""
        if not self.spec.bounded or not self.is_initialized or self._length == 0:
            return
        first = self.spec.first_needed_position(next_position)
        positions = self.positions
        if self.per_head or self.padded:
            reachable = (positions >= first) & (positions != PAD_POSITION)
            if bool(reachable.all()):
                return
            counts = reachable.sum(dim=1)
            kept = int(counts.max())
            order = torch.sort((~reachable).to(torch.int8), dim=1, stable=True).indices[:, :kept]
            valid = torch.arange(kept, device=self.device)[None, :] < counts[:, None]
            self.keep(order, valid)
            return
        drop = int((positions[0] < first).sum())
        if drop:
            self.keep(torch.arange(drop, self._length, device=self.device)[None, :].expand(self.num_heads, -1))

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
        spec = self.spec
        if bias is None:
            # A bounded layer holds only what its next query sees (`drop_unreachable`), so a single query sees all.
            if not self.evicted and q_len == k_len and not spec.bounded:
                return None, q_len > 1
            if q_len == 1 and not self.padded:
                return None, False
        key_pos = self.positions if (self.per_head or bias is not None) else self.positions[:1]
        query_pos = query_positions.to(self.device)[None, :, None]
        mask = key_pos[:, None, :] <= query_pos
        if spec.window is not None:
            mask &= key_pos[:, None, :] > query_pos - spec.window
        if spec.chunk is not None:
            mask &= key_pos[:, None, :] >= query_pos - query_pos % spec.chunk
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
        return self.share_slots_with(KVLayer(self.spec))

    def share_slots_with(self, other: KVLayer) -> KVLayer:
        """Make `other` (a fresh layer) a copy-on-write copy of this layer's slots, extras and flags."""
        if self.is_initialized:
            other.dtype, other.device = self.dtype, self.device
            other._key_buf, other._value_buf, other._position_buf = self._key_buf, self._value_buf, self._position_buf
            other._length = self._length
            other._shared = self._shared = True
            other.is_initialized = True
        other.extras = {name: state.clone() for name, state in self.extras.items()}
        other.evicted, other.per_head, other.padded = self.evicted, self.per_head, self.padded
        return other


class StateLayer(*(() if LinearAttentionLayer is None else (LinearAttentionLayer,))):
    """A linear-attention / SSM / conv layer's fixed-size state, kept by transformers' own `LinearAttentionLayer`:
    nothing per token, nothing a method compresses; its bytes count in every row (`nbytes`)."""

    def __init__(self, spec: LayerSpec, number_of_states: int = 1) -> None:
        super().__init__(number_of_states=number_of_states)
        self.spec = spec
        self.is_initialized = False  # "holds K/V": never, for a pure state layer

    def state_nbytes(self) -> int:
        """Bytes of every conv and recurrent state held."""
        tensors = [*self.conv_states.values(), *self.recurrent_states.values()]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def nbytes(self) -> int:
        return self.state_nbytes()

    reserved_nbytes = nbytes

    def logical_nbytes(self) -> int:
        return 0

    def reserve(self, num_tokens: int) -> None:
        """Nothing to reserve: the state does not grow."""

    def drop_unreachable(self, next_position: int) -> None:
        """Nothing per token to drop."""

    def copy_states_from(self, other: StateLayer) -> None:
        """Independent clones of `other`'s states (they are updated in place, so copies cannot share them)."""
        for name in ("conv_kernel_size", "is_conv_states_initialized", "is_recurrent_states_initialized"):
            setattr(self, name, dict(getattr(other, name)))
        self.has_previous_state = dict(other.has_previous_state)
        self.conv_states = {i: None if t is None else t.clone() for i, t in other.conv_states.items()}
        self.recurrent_states = {i: None if t is None else t.clone() for i, t in other.recurrent_states.items()}
        self.cumulative_length_linear = other.cumulative_length_linear.clone()
        self.device, self.dtype = other.device, other.dtype

    def copy(self) -> StateLayer:
        other = StateLayer(self.spec, self.number_of_states)
        other.copy_states_from(self)
        return other


class HybridLayer(StateLayer, KVLayer):
    """A layer with an SSM state AND full attention (Falcon-H1): the state part is `StateLayer`'s, the KV part a
    `KVLayer` that methods compress like any other."""

    def __init__(self, spec: LayerSpec, number_of_states: int = 1) -> None:
        KVLayer.__init__(self, spec)
        StateLayer.__init__(self, spec, number_of_states)

    def lazy_initialization(self, *args, **kwargs) -> None:
        # K/V arrive positionally from `update`; conv / recurrent states by keyword from the state updates.
        if args:
            KVLayer.lazy_initialization(self, *args)
        else:
            StateLayer.lazy_initialization(self, **kwargs)

    def get_seq_length(self) -> int:
        return KVLayer.get_seq_length(self)

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return KVLayer.nbytes(self) + self.state_nbytes()

    def reserved_nbytes(self) -> int:
        return KVLayer.reserved_nbytes(self) + self.state_nbytes()

    def logical_nbytes(self) -> int:
        return KVLayer.logical_nbytes(self)

    def reserve(self, num_tokens: int) -> None:
        KVLayer.reserve(self, num_tokens)

    def drop_unreachable(self, next_position: int) -> None:
        KVLayer.drop_unreachable(self, next_position)

    def copy(self) -> HybridLayer:
        other = self.share_slots_with(HybridLayer(self.spec, self.number_of_states))
        other.copy_states_from(self)
        return other


def new_layer(spec: LayerSpec) -> KVLayer | StateLayer:
    """The cache layer a layer of this spec needs."""
    if spec.has_state and LinearAttentionLayer is None:
        raise ValueError("linear-attention / SSM layers need transformers' LinearAttentionLayer (transformers >= 5.2x)")
    if spec.kind == "hybrid":
        return HybridLayer(spec)
    if spec.has_state:
        return StateLayer(spec)
    return KVLayer(spec)


class KVCache(Cache):
    """Per-layer `KVLayer`s plus the running original position counter.

    Built from the model's per-layer specs (`KVCache(lm.layer_specs)`, see `kvbench.engine.architecture`): full,
    sliding-window and chunked attention layers are `KVLayer`s (bounded ones drop what no later query sees), linear
    attention / SSM / conv layers transformers' own state layers (`StateLayer`), Falcon-H1's layers both
    (`HybridLayer`). `KVCache(n)` is n full-attention layers.

    Call `next_positions(n)` before every forward of `n` tokens and pass its result as `position_ids`:
    it tells the layers which positions the appended slots have and advances `seen_tokens`.
    `observers` are called by kvbench's attention function after each layer's attention.
    """

    def __init__(self, layers: int | list[LayerSpec]) -> None:
        specs = [FULL_SPEC] * layers if isinstance(layers, int) else list(layers)
        super().__init__(layers=[new_layer(spec) for spec in specs])
        self.seen_tokens = 0
        self.step_positions: torch.Tensor | None = None
        self.observers: list = []
        # How single-token decode steps over this cache attend: "torch" (SDPA) or "triton" (the split-K kernel).
        self.decode_kernels = "torch"

    @property
    def model_cache(self) -> KVCache:
        """The cache a forward of the model goes through (a `LayerSubset`'s base; this cache itself)."""
        return self

    @property
    def attention_layers(self) -> list[int]:
        """Indices of the layers that cache per-token K/V."""
        return [i for i, layer in enumerate(self.layers) if layer.spec.attends]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens before the current forward (transformers derives positions from it): the ORIGINAL sequence
        length, not what a compressed or sliding layer holds."""
        if self.step_positions is not None and len(self.step_positions):
            return self.seen_tokens - len(self.step_positions)
        return self.seen_tokens

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
        for copied, layer in zip(other.layers, self.layers, strict=True):
            copied.spec = layer.spec  # storage subclasses' copies keep the spec too
        other.seen_tokens = self.seen_tokens
        other.decode_kernels = self.decode_kernels
        return other

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

    def kv_bytes_by_type(self) -> dict[str, int]:
        """`kv_bytes()` split by layer type (`LayerSpec.byte_type`: full, sliding, chunked, state); a hybrid layer's
        KV counts as full and its SSM state as state."""
        totals: dict[str, int] = {}
        for layer in self.layers:
            state = layer.state_nbytes() if isinstance(layer, StateLayer) else 0
            kv = layer.nbytes() - state
            if kv or layer.spec.attends:
                key = layer.spec.byte_type if layer.spec.kind != "state" else "state"
                totals[key] = totals.get(key, 0) + kv
            if state:
                totals["state"] = totals.get("state", 0) + state
        return totals

    def kept_per_layer(self) -> list[list[int]]:
        """Kept slots per attention layer per KV head (state layers hold no slots and are left out)."""
        return [layer.lengths().tolist() for layer in self.layers if layer.spec.attends]

    def kept_entries(self) -> int:
        return int(sum(sum(heads) for heads in self.kept_per_layer()))


class IndexMappedObserver:
    """Forwards the attention calls of some layers to observers that number those layers 0..n-1 (a method working
    on a `LayerSubset` sees its own layer numbers)."""

    def __init__(self, observers: list, mapping: dict[int, int]) -> None:
        self.observers = observers
        self.mapping = mapping

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        index = self.mapping.get(layer_idx)
        if index is not None:
            for observer in self.observers:
                observer.on_attention(index, query, layer, query_positions, scaling)


class SubsetLayers(list):
    """The subset's layer list: assigning a layer (quantised storage, MiKV, KV-Direct replace layers) writes it
    into the full cache too."""

    def __init__(self, base: KVCache, indices: list[int]) -> None:
        super().__init__(base.layers[i] for i in indices)
        self.base, self.indices = base, indices

    def __setitem__(self, index, layer) -> None:
        super().__setitem__(index, layer)
        self.base.layers[self.indices[index]] = layer


class LayerSubset(KVCache):
    """The layers of `base` a method may compress, as a cache of their own numbered 0..n-1: what a method is handed
    on a model whose other layers it must leave alone (sliding-window layers keep their window, linear-attention /
    SSM states are not compressible; see `kvbench.engine.architecture`). Positions, the decode kernels and the
    observers are the base cache's: the subset's observers see only its layers, under its numbering."""

    def __init__(self, base: KVCache, indices: list[int]) -> None:  # noqa: D107 - no Cache.__init__: nothing to own
        self.base = base
        self.indices = list(indices)
        self._layers = SubsetLayers(base, self.indices)
        self.observers: list = []
        base.observers.append(IndexMappedObserver(self.observers, {real: i for i, real in enumerate(self.indices)}))

    @property
    def layers(self) -> SubsetLayers:
        return self._layers

    @layers.setter
    def layers(self, layers: list) -> None:
        # `cache.layers = [...]` (quantised storage replaces every layer at once) must reach the full cache too, as
        # an item assignment does: a new plain list would leave the model's cache holding the old layers.
        if len(layers) != len(self.indices):
            raise ValueError(f"a subset of {len(self.indices)} layers was assigned {len(layers)}")
        for index, layer in enumerate(layers):
            self._layers[index] = layer

    seen_tokens = property(
        lambda self: self.base.seen_tokens, lambda self, value: setattr(self.base, "seen_tokens", value)
    )
    step_positions = property(lambda self: self.base.step_positions)
    decode_kernels = property(lambda self: self.base.decode_kernels)

    def next_positions(self, num_tokens: int, device: torch.device | str) -> torch.Tensor:
        return self.base.next_positions(num_tokens, device)

    @property
    def model_cache(self) -> KVCache:
        return self.base

    def copy(self) -> LayerSubset:
        """The same layers of an independent (copy-on-write) copy of the base cache: a scratch forward through
        the copy's `model_cache` (KVzip's repeat, DAPQ's pseudo queries) leaves this cache untouched."""
        return LayerSubset(self.base.copy(), self.indices)

    def update(self, *args, **kwargs):
        raise TypeError("a LayerSubset is not a model's cache: forward through the full cache")


def layer_subset(cache: KVCache, indices: list[int]) -> KVCache:
    """`cache` itself when `indices` are all its layers (a plain full-attention model), else a `LayerSubset`."""
    if list(indices) == list(range(len(cache.layers))):
        return cache
    return LayerSubset(cache, indices)
