"""FP8 storage: the production KV-cache baseline (vLLM / SGLang `kv_cache_dtype=fp8`).

Every cached element is one FP8 code (`torch.float8_e4m3fn`, 3 mantissa bits, max 448, or `torch.float8_e5m2`,
2 mantissa bits, max 57344) of x / s, and x^ = code * s. The scale s is fp32, one per layer and tensor
("tensor", vLLM's per-tensor k_scale / v_scale) or one per KV head ("head"); it is calibrated once, on the first
slots the layer stores (the prefill), as s = amax(|x|) / range (range: the format's max, or vLLM's
K_SCALE_CONSTANT=200 / V_SCALE_CONSTANT=100 of `calculate_kv_scales`), and kept for every later slot, so a
decode token beyond the calibrated range saturates at +-range * s (the codes are clamped, as vLLM's conversion
does). calibrate="none" uses s = 1.0, vLLM's default without checkpoint scales; nothing is stored for it.

Round-trip bound (tested): |x - x^| <= s * max(2^-(m+1) |x / s|, 2^(e_min - m - 1)) for |x / s| <= max, with
m the mantissa bits and 2^(e_min - m) the smallest subnormal (e4m3: 2^-4 relative, 2^-10 absolute; e5m2: 2^-3,
2^-17).

Bytes: one per element plus the scales (4 bytes each), counted once per store (every segment of a store shares
its scale and they merge into one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.engine.quant.segments import Segment, SegmentStore, tensor_bytes

FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_GRANULARITIES = ("tensor", "head")
FP8_CALIBRATIONS = ("prefill", "none")
# (mantissa bits, exponent of the smallest subnormal) of each format: the round-trip bound's constants.
FP8_PRECISION = {"e4m3": (3, -9), "e5m2": (2, -16)}


def fp8_max(fmt: str) -> float:
    """The largest finite value of the format (448 for e4m3, 57344 for e5m2)."""
    return float(torch.finfo(FP8_FORMATS[fmt]).max)


def fp8_error_bound(x: torch.Tensor, fmt: str, scale: torch.Tensor | float) -> torch.Tensor:
    """The largest |x - x^| round to nearest may cause for each element of `x` (module docstring)."""
    mantissa, subnormal = FP8_PRECISION[fmt]
    scale = torch.as_tensor(scale, dtype=torch.float32)
    relative = x.float().abs() * 2.0 ** -(mantissa + 1)
    return torch.maximum(relative, scale * 2.0 ** (subnormal - 1))


def calibrate_scale(x: torch.Tensor, fmt: str, granularity: str, scale_range: float | None) -> torch.Tensor:
    """s = amax(|x|) / range for `x [Hkv, n, d]`: fp32 `[1]` (per tensor) or `[Hkv]` (per head); an all-zero
    tensor or head gets s = 1."""
    limit = fp8_max(fmt) if scale_range is None else float(scale_range)
    xf = x.float().abs()
    amax = xf.amax().reshape(1) if granularity == "tensor" else xf.amax(dim=(1, 2))
    return torch.where(amax > 0, amax / limit, torch.ones_like(amax))


@dataclass
class FP8Segment(Segment):
    """FP8 codes `[Hkv, n, d]` and the store's scale (None: s = 1, nothing stored)."""

    kind: ClassVar[str] = "fp8"
    codes: torch.Tensor
    scale: torch.Tensor | None

    @classmethod
    def encode(cls, x: torch.Tensor, fmt: str, scale: torch.Tensor | None) -> FP8Segment:
        limit = fp8_max(fmt)
        scaled = x.float() if scale is None else x.float() / scale.to(x.device)[:, None, None]
        # Clamp first: e5m2 overflows to inf and saturation is what vLLM's conversion does.
        return cls(scaled.clamp(-limit, limit).to(FP8_FORMATS[fmt]), scale)

    @property
    def num_slots(self) -> int:
        return self.codes.shape[1]

    def nbytes(self) -> int:
        return tensor_bytes(self.codes) + tensor_bytes(self.scale)

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        x = self.codes.float()
        if self.scale is not None:
            x = x * self.scale.to(x.device)[:, None, None]
        return x.to(dtype)

    def clone(self) -> FP8Segment:
        return FP8Segment(self.codes.clone(), self.scale)

    def concat(self, later: Segment) -> Segment | None:
        if not isinstance(later, FP8Segment) or later.scale is not self.scale or later.codes.dtype != self.codes.dtype:
            return None
        return FP8Segment(torch.cat([self.codes, later.codes], dim=1), self.scale)


@dataclass(eq=False)
class FP8Codec:
    """One layer's FP8 storage (`QuantKVLayer` codec interface): every fp slot is encoded at once; the scales are
    calibrated on the first slots each store receives and then fixed (`for_layer` gives a fresh, uncalibrated
    copy per layer)."""

    fmt: str = "e4m3"
    granularity: str = "tensor"
    calibrate: str = "prefill"
    k_range: float | None = None
    v_range: float | None = None
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None

    def check(self) -> None:
        """Model-independent parameter checks (one-line errors naming the valid values)."""
        for name, value, valid in (
            ("format", self.fmt, tuple(FP8_FORMATS)),
            ("granularity", self.granularity, FP8_GRANULARITIES),
            ("calibrate", self.calibrate, FP8_CALIBRATIONS),
        ):
            if value not in valid:
                raise ValueError(f"unknown fp8 {name} {value!r}. Valid: {', '.join(valid)}.")
        for name, value in (("k_range", self.k_range), ("v_range", self.v_range)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= fp8_max(self.fmt):
                raise ValueError(f"{name} must be null or in (0, {fp8_max(self.fmt):g}] for {self.fmt}, got {value!r}")

    def check_head_dim(self, head_dim: int) -> None:
        """FP8 codes fit any head dim."""

    def for_layer(self) -> FP8Codec:
        return dataclasses.replace(self, key_scale=None, value_scale=None)

    def apply(self, key_store: SegmentStore, value_store: SegmentStore) -> None:
        parts = ((key_store, "key_scale", self.k_range), (value_store, "value_scale", self.v_range))
        for store, attr, scale_range in parts:
            count = store.fp_tail_len()
            if not count:
                continue
            if self.calibrate == "prefill" and getattr(self, attr) is None:
                setattr(self, attr, calibrate_scale(store.segments[-1].data, self.fmt, self.granularity, scale_range))
            scale = getattr(self, attr)
            store.encode_oldest_fp(count, lambda x, scale=scale: FP8Segment.encode(x, self.fmt, scale))

    def describe(self) -> dict[str, Any]:
        return {
            "format": self.fmt,
            "granularity": self.granularity,
            "calibrate": self.calibrate,
            "k_range": self.k_range,
            "v_range": self.v_range,
        }
