"""Scissorhands, NACL, SimLayerKV, Finch and LU-KV on hand-made tensors against independent
naive implementations of their papers' rules; exact budgets, the full cache when the budget holds the prompt,
composition where claimed and one-line refusals of bad hyperparameters. The registry-wide contract
(tests/test_method_contract.py) runs every one of them on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.rope import rope_inv_freq, rotate_keys
from kvbench.methods import build_method
from kvbench.methods.base import CompressionContext
from kvbench.methods.nacl import sample_without_replacement


def hand_layer(num_kv: int, length: int, dim: int, seed: int) -> tuple[KVLayer, torch.Tensor, torch.Tensor]:
    """A layer of random keys/values `[Hkv, L, d]` at positions 0..L-1, and copies of both."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, num_kv, length, dim, generator=generator)
    values = torch.randn(1, num_kv, length, dim, generator=generator)
    layer = KVLayer()
    layer.update(keys, values, positions=torch.arange(length))
    return layer, keys[0].clone(), values[0].clone()


def hand_cache(layers: int, num_kv: int, length: int, dim: int, seed: int) -> tuple[KVCache, list]:
    cache = KVCache(layers)
    built = [hand_layer(num_kv, length, dim, seed + i) for i in range(layers)]
    cache.layers = [layer for layer, _, _ in built]
    return cache, built


def hand_context(
    budget: int, length: int, num_kv: int, group: int, dim: int, window: int, layers: int = 1, seed: int = 100
) -> CompressionContext:
    queries = [
        torch.randn(num_kv * group, window, dim, generator=torch.Generator().manual_seed(seed + i))
        for i in range(layers)
    ]
    return CompressionContext(
        budget=budget,
        prompt_len=length,
        num_heads=num_kv * group,
        num_kv_heads=num_kv,
        window_queries=queries,
        window_positions=torch.arange(length - window, length),
        scaling=dim**-0.5,
    )


def naive_probs(query: list[float], keys: torch.Tensor, query_pos: int, scaling: float) -> list[float]:
    """Causal softmax of one query over keys `[L, d]` at positions 0..L-1, in float64 python."""
    logits = [sum(q * k for q, k in zip(query, key.tolist(), strict=True)) * scaling for key in keys[: query_pos + 1]]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    return [w / total for w in weights] + [0.0] * (keys.shape[0] - query_pos - 1)


# --- scissorhands ----------------------------------------------------------------------------------------------


def naive_scissorhands(queries, keys, budget, recent, scaling) -> list[list[int]]:
    """Per KV head: the recent slots plus the slots least often below the uniform share 1/t (ties: more attention
    received, then the earlier slot)."""
    num_kv, length = keys.shape[0], keys.shape[1]
    group = queries.shape[0] // num_kv
    window = queries.shape[1]
    kept = []
    for kv in range(num_kv):
        count = [0] * length
        received = [0.0] * length
        for head in range(kv * group, (kv + 1) * group):
            for row in range(window):
                pos = length - window + row
                probs = naive_probs(queries[head, row].tolist(), keys[kv], pos, scaling)
                for j in range(pos + 1):
                    count[j] += probs[j] < 1.0 / (pos + 1)
                    received[j] += probs[j]
        older = range(length - recent)
        order = sorted(older, key=lambda j: (count[j], -received[j], j))[: budget - recent]
        kept.append(sorted(order) + list(range(length - recent, length)))
    return kept


@pytest.mark.parametrize("group", [1, 2])
def test_scissorhands_keeps_the_least_often_unimportant_slots(group):
    num_kv, length, dim, window, recent, budget = 2, 17, 4, 5, 3, 9
    layer, keys, _ = hand_layer(num_kv, length, dim, seed=1)
    cache = KVCache(1)
    cache.layers = [layer]
    ctx = hand_context(budget, length, num_kv, group, dim, window)
    method = build_method({"name": "scissorhands", "history_window": window, "recent": recent})
    method.compress(cache, ctx)
    expected = naive_scissorhands(ctx.window_queries[0], keys, budget, recent, ctx.scaling)
    assert layer.positions.tolist() == expected
    for kv in range(num_kv):
        assert torch.equal(layer.keys[0, kv], keys[kv, expected[kv]])


def test_scissorhands_budget_holding_the_prompt_keeps_everything_and_adakv_wraps_it():
    num_kv, length, dim, window = 2, 20, 4, 4
    cache, _ = hand_cache(2, num_kv, length, dim, seed=3)
    ctx = hand_context(length, length, num_kv, 2, dim, window, layers=2)
    build_method({"name": "scissorhands", "history_window": window, "recent": 2}).compress(cache, ctx)
    assert [layer.get_seq_length() for layer in cache.layers] == [length, length]
    cache, _ = hand_cache(2, num_kv, length, dim, seed=3)
    ctx = hand_context(8, length, num_kv, 2, dim, window, layers=2)
    adakv = build_method(
        {"name": "adakv", "base": "scissorhands", "base_params": {"history_window": window, "recent": 2}}
    )
    adakv.compress(cache, ctx)
    assert [int(layer.lengths().sum()) for layer in cache.layers] == [8 * num_kv, 8 * num_kv]


@pytest.mark.parametrize("params", [{"history_window": 0}, {"recent": -1}, {"decode_budget": 8, "decode_interval": 8}])
def test_scissorhands_refuses_bad_hyperparameters_in_one_line(params):
    with pytest.raises(ValueError) as error:
        build_method({"name": "scissorhands", **params})
    assert "\n" not in str(error.value)


# --- nacl -------------------------------------------------------------------------------------------------------


def naive_proxy_scores(queries, keys, scaling) -> list[list[float]]:
    """Per KV head, the attention the last query rows (NACL's proxies, SnapKV's window) pay to each slot before
    them, summed over the rows, mean over the GQA group."""
    num_kv, length = keys.shape[0], keys.shape[1]
    group, window = queries.shape[0] // num_kv, queries.shape[1]
    out = []
    for kv in range(num_kv):
        total = [0.0] * (length - window)
        for head in range(kv * group, (kv + 1) * group):
            for row in range(window):
                probs = naive_probs(queries[head, row].tolist(), keys[kv], length - window + row, scaling)
                for j in range(length - window):
                    total[j] += probs[j] / group
        out.append(total)
    return out


def test_nacl_without_random_eviction_keeps_the_proxy_top_k_and_the_proxies():
    num_kv, group, length, dim, proxies, budget = 2, 2, 19, 4, 4, 10
    layer, keys, _ = hand_layer(num_kv, length, dim, seed=5)
    cache = KVCache(1)
    cache.layers = [layer]
    ctx = hand_context(budget, length, num_kv, group, dim, proxies)
    build_method({"name": "nacl", "proxy_tokens": proxies, "random_ratio": 0.0}).compress(cache, ctx)
    scores = naive_proxy_scores(ctx.window_queries[0], keys, ctx.scaling)
    expected = [
        sorted(sorted(range(length - proxies), key=lambda j: (-s[j], j))[: budget - proxies])
        + list(range(length - proxies, length))
        for s in scores
    ]
    assert layer.positions.tolist() == expected


def test_nacl_random_eviction_keeps_the_top_part_and_draws_the_rest_exactly():
    num_kv, group, length, dim, proxies, budget = 2, 1, 30, 4, 2, 12
    ctx = hand_context(budget, length, num_kv, group, dim, proxies)
    method = build_method({"name": "nacl", "proxy_tokens": proxies, "random_ratio": 0.5})
    _, keys, _ = hand_layer(num_kv, length, dim, seed=6)
    scores = naive_proxy_scores(ctx.window_queries[0], keys, ctx.scaling)
    top = [set(sorted(range(length - proxies), key=lambda j: (-s[j], j))[:5]) for s in scores]  # 10 - round(5)
    draws = set()
    for seed in range(6):
        layer, _, _ = hand_layer(num_kv, length, dim, seed=6)
        cache = KVCache(1)
        cache.layers = [layer]
        ctx.seed = seed
        method.compress(cache, ctx)
        kept = layer.positions.tolist()
        for kv in range(num_kv):
            assert len(set(kept[kv])) == budget and kept[kv][-proxies:] == list(range(length - proxies, length))
            assert top[kv] <= set(kept[kv])
        draws.add(tuple(kept[0]))
    assert len(draws) > 1  # the seed changes the random part


def test_nacl_draw_frequencies_follow_the_scores_or_their_softmax():
    scores = torch.tensor([[0.0, 1.0, 2.0, 5.0]])
    eligible = torch.tensor([[True, True, True, False]])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    trials = 6000
    for _ in range(trials):
        counts[sample_without_replacement(scores, eligible, 1, generator, None)[0, 0]] += 1
    assert counts[3] == 0 and counts[0] == 0  # not eligible; zero score (1e-12 floor)
    assert abs(counts[2] / trials - 2 / 3) < 0.03
    counts.zero_()
    for _ in range(trials):
        counts[sample_without_replacement(scores, eligible, 1, generator, 1.0)[0, 0]] += 1
    softmax = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), dim=0)
    assert torch.allclose(counts[:3] / trials, softmax, atol=0.03)


@pytest.mark.parametrize("params", [{"proxy_tokens": 0}, {"random_ratio": 1.5}, {"temperature": 0.0}])
def test_nacl_refuses_bad_hyperparameters_in_one_line(params):
    with pytest.raises(ValueError) as error:
        build_method({"name": "nacl", **params})
    assert "\n" not in str(error.value)


# --- simlayerkv -------------------------------------------------------------------------------------------------


def test_simlayerkv_keeps_a_streaming_window_in_lazy_layers_only():
    num_kv, group, length, dim, budget, n_initial = 2, 2, 16, 4, 6, 2
    cache, built = hand_cache(3, num_kv, length, dim, seed=11)
    ctx = hand_context(budget, length, num_kv, group, dim, 1, layers=3)
    window = list(range(n_initial)) + list(range(length - (budget - n_initial), length))
    scores = []
    for (_, keys, _), queries in zip(built, ctx.window_queries, strict=True):
        per_head = [
            naive_probs(queries[h, 0].tolist(), keys[h // group], length - 1, ctx.scaling)
            for h in range(num_kv * group)
        ]
        scores.append(sum(sum(p[j] for j in window) for p in per_head) / len(per_head))
    threshold = sorted(scores)[1] - 1e-6  # exactly the two layers of highest window attention are lazy
    method = build_method({"name": "simlayerkv", "lazy_threshold": threshold, "n_initial": n_initial})
    method.compress(cache, ctx)
    for layer, score in zip(cache.layers, scores, strict=True):
        expected = [window] * num_kv if score > threshold else [list(range(length))] * num_kv
        assert layer.positions.tolist() == expected
    assert ctx.record["simlayerkv_lazy_layers"] == 2


def test_simlayerkv_threshold_one_or_a_roomy_budget_keeps_everything():
    cache, _ = hand_cache(2, 2, 12, 4, seed=12)
    build_method({"name": "simlayerkv", "lazy_threshold": 1.0}).compress(cache, hand_context(5, 12, 2, 1, 4, 1, 2))
    assert [layer.get_seq_length() for layer in cache.layers] == [12, 12]
    cache, _ = hand_cache(2, 2, 12, 4, seed=12)
    build_method({"name": "simlayerkv", "lazy_threshold": 0.0}).compress(cache, hand_context(12, 12, 2, 1, 4, 1, 2))
    assert [layer.get_seq_length() for layer in cache.layers] == [12, 12]


@pytest.mark.parametrize("params", [{"lazy_threshold": 1.2}, {"n_last": 0}, {"n_initial": -1}])
def test_simlayerkv_refuses_bad_hyperparameters_in_one_line(params):
    with pytest.raises(ValueError) as error:
        build_method({"name": "simlayerkv", **params})
    assert "\n" not in str(error.value)


# --- finch ------------------------------------------------------------------------------------------------------


def naive_finch(queries, keys, budget, window, scaling, chunk=None) -> list[list[int]]:
    """Per KV head: rows' attention x keys before the row, mean over rows and group; top-k (per chunk) + window."""
    num_kv, length = keys.shape[0], keys.shape[1]
    group = queries.shape[0] // num_kv
    prefix = length - window
    kept = []
    for kv in range(num_kv):
        score = [0.0] * prefix
        for head in range(kv * group, (kv + 1) * group):
            for row in range(window):
                pos = prefix + row
                probs = naive_probs(queries[head, row].tolist(), keys[kv], pos, scaling)
                for j in range(prefix):
                    score[j] += probs[j] * pos / (window * group)
        spans = [(0, prefix)] if chunk is None else [(s, min(s + chunk, prefix)) for s in range(0, prefix, chunk)]
        keep = budget - window
        shares = [keep * (e - s) / prefix for s, e in spans]
        counts = [int(x) for x in shares]
        for i in sorted(range(len(spans)), key=lambda i: (-(shares[i] - counts[i]), i))[: keep - sum(counts)]:
            counts[i] += 1
        chosen = []
        for (s, e), n in zip(spans, counts, strict=True):
            chosen += sorted(sorted(range(s, e), key=lambda j: (-score[j], j))[:n])
        kept.append(chosen + list(range(prefix, length)))
    return kept


@pytest.mark.parametrize("chunk", [None, 5])
def test_finch_window_is_the_question_and_selection_equals_the_naive_rule(chunk):
    num_kv, group, length, dim, budget, question = 2, 2, 24, 4, 11, 4
    layer, keys, _ = hand_layer(num_kv, length, dim, seed=21)
    cache = KVCache(1)
    cache.layers = [layer]
    ctx = hand_context(budget, length, num_kv, group, dim, 8)  # 8 recorded queries, the question is the last 4
    ctx.context_end = length - question
    method = build_method({"name": "finch", "window": 8, "chunk_length": chunk, "rerotate": False})
    method.compress(cache, ctx)
    queries = ctx.window_queries[0][:, -question:]
    assert layer.positions.tolist() == naive_finch(queries, keys, budget, question, ctx.scaling, chunk)
    ctx.context_end = None  # unknown question: the fixed window (8)
    layer, keys, _ = hand_layer(num_kv, length, dim, seed=21)
    cache.layers = [layer]
    method.compress(cache, ctx)
    assert layer.positions.tolist() == naive_finch(ctx.window_queries[0], keys, budget, 8, ctx.scaling, chunk)


def test_finch_rerotates_kept_keys_to_contiguous_positions(tiny_lm):
    num_kv, length, dim = tiny_lm.config.num_key_value_heads, 20, tiny_lm.config.head_dim
    raw = torch.randn(1, num_kv, length, dim, generator=torch.Generator().manual_seed(4))
    inv_freq = rope_inv_freq(tiny_lm.model)
    at = torch.arange(length).expand(num_kv, -1)
    layer = KVLayer()
    layer.update(rotate_keys(raw, at, inv_freq), torch.randn(1, num_kv, length, dim), positions=torch.arange(length))
    cache = KVCache(1)
    cache.layers = [layer]
    group = tiny_lm.config.num_attention_heads // num_kv
    ctx = hand_context(8, length, num_kv, group, dim, 4)
    ctx.lm = tiny_lm
    build_method({"name": "finch", "window": 4}).compress(cache, ctx)
    cache_plain = KVCache(1)
    plain = KVLayer()
    plain.update(rotate_keys(raw, at, inv_freq), torch.zeros(1, num_kv, length, dim), positions=torch.arange(length))
    cache_plain.layers = [plain]
    build_method({"name": "finch", "window": 4, "rerotate": False}).compress(cache_plain, ctx)
    assert layer.positions.tolist() == [list(range(8))] * num_kv
    kept = plain.positions  # original positions of the kept slots
    expected = rotate_keys(raw.gather(2, kept[None, :, :, None].expand(-1, -1, -1, dim)), at[:, :8], inv_freq)
    assert torch.allclose(layer.keys, expected, atol=1e-5)


@pytest.mark.parametrize("params", [{"window": 0}, {"max_window": 0}, {"chunk_length": 0}])
def test_finch_refuses_bad_hyperparameters_in_one_line(params):
    with pytest.raises(ValueError) as error:
        build_method({"name": "finch", **params})
    assert "\n" not in str(error.value)


# --- lukv -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sink", [0, 2])
def test_lukv_without_a_curve_allocates_the_global_top_shares_across_layers_and_heads(sink):
    layers, num_kv, group, length, dim, window, budget = 2, 2, 2, 15, 4, 3, 7
    cache, built = hand_cache(layers, num_kv, length, dim, seed=31)
    ctx = hand_context(budget, length, num_kv, group, dim, window, layers=layers)
    base = {"window": window, "kernel": 1, "pool": "none"}
    build_method({"name": "lukv", "base": "snapkv", "base_params": base, "sink": sink}).compress(cache, ctx)
    entries = []  # (share, layer, head, slot)
    for layer_idx, (_, keys, _) in enumerate(built):
        for kv, scores in enumerate(naive_proxy_scores(ctx.window_queries[layer_idx], keys, ctx.scaling)):
            total = sum(scores[sink:])
            entries += [(2.0 if j < sink else scores[j] / total, layer_idx, kv, j) for j in range(len(scores))]
    winners = sorted(entries, key=lambda e: -e[0])[: layers * num_kv * (budget - window)]
    for layer_idx, layer in enumerate(cache.layers):
        for kv in range(num_kv):
            chosen = sorted(j for _, lay, h, j in winners if (lay, h) == (layer_idx, kv))
            kept = [p for p in layer.positions[kv].tolist() if p < length]
            assert kept == chosen + list(range(length - window, length))
            assert set(range(sink)) <= set(kept)
    assert sum(int(layer.lengths().sum()) for layer in cache.layers) == layers * num_kv * budget


def test_lukv_curve_sets_each_heads_share_and_keeps_the_layer_total(tmp_path):
    layers, num_kv, length, dim, window, budget = 2, 2, 20, 4, 2, 8
    curve = np.full((99, layers, num_kv), 0.5)
    curve[59, 0] = [0.4, 0.8]  # ratio 0.6 -> row 59: layer 0 keep rates 0.6 / 0.2 -> 3:1 of 2 x 6 selectable
    path = tmp_path / "curve.npy"
    np.save(path, curve)
    cache, _ = hand_cache(layers, num_kv, length, dim, seed=32)
    ctx = hand_context(budget, length, num_kv, 1, dim, window, layers=layers)
    method = build_method({"name": "lukv", "base": "snapkv", "base_params": {"window": window}, "curve": str(path)})
    method.compress(cache, ctx)
    assert cache.layers[0].lengths().tolist() == [9 + window, 3 + window]
    assert cache.layers[1].lengths().tolist() == [budget, budget]


@pytest.mark.parametrize("params", [{"sink": -1}, {"base": "h2o"}, {"decode_budget": 64}])
def test_lukv_refuses_bad_hyperparameters_in_one_line(params):
    with pytest.raises(ValueError) as error:
        build_method({"name": "lukv", **params})
    assert "\n" not in str(error.value)
