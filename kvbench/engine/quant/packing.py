"""Bit packing of b-bit codes (b in {1, 2, 3, 4, 8}) into bytes, with padding counted.

Layout: the codes of a row (last axis) are padded to a multiple of 8 and cut into blocks of 8; a block's 8 codes
form one 8b-bit little-endian integer (code i at bits b*i .. b*i + b - 1) stored as b bytes. So code c of a row
starts at bit b*c of the row's bytes, for every b: byte (b*c) // 8, shift (b*c) % 8 (a 3-bit code may straddle
two bytes). A row of n codes takes ceil(n / 8) * b bytes: 3-bit codes really take 3 bits (no 4-bit fallback).
The Triton decode kernel unpacks with the same formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_BITS = (1, 2, 3, 4, 8)


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes of one packed row of `n` codes (padding included)."""
    return -(-n // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes `[..., n]` (each < 2^bits) into uint8 `[..., packed_row_bytes(n, bits)]`."""
    if bits not in PACK_BITS:
        raise ValueError(f"unsupported bits {bits}. Valid bits: {', '.join(map(str, PACK_BITS))}.")
    n = codes.shape[-1]
    blocks = F.pad(codes, (0, (-n) % 8)).to(torch.int64).unflatten(-1, (-1, 8))
    shifts = torch.arange(8, device=codes.device) * bits
    words = (blocks << shifts).sum(dim=-1)
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    return ((words[..., None] >> byte_shifts) & 0xFF).to(torch.uint8).flatten(-2)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 `[..., packed_row_bytes(n, bits)]` -> uint8 codes `[..., n]`."""
    if bits not in PACK_BITS:
        raise ValueError(f"unsupported bits {bits}. Valid bits: {', '.join(map(str, PACK_BITS))}.")
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    words = (packed.to(torch.int64).unflatten(-1, (-1, bits)) << byte_shifts).sum(dim=-1)
    shifts = torch.arange(8, device=packed.device) * bits
    codes = (words[..., None] >> shifts) & (2**bits - 1)
    return codes.flatten(-2)[..., :n].to(torch.uint8)
