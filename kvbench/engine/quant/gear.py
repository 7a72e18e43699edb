"""GEAR storage (arXiv 2403.05527): a uniform-quantised backbone, sparse outliers kept exactly and a low-rank
approximation of the quantisation residual, per block of slots (`GearSegment`), streamed in blocks of
`streaming_gap` slots (`GearTensorCodec`).

Block X `[Hkv, n, d]` of keys or values, X ~= D^ + L^ + S (section 1.3 of the compression spec):
1. S: per row of the outlier layout, the k largest and k smallest entries with k = floor(s * Hkv * d / 2)
   (official `gears_tokenQ` / `gears_channelQ`); values: rows are tokens over the concatenated heads; keys: rows
   are channels (of the concatenated heads) over the block's tokens, with the same k ([QUIRK] kept: k comes from
   Hkv * d even along tokens). They are replaced by the row mean before quantisation and restored exactly.
2. D^: kvbench's shared asymmetric quantiser (`quant.quantizer`, 2^b - 1 levels: the official `bits**2 - 1`
   [QUIRK] is fixed), keys per channel in groups of G slots, values per slot in groups of G channels of a head
   (the official groups run over the concatenated heads; the same groups when G divides d).
3. L^: E = X - (D^ + S), zero at the outlier entries; per KV head, rank-r factors by seeded power iteration
   (`kvbench.engine.quant.lowrank.power_iteration`), Q `[Hkv, n, r]` and P `[Hkv, d, r]` stored in 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.engine.quant.codecs import TensorCodec, UniformCodec
from kvbench.engine.quant.lowrank import Outliers, extract_outliers, power_iteration
from kvbench.engine.quant.quantizer import param_dtype
from kvbench.engine.quant.segments import Segment, SegmentStore, UniformSegment, tensor_bytes

OUTLIER_LAYOUTS = ("token", "channel")  # rows of the outlier selection: tokens (values) or channels (keys)


def to_rows(x: torch.Tensor, layout: str) -> torch.Tensor:
    """`[Hkv, n, d]` -> `[n, Hkv * d]` (layout "token") or `[Hkv * d, n]` (layout "channel")."""
    heads, n, d = x.shape
    tokens = x.permute(1, 0, 2).reshape(n, heads * d)
    return tokens if layout == "token" else tokens.T


def from_rows(rows: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    tokens = rows if layout == "token" else rows.T
    n = tokens.shape[0]
    return tokens.reshape(n, heads, -1).permute(1, 0, 2)


def outlier_count(ratio: float, heads: int, head_dim: int) -> int:
    """k per row: floor(s * Hkv * d / 2) largest and as many smallest entries (official rule, both layouts)."""
    return int(ratio * heads * head_dim / 2)


@dataclass
class GearSegment(Segment):
    """One GEAR block: `backbone` codes, outliers (values at int indices, per row of `layout`), low-rank factors."""

    kind: ClassVar[str] = "gear"
    backbone: UniformSegment
    outliers: Outliers
    layout: str
    q: torch.Tensor  # [Hkv, n, r], 16-bit
    p: torch.Tensor  # [Hkv, d, r], 16-bit

    @property
    def num_slots(self) -> int:
        return self.backbone.num_slots

    @property
    def rank(self) -> int:
        return self.q.shape[-1]

    def nbytes(self) -> int:
        extra = (self.outliers.values, self.outliers.indices, self.q, self.p)
        return self.backbone.nbytes() + sum(tensor_bytes(t) for t in extra)

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        x = self.backbone.materialize(torch.float32)
        if self.rank:
            x = x + self.q.float() @ self.p.float().transpose(-1, -2)
        if self.outliers.indices.shape[-1]:
            x = from_rows(self.outliers.restore(to_rows(x, self.layout)), self.layout, x.shape[0])
        return x.to(dtype)

    def clone(self) -> GearSegment:
        outliers = Outliers(self.outliers.values.clone(), self.outliers.indices.clone())
        return GearSegment(self.backbone.clone(), outliers, self.layout, self.q.clone(), self.p.clone())


def encode_gear(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    axis: str,
    layout: str,
    outlier_ratio: float,
    rank: int,
    loops: int,
    generator: torch.Generator,
) -> GearSegment:
    """Compress one block `x [Hkv, n, d]` (module docstring)."""
    heads, _, head_dim = x.shape
    rows, outliers = extract_outliers(to_rows(x, layout), outlier_count(outlier_ratio, heads, head_dim), x.dtype)
    filled = from_rows(rows, layout, heads).contiguous()
    backbone = UniformSegment.encode(filled, bits, group_size, axis)
    residual = filled.float() - backbone.materialize(torch.float32)
    if outliers.indices.shape[-1]:  # restored exactly: nothing left for the low-rank part there
        zeros = torch.zeros_like(outliers.values, dtype=torch.float32)
        residual = from_rows(Outliers(zeros, outliers.indices).restore(to_rows(residual, layout)), layout, heads)
    q, p = power_iteration(residual, rank, loops, generator)
    factor_dtype = param_dtype(x.dtype)
    return GearSegment(backbone, outliers, layout, q.to(factor_dtype), p.to(factor_dtype))


@dataclass(frozen=True)
class GearTensorCodec(TensorCodec):
    """Keys or values under GEAR: blocks of `residual_length` (= streaming gap n_b) slots leave the fp tail (the
    "block" flush rule); the first block of a store (the prefill's T - T mod n_b slots) gets `prefill_rank`, later
    (decode) blocks `decode_rank`. Power iteration is seeded by (seed, role, slots encoded before the block)."""

    layout: str = "token"
    outlier_ratio: float = 0.02
    prefill_rank: int = 4
    decode_rank: int = 2
    loops: int = 3
    seed: int = 0
    role: int = 0  # 0 keys, 1 values: different random starts for the two stores

    def apply(self, store: SegmentStore) -> None:
        count = self.flush_count(store.fp_tail_len())
        if not count:
            return
        encoded = store.num_slots - store.fp_tail_len()
        rank = self.prefill_rank if encoded == 0 else self.decode_rank
        generator = torch.Generator().manual_seed((self.seed * 2 + self.role) * 2**32 + encoded)
        store.encode_oldest_fp(
            count,
            lambda x: encode_gear(
                x, self.bits, self.group_size, self.axis, self.layout, self.outlier_ratio, rank, self.loops, generator
            ),
        )


@dataclass(frozen=True)
class GearCodec(UniformCodec):
    keys: GearTensorCodec
    values: GearTensorCodec

    def check(self) -> None:
        super().check()
        for part in (self.keys, self.values):
            if part.bits == 16:
                raise ValueError("gear needs bits in 2, 3, 4, 8 (16 would store nothing to recover)")
            if not 0 <= part.outlier_ratio < 1:
                raise ValueError(f"outlier_ratio must be in [0, 1), got {part.outlier_ratio!r}")
            for name in ("prefill_rank", "decode_rank"):
                rank = getattr(part, name)
                if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                    raise ValueError(f"{name} must be an int >= 0, got {rank!r}")
            if isinstance(part.loops, bool) or not isinstance(part.loops, int) or part.loops < 1:
                raise ValueError(f"loops must be an int >= 1, got {part.loops!r}")

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "outlier_ratio": self.keys.outlier_ratio,
            "prefill_rank": self.keys.prefill_rank,
            "decode_rank": self.keys.decode_rank,
            "loops": self.keys.loops,
            "streaming_gap": self.keys.residual_length,
        }
