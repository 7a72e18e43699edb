"""Asymmetric uniform round-to-nearest quantisation of `[Hkv, n, d]` blocks in groups along one axis.

For a group x: m = min(x), M = max(x), s = (M - m) / (2^b - 1), code q = clamp(round((x - m) / s), 0, 2^b - 1),
reconstruction x^ = q * s + m (KIVI's quantiser, section 1.1 of the compression spec).

Grouping axis (`axis`) names the axis along which a group's members lie:
* "token": one (s, m) pair per channel per block of G consecutive slots (KIVI's per-channel keys);
  scale/zero `[Hkv, n / G, d]`, n must be a multiple of G.
* "channel": one (s, m) pair per slot per block of G consecutive channels (per-token values, RTN);
  scale/zero `[Hkv, n, d / G]`, d must be a multiple of G.

Scale and minimum are stored in 16 bits (the input dtype when it is fp16/bf16, else fp16). The stored minimum is
rounded DOWN and the stored scale UP to that dtype, so every x of the group still lies on the grid
[m16, m16 + (2^b - 1) s16] and |x - x^| <= s16 / 2 holds for the stored parameters (plain rounding of M - m to
fp16 can shrink the grid and clip the group maximum). A constant group gets s = 0 and reconstructs to m exactly
(the official code would divide by zero: the spec's [QUIRK]); code computation divides by 1 there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AXES = ("token", "channel")
BITS = (2, 3, 4, 8)


@dataclass
class Quantized:
    codes: torch.Tensor  # uint8 `[Hkv, n, d]`, unpacked
    scale: torch.Tensor  # 16-bit, shape by axis (module docstring)
    zero: torch.Tensor  # the group minimum, same shape and dtype as scale


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype scales and minima are stored in for inputs of `dtype`."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def _round_to(x: torch.Tensor, dtype: torch.dtype, direction: float) -> torch.Tensor:
    """`x` (fp32) rounded to `dtype`, towards -inf (direction=-inf) or +inf (direction=+inf)."""
    rounded = x.to(dtype)
    wrong = rounded.float() > x if direction < 0 else rounded.float() < x
    if bool(wrong.any()):
        step = torch.nextafter(rounded.float(), torch.full_like(x, direction)).to(dtype)
        # nextafter in fp32 moves by one fp32 ulp; the cast back rounds to nearest, so step again in `dtype`.
        step = torch.where(step == rounded, torch.nextafter(rounded, torch.full_like(rounded, direction)), step)
        rounded = torch.where(wrong, step, rounded)
    if not bool(torch.isfinite(rounded).all()):
        raise ValueError(f"KV values exceed the {dtype} range of quantisation scales")
    return rounded


def _grouped(x: torch.Tensor, group_size: int, axis: str) -> torch.Tensor:
    """`[Hkv, n, d]` viewed as `[Hkv, a, b, G]` with the group members on the last axis."""
    heads, n, d = x.shape
    if axis == "token":
        if n % group_size:
            raise ValueError(f"{n} slots do not fill groups of {group_size} tokens")
        return x.view(heads, n // group_size, group_size, d).transpose(2, 3)
    if axis == "channel":
        if d % group_size:
            raise ValueError(f"group_size {group_size} does not divide head dim {d}")
        return x.view(heads, n, d // group_size, group_size)
    raise ValueError(f"unknown grouping axis '{axis}'. Valid axes: {', '.join(AXES)}.")


def _ungrouped(g: torch.Tensor, axis: str) -> torch.Tensor:
    heads, a, b, group = g.shape
    if axis == "token":
        return g.transpose(2, 3).reshape(heads, a * group, b)
    return g.reshape(heads, a, b * group)


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: str) -> Quantized:
    """Quantise `x [Hkv, n, d]` to `bits`-bit codes in groups of `group_size` along `axis`."""
    if bits not in BITS:
        raise ValueError(f"unsupported bits {bits}. Valid bits: {', '.join(map(str, BITS))}.")
    levels = 2**bits - 1
    pdtype = param_dtype(x.dtype)
    groups = _grouped(x.float(), group_size, axis)
    low = _round_to(groups.amin(dim=-1), pdtype, float("-inf"))
    span = groups.amax(dim=-1) - low.float()
    scale = _round_to(span / levels, pdtype, float("inf"))
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = torch.round((groups - low.float()[..., None]) / safe[..., None]).clamp_(0, levels).to(torch.uint8)
    return Quantized(codes=_ungrouped(codes, axis), scale=scale, zero=low)


def dequantize(q: Quantized, group_size: int, axis: str, dtype: torch.dtype) -> torch.Tensor:
    """x^ = q * s + m in fp32, returned in `dtype`, `[Hkv, n, d]`."""
    groups = _grouped(q.codes, group_size, axis).float()
    out = groups * q.scale.float()[..., None] + q.zero.float()[..., None]
    return _ungrouped(out, axis).to(dtype)
