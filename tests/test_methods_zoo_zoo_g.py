"""Entropy-gated ChunkKV (`entropy_chunkkv`, kvpress EntropyGatedChunkKVPress): the gate's rule on hand-made
scores worked out by hand and against an independent plain-Python reconstruction, the exact budget and the base's
window on the tiny model, the full cache when the budget holds the prompt, and one-line refusals of bad
hyperparameters."""

from __future__ import annotations

import math
import random

import pytest
import torch

from kvbench.methods import build_method
from tests.helpers import assert_kept_slots_are_untouched, compressed_copy


def reference_selection(scores: list[list[float]], chunk: int, spiky_keep: int, keep: int) -> list[int]:
    """The press's rule written out on plain lists: head sums, chunk means and normalised entropies, lower medians,
    chunks best first (ties: earlier) with important-and-spiky ones capped, then the best leftover slots."""
    layer = [sum(column) for column in zip(*scores, strict=True)]
    blocks = [list(range(s, min(s + chunk, len(layer)))) for s in range(0, len(layer), chunk)]
    means = [sum(layer[i] for i in b) / len(b) for b in blocks]
    entropies = []
    for b in blocks:
        low = min(0.0, min(layer[i] for i in b))
        shifted = [layer[i] - low for i in b]
        total = sum(shifted)
        if len(b) == 1 or total <= 0:
            entropies.append(0.0)
            continue
        h = -sum(x / total * math.log(x / total) for x in shifted if x > 0)
        entropies.append(min(1.0, max(0.0, h / math.log(len(b)))))
    median_mean = sorted(means)[(len(means) - 1) // 2]
    median_entropy = sorted(entropies)[(len(entropies) - 1) // 2]
    kept: set[int] = set()
    remaining = keep
    for c in sorted(range(len(blocks)), key=lambda c: (-means[c], c)):
        if remaining <= 0:
            break
        cap = spiky_keep if means[c] >= median_mean and entropies[c] < median_entropy else len(blocks[c])
        take = min(remaining, cap, len(blocks[c]))
        kept |= set(sorted(blocks[c], key=lambda i: (-layer[i], i))[:take])
        remaining -= take
    leftover = sorted((i for i in range(len(layer)) if i not in kept), key=lambda i: (-layer[i], i))
    kept |= set(leftover[:remaining])
    return sorted(kept)


def choose(scores: torch.Tensor, keep: int, chunk: int, spiky_keep: int) -> list[int]:
    method = build_method({"name": "entropy_chunkkv", "chunk_length": chunk, "low_entropy_chunk_length": spiky_keep})
    return method.choose(scores, keep).tolist()


# Two heads summing to chunks (length 4) [1.2, 1, .9, .9] (mean 1, coherent), [8, 1, 0, 0] (mean 2.25, spiky),
# [3, 3, 3, 3] (mean 3, coherent) and [.5, .5, .5, .5] (mean .5, coherent); entropies ~.995, ~.25, 1, 1. Lower
# medians: mean 1 (chunk 0), entropy ~.995 (chunk 0), so only chunk 1 (mean >= 1, entropy below) is gated to its
# best 2 slots; chunk 0 sits at the entropy median and stays whole.
HAND = torch.tensor(
    [
        [0.6, 0.5, 0.45, 0.45, 4.0, 0.5, 0.0, 0.0, 1.0, 2.0, 1.5, 0.5, 0.25, 0.25, 0.25, 0.25],
        [0.6, 0.5, 0.45, 0.45, 4.0, 0.5, 0.0, 0.0, 2.0, 1.0, 1.5, 2.5, 0.25, 0.25, 0.25, 0.25],
    ]
)


def test_spiky_important_chunks_keep_their_best_slots_and_the_freed_budget_goes_to_the_next_chunks():
    # Order by mean: chunk 2, 1, 0, 3. Budget 8: chunk 2 whole, chunk 1's slots 4 and 5, chunk 0's best two.
    assert choose(HAND, 8, 4, 2) == [0, 1, 4, 5, 8, 9, 10, 11]
    # Plain ChunkKV keeps chunk 1 whole instead (the gate is what differs).
    assert build_method({"name": "chunkkv", "chunk_length": 4}).choose(HAND, 8).tolist() == list(range(4, 12))
    assert choose(HAND, 6, 4, 2) == [4, 5, 8, 9, 10, 11]
    assert choose(HAND, 3, 4, 2) == [8, 9, 10]  # the best chunk does not fit: its best slots (all tie: earliest)
    # Caps sum to 14: chunks 2, 1 (capped), 0 and 3 give 14 slots, the 15th is the best leftover (slot 6, a tie).
    assert choose(HAND, 14, 4, 2) == [i for i in range(16) if i not in (6, 7)]
    assert choose(HAND, 15, 4, 2) == [i for i in range(16) if i != 7]
    assert choose(HAND, 20, 4, 2) == list(range(16))
    for keep in range(17):
        assert choose(HAND, keep, 4, 2) == reference_selection(HAND.tolist(), 4, 2, keep)


def test_signed_scores_and_a_partial_last_chunk_match_the_reference():
    rng = random.Random(0)
    for trial in range(40):
        length, chunk = rng.randint(1, 37), rng.randint(2, 9)
        spiky_keep = rng.randint(1, chunk - 1)
        # Spiky and flat chunks mixed, some negative, with repeated values to exercise the tie rules.
        rows = [[rng.choice([0.0, 0.5, 1.0, -1.0, 3.0, rng.uniform(-2, 6)]) for _ in range(length)] for _ in range(2)]
        scores = torch.tensor(rows, dtype=torch.float64)
        for keep in {0, 1, length // 3, length // 2, length - 1, length}:
            got = choose(scores, keep, chunk, spiky_keep)
            assert len(got) == max(0, keep)
            assert got == reference_selection(rows, chunk, spiky_keep, keep), (trial, keep)


def test_on_the_tiny_model_one_set_per_layer_of_exactly_the_budget_plus_the_window(tiny_lm):
    budget, window = 30, 8
    cfg = {"name": "entropy_chunkkv", "chunk_length": 5, "low_entropy_chunk_length": 2, "base_params": {"window": 8}}
    method, cache, compressed, ctx = compressed_copy(tiny_lm, cfg, budget, window)
    gated_somewhere = False
    for layer_idx, (full, layer) in enumerate(zip(cache.layers, compressed.layers, strict=True)):
        base = method.inner.layer_scores(layer_idx, full, budget, ctx).scores
        chosen = reference_selection(base.double().tolist(), 5, 2, budget - window)
        expected = chosen + list(range(base.shape[1], full.get_seq_length()))
        assert layer.positions.tolist() == [expected] * full.num_heads
        plain = build_method({"name": "chunkkv", "chunk_length": 5}).choose(base, budget - window).tolist()
        gated_somewhere |= plain != chosen
    assert gated_somewhere  # the gate changes the selection of some layer on a real prompt
    assert_kept_slots_are_untouched(cache, compressed)


def test_a_budget_holding_the_prompt_keeps_the_full_cache(tiny_lm):
    method, cache, compressed, ctx = compressed_copy(tiny_lm, {"name": "entropy_chunkkv"}, 10_000)
    for full, layer in zip(cache.layers, compressed.layers, strict=True):
        assert torch.equal(layer.positions, full.positions)
        assert torch.equal(layer.keys, full.keys) and torch.equal(layer.values, full.values)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"chunk_length": 4, "low_entropy_chunk_length": 4}, "chunk_length > low_entropy_chunk_length >= 1"),
        ({"low_entropy_chunk_length": 0}, "chunk_length > low_entropy_chunk_length >= 1"),
        ({"chunk_length": 0}, "chunk_length > low_entropy_chunk_length >= 1"),
        ({"decode_budget": 64}, "decode_budget is not supported"),
        ({"base": "kivi"}, "cannot wrap 'kivi'"),
    ],
)
def test_bad_hyperparameters_are_refused_in_one_line(params, message):
    with pytest.raises(ValueError, match=message) as error:
        build_method({"name": "entropy_chunkkv", **params})
    assert "\n" not in str(error.value)
