"""Scorers of the method zoo: KeyDiff, LagKV, leverage / non-causal attention / Compactor, CUR, CAP, CriticalKV
(and its head-adaptive variant) and ChunkKV. Each against its paper's formula computed independently here on
hand-made tensors, the exact budget on the tiny model, and one-line refusals of bad hyperparameters. The budget
rule and the identity with the full cache when the budget holds everything are checked for every method in
test_method_contract.py."""

from __future__ import annotations

import math

import pytest
import torch

from kvbench.engine.cache import KVLayer
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.methods import build_method
from kvbench.methods.base import CompressionContext
from kvbench.methods.keydiff import keydiff_scores
from tests.helpers import assert_kept_slots_are_untouched, needle_sample, prefilled


def hand_layer(keys: torch.Tensor, values: torch.Tensor | None = None) -> KVLayer:
    """A layer holding `keys [Hkv, L, d]` (values: ones unless given) at positions 0..L-1."""
    layer = KVLayer()
    values = torch.ones_like(keys) if values is None else values
    layer.update(keys[None], values[None], positions=torch.arange(keys.shape[1]))
    return layer


def hand_context(budget: int, length: int, heads: int = 1, kv_heads: int = 1) -> CompressionContext:
    return CompressionContext(budget=budget, prompt_len=length, num_heads=heads, num_kv_heads=kv_heads)


def run_rows(lm, cfg: dict, budget: int, compress: str = "prompt") -> dict[str, dict]:
    jobs = [Job(build_method({"name": "full"}), None, "full"), Job(build_method(cfg), budget, "m")]
    rows = run_sample(lm, needle_sample(8), jobs, RunOptions(compress=compress, seed=0, fail_fast=True))
    return {job.key: row for job, row in rows}


def compressed_copy(lm, cfg: dict, budget: int, window: int = 8):
    """The tiny model's prefilled cache, and a copy compressed by the method `cfg` (observer attached)."""
    method = build_method(cfg)
    cache, ctx = prefilled(lm, budget, max(window, method.window_queries_needed()))
    compressed = cache.copy()
    method.setup(compressed, ctx)
    method.compress(compressed, ctx)
    return method, cache, compressed, ctx


def kept_positions(layer: KVLayer) -> list[list[int]]:
    return layer.positions.tolist()


# --- KeyDiff --------------------------------------------------------------------------------------------------


def test_keydiff_scores_are_minus_the_cosine_to_the_mean_unit_key():
    keys = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]]])
    units = [[1.0, 0.0], [0.0, 1.0], [1 / math.sqrt(2), 1 / math.sqrt(2)], [-1.0, 0.0]]
    anchor = [sum(u[i] for u in units) / 4 for i in range(2)]
    norm_a = math.hypot(*anchor)
    expected = [-(u[0] * anchor[0] + u[1] * anchor[1]) / norm_a for u in units]
    assert torch.allclose(keydiff_scores(keys)[0], torch.tensor(expected), atol=1e-6)
    # Only valid slots form the anchor: masking the last key moves it.
    valid = torch.tensor([[True, True, True, False]])
    anchor3 = [sum(u[i] for u in units[:3]) / 3 for i in range(2)]
    expected3 = -(units[0][0] * anchor3[0] + units[0][1] * anchor3[1]) / math.hypot(*anchor3)
    assert keydiff_scores(keys, valid)[0, 0].item() == pytest.approx(expected3, abs=1e-6)


def test_keydiff_keeps_the_most_distinctive_keys():
    # Four keys along e0 and one along e1, one against e0: the anchor points along e0, so the budget of 2
    # keeps the two keys least like it.
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, -0.1], [-1.0, 0.0], [2.0, 0.0]]])
    layer = hand_layer(keys)
    method = build_method({"name": "keydiff"})
    method.compress(KVCacheOf(layer), hand_context(2, 6))
    assert kept_positions(layer) == [[2, 4]]


class KVCacheOf:
    """A one-layer stand-in for `KVCache` (what `ScoringMethod.compress` reads: `layers`)."""

    def __init__(self, *layers: KVLayer) -> None:
        self.layers = list(layers)


def test_keydiff_on_the_tiny_model_keeps_the_budget_and_untouched_slots(tiny_lm):
    budget = 24
    method, cache, compressed, _ = compressed_copy(tiny_lm, {"name": "keydiff"}, budget)
    for full, layer in zip(cache.layers, compressed.layers, strict=True):
        assert layer.get_seq_length() == budget
        expected = torch.sort(keydiff_scores(full.keys[0]), dim=-1, descending=True, stable=True).indices[:, :budget]
        assert torch.equal(layer.positions, expected.sort(dim=-1).values)
    assert_kept_slots_are_untouched(cache, compressed)
