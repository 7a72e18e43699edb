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
from kvbench.engine.generation import prefill
from kvbench.engine.measure import Stopwatch
from kvbench.engine.rope import rotary_embedding, unrotate_keys
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.methods import build_method
from kvbench.methods.adakv import head_budgets
from kvbench.methods.base import CompressionContext
from kvbench.methods.cap import capacity_scores
from kvbench.methods.chunkkv import chunk_selection
from kvbench.methods.criticalkv import projected_value_norms, two_stage_scores
from kvbench.methods.cur import cur_scores
from kvbench.methods.keydiff import keydiff_scores
from kvbench.methods.leverage import gaussian_sketch, leverage_scores, zscore
from kvbench.methods.noncausal import noncausal_chunk_attention
from tests.helpers import assert_kept_slots_are_untouched, compressed_copy, needle_sample


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


# --- LagKV ----------------------------------------------------------------------------------------------------


def lag_score_by_hand(rows: list[list[float]], reference: list[list[float]]) -> list[float]:
    """Softmax over the partition of the std (n-1) of each row normalised by the reference's per-channel range."""
    dims = range(len(rows[0]))
    low = [min(r[c] for r in reference) for c in dims]
    high = [max(r[c] for r in reference) for c in dims]
    spreads = []
    for row in rows:
        x = [(row[c] - low[c]) / (high[c] - low[c]) for c in dims]
        mean = sum(x) / len(x)
        spreads.append(math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1)))
    weights = [math.exp(s) for s in spreads]
    return [w / sum(weights) for w in weights]


def test_lagkv_scores_follow_the_lag_relative_formula():
    # n_sink=1, lag=2, 8 slots: partitions [1,3) [3,5) [5,7); the last complete one and slot 7 are the tail.
    torch.manual_seed(0)
    keys, values = torch.randn(1, 8, 3), torch.randn(1, 8, 3)
    layer = hand_layer(keys, values)
    method = build_method({"name": "lagkv", "n_sink": 1, "lag_size": 2, "cross_scoring": True})
    scores = method.layer_scores(0, layer, 5, hand_context(5, 8)).scores[0]
    k, v = keys[0].tolist(), values[0].tolist()
    expected = [1.0]
    for start in (1, 3):
        ks = lag_score_by_hand(k[start : start + 2], k[start + 2 : start + 4])
        vs = lag_score_by_hand(v[start : start + 2], v[start + 2 : start + 4])
        expected += [(a + b) / 2 for a, b in zip(ks, vs, strict=True)]
    expected += [1.0, 1.0, 1.0]
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-5)
    # Default (ranks): in each partition the better token scores 1/2, the other 0.
    ranked = build_method({"name": "lagkv", "n_sink": 1, "lag_size": 2}).layer_scores(0, layer, 5, hand_context(5, 8))
    for start in (1, 3):
        pair = expected[start : start + 2]
        assert ranked.scores[0, start : start + 2].tolist() == ([0.5, 0.0] if pair[0] > pair[1] else [0.0, 0.5])
    # Budget 5: the sink, the 3 tail slots, and the better token of the FIRST partition (ties go earlier).
    method = build_method({"name": "lagkv", "n_sink": 1, "lag_size": 2})
    method.compress(KVCacheOf(layer), hand_context(5, 8))
    best_first = 1 if expected[1] > expected[2] else 2
    assert kept_positions(layer) == [[0, best_first, 5, 6, 7]]


def test_lagkv_short_layers_keep_the_sinks_then_the_most_recent():
    layer = hand_layer(torch.randn(2, 9, 4))
    build_method({"name": "lagkv", "n_sink": 2, "lag_size": 4}).compress(KVCacheOf(layer), hand_context(5, 9))
    assert kept_positions(layer) == [[0, 1, 6, 7, 8]] * 2


# --- leverage ---------------------------------------------------------------------------------------------------


def test_leverage_scores_equal_the_hat_matrix_diagonal_of_the_sketched_centred_keys():
    torch.manual_seed(1)
    keys, phi = torch.randn(2, 12, 4), torch.randn(2, 4, 3)
    scores = leverage_scores(keys, phi, ridge=0.05)
    for head in range(2):
        x = (keys[head] - keys[head].mean(dim=0)).double() @ phi[head].double()
        hat = x @ torch.linalg.inv(x.T @ x + 0.05 * torch.eye(3, dtype=torch.float64)) @ x.T
        assert torch.allclose(scores[head].double(), hat.diagonal(), atol=1e-5)


def test_leverage_without_sketch_or_ridge_sums_to_the_rank_and_finds_the_outlier():
    # Exact leverage (phi = I, no ridge): the scores are the hat matrix's diagonal, which sums to its rank d.
    torch.manual_seed(2)
    keys = torch.randn(1, 20, 3) * 0.1
    keys[0, 7] = torch.tensor([5.0, -4.0, 3.0])
    scores = leverage_scores(keys, torch.eye(3)[None], ridge=0.0)
    assert scores.sum().item() == pytest.approx(3.0, abs=1e-4)
    assert int(scores.argmax()) == 7
    z = zscore(scores)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-6) and z.std().item() == pytest.approx(1.0, abs=1e-5)


def test_leverage_on_the_tiny_model_scores_the_unrotated_keys_with_the_seeded_sketch(tiny_lm):
    budget = 24
    method, cache, compressed, ctx = compressed_copy(tiny_lm, {"name": "leverage", "sketch_dimension": 8}, budget)
    rotary = rotary_embedding(tiny_lm.model)
    for layer_idx, (full, layer) in enumerate(zip(cache.layers, compressed.layers, strict=True)):
        keys = unrotate_keys(full.keys[0], full.positions, rotary)
        phi = gaussian_sketch(keys.shape[0], keys.shape[-1], 8, ctx.seed, layer_idx)
        expected = torch.sort(leverage_scores(keys, phi), dim=-1, descending=True, stable=True).indices[:, :budget]
        assert torch.equal(layer.positions, expected.sort(dim=-1).values)
    assert_kept_slots_are_untouched(cache, compressed)


# --- non-causal chunked attention -----------------------------------------------------------------------------


def chunk_sums_by_hand(queries, keys, chunk, scaling, start=0, end=0):
    """Per KV head (group = H / Hkv consecutive query heads), each key's attention from the queries of its chunk."""
    num_heads, num_queries = len(queries), len(queries[0])
    num_kv_heads, length = len(keys), len(keys[0])
    group, first = num_heads // num_kv_heads, length - num_queries
    out = [[0.0] * length for _ in range(num_kv_heads)]
    for lo in range(start, length - end, chunk):
        slots = list(range(lo, min(lo + chunk, length - end)))
        for head in range(num_heads):
            kv = head // group
            for row in slots:
                if row < first:
                    continue
                q = queries[head][row - first]
                logits = [scaling * sum(a * b for a, b in zip(q, keys[kv][s], strict=True)) for s in slots]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                for s, w in zip(slots, weights, strict=True):
                    out[kv][s] += w / sum(weights) / group
    return out


@pytest.mark.parametrize(("num_queries", "start", "end"), [(7, 0, 0), (4, 0, 0), (7, 1, 2)])
def test_noncausal_chunk_attention_matches_the_formula(num_queries, start, end):
    torch.manual_seed(3)
    queries, keys = torch.randn(4, num_queries, 3), torch.randn(2, 7, 3)
    got = noncausal_chunk_attention(queries, keys, 3, 0.7, start, end)
    expected = chunk_sums_by_hand(queries.tolist(), keys.tolist(), 3, 0.7, start, end)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5)
    if num_queries == 7 and start == end == 0:  # every query spreads attention 1 over its chunk, per KV head
        assert got.sum(dim=-1).tolist() == pytest.approx([7.0, 7.0], abs=1e-5)


def test_noncausal_on_the_tiny_model_scores_attention_times_value_norm(tiny_lm):
    budget, cfg = 24, {"name": "noncausal", "chunk_size": 16}
    method = build_method(cfg)
    observer = method.prefill_observer()
    cache, ctx = prefilled_with(tiny_lm, budget, observer)
    compressed = cache.copy()
    method.compress(compressed, ctx)
    for layer_idx, (full, layer) in enumerate(zip(cache.layers, compressed.layers, strict=True)):
        sums = observer.sums[layer_idx]
        # One unit of attention per query (group mean), for each KV head.
        assert sums.sum(dim=-1).tolist() == pytest.approx([full.get_seq_length()] * full.num_heads, rel=1e-4)
        raw = sums * full.values[0].float().norm(dim=-1)
        pooled = torch.nn.functional.avg_pool1d(raw[:, None], 3, stride=1, padding=1)[:, 0]
        expected = torch.sort(pooled, dim=-1, descending=True, stable=True).indices[:, :budget]
        assert torch.equal(layer.positions, expected.sort(dim=-1).values)
    assert_kept_slots_are_untouched(cache, compressed)


def prefilled_with(lm, budget: int, observer):
    """`prefilled`'s prompt, prefilled with `observer` watching (bound to the model when it asks)."""
    text = " ".join(f"Item {i} is {i * 7 % 13}." for i in range(40))
    ids = lm.tokenizer(text)["input_ids"]
    if hasattr(observer, "bind_model"):
        observer.bind_model(lm)
    pre = prefill(lm, ids, 8, Stopwatch(lm.device), [observer])
    ctx = CompressionContext.for_prompt(lm, budget, len(ids), pre, input_ids=ids, prefill_stats=observer)
    return pre.cache, ctx


# --- Compactor --------------------------------------------------------------------------------------------------


def test_compactor_blends_the_two_z_scores_on_the_middle_and_keeps_the_sinks(tiny_lm):
    # 1 KV head, 2 query heads, 14 slots: sinks 2 + 1, the middle 2..12 tiled in chunks of 4 from slot 2.
    torch.manual_seed(4)
    length, budget = 14, 7
    keys, values, queries = torch.randn(1, length, 16), torch.randn(1, length, 16), torch.randn(2, length, 16)
    layer = hand_layer(keys, values)
    method = build_method(
        {"name": "compactor", "sink_size_start": 2, "sink_size_end": 1, "chunk_size": 4, "sketch_dimension": 6}
    )
    observer = method.prefill_observer()
    observer.on_attention(0, queries[None], layer, torch.arange(length), 0.25)
    ctx = CompressionContext(budget, length, 2, 1, lm=tiny_lm, prefill_stats=observer, seed=5)
    scores = method.layer_scores(0, layer, budget, ctx).scores
    middle = slice(2, 13)
    sums = torch.tensor(chunk_sums_by_hand(queries[:, middle].tolist(), keys[:, middle].tolist(), 4, 0.25))
    attention = sums * values[:, middle].norm(dim=-1)
    attention = torch.nn.functional.avg_pool1d(attention[:, None], 3, stride=1, padding=1)[:, 0]
    pre_rope = unrotate_keys(keys, torch.arange(length)[None], rotary_embedding(tiny_lm.model))[:, middle]
    leverage = leverage_scores(pre_rope, gaussian_sketch(1, 16, 6, 5, 0))
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    expected = (1 - budget / length) * z(leverage) + z(attention)
    assert torch.allclose(scores[:, middle], expected, atol=1e-4)
    assert scores[0, [0, 1, 13]].tolist() == [math.inf] * 3
    method.compress(KVCacheOf(layer), ctx)
    best = sorted((torch.sort(expected[0], descending=True, stable=True).indices[:4] + 2).tolist())
    assert kept_positions(layer) == [sorted([0, 1, 13, *best])]


# --- CUR (CurDKV) -------------------------------------------------------------------------------------------------


def test_cur_scores_are_locally_normalised_row_energies():
    # 5 slots, windows of 2: [0,1] [2,3] [4 + zero padding].
    keys = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 0.0], [0.0, 1.0]]])
    values = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0]]])
    k2, v2 = [1.0, 4.0, 2.0, 9.0, 1.0], [4.0, 1.0, 1.0, 2.0, 9.0]
    local_k = [1 / 5, 4 / 5, 2 / 11, 9 / 11, 1.0]
    local_v = [4 / 5, 1 / 5, 1 / 3, 2 / 3, 1.0]
    product = [a * b for a, b in zip(local_k, local_v, strict=True)]
    expected = [x / sum(product) for x in product]
    assert torch.allclose(cur_scores(keys, values, "kv_product", 2)[0], torch.tensor(expected), atol=1e-6)
    global_avg = [(a + b) / 2 for a, b in zip(k2, v2, strict=True)]
    expected_avg = [x / sum(global_avg) for x in global_avg]
    assert torch.allclose(cur_scores(keys, values, "kv_avg", None)[0], torch.tensor(expected_avg), atol=1e-6)
    # Budget 3 with one sink: slot 0, then the two best of the rest by kv_product (slots 4 and 3).
    layer = hand_layer(keys, values)
    build_method({"name": "cur", "num_sinks": 1, "local_window_size": 2}).compress(KVCacheOf(layer), hand_context(3, 5))
    ranked = sorted(range(1, 5), key=lambda i: -expected[i])[:2]
    assert kept_positions(layer) == [sorted([0, *ranked])]


# --- CAP (CapKV) --------------------------------------------------------------------------------------------------


def test_cap_scores_follow_the_weighted_leverage_formula():
    # 2 query heads over 1 KV head, 5 slots of which the first is a sink (not scored, not in A).
    torch.manual_seed(6)
    anchor, keys, values = torch.randn(2, 3), torch.randn(1, 5, 3), torch.randn(1, 5, 3)
    scored = torch.tensor([[False, True, True, True, True]])
    got = capacity_scores(anchor, keys, values, scored, tau=2.0, epsilon=0.1)
    expected = torch.zeros(5, dtype=torch.float64)
    for head in range(2):
        a = anchor[head].double()
        cos = [float(a @ keys[0, i].double() / (a.norm() * keys[0, i].double().norm())) for i in range(5)]
        top = max(2.0 * c for c in cos[1:])
        w = [math.exp(2.0 * c - top) if i > 0 else 0.0 for i, c in enumerate(cos)]
        capacity = torch.eye(3, dtype=torch.float64)
        for i in range(1, 5):
            v = values[0, i].double()
            capacity += (w[i] + 0.1) * torch.outer(v, v)
        inverse = torch.linalg.inv(capacity)
        for i in range(5):
            v = values[0, i].double()
            expected[i] += w[i] * float(v @ inverse @ v) / 2
    assert torch.allclose(got[0].double(), expected, atol=1e-5)


def test_cap_on_the_tiny_model_keeps_its_sinks_and_the_budget(tiny_lm):
    budget = 24
    method, cache, compressed, ctx = compressed_copy_observed(tiny_lm, {"name": "cap"}, budget)
    for layer in compressed.layers:
        assert layer.get_seq_length() == budget
        assert (layer.positions[:, :4] == torch.arange(4)).all()
    assert_kept_slots_are_untouched(cache, compressed)


def compressed_copy_observed(lm, cfg: dict, budget: int):
    """`compressed_copy` for a method with a prefill observer."""
    method = build_method(cfg)
    cache, ctx = prefilled_with(lm, budget, method.prefill_observer())
    compressed = cache.copy()
    method.setup(compressed, ctx)
    method.compress(compressed, ctx)
    return method, cache, compressed, ctx


# --- CriticalKV / CriticalAdaKV -----------------------------------------------------------------------------------


def test_projected_value_norms_are_the_l1_norms_through_each_heads_output_slice():
    # 2 query heads sharing 1 KV head, d = 2, hidden = 3: W_o [hidden, H * d].
    values = torch.tensor([[[1.0, 2.0], [-1.0, 0.5]]])
    weight = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.0, 1.0, 0.0, 1.0], [1.0, 1.0, -1.0, 0.0]])
    expected = []
    for v in values[0].tolist():
        per_head = []
        for head in range(2):
            out = [sum(weight[o, head * 2 + j].item() * v[j] for j in range(2)) for o in range(3)]
            per_head.append(sum(abs(x) for x in out))
        expected.append(sum(per_head) / 2)
    assert torch.allclose(projected_value_norms(values, weight, 2)[0], torch.tensor(expected))


def test_two_stage_scores_keep_the_first_stage_then_rescale():
    scores = torch.tensor([[0.5, 0.4, 0.1, 0.0, float("-inf")]])
    norms = torch.tensor([[1.0, 0.1, 10.0, 3.0, 5.0]])
    merged = two_stage_scores(scores, norms, [1], 0.01)
    assert merged[0].tolist() == pytest.approx([math.inf, 0.041, 1.1, 0.03, -math.inf])


def test_criticalkv_on_the_tiny_model_follows_the_two_stages(tiny_lm):
    budget, window = 24, 8
    cfg = {"name": "criticalkv", "base_params": {"window": window}}
    method, cache, compressed, ctx = compressed_copy(tiny_lm, cfg, budget, window)
    for layer_idx, (full, layer) in enumerate(zip(cache.layers, compressed.layers, strict=True)):
        base = method.inner.layer_scores(layer_idx, full, budget, ctx).scores
        weight = tiny_lm.model.model.layers[layer_idx].self_attn.o_proj.weight.detach()
        norms = projected_value_norms(full.values[0, :, : base.shape[1]], weight, ctx.num_heads)
        for head in range(full.num_heads):
            first = torch.sort(base[head], descending=True, stable=True).indices[: (budget - window) // 2]
            rest = ((base[head] + 1e-4) * norms[head]).index_fill(0, first, -math.inf)
            second = torch.sort(rest, descending=True, stable=True).indices[: budget - window - len(first)]
            window_slots = torch.arange(base.shape[1], full.get_seq_length())
            expected = torch.cat([first, second, window_slots]).sort().values
            assert torch.equal(layer.positions[head], expected)
    assert_kept_slots_are_untouched(cache, compressed)


def test_criticaladakv_heads_keep_the_adakv_budgets_and_the_layer_total(tiny_lm):
    budget, window = 24, 8
    cfg = {"name": "criticaladakv", "base_params": {"window": window}}
    method, cache, compressed, ctx = compressed_copy(tiny_lm, cfg, budget, window)
    for layer_idx, (full, layer) in enumerate(zip(cache.layers, compressed.layers, strict=True)):
        base = method.inner.layer_scores(layer_idx, full, budget, ctx).scores
        heads = head_budgets(base, budget - window, 0.2)
        assert layer.lengths().tolist() == [b + window for b in heads]
        assert int(layer.lengths().sum()) == budget * full.num_heads
        weight = tiny_lm.model.model.layers[layer_idx].self_attn.o_proj.weight.detach()
        norms = projected_value_norms(full.values[0, :, : base.shape[1]], weight, ctx.num_heads)
        merged = two_stage_scores(base, norms, [b // 2 for b in heads], 1e-4)
        for head, count in enumerate(heads):
            chosen = torch.sort(merged[head], descending=True, stable=True).indices[:count]
            kept = layer.positions[head, : count + window]
            assert torch.equal(kept[:count], chosen.sort().values)
    assert_kept_slots_are_untouched(cache, compressed)


# --- ChunkKV ------------------------------------------------------------------------------------------------------


def test_chunkkv_keeps_whole_chunks_by_mean_score_then_the_best_of_the_next():
    # Head sums: [1, 1, 1 | 5, 0, 4 | 2]: chunk means 1, 3, 2 -> chunk 1 whole, then chunk 2 (slot 6), then
    # the best slot of chunk 0 (a tie: the earliest, slot 0).
    scores = torch.tensor([[0.5, 0.5, 0.5, 2.0, 0.0, 3.0, 1.0], [0.5, 0.5, 0.5, 3.0, 0.0, 1.0, 1.0]])
    assert chunk_selection(scores, 3, 3).tolist() == [3, 4, 5]
    assert chunk_selection(scores, 3, 4).tolist() == [3, 4, 5, 6]
    assert chunk_selection(scores, 3, 5).tolist() == [0, 3, 4, 5, 6]
    assert chunk_selection(scores, 3, 2).tolist() == [3, 5]  # the best chunk does not fit: its best slots
    assert chunk_selection(scores, 3, 9).tolist() == list(range(7))


def test_chunkkv_on_the_tiny_model_keeps_one_chunk_set_per_layer_and_the_window(tiny_lm):
    budget, window = 24, 8
    cfg = {"name": "chunkkv", "chunk_length": 4, "base_params": {"window": window}}
    method, cache, compressed, ctx = compressed_copy(tiny_lm, cfg, budget, window)
    for layer_idx, (full, layer) in enumerate(zip(cache.layers, compressed.layers, strict=True)):
        base = method.inner.layer_scores(layer_idx, full, budget, ctx).scores
        chosen = chunk_selection(base, 4, budget - window).tolist()
        expected = chosen + list(range(base.shape[1], full.get_seq_length()))
        assert layer.positions.tolist() == [expected] * full.num_heads
        whole = [c for c in range(0, base.shape[1], 4) if all(c + i in chosen for i in range(4))]
        assert len(whole) == (budget - window) // 4  # 16 selectable slots = 4 whole chunks
    assert_kept_slots_are_untouched(cache, compressed)


# --- every method of this file ----------------------------------------------------------------------------------

BAD_HYPERPARAMETERS = [
    ("lagkv", {"lag_size": 1}, "lag_size >= 2"),
    ("lagkv", {"n_sink": -1}, "n_sink must be >= 0"),
    ("leverage", {"sketch_dimension": 0}, "sketch_dimension >= 1"),
    ("noncausal", {"chunk_size": 0}, "chunk_size >= 1"),
    ("noncausal", {"decode_budget": 64}, "decode_budget is not supported"),
    ("compactor", {"sketch_dimension": 0}, "sketch_dimension >= 1"),
    ("compactor", {"decode_budget": 64}, "decode_budget is not supported"),
    ("cur", {"leverage_type": "rows"}, "unknown leverage_type"),
    ("cur", {"local_window_size": 0}, "local_window_size >= 1"),
    ("cap", {"n_future_positions": 0}, "n_future_positions >= 1"),
    ("criticalkv", {"first_stage_ratio": 1.5}, "first_stage_ratio in"),
    ("criticalkv", {"decode_budget": 64}, "decode_budget is not supported"),
    ("criticalkv", {"base": "kivi"}, "cannot wrap 'kivi'"),
    ("criticaladakv", {"alpha": 2.0}, "alpha must be in"),
    ("chunkkv", {"chunk_length": 0}, "chunk_length >= 1"),
    ("chunkkv", {"decode_budget": 64}, "decode_budget is not supported"),
]


@pytest.mark.parametrize(("name", "params", "message"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_are_refused_in_one_line(name, params, message):
    with pytest.raises(ValueError, match=message) as error:
        build_method({"name": name, **params})
    assert "\n" not in str(error.value)


ADAKV_BASES = ["keydiff", "lagkv", "leverage", "noncausal", "compactor", "cur", "cap"]


@pytest.mark.parametrize("base", ADAKV_BASES)
def test_scorers_compose_with_adakv_and_keep_the_layer_total(tiny_lm, base):
    budget = 24
    rows = run_rows(tiny_lm, {"name": "adakv", "base": base}, budget)
    layers, heads = tiny_lm.config.num_hidden_layers, tiny_lm.config.num_key_value_heads
    assert rows["m"]["kept_entries_compressed"] == budget * layers * heads


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "keydiff"},
        {"name": "lagkv", "lag_size": 4},
        {"name": "leverage", "sketch_dimension": 8},
        {"name": "cur"},
        {"name": "cap"},
    ],
    ids=lambda cfg: cfg["name"],
)
def test_query_agnostic_scorers_hold_a_decode_budget(tiny_lm, cfg):
    rows = run_rows(tiny_lm, {**cfg, "decode_budget": 28, "decode_interval": 4}, 24)
    row = rows["m"]
    assert row["output_tokens"] == 8 and row["max_layer_len_decode"] <= 28
    assert row["method_record"]["decode_rescores"] > 0
