from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.engine.cache import KVLayer
from kvbench.engine.rope import rotary_embedding, unrotate_keys
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores, ScoringMethod

# Ridge added to the sketched Gram matrix before solving (kvpress's first Cholesky jitter): the sketch may have
# more columns than the keys have dimensions, so X^T X alone can be singular.
RIDGE = 1e-2


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """(s - mean) / std over every element of a layer's `[Hkv, L]` scores (std unbiased, at least 1e-6): one
    normalisation for all heads, so head-adaptive wrappers still compare heads."""
    return (scores - scores.mean()) / scores.std().clamp_min(1e-6)


def gaussian_sketch(num_heads: int, dim: int, sketch: int, seed: int, layer_idx: int) -> torch.Tensor:
    """Right Gaussian sketch `[Hkv, d, k]`, entries N(0, 1/k), drawn on the CPU from (seed, layer) so that every
    device draws the same matrix."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer_idx)
    return torch.randn((num_heads, dim, sketch), generator=generator) / math.sqrt(sketch)


def leverage_scores(keys: torch.Tensor, phi: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """Approximate leverage scores of keys `[Hkv, L, d]` through the sketch `phi [Hkv, d, k]` (`[Hkv, L]`, fp32):
    X = (K - mean over the sequence) phi, score_i = x_i^T (X^T X + ridge I)^-1 x_i, clamped at 0."""
    centred = keys.float() - keys.float().mean(dim=1, keepdim=True)
    sketched = centred @ phi.to(centred.device, torch.float32)  # [Hkv, L, k]
    gram = sketched.transpose(1, 2) @ sketched
    gram = 0.5 * (gram + gram.transpose(1, 2)) + ridge * torch.eye(gram.shape[-1], device=gram.device)
    factor = torch.linalg.cholesky(gram)
    solved = torch.cholesky_solve(sketched.transpose(1, 2), factor)  # (X^T X + rI)^-1 X^T, [Hkv, k, L]
    return (sketched * solved.transpose(1, 2)).sum(dim=-1).clamp_min(0)


def pre_rope_keys(layer: KVLayer, ctx: CompressionContext, what: str) -> torch.Tensor:
    """The layer's keys before RoPE (`[Hkv, L, d]`, fp32), un-rotated at their original positions with the
    model's own rotary module."""
    if ctx.model is None:
        raise ValueError(f"{what} needs the model's rotary embedding to recover pre-RoPE keys (ctx.lm is None)")
    return unrotate_keys(layer.keys[0], layer.positions, rotary_embedding(ctx.model))


@register_method("leverage")
@dataclass
class Leverage(ScoringMethod):
    """Approximate leverage scores of the keys (Chari and Van Durme, 2025, "Compactor: Calibrated Query-Agnostic
    KV Cache Compression with Approximate Leverage Scores", arXiv 2507.08143; kvpress `LeverageScorePress`).

    Keys that are geometric outliers of the layer's key matrix are kept: the pre-RoPE keys (un-rotated from the
    cache with the model's rotary module; kvpress recomputes them from the hidden states) are centred over the
    sequence and sketched on the right by a Gaussian matrix phi (`sketch_dimension` columns, N(0, 1/k)); a
    key's score is its leverage in the sketched matrix, x_i^T (X^T X + 0.01 I)^-1 x_i, z-normalised over the
    whole layer (all heads at once, as kvpress). Each KV head keeps its `budget` best. Query-agnostic.

    Paper vs peer: as kvpress, a Cholesky solve on the sketched Gram matrix with the 0.01 ridge of kvpress's
    first jitter (kvpress raises the jitter only if that factorisation fails); the sketch is drawn from the
    run seed and the layer index (kvpress: the global torch RNG), so results are reproducible.

    Hyperparameters: sketch_dimension=48 (kvpress); decode_budget=null and decode_interval=16 as every scorer
    (re-scoring while decoding recomputes the leverage of the slots held).
    """

    sketch_dimension: int = 48

    def rope_dependent(self) -> bool:
        return True  # its keys are un-rotated with the model's one RoPE

    def validate(self) -> None:
        if self.sketch_dimension < 1:
            raise ValueError(f"leverage needs sketch_dimension >= 1, got {self.sketch_dimension}")

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        keys = pre_rope_keys(layer, ctx, self.name)
        phi = gaussian_sketch(keys.shape[0], keys.shape[-1], self.sketch_dimension, ctx.seed, layer_idx)
        return LayerScores(zscore(leverage_scores(keys, phi)))
