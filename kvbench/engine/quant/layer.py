"""`QuantKVLayer`: a `KVLayer` whose keys and values are `SegmentStore`s (packed codes + fp tail) under a codec.

Positions, per-slot extras, masks and the eviction bookkeeping are the plain layer's; only the storage differs:

* `update` appends new K/V to the fp tails, then the codec flushes what must be quantised (KIVI's residual
  rules), and returns the whole layer dequantised to the compute dtype for the torch attention path (a transient
  tensor, freed after the layer's attention). With `packed_decode` (kernels=triton) a one-token step returns
  empty K/V instead: the attention function reads the packed codes itself (`kvbench.engine.kernels.packed_decode`).
* `keys` / `values` read as the dequantised `[1, Hkv, n, d]`; assigning a tensor stores it as one fp segment.
  So the plain layer's `keep` (decode-time eviction) works unchanged: the kept slots are gathered from the
  dequantised tensors and re-encoded by the codec (documented cost: groups of kept slots are re-quantised, e.g.
  KIVI's per-channel key groups are rebuilt over the kept slots).
* `nbytes` is what the stores hold (codes, scales, zeros, fp tails, padding slots included).
"""

from __future__ import annotations

import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.quant.codecs import UniformCodec
from kvbench.engine.quant.segments import FPSegment, SegmentStore, UniformSegment


class StoredKVLayer(KVLayer):
    """A layer whose K/V live in its own storage instead of KVLayer's buffers (packed segments, a transformers
    cache layer): its length and head count come from the positions it keeps."""

    def get_seq_length(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    @property
    def num_heads(self) -> int:
        return self.positions.shape[0]


class QuantKVLayer(StoredKVLayer):
    def __init__(self, codec: UniformCodec) -> None:
        self.kstore: SegmentStore | None = None
        self.vstore: SegmentStore | None = None
        super().__init__()
        self.codec = codec
        self.packed_decode = False

    @classmethod
    def from_layer(cls, layer: KVLayer, codec: UniformCodec, packed_decode: bool = False) -> QuantKVLayer:
        """Take over a plain layer's slots (positions, extras, flags) and encode its K/V with `codec`."""
        new = cls(codec)
        # Everything but the plain layer's fp K/V buffers (the stores replace them; keeping them would hold memory).
        skip = ("keys", "values", "_key_buf", "_value_buf")
        new.__dict__.update({name: value for name, value in vars(layer).items() if name not in skip})
        new.kstore, new.vstore = SegmentStore.of(layer.keys[0]), SegmentStore.of(layer.values[0])
        new.packed_decode = packed_decode
        codec.apply(new.kstore, new.vstore)
        return new

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.kstore is None else self.kstore.materialize(self.dtype)[None]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self.kstore = None if value is None else SegmentStore.of(value[0])

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.vstore is None else self.vstore.materialize(self.dtype)[None]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self.vstore = None if value is None else SegmentStore.of(value[0])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, positions: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.kstore.append_fp(key_states[0])
        self.vstore.append_fp(value_states[0])
        self.append_slot_state(positions, key_states.shape[-2])
        self.codec.apply(self.kstore, self.vstore)
        if self.packed_decode and key_states.shape[-2] == 1:
            return key_states[:, :, :0], value_states[:, :, :0]
        return self.keys, self.values

    def keep(self, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        super().keep(indices, valid)  # gathers the dequantised K/V into fp stores
        self.codec.apply(self.kstore, self.vstore)

    def _set_storage(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """After `keep`: the held slots of the gathered K/V become fp stores (re-encoded by `keep`)."""
        length = self._length
        self.kstore, self.vstore = SegmentStore.of(keys[0, :, :length]), SegmentStore.of(values[0, :, :length])
        self._position_buf, self._shared = positions, False

    def nbytes(self) -> int:
        return self.kstore.nbytes() + self.vstore.nbytes()

    def reserved_nbytes(self) -> int:
        return self.nbytes()  # the stores hold no capacity ahead of their length

    def logical_nbytes(self) -> int:
        """The kept (non-padding) slots' share of `nbytes`."""
        slots = self.positions.numel()
        return 0 if slots == 0 else self.nbytes() * int(self.lengths().sum()) // slots

    def copy(self) -> QuantKVLayer:
        other = QuantKVLayer(self.codec)
        other.__dict__.update(vars(self))
        other.kstore, other.vstore = self.kstore.clone(), self.vstore.clone()
        other.positions = self.positions.clone()
        other.extras = {name: state.clone() for name, state in self.extras.items()}
        return other

    def packed_operands(self) -> tuple | None:
        """(key codes, key fp tail, value codes, value fp tail) for the packed decode kernel: each store as at most
        one `UniformSegment` followed by at most one `FPSegment` (None in place of a missing part); None when
        a store holds another layout (other segment kinds), which the torch path handles."""
        out = []
        for store in (self.kstore, self.vstore):
            segments = list(store.segments)
            fp = segments.pop() if segments and isinstance(segments[-1], FPSegment) else None
            if len(segments) > 1 or (segments and type(segments[0]) is not UniformSegment):
                return None
            out += [segments[0] if segments else None, None if fp is None else fp.data]
        return tuple(out)


def quantize_cache(cache: KVCache, codec: UniformCodec, packed_decode: bool = False) -> None:
    """Replace every layer of `cache` by a `QuantKVLayer` holding its slots encoded with `codec` (in place)."""
    cache.layers = [QuantKVLayer.from_layer(layer, codec, packed_decode) for layer in cache.layers]
