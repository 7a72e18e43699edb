"""TurboQuant storage (Zandieh et al., arXiv 2504.19874): random rotation + per-coordinate optimal scalar codes,
optionally + the 1-bit QJL transform of the residual (unbiased inner products).

Per cached vector x of one head (`encode_turbo`):
1. norm: ||x|| stored in 16 bits; u = R x / ||x|| with R = diag(s) H_d (normalised Hadamard, seeded signs s:
   `kvbench.engine.quant.octopus.rotation`), so every coordinate of u follows the law of one coordinate of a
   uniform unit vector, density proportional to (1 - t^2)^((d - 3) / 2) on [-1, 1];
2. MSE stage (TurboQuant_mse): each coordinate coded with the 2^b-level Lloyd-Max codebook of that density
   (`beta_codebook`, solved on a fine grid of the exact density; the paper's optimal scalar quantiser);
   `norm_correction` (vLLM's `_nc` presets) rescales the decoded rotated vector to unit norm before rotating back;
3. QJL stage (TurboQuant_prod, `qjl=True`): the MSE stage uses b - 1 bits and the residual r = u - u^ is stored as
   sign(S r) (d bits, S a seeded d x d standard Gaussian matrix) and ||r|| (16 bits); decoding adds
   sqrt(pi / 2) / d * ||r|| * S^T sign(S r), whose expectation over S is r, so <y, x^> is unbiased for <y, x>.

Bytes per vector: ceil(d / 8) * b_mse (+ ceil(d / 8) with QJL) packed code bytes + 2 (norm) (+ 2, residual norm).
R and S are regenerated from the seed (model-wide constants, like vLLM's cached Hadamard matrix), not cache
bytes; the codebook (2^b fp32 values per (d, b)) likewise.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.engine.quant.fp8 import FP8Segment
from kvbench.engine.quant.octopus import nearest, rotation
from kvbench.engine.quant.packing import pack, packed_row_bytes, unpack
from kvbench.engine.quant.quantizer import BITS, param_dtype
from kvbench.engine.quant.segments import Segment, SegmentStore, UniformSegment, tensor_bytes
from kvbench.engine.quant.transforms import check_power_of_two

TURBO_BITS = (1, 2, 3, 4)  # bits per coordinate of the MSE stage
GRID = 1 << 16
LLOYD_ITERATIONS = 300
QJL_SEED_OFFSET = 0x51A1  # S and R come from the same seed: distinct streams


@functools.lru_cache(maxsize=32)
def beta_codebook(head_dim: int, bits: int) -> torch.Tensor:
    """The 2^bits Lloyd-Max centroids (fp64, sorted) of one coordinate of a uniform unit vector in R^head_dim,
    iterated on a grid of the exact density from its quantiles."""
    t = torch.linspace(-1.0, 1.0, GRID + 2, dtype=torch.float64)[1:-1]
    weight = (1.0 - t * t).pow((head_dim - 3) / 2.0)
    weight = weight / weight.sum()
    levels = 2**bits
    cdf = weight.cumsum(0)
    targets = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    centres = t[torch.searchsorted(cdf, targets).clamp_max(GRID - 1)]
    for _ in range(LLOYD_ITERATIONS):
        cells = torch.bucketize(t, (centres[1:] + centres[:-1]) / 2)
        mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, cells, weight)
        moment = torch.zeros(levels, dtype=torch.float64).index_add_(0, cells, weight * t)
        centres = torch.where(mass > 0, moment / mass.clamp_min(1e-300), centres)
    return centres.sort().values


def qjl_matrix(head_dim: int, seed: int, device: Any = None) -> torch.Tensor:
    """The seeded standard Gaussian projection S `[d, d]` of the QJL stage."""
    generator = torch.Generator().manual_seed(seed + QJL_SEED_OFFSET)
    return torch.randn(head_dim, head_dim, generator=generator).to(device)


@dataclass
class TurboSegment(Segment):
    """TurboQuant codes of `[Hkv, n, d]` vectors: packed MSE codes, 16-bit norms, and with QJL packed sign bits and
    16-bit residual norms (module docstring)."""

    kind: ClassVar[str] = "turbo"
    codes: torch.Tensor  # uint8 [Hkv, n, packed_row_bytes(d, bits)]
    norms: torch.Tensor  # 16-bit [Hkv, n]
    signs: torch.Tensor | None  # uint8 [Hkv, n, packed_row_bytes(d, 1)] (QJL) or None
    residual_norms: torch.Tensor | None  # 16-bit [Hkv, n] (QJL) or None
    head_dim: int
    bits: int  # of the MSE stage
    norm_correction: bool
    seed: int

    @property
    def num_slots(self) -> int:
        return self.norms.shape[1]

    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in (self.codes, self.norms, self.signs, self.residual_norms))

    def rotated(self) -> torch.Tensor:
        """The decoded unit-norm-scale rotated vectors u^ `[Hkv, n, d]` (fp32), QJL correction included."""
        book = beta_codebook(self.head_dim, self.bits).to(self.codes.device, torch.float32)
        u = book[unpack(self.codes, self.bits, self.head_dim).long()]
        if self.norm_correction:
            u = u / u.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        if self.signs is not None:
            z = unpack(self.signs, 1, self.head_dim).float() * 2 - 1
            projection = z @ qjl_matrix(self.head_dim, self.seed, z.device)  # S^T z for row vectors
            u = u + math.sqrt(math.pi / 2) / self.head_dim * self.residual_norms.float()[..., None] * projection
        return u

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        x = self.rotated() @ rotation(self.head_dim, self.seed, self.codes.device)
        return (x * self.norms.float()[..., None]).to(dtype)

    def clone(self) -> TurboSegment:
        copy = [None if t is None else t.clone() for t in (self.codes, self.norms, self.signs, self.residual_norms)]
        return TurboSegment(*copy, self.head_dim, self.bits, self.norm_correction, self.seed)

    def concat(self, later: Segment) -> Segment | None:
        same = ("head_dim", "bits", "norm_correction", "seed")
        if not isinstance(later, TurboSegment) or any(getattr(self, f) != getattr(later, f) for f in same):
            return None
        parts = []
        for a, b in zip(
            (self.codes, self.norms, self.signs, self.residual_norms),
            (later.codes, later.norms, later.signs, later.residual_norms),
            strict=True,
        ):
            parts.append(None if a is None else torch.cat([a, b], dim=1))
        return TurboSegment(*parts, self.head_dim, self.bits, self.norm_correction, self.seed)


def encode_turbo(x: torch.Tensor, bits: int, qjl: bool, norm_correction: bool, seed: int) -> TurboSegment:
    """`x [Hkv, n, d]` -> a `TurboSegment` with `bits` per coordinate in total (b - 1 MSE + 1 QJL with `qjl`)."""
    head_dim = x.shape[-1]
    mse_bits = bits - 1 if qjl else bits
    xf = x.float()
    norms = xf.norm(dim=-1)
    u = (xf @ rotation(head_dim, seed, x.device).T) / norms.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    book = beta_codebook(head_dim, mse_bits)
    codes = nearest(u, book)
    store_dtype = param_dtype(x.dtype)
    signs = residual_norms = None
    if qjl:
        decoded = book.to(x.device, torch.float32)[codes.long()]
        residual = u - decoded
        signs = pack((residual @ qjl_matrix(head_dim, seed, x.device).T >= 0).to(torch.uint8), 1)
        residual_norms = residual.norm(dim=-1).to(store_dtype)
    return TurboSegment(
        pack(codes, mse_bits), norms.to(store_dtype), signs, residual_norms, head_dim, mse_bits,
        norm_correction and not qjl, seed,
    )  # fmt: skip


def turbo_nbytes(heads: int, n: int, head_dim: int, bits: int, qjl: bool) -> int:
    """Bytes of a `TurboSegment` of `n` slots at `bits` per coordinate in total."""
    mse = bits - 1 if qjl else bits
    per_vector = packed_row_bytes(head_dim, mse) + 2 + (packed_row_bytes(head_dim, 1) + 2 if qjl else 0)
    return heads * n * per_vector


TENSOR_KINDS = ("turbo", "fp8", "uniform")


@dataclass(frozen=True)
class TurboTensorCodec:
    """How keys or values are stored: "turbo" (this module), "fp8" (e4m3 codes, scale 1: vLLM's k8v4 keys) or
    "uniform" (asymmetric per-vector codes, one 16-bit scale and minimum per head vector: vLLM's TurboQuant
    values)."""

    kind: str
    bits: int
    qjl: bool = False
    norm_correction: bool = False
    seed: int = 0

    def check(self, name: str) -> None:
        if self.kind not in TENSOR_KINDS:
            raise ValueError(f"unknown {name} storage {self.kind!r}. Valid: {', '.join(TENSOR_KINDS)}.")
        if self.kind == "turbo":
            valid = tuple(b + 1 for b in TURBO_BITS) if self.qjl else TURBO_BITS
        elif self.kind == "uniform":
            valid = BITS
        else:
            valid = (8,)
        if isinstance(self.bits, bool) or self.bits not in valid:
            qjl = " with qjl" if self.qjl and self.kind == "turbo" else ""
            raise ValueError(
                f"unsupported {name} bits {self.bits!r} for {self.kind}{qjl}. Valid: {', '.join(map(str, valid))}."
            )
        if self.qjl and self.kind != "turbo":
            raise ValueError(f"qjl needs turbo storage, not {self.kind}")

    def encoder(self, x: torch.Tensor) -> Segment:
        if self.kind == "turbo":
            return encode_turbo(x, self.bits, self.qjl, self.norm_correction, self.seed)
        if self.kind == "fp8":
            return FP8Segment.encode(x, "e4m3", None)
        return UniformSegment.encode(x, self.bits, x.shape[-1], "channel")


@dataclass(frozen=True)
class TurboCodec:
    """Every fp slot is encoded at once (vLLM quantises on store); `QuantKVLayer` codec interface."""

    keys: TurboTensorCodec
    values: TurboTensorCodec

    def check(self) -> None:
        """Model-independent parameter checks (one-line errors naming the valid values)."""
        self.keys.check("key")
        self.values.check("value")

    def check_head_dim(self, head_dim: int) -> None:
        if "turbo" in (self.keys.kind, self.values.kind):
            check_power_of_two(head_dim, "hadamard size (head dim)")

    def apply(self, key_store: SegmentStore, value_store: SegmentStore) -> None:
        key_store.encode_oldest_fp(key_store.fp_tail_len(), self.keys.encoder)
        value_store.encode_oldest_fp(value_store.fp_tail_len(), self.values.encoder)

    def describe(self) -> dict[str, Any]:
        return {
            "keys": f"{self.keys.kind}{self.keys.bits}" + ("+qjl" if self.keys.qjl else ""),
            "values": f"{self.values.kind}{self.values.bits}" + ("+qjl" if self.values.qjl else ""),
            "k_bits": self.keys.bits,
            "v_bits": self.values.bits,
            "norm_correction": self.keys.norm_correction,
            "seed": self.keys.seed,
        }
