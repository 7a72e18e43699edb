"""Rotated storage for RotateKV (arXiv 2501.16383): keys and values quantised in a Hadamard-rotated basis.

* `ChannelTransform`: per group of `head_group` KV heads, multiply the concatenated vectors (head_group * d
  channels, a power of two) by the normalised Hadamard H, then permute the Hkv * d channels of the layer by a
  calibrated order (keys; values: no permutation). The stored block is `[1, n, Hkv * d]`, quantised per slot in
  groups of G consecutive (permuted) channels; the inverse is permutation^-1 then H again (H H = I).
* `RotatedSegment`: a `UniformSegment` of transformed slots + its transform (generated, not stored: the
  permutation is counted once per layer, by `RotatedKVLayer.nbytes`).
* `SinkSegment`: slots kept in 16 bits exactly as cached (RotateKV's attention-sink tokens); never flushed.
* `RotatedKVLayer`: a `QuantKVLayer` whose key store holds PRE-RoPE keys (un-rotated with the slots' original
  positions and the model's own rotary module, `kvbench.engine.rope`) and re-applies RoPE on read, so rotation and
  channel reordering act on pre-RoPE keys as in the paper (whose code folds them into W_k instead).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.engine.cache import KVLayer
from kvbench.engine.quant.layer import QuantKVLayer
from kvbench.engine.quant.quantizer import BITS
from kvbench.engine.quant.segments import Segment, SegmentStore, UniformSegment
from kvbench.engine.quant.transforms import check_power_of_two, hadamard
from kvbench.engine.rope import rope_keys, unrotate_keys

SINK_EXTRA = "rotatekv_sink"  # per-slot layer extra: 1 for attention-sink slots kept in 16 bits


@dataclass(frozen=True, eq=False)
class ChannelTransform:
    heads: int
    head_dim: int
    head_group: int
    order: torch.Tensor | None = None  # permutation of the heads * head_dim channels (None: identity)

    def __post_init__(self) -> None:
        check_transform(self.heads, self.head_dim, self.head_group)

    def matrix(self, device: torch.device) -> torch.Tensor:
        return hadamard(self.head_group * self.head_dim, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[Hkv, n, d]` -> transformed `[1, n, Hkv * d]` (fp32)."""
        heads, n, d = x.shape
        grouped = x.float().reshape(heads // self.head_group, self.head_group, n, d).permute(0, 2, 1, 3)
        rotated = grouped.reshape(heads // self.head_group, n, self.head_group * d) @ self.matrix(x.device)
        flat = rotated.permute(1, 0, 2).reshape(1, n, heads * d)
        return flat if self.order is None else flat[..., self.order.to(x.device).long()]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """transformed `[1, n, Hkv * d]` -> `[Hkv, n, d]` (fp32)."""
        _, n, channels = y.shape
        y = y.float()
        if self.order is not None:
            y = torch.empty_like(y).index_copy_(-1, self.order.to(y.device).long(), y)
        groups = self.heads // self.head_group
        rotated = y.reshape(n, groups, self.head_group * self.head_dim).permute(1, 0, 2) @ self.matrix(y.device)
        return (
            rotated.reshape(groups, n, self.head_group, self.head_dim)
            .permute(0, 2, 1, 3)
            .reshape(self.heads, n, self.head_dim)
        )


def check_transform(heads: int, head_dim: int, head_group: int) -> None:
    """One-line errors: head_group must divide the KV heads and head_group * d must be a power of two."""
    if isinstance(head_group, bool) or not isinstance(head_group, int) or head_group < 1 or heads % head_group:
        valid = [g for g in range(1, heads + 1) if heads % g == 0]
        raise ValueError(
            f"head_group {head_group!r} does not divide the {heads} KV heads. Valid head groups: "
            + ", ".join(map(str, valid))
        )
    try:
        check_power_of_two(head_group * head_dim, f"hadamard size (head_group {head_group} x head dim {head_dim})")
    except ValueError as err:
        valid = [g for g in range(1, heads + 1) if heads % g == 0 and not (g * head_dim) & (g * head_dim - 1)]
        raise ValueError(f"{err}; valid head groups for this model: {', '.join(map(str, valid)) or 'none'}") from None


def clipped(x: torch.Tensor, group_size: int, clip: float) -> torch.Tensor:
    """`x [1, n, C]` clamped per group of `group_size` channels to clip * [min, max] (RotateKV's clip ratio)."""
    if clip >= 1.0:
        return x
    groups = x.unflatten(-1, (-1, group_size))
    low, high = groups.amin(dim=-1, keepdim=True) * clip, groups.amax(dim=-1, keepdim=True) * clip
    return torch.minimum(torch.maximum(groups, low), high).flatten(-2)


@dataclass
class RotatedSegment(Segment):
    kind: ClassVar[str] = "rotated"
    inner: UniformSegment
    transform: ChannelTransform

    @classmethod
    def encode(cls, x: torch.Tensor, transform: ChannelTransform, bits: int, group_size: int, clip: float):
        y = clipped(transform.forward(x), group_size, clip).to(x.dtype)
        return cls(UniformSegment.encode(y, bits, group_size, "channel"), transform)

    @property
    def num_slots(self) -> int:
        return self.inner.num_slots

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.transform.inverse(self.inner.materialize(torch.float32)).to(dtype)

    def clone(self) -> RotatedSegment:
        return RotatedSegment(self.inner.clone(), self.transform)

    def concat(self, later: Segment) -> Segment | None:
        if not isinstance(later, RotatedSegment) or later.transform is not self.transform:
            return None
        merged = self.inner.concat(later.inner)
        return None if merged is None else RotatedSegment(merged, self.transform)


@dataclass
class SinkSegment(Segment):
    """Slots kept exactly as cached (16 bits); not an fp tail, so codecs never flush it."""

    kind: ClassVar[str] = "sink"
    data: torch.Tensor  # [Hkv, n, d]

    @property
    def num_slots(self) -> int:
        return self.data.shape[1]

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.data.to(dtype)

    def clone(self) -> SinkSegment:
        return SinkSegment(self.data.clone())


@dataclass(frozen=True, eq=False)
class RotatedCodec:
    """Every fp slot is encoded at once (no fp residual window, as in RotateKV). One per layer: the key
    transform carries the layer's calibrated channel order (`with_transforms`)."""

    k_bits: int
    v_bits: int
    group_size: int
    k_clip: float
    v_clip: float
    keys: ChannelTransform | None = None
    values: ChannelTransform | None = None

    def check(self) -> None:
        """Model-independent parameter checks (one-line errors naming the valid values)."""
        for name, bits in (("k_bits", self.k_bits), ("v_bits", self.v_bits)):
            if isinstance(bits, bool) or bits not in BITS:
                raise ValueError(f"unsupported {name} {bits!r}. Valid {name}: {', '.join(map(str, BITS))}.")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        for name, clip in (("k_clip", self.k_clip), ("v_clip", self.v_clip)):
            if isinstance(clip, bool) or not isinstance(clip, int | float) or not 0 < clip <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {clip!r}")

    def check_head_dim(self, head_dim: int) -> None:
        """Groups of `group_size` channels must tile each head (so a group never mixes rotation groups)."""
        if head_dim % self.group_size:
            valid = [g for g in range(1, head_dim + 1) if head_dim % g == 0]
            raise ValueError(
                f"group_size {self.group_size} does not divide the head dim {head_dim}. "
                f"Valid group sizes: {', '.join(map(str, valid))}."
            )

    def with_transforms(self, keys: ChannelTransform, values: ChannelTransform) -> RotatedCodec:
        return dataclasses.replace(self, keys=keys, values=values)

    def key_encoder(self, x: torch.Tensor) -> RotatedSegment:
        return RotatedSegment.encode(x, self.keys, self.k_bits, self.group_size, self.k_clip)

    def value_encoder(self, x: torch.Tensor) -> RotatedSegment:
        return RotatedSegment.encode(x, self.values, self.v_bits, self.group_size, self.v_clip)

    def apply(self, key_store: SegmentStore, value_store: SegmentStore) -> None:
        key_store.encode_oldest_fp(key_store.fp_tail_len(), self.key_encoder)
        value_store.encode_oldest_fp(value_store.fp_tail_len(), self.value_encoder)

    def describe(self) -> dict[str, Any]:
        return {
            "k_bits": self.k_bits,
            "v_bits": self.v_bits,
            "group_size": self.group_size,
            "k_clip": self.k_clip,
            "v_clip": self.v_clip,
        }


def build_store(data: torch.Tensor, sink_columns: torch.Tensor, encoder) -> SegmentStore:
    """`data [Hkv, n, d]` as segments in slot order: sink columns as `SinkSegment`s, every other run of slots
    encoded with `encoder(x [Hkv, k, d]) -> Segment`."""
    store = SegmentStore(data)
    n = data.shape[1]
    start = 0
    while start < n:
        sink = bool(sink_columns[start])
        end = start + 1
        while end < n and bool(sink_columns[end]) == sink:
            end += 1
        part = data[:, start:end].clone()
        if sink:
            store.segments.append(SinkSegment(part))
        else:
            store.append_fp(part)
            store.encode_oldest_fp(end - start, encoder)
        start = end
    return store


class RotatedKVLayer(QuantKVLayer):
    """A `QuantKVLayer` whose keys are stored pre-RoPE (module docstring); sink slots (`SINK_EXTRA`) stay 16-bit
    exactly as cached (post-RoPE keys)."""

    def __init__(self, codec: RotatedCodec, rotary: torch.nn.Module | None = None) -> None:
        super().__init__(codec)
        self.rotary = rotary

    @classmethod
    def from_layer(cls, layer: KVLayer, codec: RotatedCodec, rotary: torch.nn.Module) -> RotatedKVLayer:
        new = cls(codec, rotary)
        skip = ("keys", "values", "_key_buf", "_value_buf")  # the stores replace the plain layer's fp K/V buffers
        new.__dict__.update({name: value for name, value in vars(layer).items() if name not in skip})
        new.packed_decode = False
        new.codec, new.rotary = codec, rotary
        new._store(layer.keys[0], layer.values[0])
        return new

    def sink_columns(self) -> torch.Tensor:
        """Slot columns kept 16-bit: a column is a sink if any head holds a sink slot there."""
        sinks = self.extras.get(SINK_EXTRA)
        if sinks is None:
            return torch.zeros(self.positions.shape[1], dtype=torch.bool)
        return (sinks > 0).any(dim=0).cpu()

    def _store(self, post_rope_keys: torch.Tensor, values: torch.Tensor) -> None:
        """(Re)build both stores from fp keys (post-RoPE) and values `[Hkv, n, d]` of the current slots."""
        sinks = self.sink_columns()
        pre = unrotate_keys(post_rope_keys, self.positions, self.rotary).to(post_rope_keys.dtype)
        keys = torch.where(sinks.to(pre.device)[None, :, None], post_rope_keys, pre)  # sinks: exactly as cached
        self.kstore = build_store(keys, sinks, self.codec.key_encoder)
        self.vstore = build_store(values, sinks, self.codec.value_encoder)

    def materialized_keys(self) -> torch.Tensor:
        """Post-RoPE keys `[Hkv, n, d]` in the cache dtype: encoded slots decoded and re-rotated at their
        positions, sink slots as stored."""
        parts, offset = [], 0
        for segment in self.kstore.segments:
            n = segment.num_slots
            data = segment.materialize(torch.float32)
            if not isinstance(segment, SinkSegment):
                data = rope_keys(data, self.positions[:, offset : offset + n], self.rotary)
            parts.append(data.to(self.dtype))
            offset += n
        return torch.cat(parts, dim=1) if parts else self.kstore.template.to(self.dtype)

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.kstore is None else self.materialized_keys()[None]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        # Set by the plain layer's `keep` with post-RoPE keys before the positions follow; `keep` below re-encodes.
        self.kstore = None if value is None else SegmentStore.of(value[0])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, positions: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        heads = key_states.shape[1]
        pre = unrotate_keys(key_states[0], positions.to(key_states.device).expand(heads, -1), self.rotary)
        return super().update(pre.to(key_states.dtype)[None], value_states, positions=positions)

    def keep(self, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Decode-time eviction: the plain layer's `keep` on the decoded (post-RoPE) K/V, then re-encode the kept
        slots (groups are per slot, so only the slots' own codes are rebuilt; sinks stay 16-bit)."""
        plain = KVLayer()
        own = ("kstore", "vstore", "codec", "rotary", "packed_decode")
        plain.__dict__.update({name: value for name, value in vars(self).items() if name not in own})
        plain.keys, plain.values = self.materialized_keys()[None], self.vstore.materialize(self.dtype)[None]
        plain.keep(indices, valid)
        for name in ("_length", "positions", "extras", "evicted", "per_head", "padded"):  # the length first
            setattr(self, name, getattr(plain, name))
        self._store(plain.keys[0], plain.values[0])

    def nbytes(self) -> int:
        order = self.codec.keys.order
        return super().nbytes() + (0 if order is None else order.numel() * order.element_size())

    def copy(self) -> RotatedKVLayer:
        other = super().copy()  # a QuantKVLayer with this layer's attributes (rotary included) and cloned stores
        other.__class__ = RotatedKVLayer
        return other
