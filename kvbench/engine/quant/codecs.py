"""Codecs: how a quantised layer stores its keys and values, and when slots move from the fp tail into codes.

A `UniformCodec` quantises keys and values with the asymmetric uniform quantiser (`kvbench.engine.quant.quantizer`)
and keeps a full-precision tail of `residual_length` (R) slots, with one of two flush rules per tensor:

* "block" (KIVI keys, grouped along tokens): the fp tail is quantised R slots at a time, when it reaches exactly R
  (prefill or re-encode of n fp slots: the first n - n mod R are quantised). The fp key tail holds 0..R-1 slots.
* "sliding" (KIVI values, RTN): the fp tail keeps the newest R slots; older ones are quantised as soon as they
  fall out of it (per-token groups need no other slots). R = 0 quantises every slot at once.

bits = 16 stores that tensor unquantised. Codecs are immutable and shared by every layer of a cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbench.engine.quant.quantizer import AXES
from kvbench.engine.quant.segments import SegmentStore, UniformSegment

VALID_BITS = (2, 3, 4, 8, 16)  # 16: not quantised
FLUSH_RULES = ("block", "sliding")


@dataclass(frozen=True)
class TensorCodec:
    """How one of keys/values is stored (see the module docstring)."""

    bits: int
    group_size: int
    axis: str  # grouping axis of the quantiser: "token" (per-channel groups of G slots) or "channel" (per-token)
    flush: str  # "block" or "sliding"
    residual_length: int

    def flush_count(self, tail: int) -> int:
        """How many of the `tail` fp slots to quantise now."""
        if self.bits == 16:
            return 0
        if self.flush == "block":
            return tail - tail % self.residual_length
        return max(0, tail - self.residual_length)

    def apply(self, store: SegmentStore) -> None:
        count = self.flush_count(store.fp_tail_len())
        if count:
            store.encode_oldest_fp(count, lambda x: UniformSegment.encode(x, self.bits, self.group_size, self.axis))


def channel_group_size(group_size: int, head_dim: int | None) -> int:
    """Channels per group for a model's head dim: a group never spans more than one head vector, so a group size
    above the head dim (kivi's 32 on a head dim of 16) becomes the head dim; None (no model yet) keeps it."""
    return group_size if head_dim is None else min(group_size, head_dim)


def check_bits(name: str, bits: Any) -> None:
    if isinstance(bits, bool) or bits not in VALID_BITS:
        raise ValueError(f"unsupported {name} {bits!r}. Valid {name}: {', '.join(map(str, VALID_BITS))}.")


@dataclass(frozen=True)
class UniformCodec:
    keys: TensorCodec
    values: TensorCodec

    def check(self) -> None:
        """Model-independent parameter checks (one-line errors naming the valid values)."""
        check_bits("k_bits", self.keys.bits)
        check_bits("v_bits", self.values.bits)
        for part in (self.keys, self.values):
            if part.axis not in AXES or part.flush not in FLUSH_RULES:
                raise ValueError(f"invalid codec {part}")
            if isinstance(part.group_size, bool) or not isinstance(part.group_size, int) or part.group_size < 1:
                raise ValueError(f"group_size must be a positive int, got {part.group_size!r}")
            r = part.residual_length
            if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                raise ValueError(f"residual_length must be an int >= 0, got {r!r}")
            if part.flush == "block" and (r == 0 or r % part.group_size):
                valid = f"{part.group_size}, {2 * part.group_size}, {3 * part.group_size}, ..."
                raise ValueError(
                    f"residual_length {r} is not a positive multiple of group_size {part.group_size}. "
                    f"Valid residual_lengths: {valid}"
                )

    def check_head_dim(self, head_dim: int) -> None:
        """Channel-axis groups must tile the head dim."""
        for part in (self.keys, self.values):
            if part.bits != 16 and part.axis == "channel" and head_dim % part.group_size:
                valid = [g for g in range(1, head_dim + 1) if head_dim % g == 0]
                raise ValueError(
                    f"group_size {part.group_size} does not divide the head dim {head_dim}. "
                    f"Valid group sizes: {', '.join(map(str, valid))}."
                )

    def apply(self, key_store: SegmentStore, value_store: SegmentStore) -> None:
        """Quantise whatever the flush rules say should no longer be fp (after prefill, appends or eviction)."""
        self.keys.apply(key_store)
        self.values.apply(value_store)

    def describe(self) -> dict[str, Any]:
        return {
            "k_bits": self.keys.bits,
            "v_bits": self.values.bits,
            "group_size": self.keys.group_size,
            "v_group_size": self.values.group_size,  # differs from group_size where channel groups met the head dim
            "residual_length": self.keys.residual_length,
            "key_axis": self.keys.axis,
            "value_axis": self.values.axis,
        }
