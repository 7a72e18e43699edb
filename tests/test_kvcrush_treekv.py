"""KVCrush (hand-made signatures per anchor mode, crush_fraction 0 == base, exact budget) and TreeKV-R (the
cursor rule against a pure-Python reference, pair survivors, size B at every step, protected window)."""

from __future__ import annotations

import random

import pytest
import torch

from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.harness.sample import Sample
from kvbench.methods import build_method
from kvbench.methods.kvcrush import anchor, crush_pick, head_signatures
from kvbench.methods.treekv import sweep_evict
from tests.helpers import needle_sample

# ---------------------------------------------------------------- KVCrush

# 4 KV heads x 8 candidates. Top half per head: h0 {0,1,2,3}, h1 {4,5,6,7}, h2 {0,2,4,6}, h3 {0,1,6,7}.
HAND_SCORES = torch.tensor(
    [
        [8.0, 7, 6, 5, 4, 3, 2, 1],
        [1.0, 2, 3, 4, 5, 6, 7, 8],
        [8.0, 1, 7, 2, 6, 3, 5, 4],
        [8.0, 7, 1, 2, 3, 4, 5, 6],
    ]
)
HAND_SIGNATURES = [  # bits h0..h3 per candidate, by hand from the top halves above
    [1, 0, 1, 1],
    [1, 0, 0, 1],
    [1, 0, 1, 0],
    [1, 0, 0, 0],
    [0, 1, 1, 0],
    [0, 1, 0, 0],
    [0, 1, 1, 1],
    [0, 1, 0, 1],
]
# Hamming distances to the anchor, stable order by (distance, candidate), picks at sorted indices 0, 2, 5 (i*8//3):
#   zeros  0000: d = 3 2 2 1 2 1 3 2 -> order 3 5 1 2 4 7 0 6 -> picks 3, 1, 7
#   ones   1111: d = 1 2 2 3 2 3 1 2 -> order 0 6 1 2 4 7 3 5 -> picks 0, 1, 7
#   alternate 0101: d = 3 2 4 3 2 1 1 0 -> order 7 5 6 1 4 0 3 2 -> picks 7, 6, 0
#   mean: every bit is set for exactly half the candidates (top-half rule), the tie counts as 1 -> as ones
HAND_PICKS = {"zeros": [1, 3, 7], "ones": [0, 1, 7], "alternate": [0, 6, 7], "mean": [0, 1, 7]}


def test_kvcrush_signatures_and_picks_match_the_hand_calculation():
    assert head_signatures(HAND_SCORES).int().tolist() == HAND_SIGNATURES
    for mode, expected in HAND_PICKS.items():
        assert sorted(crush_pick(HAND_SCORES, 3, mode, seed=0).tolist()) == expected, mode


def test_kvcrush_random_anchor_is_seeded_and_follows_the_same_rule():
    signatures = head_signatures(HAND_SCORES)
    first = anchor(signatures, "random", seed=7)
    assert torch.equal(first, anchor(signatures, "random", seed=7))
    distance = (signatures ^ first[None]).sum(dim=1).tolist()
    order = sorted(range(8), key=lambda c: (distance[c], c))
    assert sorted(crush_pick(HAND_SCORES, 3, "random", seed=7).tolist()) == sorted(order[i * 8 // 3] for i in range(3))


@pytest.mark.parametrize("base", ["snapkv", "pyramidkv"])
def test_kvcrush_fraction_zero_is_the_base_and_budgets_are_exact(tiny_lm, base):
    sample = needle_sample(max_new_tokens=8)
    jobs = [Job(build_method({"name": base}), 48, "base")]
    jobs.append(Job(build_method({"name": "kvcrush", "base": base, "crush_fraction": 0.0}), 48, "crush0"))
    for mode in ("alternate", "random", "zeros"):
        jobs.append(
            Job(build_method({"name": "kvcrush", "base": base, "anchor": mode, "crush_fraction": 0.25}), 48, mode)
        )
    rows = {
        job.key: row
        for job, row in run_sample(tiny_lm, sample, jobs, RunOptions(compress="prompt", seed=0, fail_fast=True))
    }
    assert rows["crush0"]["output_ids"] == rows["base"]["output_ids"]
    assert rows["crush0"]["kept_per_layer_compressed"] == rows["base"]["kept_per_layer_compressed"]
    assert rows["crush0"]["kv_bytes_compressed"] == rows["base"]["kv_bytes_compressed"]
    for mode in ("alternate", "random", "zeros"):
        # exactly the layer budgets
        assert rows[mode]["kept_per_layer_compressed"] == rows["base"]["kept_per_layer_compressed"], mode
        assert rows[mode]["kv_bytes_compressed"] == rows["base"]["kv_bytes_compressed"]


def test_kvcrush_bad_input_is_one_line():
    with pytest.raises(
        ValueError, match=r"^kvcrush cannot wrap 'h2o' \(not a scoring method\)\. Valid bases: .*snapkv"
    ):
        build_method({"name": "kvcrush", "base": "h2o"})
    with pytest.raises(ValueError, match="Valid anchors: random, zeros, ones, mean, alternate"):
        build_method({"name": "kvcrush", "anchor": "middle"})


# ---------------------------------------------------------------- TreeKV-R


def reference_sweep(length: int, sinks: int, window: int, budget: int) -> list[int]:
    """The cursor rule with equal scores, written out separately: walk the evictable part with a pair cursor,
    drop the newer of each pair (equal scores), step one slot on, start over at the sinks when the pair would
    reach the protected window."""
    slots = list(range(length))
    cursor = sinks
    while len(slots) > budget:
        if cursor + 1 >= len(slots) - window:
            cursor = sinks
        slots.pop(cursor + 1)
        cursor += 1
    return slots


# T = 64, B = 16, 4 sinks, window B // 4 = 4 (by hand): pass 1 keeps 4, 6, ..., 58; pass 2 keeps 4, 8, ..., 56;
# pass 3 needs 6 more evictions: drops 8, 16, ..., 48 and leaves 52, 56.
GOLDEN_T64_B16 = [0, 1, 2, 3, 4, 12, 20, 28, 36, 44, 52, 56, 60, 61, 62, 63]


def test_treekv_constant_scores_match_the_golden_list_and_the_reference():
    kept, _, _ = sweep_evict([1.0] * 64, (4, 60), 0, 48)
    assert kept == reference_sweep(64, 4, 4, 16) == GOLDEN_T64_B16


def test_treekv_survivor_is_never_less_important_than_the_evicted():
    rng = random.Random(0)
    scores = [rng.random() for _ in range(200)]
    kept, _, pairs = sweep_evict(scores, (4, 180), 0, 150)
    assert len(kept) == 50 and len(pairs) == 150
    assert all(scores[survivor] >= scores[evicted] for survivor, evicted in pairs)
    assert kept[:4] == [0, 1, 2, 3] and kept[-20:] == list(range(180, 200))


def test_treekv_holds_exactly_the_budget_after_every_step(tiny_lm):
    """Prefill compression and 40 decode steps: every (layer, KV head) holds exactly B after each forward; the
    sinks and the newest window are always there; density rises towards the end."""
    budget, steps = 16, 40
    sample = Sample(
        "s", "alpha beta gamma delta " * 30, "Which?", "A:", ["x"], "string_match_all", steps, meta={"ignore_eos": True}
    )
    method = build_method({"name": "treekv"})

    class SizeProbe:
        sizes: list[int] = []
        intact = True

        def on_attention(self, layer_idx, query, layer, query_positions, scaling):
            newest = int(query_positions[-1])
            SizeProbe.sizes.append(layer.get_seq_length())
            window = torch.arange(newest - 3, newest + 1)
            SizeProbe.intact &= bool(
                (layer.positions[:, -4:] == window).all() and (layer.positions[:, :4] == torch.arange(4)).all()
            )

    original_setup = method.setup

    def setup(cache, ctx):
        original_setup(cache, ctx)
        cache.observers.insert(0, SizeProbe())

    method.setup = setup  # test-local probe on this one object
    [(job, row)] = list(
        run_sample(
            tiny_lm, sample, [Job(method, budget, "treekv")], RunOptions(compress="prompt", seed=0, fail_fast=True)
        )
    )
    layers = tiny_lm.config.num_hidden_layers
    assert row["kept_per_layer_compressed"] == [budget] * layers
    assert SizeProbe.sizes == [budget] * (layers * (steps - 1))
    assert SizeProbe.intact
    assert row["output_tokens"] == steps


def test_treekv_bad_input_is_one_line():
    with pytest.raises(ValueError, match="Valid tie_breaks: newer, older"):
        build_method({"name": "treekv", "tie_break": "random"})


@pytest.mark.parametrize("candidates", [5, 8, 33])
def test_kvcrush_mean_anchor_always_equals_ones(candidates):
    """Top-half signatures set each bit for ceil(N/2) candidates, so the per-bit majority is all ones."""
    scores = torch.rand(3, candidates, generator=torch.Generator().manual_seed(candidates))
    assert torch.equal(crush_pick(scores, 4, "mean", 0), crush_pick(scores, 4, "ones", 0))
