"""Segments: runs of consecutive cache slots of one layer's keys (or values), each stored its own way.

A `SegmentStore` holds one layer's keys (or values) `[Hkv, n, d]` as a list of segments in slot order, oldest
first; `KVLayer` positions stay one `[Hkv, n]` tensor for the whole layer, so masks, eviction and ragged heads
work as for a plain layer. Codecs (`kvbench.engine.quant.codecs`) keep the layout "encoded segments, then at most one
trailing `FPSegment`" (the full-precision tail: KIVI's residual buffer, new tokens): new slots are appended to
the fp tail and `encode_oldest_fp` moves the oldest tail slots into an encoded segment.

Adding a segment kind (GEAR's outliers + low-rank factors, RotateKV's rotation, ...): subclass `Segment`, set
`kind`, implement `num_slots`, `nbytes` (EVERYTHING held: codes, scales, zeros, indices, factors, padding),
`materialize` (fp `[Hkv, n, d]` for the torch reference attention) and `clone`; implement `concat` when two
consecutive segments of the kind can merge into one (saves per-segment overhead; return None otherwise). A codec
then builds such segments in its encoder (`SegmentStore.encode_oldest_fp(count, encoder)`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.quant.packing import pack, packed_row_bytes, unpack
from kvbench.engine.quant.quantizer import Quantized, dequantize, quantize


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class Segment(ABC):
    """A run of `num_slots` consecutive slots of one layer's keys or values, `[Hkv, num_slots, d]` when read."""

    kind: ClassVar[str] = ""

    @property
    @abstractmethod
    def num_slots(self) -> int: ...

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes physically held by this segment (every tensor it keeps, padding included)."""
        ...

    @abstractmethod
    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        """The reconstructed values `[Hkv, num_slots, d]` in `dtype`."""
        ...

    @abstractmethod
    def clone(self) -> Segment: ...

    def concat(self, later: Segment) -> Segment | None:
        """This segment followed by `later` as one segment, or None when they cannot merge."""
        return None


@dataclass
class FPSegment(Segment):
    """Plain tensors in the cache dtype."""

    kind: ClassVar[str] = "fp"
    data: torch.Tensor  # [Hkv, n, d]

    @property
    def num_slots(self) -> int:
        return self.data.shape[1]

    def nbytes(self) -> int:
        return tensor_bytes(self.data)

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.data.to(dtype)

    def clone(self) -> FPSegment:
        return FPSegment(self.data.clone())

    def concat(self, later: Segment) -> Segment | None:
        return FPSegment(torch.cat([self.data, later.data], dim=1)) if isinstance(later, FPSegment) else None


@dataclass
class UniformSegment(Segment):
    """Uniform asymmetric codes (`kvbench.engine.quant.quantizer`), packed per slot along the channel axis
    (`kvbench.engine.quant.packing`): `packed` uint8 `[Hkv, n, ceil(d / 8) * bits]`, 16-bit `scale`/`zero` grouped along
    `axis` ("token": `[Hkv, n / G, d]`, KIVI keys; "channel": `[Hkv, n, d / G]`, per-token values)."""

    kind: ClassVar[str] = "uniform"
    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    axis: str
    head_dim: int

    @classmethod
    def encode(cls, x: torch.Tensor, bits: int, group_size: int, axis: str) -> UniformSegment:
        q = quantize(x, bits, group_size, axis)
        return cls(pack(q.codes, bits), q.scale, q.zero, bits, group_size, axis, x.shape[-1])

    @property
    def num_slots(self) -> int:
        return self.packed.shape[1]

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes `[Hkv, n, d]`."""
        return unpack(self.packed, self.bits, self.head_dim)

    def nbytes(self) -> int:
        return tensor_bytes(self.packed) + tensor_bytes(self.scale) + tensor_bytes(self.zero)

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        q = Quantized(self.codes(), self.scale, self.zero)
        return dequantize(q, self.group_size, self.axis, dtype)

    def clone(self) -> UniformSegment:
        return UniformSegment(
            self.packed.clone(), self.scale.clone(), self.zero.clone(), self.bits, self.group_size, self.axis,
            self.head_dim,
        )  # fmt: skip

    def concat(self, later: Segment) -> Segment | None:
        same = isinstance(later, UniformSegment) and (later.bits, later.group_size, later.axis, later.head_dim) == (
            self.bits,
            self.group_size,
            self.axis,
            self.head_dim,
        )
        if not same:
            return None
        return UniformSegment(
            torch.cat([self.packed, later.packed], dim=1),
            torch.cat([self.scale, later.scale], dim=1),  # both axes: groups follow the slot axis (dim 1)
            torch.cat([self.zero, later.zero], dim=1),
            self.bits, self.group_size, self.axis, self.head_dim,
        )  # fmt: skip


def uniform_nbytes(heads: int, n: int, d: int, bits: int, group_size: int, axis: str, param_bytes: int = 2) -> int:
    """Bytes of a `UniformSegment` of `n` slots: packed codes plus one scale and one zero per group."""
    groups = (n // group_size) * d if axis == "token" else n * (d // group_size)
    return heads * n * packed_row_bytes(d, bits) + heads * groups * 2 * param_bytes


class SegmentStore:
    """One layer's keys (or values) as segments in slot order (see the module docstring)."""

    def __init__(self, template: torch.Tensor, segments: list[Segment] | None = None) -> None:
        # `template` [Hkv, 0, d]: heads, head dim, dtype and device of an empty store.
        self.template = template[:, :0]
        self.segments: list[Segment] = list(segments or [])

    @classmethod
    def of(cls, data: torch.Tensor) -> SegmentStore:
        """A store holding `data [Hkv, n, d]` as one fp segment."""
        return cls(data, [FPSegment(data)] if data.shape[1] else [])

    @property
    def num_slots(self) -> int:
        return sum(segment.num_slots for segment in self.segments)

    def fp_tail_len(self) -> int:
        """Slots in the trailing fp segment (0 when the newest segment is encoded)."""
        last = self.segments[-1] if self.segments else None
        return last.num_slots if isinstance(last, FPSegment) else 0

    def append_fp(self, data: torch.Tensor) -> None:
        """Append new slots `[Hkv, k, d]` to the fp tail."""
        self._push(FPSegment(data))

    def encode_oldest_fp(self, count: int, encoder) -> None:
        """Move the oldest `count` slots of the fp tail into `encoder(x [Hkv, count, d]) -> Segment`."""
        if count <= 0:
            return
        tail = self.fp_tail_len()
        if count > tail:
            raise ValueError(f"cannot encode {count} slots of an fp tail of {tail}")
        data = self.segments.pop().data
        self._push(encoder(data[:, :count]))
        if count < tail:
            self.segments.append(FPSegment(data[:, count:].clone()))  # clone: free the encoded part's fp copy

    def _push(self, segment: Segment) -> None:
        merged = self.segments[-1].concat(segment) if self.segments else None
        if merged is not None:
            self.segments[-1] = merged
        elif segment.num_slots:
            self.segments.append(segment)

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        """All slots `[Hkv, n, d]` reconstructed in `dtype` (a transient tensor for the torch attention path)."""
        parts = [segment.materialize(dtype) for segment in self.segments]
        if not parts:
            return self.template.to(dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def nbytes(self) -> int:
        return sum(segment.nbytes() for segment in self.segments)

    def clone(self) -> SegmentStore:
        return SegmentStore(self.template, [segment.clone() for segment in self.segments])

    def kinds(self) -> list[tuple[str, int]]:
        """(kind, slots) per segment, oldest first: what the store holds, for tests and records."""
        return [(segment.kind, segment.num_slots) for segment in self.segments]
