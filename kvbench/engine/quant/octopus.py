"""OCTOPUS-reconstructed storage (arXiv 2605.21226; no public code): rotation + octahedral triplet codes.

The compression spec's documented reconstruction ([UNVERIFIED] details marked there), per cached vector x of
one head (keys post-RoPE and values alike):
1. norm: ||x|| stored in 16 bits ([UNVERIFIED]: TurboQuant stores it; whether OCTOPUS does is not public);
2. rotation: u = H diag(s) x / ||x|| with the normalised Hadamard H_d and seeded signs s (data-oblivious);
3. triplets: u's first 3 * floor(d / 3) coordinates in triplets t; per triplet r = ||t|| and the octahedral
   map (a, b) of t / r (`kvbench.engine.quant.transforms`);
4. Lloyd-Max scalar codebooks for a, b and r (and the d mod 3 leftover coordinates), fitted once per (d, bits)
   on seeded Monte-Carlo samples of rotated unit Gaussian vectors (`codebooks`), codes packed with
   `kvbench.engine.quant.packing`;
5. bit split (b_a, b_b, b_r) per triplet: the split with the lowest synthetic MSE among those summing to
   3 * bits with every width packable ({2, 3, 4}); leftovers get `bits`.
Decode: codebook values, inverse octahedral map, times r, inverse rotation, times the norm.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.engine.quant.packing import pack, unpack
from kvbench.engine.quant.segments import Segment, SegmentStore, tensor_bytes
from kvbench.engine.quant.transforms import (
    check_power_of_two,
    hadamard,
    octahedral_decode,
    octahedral_encode,
    random_signs,
)

OCTOPUS_BITS = (2, 3, 4)
STREAM_BITS = (2, 3, 4)  # packable widths a split may use
SAMPLES = 8192
LLOYD_ITERATIONS = 40


def lloyd_max(samples: torch.Tensor, bits: int) -> torch.Tensor:
    """The 2^bits-level Lloyd-Max (1-D k-means) codebook of `samples` (fp64, sorted), started at quantiles."""
    x = samples.double().flatten().sort().values
    levels = 2**bits
    centres = torch.quantile(x, (torch.arange(levels, dtype=torch.float64) + 0.5) / levels)
    for _ in range(LLOYD_ITERATIONS):
        cells = torch.bucketize(x, (centres[1:] + centres[:-1]) / 2)
        sums = torch.zeros(levels, dtype=torch.float64).index_add_(0, cells, x)
        counts = torch.bincount(cells, minlength=levels).double()
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres).sort().values
    return centres


def nearest(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest codebook entry for every value."""
    book = codebook.to(values.device, torch.float32)
    return torch.bucketize(values.float().contiguous(), (book[1:] + book[:-1]) / 2).to(torch.uint8)


def rotated_unit_samples(head_dim: int, seed: int = 0) -> torch.Tensor:
    """Seeded Monte-Carlo unit vectors (rotation-invariant, so what a random rotation makes of any vector)."""
    g = torch.randn(SAMPLES, head_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g / g.norm(dim=-1, keepdim=True)


def split_parts(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit vectors `[..., d]` -> octahedral (a, b) `[..., m, 2]`, triplet norms r `[..., m]` and the d mod 3
    leftover coordinates."""
    m = u.shape[-1] // 3
    triplets = u[..., : 3 * m].unflatten(-1, (m, 3))
    r = triplets.norm(dim=-1)
    direction = triplets / r.clamp_min(torch.finfo(u.dtype).tiny)[..., None]
    direction = torch.where(r[..., None] > 0, direction, torch.tensor([0.0, 0.0, 1.0], dtype=u.dtype))
    return octahedral_encode(direction), r, u[..., 3 * m :]


def join_parts(ab: torch.Tensor, r: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    triplets = octahedral_decode(ab) * r[..., None]
    return torch.cat([triplets.flatten(-2), rest], dim=-1)


@dataclass(frozen=True)
class Codebooks:
    split: tuple[int, int, int]  # bits of a, b, r per triplet
    a: torch.Tensor
    b: torch.Tensor
    r: torch.Tensor
    rest: torch.Tensor  # leftover coordinates' codebook (bits = the total bits per element)
    rest_bits: int


def reconstruct(u: torch.Tensor, books: Codebooks) -> torch.Tensor:
    ab, r, rest = split_parts(u)
    q = (
        books.a.to(u.dtype)[nearest(ab[..., 0], books.a).long()],
        books.b.to(u.dtype)[nearest(ab[..., 1], books.b).long()],
        books.r.to(u.dtype)[nearest(r, books.r).long()],
    )
    rest_hat = books.rest.to(u.dtype)[nearest(rest, books.rest).long()] if rest.numel() else rest
    return join_parts(torch.stack(q[:2], dim=-1), q[2], rest_hat)


@functools.lru_cache(maxsize=16)
def codebooks(head_dim: int, bits: int) -> Codebooks:
    """Codebooks and bit split for unit vectors of `head_dim` at `bits` per element (deterministic; cached)."""
    samples = rotated_unit_samples(head_dim)
    ab, r, rest = split_parts(samples)
    splits = [split for split in itertools.product(STREAM_BITS, repeat=3) if sum(split) == 3 * bits]
    books = {  # one Lloyd-Max fit per stream and width, shared by the candidate splits
        name: {width: lloyd_max(values, width) for width in {split[i] for split in splits}}
        for i, (name, values) in enumerate((("a", ab[..., 0]), ("b", ab[..., 1]), ("r", r)))
    }
    rest_book = lloyd_max(rest, bits) if rest.numel() else torch.zeros(2**bits, dtype=torch.float64)
    best, best_mse = None, float("inf")
    for split in splits:
        candidate = Codebooks(split, books["a"][split[0]], books["b"][split[1]], books["r"][split[2]], rest_book, bits)
        mse = float((reconstruct(samples, candidate) - samples).pow(2).sum(dim=-1).mean())
        if mse < best_mse:
            best, best_mse = candidate, mse
    return best


@dataclass
class OctopusSegment(Segment):
    """Packed code streams `[Hkv, n, bytes]` for a, b, r (per triplet) and leftovers, plus 16-bit norms `[Hkv, n]`."""

    kind: ClassVar[str] = "octopus"
    streams: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    norms: torch.Tensor
    head_dim: int
    bits: int
    seed: int

    @property
    def num_slots(self) -> int:
        return self.norms.shape[1]

    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.streams) + tensor_bytes(self.norms)

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        books = codebooks(self.head_dim, self.bits)
        m, leftover = self.head_dim // 3, self.head_dim % 3
        widths = (*books.split, books.rest_bits)
        counts = (m, m, m, leftover)
        values = []
        parts = zip(self.streams, widths, counts, (books.a, books.b, books.r, books.rest), strict=True)
        for stream, width, count, book in parts:
            codes = unpack(stream, width, count).long() if count else stream.new_zeros(*stream.shape[:2], 0).long()
            values.append(book.to(stream.device, torch.float32)[codes])
        u = join_parts(torch.stack(values[:2], dim=-1), values[2], values[3])
        x = (u @ rotation(self.head_dim, self.seed, u.device)) * self.norms.float()[..., None]
        return x.to(dtype)

    def clone(self) -> OctopusSegment:
        return OctopusSegment(tuple(t.clone() for t in self.streams), self.norms.clone(), self.head_dim, self.bits,
                              self.seed)  # fmt: skip

    def concat(self, later: Segment) -> Segment | None:
        if not isinstance(later, OctopusSegment) or (later.head_dim, later.bits, later.seed) != (
            self.head_dim, self.bits, self.seed
        ):  # fmt: skip
            return None
        streams = tuple(torch.cat([a, b], dim=1) for a, b in zip(self.streams, later.streams, strict=True))
        return OctopusSegment(streams, torch.cat([self.norms, later.norms], dim=1), self.head_dim, self.bits, self.seed)


def rotation(head_dim: int, seed: int, device: Any) -> torch.Tensor:
    """The orthogonal matrix R = diag(s) H (rows: output coordinates), so u = x R^T and x = u R."""
    return (random_signs(head_dim, seed)[:, None] * hadamard(head_dim)).to(device)


def encode_octopus(x: torch.Tensor, bits: int, seed: int) -> OctopusSegment:
    """`x [Hkv, n, d]` -> an `OctopusSegment` (module docstring)."""
    head_dim = x.shape[-1]
    books = codebooks(head_dim, bits)
    xf = x.float()
    norms = xf.norm(dim=-1)
    u = (xf @ rotation(head_dim, seed, x.device).T) / norms.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    ab, r, rest = split_parts(u)
    streams = []
    for values, book, width in (
        (ab[..., 0], books.a, books.split[0]),
        (ab[..., 1], books.b, books.split[1]),
        (r, books.r, books.split[2]),
        (rest, books.rest, books.rest_bits),
    ):
        codes = nearest(values, book)
        streams.append(pack(codes, width) if values.shape[-1] else codes)
    norm_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float16
    return OctopusSegment(tuple(streams), norms.to(norm_dtype), head_dim, bits, seed)


@dataclass(frozen=True)
class OctopusCodec:
    """Every fp slot is encoded at once; keys and values alike (`QuantKVLayer` codec interface)."""

    bits: int
    seed: int

    def check(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in OCTOPUS_BITS:
            raise ValueError(f"unsupported bits {self.bits!r}. Valid bits: {', '.join(map(str, OCTOPUS_BITS))}.")

    def check_head_dim(self, head_dim: int) -> None:
        check_power_of_two(head_dim, "hadamard size (head dim)")

    def encoder(self, x: torch.Tensor) -> OctopusSegment:
        return encode_octopus(x, self.bits, self.seed)

    def apply(self, key_store: SegmentStore, value_store: SegmentStore) -> None:
        for store in (key_store, value_store):
            store.encode_oldest_fp(store.fp_tail_len(), self.encoder)

    def describe(self) -> dict[str, Any]:
        return {"bits": self.bits, "seed": self.seed, "reconstruction": "OCTOPUS-reconstructed"}
