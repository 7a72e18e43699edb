from __future__ import annotations

from dataclasses import dataclass

from kvbench.engine.cache import KVCache
from kvbench.engine.quant.octopus import OctopusCodec, codebooks
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.quantized import QuantizedMethod

LABEL = "octopus-reconstructed"


@register_method("octopus")
@dataclass
class Octopus(QuantizedMethod):
    """OCTOPUS-reconstructed: kvbench's documented reconstruction of OCTOPUS ("octahedral parametrisation under
    optimal squared-error quantisation", Stability AI, arXiv 2605.21226, May 2026), from the abstract and project
    page only: no code is public, and the bit split, codebooks, value handling, d mod 3 leftovers and norm storage
    are [UNVERIFIED] (see `kvbench.engine.quant.octopus` and the compression spec). Rows are labelled
    "octopus-reconstructed".

    Every cached key and value vector (per head) is stored as a 16-bit norm plus, after a seeded randomized
    Hadamard rotation, octahedral (a, b) and norm codes per coordinate triplet (Lloyd-Max codebooks fitted on
    synthetic rotated unit vectors, the (a, b, r) split chosen by synthetic MSE) and scalar codes for the d mod 3
    leftover coordinates. No fp residual window. The head dim must be a power of two (Hadamard).

    Known gap: on synthetic rotated vectors (d=64) this reconstruction has a HIGHER MSE than one per-coordinate
    Lloyd-Max codebook (TurboQuant-MSE): 0.166 vs 0.114 at 2 bits, 0.040 vs 0.033 at 3, so it does not reproduce
    the paper's claim (a strict-xfail test tracks it); the paper's codec must differ from this reading.

    Hyperparameters: bits=3 per element (2, 3 or 4; plus 16 / d bits of norm), seed=0 (rotation signs).
    `base`: an eviction method whose kept slots are stored this way.
    """

    bits: int = 3
    seed: int = 0

    def codec(self, head_dim: int | None = None) -> OctopusCodec:
        return OctopusCodec(self.bits, self.seed)

    def label(self) -> str:
        return LABEL + super().label().removeprefix(self.name)

    def after_compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        super().after_compress(cache, ctx)
        head_dim = cache.layers[0].keys.shape[-1] if cache.layers else ctx.lm.head_dim  # the stored layers' own
        ctx.record["quant"]["split_abr"] = list(codebooks(head_dim, self.bits).split)
