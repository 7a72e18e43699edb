"""KVQuant storage (Hooper et al., NeurIPS 2024, arXiv 2401.18079): pre-RoPE per-channel keys and per-token values
in non-uniform (nuq) datatypes with dense-and-sparse outliers.

Per layer, a calibration (`KVQuantCalibration`, fitted once per model by `fit_calibration`):
* keys: per channel (each of the Hkv * d pre-RoPE channels) the thresholds lo, hi at the outlier_fraction / 2
  and 1 - outlier_fraction / 2 quantiles of the calibration tokens (KVQuant calibrates the key outlier
  thresholds offline), and a 2^b-level codebook in normalised units [-1, 1] (1-D k-means of the calibration's
  normalised dense entries);
* values: one 2^b-level codebook in the same units (values' thresholds are per token, computed online).

Encoding a block `[Hkv, n, d]` (`encode_nuq`): an entry outside its vector's [lo, hi] is an outlier, stored
sparse and exact (16-bit value, int32 slot, int16 channel); the dense rest is clamped to [lo, hi], normalised
z = (x - (hi + lo) / 2) / ((hi - lo) / 2) and coded with the nearest codebook entry (b bits, packed). Keys use
the layer's calibrated per-channel thresholds; values per token (over the token's Hkv * d entries) the
quantiles of that token, stored in 16 bits per slot. Attention-sink slots stay 16-bit (`rotation.SinkSegment`).

Bytes: packed codes + per-slot value thresholds + outliers (8 bytes each) per segment; per layer the key
thresholds (16-bit, 2 Hkv d) and both codebooks (16-bit, 2^b each) (`KVQuantCodec.param_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.engine.quant.octopus import lloyd_max, nearest
from kvbench.engine.quant.packing import pack, unpack
from kvbench.engine.quant.quantizer import BITS, param_dtype
from kvbench.engine.quant.rotation import RotatedKVLayer
from kvbench.engine.quant.segments import Segment, SegmentStore, tensor_bytes

FIT_SAMPLES = 1 << 18  # normalised entries per codebook fit (a seeded subsample beyond that)


@dataclass(frozen=True, eq=False)
class KVQuantCalibration:
    """One layer's calibration: key thresholds `[Hkv, d]` and the key and value codebooks `[2^b]` (16-bit)."""

    key_low: torch.Tensor
    key_high: torch.Tensor
    key_book: torch.Tensor
    value_book: torch.Tensor

    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in (self.key_low, self.key_high, self.key_book, self.value_book))


def normalise(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Dense entries clamped to [low, high] and mapped to [-1, 1] (a zero-width range maps to 0)."""
    mid, half = (high + low) / 2, (high - low) / 2
    safe = torch.where(half > 0, half, torch.ones_like(half))
    return torch.where(half > 0, (x.clamp(low, high) - mid) / safe, torch.zeros_like(x))


def token_thresholds(x: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot of `x [Hkv, n, d]`, the fraction / 2 and 1 - fraction / 2 quantiles over its Hkv * d entries,
    each `[n]` (the online per-token thresholds of values)."""
    tokens = x.float().permute(1, 0, 2).reshape(x.shape[1], -1)
    if fraction == 0:
        return tokens.amin(dim=-1), tokens.amax(dim=-1)
    q = torch.tensor([fraction / 2, 1 - fraction / 2], dtype=tokens.dtype, device=tokens.device)
    low, high = torch.quantile(tokens, q, dim=-1)
    return low, high


def fit_codebook(z: torch.Tensor, bits: int, seed: int = 0) -> torch.Tensor:
    """2^bits k-means centroids (`octopus.lloyd_max`) of normalised entries `z`, seeded subsample when large."""
    flat = z.flatten().double()
    if flat.numel() > FIT_SAMPLES:
        pick = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:FIT_SAMPLES]
        flat = flat[pick]
    return lloyd_max(flat, bits)


def fit_calibration(
    pre_rope_keys: torch.Tensor, values: torch.Tensor, bits: int, fraction: float, dtype: torch.dtype
) -> KVQuantCalibration:
    """A layer's calibration from its calibration K (pre-RoPE) and V `[Hkv, n, d]` (module docstring)."""
    keys = pre_rope_keys.float()
    if fraction == 0:
        low, high = keys.amin(dim=1), keys.amax(dim=1)
    else:
        q = torch.tensor([fraction / 2, 1 - fraction / 2], dtype=keys.dtype)
        low, high = torch.quantile(keys.permute(0, 2, 1), q, dim=-1)  # [2 of] [Hkv, d]
    pdtype = param_dtype(dtype)
    low, high = low.to(pdtype), high.to(pdtype)
    key_z = normalise(keys, low.float()[:, None], high.float()[:, None])
    v_low, v_high = token_thresholds(values, fraction)
    value_z = normalise(values.float(), v_low[None, :, None], v_high[None, :, None])
    return KVQuantCalibration(
        low, high, fit_codebook(key_z, bits).to(pdtype), fit_codebook(value_z, bits, seed=1).to(pdtype)
    )


@dataclass
class NUQSegment(Segment):
    """nuq codes of `[Hkv, n, d]` + sparse outliers; keys: the layer's per-channel thresholds (`key_low`,
    `key_high`, held by the codec, not here); values: per-slot thresholds `token_low`, `token_high` `[n]`."""

    kind: ClassVar[str] = "nuq"
    codes: torch.Tensor  # uint8 [Hkv, n, packed bytes]
    book: torch.Tensor  # the layer's codebook (shared, counted by the codec)
    low: torch.Tensor  # keys: [Hkv, d] (shared); values: [n] per slot
    high: torch.Tensor
    per_token: bool
    outlier_slots: torch.Tensor  # int32 [k]
    outlier_channels: torch.Tensor  # int16 [k]: head * d + channel
    outlier_values: torch.Tensor  # 16-bit [k]
    bits: int
    head_dim: int

    @property
    def num_slots(self) -> int:
        return self.codes.shape[1]

    def nbytes(self) -> int:
        own = (self.outlier_slots, self.outlier_channels, self.outlier_values)
        thresholds = (self.low, self.high) if self.per_token else ()
        return tensor_bytes(self.codes) + sum(tensor_bytes(t) for t in (*own, *thresholds))

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        z = self.book.float().to(self.codes.device)[unpack(self.codes, self.bits, self.head_dim).long()]
        if self.per_token:
            low, high = self.low.float()[None, :, None], self.high.float()[None, :, None]
        else:
            low, high = self.low.float()[:, None], self.high.float()[:, None]
        x = z * (high - low) / 2 + (high + low) / 2
        if self.outlier_values.numel():
            heads = x.shape[0]
            flat = x.permute(1, 0, 2).reshape(x.shape[1], -1)
            flat[self.outlier_slots.long(), self.outlier_channels.long()] = self.outlier_values.float()
            x = flat.reshape(x.shape[1], heads, -1).permute(1, 0, 2)
        return x.to(dtype)

    def clone(self) -> NUQSegment:
        return NUQSegment(
            self.codes.clone(), self.book, self.low.clone() if self.per_token else self.low,
            self.high.clone() if self.per_token else self.high, self.per_token, self.outlier_slots.clone(),
            self.outlier_channels.clone(), self.outlier_values.clone(), self.bits, self.head_dim,
        )  # fmt: skip

    def concat(self, later: Segment) -> Segment | None:
        if not isinstance(later, NUQSegment) or later.book is not self.book or later.per_token != self.per_token:
            return None
        cat = lambda a, b: torch.cat([a, b])  # noqa: E731
        return NUQSegment(
            torch.cat([self.codes, later.codes], dim=1), self.book,
            cat(self.low, later.low) if self.per_token else self.low,
            cat(self.high, later.high) if self.per_token else self.high,
            self.per_token, cat(self.outlier_slots, later.outlier_slots + self.num_slots),
            cat(self.outlier_channels, later.outlier_channels), cat(self.outlier_values, later.outlier_values),
            self.bits, self.head_dim,
        )  # fmt: skip


def encode_nuq(
    x: torch.Tensor, book: torch.Tensor, bits: int, low: torch.Tensor | None, high: torch.Tensor | None, fraction: float
) -> NUQSegment:
    """`x [Hkv, n, d]` -> a `NUQSegment`: keys with the calibrated per-channel `low`/`high` `[Hkv, d]`; values
    (low=high=None) with per-token thresholds computed here (module docstring)."""
    heads, n, d = x.shape
    pdtype = param_dtype(x.dtype)
    xf = x.float()
    per_token = low is None
    if per_token:
        token_low, token_high = token_thresholds(xf, fraction)
        low, high = token_low.to(pdtype), token_high.to(pdtype)
        lo, hi = low.float()[None, :, None], high.float()[None, :, None]
    else:
        lo, hi = low.float()[:, None], high.float()[:, None]
    codes = nearest(normalise(xf, lo, hi), book.float())
    outside = ((xf < lo) | (xf > hi)).permute(1, 0, 2).reshape(n, heads * d)
    slots, channels = outside.nonzero(as_tuple=True)
    values = xf.permute(1, 0, 2).reshape(n, heads * d)[slots, channels].to(pdtype)
    return NUQSegment(
        pack(codes, bits), book, low, high, per_token, slots.to(torch.int32), channels.to(torch.int16), values,
        bits, d,
    )  # fmt: skip


@dataclass(frozen=True, eq=False)
class KVQuantCodec:
    """One layer's KVQuant storage (`QuantKVLayer` codec interface; keys arrive pre-RoPE, `KVQuantLayer`): every
    fp slot is encoded at once."""

    bits: int
    outlier_fraction: float
    calibration: KVQuantCalibration | None = None

    def check(self) -> None:
        """Model-independent parameter checks (one-line errors naming the valid values)."""
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"unsupported bits {self.bits!r}. Valid bits: {', '.join(map(str, BITS))}.")
        f = self.outlier_fraction
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 <= f < 0.5:
            raise ValueError(f"outlier_fraction must be in [0, 0.5), got {f!r}")

    def check_head_dim(self, head_dim: int) -> None:
        """nuq codes fit any head dim."""

    def key_encoder(self, x: torch.Tensor) -> NUQSegment:
        c = self.calibration
        return encode_nuq(x, c.key_book, self.bits, c.key_low, c.key_high, self.outlier_fraction)

    def value_encoder(self, x: torch.Tensor) -> NUQSegment:
        return encode_nuq(x, self.calibration.value_book, self.bits, None, None, self.outlier_fraction)

    def apply(self, key_store: SegmentStore, value_store: SegmentStore) -> None:
        key_store.encode_oldest_fp(key_store.fp_tail_len(), self.key_encoder)
        value_store.encode_oldest_fp(value_store.fp_tail_len(), self.value_encoder)

    def param_bytes(self) -> int:
        return 0 if self.calibration is None else self.calibration.nbytes()

    def describe(self) -> dict[str, Any]:
        return {"bits": self.bits, "outlier_fraction": self.outlier_fraction}


class KVQuantLayer(RotatedKVLayer):
    """RotateKV's pre-RoPE layer (keys un-rotated at their positions, RoPE on read, sink slots 16-bit) with KVQuant's
    codec; its bytes add the layer's calibration (key thresholds and codebooks)."""

    def nbytes(self) -> int:
        return self.kstore.nbytes() + self.vstore.nbytes() + self.codec.param_bytes()

    def copy(self) -> KVQuantLayer:
        other = super().copy()
        other.__class__ = KVQuantLayer
        return other
