"""kvcompose and headkv: golden cases on hand-made tensors from the papers' / peers' formulas, exact budgets, the
full cache when the budget holds the prompt, the extra pass's transient bytes in the row's peak, the cached head
profile and a layer subset's rows, composability and bad hyperparameters refused in one line."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import kvbench.api as kv
from kvbench.engine.cache import PAD_POSITION, KVLayer, LayerSubset
from kvbench.engine.generation import prefill
from kvbench.engine.measure import Stopwatch
from kvbench.harness.sample import Sample
from kvbench.methods import build_method
from kvbench.methods.base import CompressionContext
from kvbench.methods.headkv import calibration_example, capped_allocation, head_capacities, needle_topk_scores
from kvbench.methods.kvcompose import SecondPassScorer
from kvbench.methods.scoring import SweepShared


def prompt(count: int) -> list[int]:
    return torch.randint(100, 40000, (count,), generator=torch.Generator().manual_seed(count)).tolist()


def run(lm, method, ids, budget, cache_dir, stats=None):
    """Prefill `ids`, then setup / compress on a copy (compress is called even when the prompt fits)."""
    pre = prefill(lm, ids, method.window_queries_needed(), Stopwatch(lm.device), [])
    cache = pre.cache.copy()
    ctx = CompressionContext.for_prompt(
        lm, budget, len(ids), pre, input_ids=ids, cache_dir=cache_dir, prefill_stats=stats
    )
    method.setup(cache, ctx)
    method.compress(cache, ctx)
    return pre.cache, cache, ctx


def kept_positions(layer: KVLayer) -> list[list[int]]:
    return [[p for p in row if p != PAD_POSITION] for row in layer.positions.tolist()]


# ---------------------------------------------------------------- kvcompose


def reference_keep(scores: list[list[list[float]]], budget: int, structured: bool) -> list[list[set[int]]]:
    """KVCompose's selection written with plain lists (agg_head=mean, no lower bound): composite j of a layer is
    the mean of its heads' j-th best scores, layer 0 takes the max over layers, a global top of budget x L
    composites (or budget x L x H per-head ranks, unstructured) gives the counts, each head keeps its best."""
    num_layers, num_heads, length = len(scores), len(scores[0]), len(scores[0][0])
    ranked = [[sorted(head, reverse=True) for head in layer] for layer in scores]
    if structured:
        composite = [
            [sum(ranked[i][h][j] for h in range(num_heads)) / num_heads for j in range(length)]
            for i in range(num_layers)
        ]
        composite[0] = [max(composite[i][j] for i in range(num_layers)) for j in range(length)]
        # Layer 0's composites equal another layer's where that layer holds the maximum: ties go to the earlier layer.
        entries = sorted((-composite[i][j], i) for i in range(num_layers) for j in range(length))
        chosen = [owner for _, owner in entries[: budget * num_layers]]
        counts = [[chosen.count(i)] * num_heads for i in range(num_layers)]
    else:
        entries = sorted(
            ((ranked[i][h][j], (i, h)) for i in range(num_layers) for h in range(num_heads) for j in range(length)),
            reverse=True,
        )
        chosen = [owner for _, owner in entries[: budget * num_layers * num_heads]]
        counts = [[chosen.count((i, h)) for h in range(num_heads)] for i in range(num_layers)]
    return [
        [set(sorted(range(length), key=lambda t: -scores[i][h][t])[: counts[i][h]]) for h in range(num_heads)]
        for i in range(num_layers)
    ]


# Distinct values: no ties, so any correct top-k agrees with the reference.
SCORES = [
    [[0.90, 0.10, 0.50, 0.30, 0.05], [0.20, 0.80, 0.60, 0.15, 0.40]],
    [[0.35, 0.25, 0.95, 0.12, 0.70], [0.45, 0.55, 0.08, 0.65, 0.02]],
    [[0.11, 0.21, 0.31, 0.41, 0.51], [0.99, 0.03, 0.13, 0.23, 0.33]],
]


@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("budget", [1, 2, 3])
def test_kvcompose_keeps_the_composite_token_selection(structured, budget):
    method = build_method({"name": "kvcompose", "structured": structured, "add_mean_across_heads": False})
    masks = method.keep_masks(torch.tensor(SCORES), budget)
    expected = reference_keep(SCORES, budget, structured)
    assert masks.sum().item() == budget * 3 * 2  # exactly budget x L x Hkv entries
    for i in range(3):
        for h in range(2):
            assert set(torch.nonzero(masks[i, h]).flatten().tolist()) == expected[i][h], (i, h)
        if structured:  # composite tokens: every head of a layer holds the same count
            assert masks[i, 0].sum() == masks[i, 1].sum()


def test_kvcompose_layer_zero_keeps_at_least_any_other_layer_and_the_lower_bound_holds():
    scores = torch.tensor(SCORES)
    scores[0] *= 0.01  # layer 0 alone would lose everything
    method = build_method({"name": "kvcompose", "add_mean_across_heads": False})
    counts = method.keep_masks(scores, 2)[:, 0].sum(dim=-1)
    assert counts[0] == counts.max()
    # budget 2 x 3 layers = 6 composites. Composites (head means of the sorted scores; layer 0 the max over layers):
    # L0 .85 .625 .4 ..., L1 .8 .625 .4 ..., L2 .75 .37 ...: the top 6 are 3 of L0, 2 of L1, 1 of L2. With
    # keep_token_lower_bound=2 the 6 bounded composites win: 2 per layer.
    assert method.keep_masks(torch.tensor(SCORES), 2)[:, 0].sum(dim=-1).tolist() == [3, 2, 1]
    bounded = build_method({"name": "kvcompose", "add_mean_across_heads": False, "keep_token_lower_bound": 2})
    assert bounded.keep_masks(torch.tensor(SCORES), 2)[:, 0].sum(dim=-1).tolist() == [2, 2, 2]


def test_kvcompose_enhancements_multiply_by_value_norms_and_add_the_head_mean():
    scores = torch.tensor(SCORES)
    values = [torch.arange(1.0, 1.0 + 2 * 5 * 2).view(2, 5, 2) * (i + 1) for i in range(3)]
    method = build_method({"name": "kvcompose", "add_v_norm": True})
    enhanced = method.enhance(scores, values)
    for i in range(3):
        weighted = [[SCORES[i][h][t] * math.hypot(*values[i][h, t].tolist()) for t in range(5)] for h in range(2)]
        for h in range(2):
            for t in range(5):
                expected = weighted[h][t] + (weighted[0][t] + weighted[1][t]) / 2
                assert enhanced[i, h, t].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("task", ["max", "mean"])
def test_kvcompose_second_pass_scores_are_the_aggregated_attention_on_the_first_copy(task):
    """2 query heads over 1 KV head; 3 first-copy slots, 2 second-pass queries (causal over their own keys)."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, 5, 4, generator=generator)
    query = torch.randn(1, 2, 2, 4, generator=generator)
    layer = KVLayer()
    layer.update(keys, torch.zeros_like(keys), positions=torch.arange(5))
    scorer = SecondPassScorer(3, task, row_block=1)
    scorer.on_attention(0, query, layer, torch.tensor([3, 4]), 0.5)
    for head in range(2):
        rows = []
        for row, position in enumerate((3, 4)):
            logits = [0.5 * float(query[0, head, row] @ keys[0, 0, k]) for k in range(position + 1)]
            peak = max(logits)
            weights = [math.exp(x - peak) for x in logits]
            rows.append([w / sum(weights) for w in weights[:3]])
        for slot in range(3):
            column = [r[slot] for r in rows]
            expected = max(column) if task == "max" else sum(column) / 2
            assert scorer.scores[0][head, slot].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("structured", [True, False])
def test_kvcompose_on_the_tiny_model_keeps_the_exact_budget_and_unchanged_slots(tiny_lm, tmp_path, structured):
    ids = prompt(50)
    method = build_method({"name": "kvcompose", "structured": structured})
    full, cache, ctx = run(tiny_lm, method, ids, 12, tmp_path)
    layers, heads = len(cache.layers), tiny_lm.num_kv_heads
    assert cache.kept_entries() == 12 * layers * heads
    counts = [[len(row) for row in kept_positions(layer)] for layer in cache.layers]
    if structured:  # one count per layer, no padding: a plain layer
        assert all(len(set(row)) == 1 for row in counts) and not any(layer.padded for layer in cache.layers)
    assert len({c for row in counts for c in row}) > 1  # budgets move between layers (or heads)
    # One extra pass of T tokens; the job's T slots + the scratch grown to 2T are held during it.
    assert ctx.record["kvcompose_forward_tokens"] == 50
    assert ctx.record["transient_kv_bytes"] == 3 * full.kv_bytes()
    for reference, layer in zip(full.layers, cache.layers, strict=True):
        for h, positions in enumerate(kept_positions(layer)):
            assert torch.equal(layer.keys[0, h, : len(positions)], reference.keys[0, h, positions])


def test_kvcompose_budget_holding_the_prompt_keeps_everything_and_a_sweep_scores_once(tiny_lm, tmp_path):
    ids = prompt(40)
    shared = SweepShared()
    full, cache, _ = run(tiny_lm, build_method({"name": "kvcompose"}), ids, 40, tmp_path, shared)
    assert cache.kept_entries() == full.kept_entries()
    _, again, ctx = run(tiny_lm, build_method({"name": "kvcompose"}), ids, 10, tmp_path, shared)
    assert ctx.record["kvcompose_scores_shared"] is True
    assert ctx.record["transient_kv_bytes"] == 3 * full.kv_bytes()  # the cost of one compression, every row
    _, fresh, _ = run(tiny_lm, build_method({"name": "kvcompose"}), ids, 10, tmp_path)
    for mine, theirs in zip(again.layers, fresh.layers, strict=True):
        assert torch.equal(mine.positions, theirs.positions)


def test_kvcompose_transient_bytes_are_the_rows_peak(tiny_lm, tmp_path):
    sample = Sample(
        "t", "The sky is blue. " * 12, "What colour is the sky?", "Answer:", ["blue"], "string_match_all", 3
    )
    rows = kv.evaluate(tiny_lm, [sample], [build_method({"name": "kvcompose"})], [16], cache_dir=tmp_path)
    (row,) = [r for r in rows if r["method"] == "kvcompose"]
    assert row["status"] == "ok", row.get("error")
    transient = row["method_record"]["transient_kv_bytes"]
    assert row["kv_bytes_peak"] == transient > row["kv_bytes"]


@pytest.mark.parametrize(
    "params",
    [{"agg_task": "sum"}, {"agg_group": "median"}, {"agg_head": "min"}, {"keep_token_lower_bound": -1}],
)
def test_kvcompose_refuses_bad_hyperparameters_in_one_line(params):
    with pytest.raises(ValueError) as refused:
        build_method({"name": "kvcompose", **params})
    message = str(refused.value)
    assert "\n" not in message and ("kvcompose" in message or next(iter(params)) in message)


# ---------------------------------------------------------------- headkv


def test_headkv_needle_score_counts_the_top_k_attention_inside_the_needle():
    """HeadKV-R2's per-step score: the head's k most attended keys, those inside the needle, summed / needle length."""
    probs = torch.tensor(
        [
            [[0.05, 0.40, 0.30, 0.05, 0.20], [0.10, 0.10, 0.50, 0.25, 0.05]],
            [[0.60, 0.10, 0.10, 0.10, 0.10], [0.02, 0.03, 0.05, 0.10, 0.80]],
        ]
    )
    positions = torch.arange(5).expand(2, 5)
    start, end = 1, 3  # the needle is positions 1 and 2; k = 2
    scores = needle_topk_scores(probs, positions, start, end, end - start)
    # head 0: step 0 tops {1: .40, 2: .30} both inside; step 1 tops {2: .50, 3: .25}, only 2 inside.
    # head 1: step 0 tops {0: .60, then the first .10 (slot 1)} -> .10 inside; step 1 tops {4, 3}: none inside.
    assert scores.tolist() == pytest.approx([(0.40 + 0.30 + 0.50) / 2, 0.10 / 2])


def test_headkv_capacities_follow_the_basic_share_plus_the_importance_pool():
    importance = torch.tensor([[4.0, 2.0], [2.0, 0.0]])  # normalised: .5 .25 .25 0
    # beta = 2, S = 10: basic share 5 per head; pool 2 layers x 2 heads x 10 / 2 = 20.
    assert head_capacities(importance, [10, 10], [40, 40], 2.0) == [[15, 10], [10, 5]]
    # A cap of 12: the first head's surplus 3 goes to the others in proportion to 10 : 10 : 5.
    assert head_capacities(importance, [10, 10], [12, 12], 2.0) == [[12, 11], [11, 6]]
    # beta = 1: everything by importance; a zero-importance head gets nothing.
    assert head_capacities(importance, [10, 10], [40, 40], 1.0) == [[20, 10], [10, 0]]
    # All-zero importance: uniform.
    assert head_capacities(torch.zeros(2, 2), [10, 10], [40, 40], 1.01) == [[10, 10], [10, 10]]
    assert capped_allocation([1.0, 1.0], [3, 3], 10) == [3, 3]  # more than every cap: everything


def test_headkv_calibration_example_marks_the_needle_span(tiny_lm):
    ids, start, end, steps = calibration_example(tiny_lm.tokenizer, 200, 0.5, random.Random(3))
    needle = tiny_lm.tokenizer.decode(ids[start:end])
    assert "picked up the" in needle and needle.rstrip().endswith(".") and "holds the number" in needle
    assert 190 <= len(ids) <= 201 and steps >= 1  # about 200 tokens with BOS and the answer, less its last token
    prompt_ids = ids[: len(ids) - (steps - 1)]  # without the teacher-forced answer tokens
    assert tiny_lm.tokenizer.decode(prompt_ids).endswith("picked up?\nAnswer:")


def test_headkv_on_the_tiny_model_allocates_from_the_cached_profile(tiny_lm, tmp_path):
    ids = prompt(60)
    method = build_method({"name": "headkv", "calibration_tokens": 128, "calibration_samples": 2})
    full, cache, ctx = run(tiny_lm, method, ids, 20, tmp_path)
    layers, heads = len(cache.layers), tiny_lm.num_kv_heads
    assert cache.kept_entries() == 20 * layers * heads
    (path,) = (tmp_path / "headkv").iterdir()  # the profile, and nothing else, under the cache dir
    assert path == method.profile_path(tiny_lm, tmp_path)
    # Rewrite the cached profile: the next compression allocates from it (no recalibration).
    num_query = tiny_lm.config.num_attention_heads
    profile = {str(i): [0.0] * num_query for i in range(layers)}
    profile["2"] = [1.0] * num_query  # only layer 2's heads matter
    path.write_text(json.dumps({"scores": profile}))
    params = {"calibration_tokens": 128, "calibration_samples": 2, "beta": 2.0, "base_params": {"window": 4}}
    full, cache, ctx = run(tiny_lm, build_method({"name": "headkv", **params}), ids, 20, tmp_path)
    # S = 20 - 4 = 16 per head: basic share 16 - 16 / 2 = 8; the pool (4 layers x 2 heads x 8 = 64) goes to layer
    # 2's heads only (32 each); every head also keeps snapkv's window of 4.
    kept = [[len(row) for row in kept_positions(layer)] for layer in cache.layers]
    assert kept == [[8 + 4] * heads, [8 + 4] * heads, [40 + 4] * heads, [8 + 4] * heads]
    assert sum(map(sum, kept)) == 20 * layers * heads
    assert (ctx.record["headkv_head_budget_min"], ctx.record["headkv_head_budget_max"]) == (8, 40)
    # Each head keeps its own best slots by the base (snapkv window 4) plus the window.
    snap = build_method({"name": "snapkv", "window": 4})
    pre = prefill(tiny_lm, ids, 4, Stopwatch(tiny_lm.device), [])
    sctx = CompressionContext.for_prompt(tiny_lm, 20, 60, pre, input_ids=ids)
    for layer_idx, layer in enumerate(cache.layers):
        verdict = snap.layer_scores(layer_idx, pre.cache.layers[layer_idx], 20, sctx)
        for h, positions in enumerate(kept_positions(layer)):
            best = torch.sort(verdict.scores[h], descending=True, stable=True).indices[: len(positions) - 4]
            assert positions == sorted(best.tolist()) + list(range(56, 60))


def test_headkv_budget_holding_the_prompt_keeps_everything(tiny_lm, tmp_path):
    ids = prompt(48)
    for extra in (0, 5):
        method = build_method({"name": "headkv", "calibration_tokens": 128, "calibration_samples": 1})
        full, cache, _ = run(tiny_lm, method, ids, 48 + extra, tmp_path)
        assert cache.kept_entries() == full.kept_entries()
        for reference, layer in zip(full.layers, cache.layers, strict=True):
            assert torch.equal(layer.positions, reference.positions) and torch.equal(layer.keys, reference.keys)


def test_headkv_on_a_layer_subset_takes_the_views_profile_rows(tiny_lm, tmp_path):
    method = build_method({"name": "headkv", "calibration_tokens": 128, "calibration_samples": 1})
    num_query, num_kv = tiny_lm.config.num_attention_heads, tiny_lm.num_kv_heads
    profile = {str(i): [float(10 * i + h) for h in range(num_query)] for i in range(4)}
    path = method.profile_path(tiny_lm, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"scores": profile}))
    pre = prefill(tiny_lm, prompt(30), 0, Stopwatch(tiny_lm.device), [])
    view = LayerSubset(pre.cache.copy(), [1, 3])
    ctx = CompressionContext.for_prompt(tiny_lm, 10, 30, pre, layers=[1, 3], cache_dir=tmp_path)
    group = num_query // num_kv
    expected = [[sum(profile[str(i)][k * group : (k + 1) * group]) / group for k in range(num_kv)] for i in (1, 3)]
    assert method.head_importance(view, ctx).tolist() == expected


@pytest.mark.parametrize("base", ["pyramidkv", "knorm", "keydiff"])
def test_headkv_composes_with_other_scorers_at_the_exact_budget(tiny_lm, tmp_path, base):
    ids = prompt(60)
    method = build_method({"name": "headkv", "base": base, "calibration_tokens": 128, "calibration_samples": 1})
    _, cache, _ = run(tiny_lm, method, ids, 24, tmp_path)
    assert cache.kept_entries() == 24 * len(cache.layers) * tiny_lm.num_kv_heads


@pytest.mark.parametrize(
    "params",
    [{"beta": 0.5}, {"calibration_tokens": 10}, {"calibration_samples": 0}, {"decode_budget": 64}],
)
def test_headkv_refuses_bad_hyperparameters_in_one_line(params):
    with pytest.raises(ValueError) as refused:
        build_method({"name": "headkv", **params})
    assert "\n" not in str(refused.value) and "headkv" in str(refused.value)
