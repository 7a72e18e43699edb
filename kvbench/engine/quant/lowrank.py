"""Error-recovery pieces of GEAR (arXiv 2403.05527): sparse outliers kept exactly and a low-rank approximation
of the quantisation residual by seeded power iteration. Pure tensor functions; `kvbench.methods.gear` stores
their results in segments."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def power_iteration(
    matrix: torch.Tensor, rank: int, loops: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors (Q `[..., n, r]`, P `[..., d, r]`, fp32) with matrix `[..., n, d]` ~= Q P^T.

    GEAR's official loop (`fake_poweriteration_group`), seeded: P0 uniform random (`generator`; the official
    `torch.rand` is unseeded); each loop Q = E P, P = E^T Q; on the last loop P and then Q are orthonormalised
    (QR) first, so Q P^T = Q Q^T E, the projection of E onto the span of Q. An exactly rank-r matrix is recovered
    up to rounding.
    """
    if loops < 1:
        raise ValueError(f"power iteration loops must be >= 1, got {loops}")
    e = matrix.float()
    *batch, n, d = e.shape
    if rank == 0:
        return e.new_zeros(*batch, n, 0), e.new_zeros(*batch, d, 0)
    p = torch.rand(*batch, d, rank, generator=generator).to(e.device)
    q = e.new_zeros(*batch, n, rank)
    for step in range(loops):
        last = step == loops - 1
        if last:
            p = torch.linalg.qr(p).Q
        q = e @ p
        if last:
            q = torch.linalg.qr(q).Q
        p = e.transpose(-1, -2) @ q
    return q, p


@dataclass
class Outliers:
    """Entries taken out of `[rows, m]` before quantisation: per row, `values` `[rows, 2k]` at `indices`."""

    values: torch.Tensor
    indices: torch.Tensor

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[rows, m]` with the outlier entries put back exactly."""
        if self.indices.shape[-1] == 0:
            return x
        return x.scatter(-1, self.indices.long(), self.values.to(x.dtype))


def index_dtype(length: int) -> torch.dtype:
    """The smallest integer dtype that indexes a row of `length` entries (int16 up to 32767, as GEAR's bytes)."""
    return torch.int16 if length <= torch.iinfo(torch.int16).max + 1 else torch.int32


def extract_outliers(x: torch.Tensor, k: int, value_dtype: torch.dtype) -> tuple[torch.Tensor, Outliers]:
    """Per row of `x [rows, m]`, the k largest and k smallest entries (GEAR `gears_tokenQ`/`gears_channelQ`):
    returns x with those entries replaced by the row mean (so they do not stretch the quantiser's range) and the
    `Outliers` (values in `value_dtype`, exactly as they were in x of that dtype)."""
    k = min(k, x.shape[-1] // 2)
    empty = x.new_zeros(x.shape[0], 0)
    if k <= 0:
        return x, Outliers(empty.to(value_dtype), empty.to(index_dtype(x.shape[-1])))
    top = x.topk(k, dim=-1).indices
    bottom = (-x).topk(k, dim=-1).indices
    indices = torch.cat([top, bottom], dim=-1)
    values = x.gather(-1, indices).to(value_dtype)
    filled = x.scatter(-1, indices, x.mean(dim=-1, keepdim=True).expand_as(indices).to(x.dtype))
    return filled, Outliers(values, indices.to(index_dtype(x.shape[-1])))
