"""Prompt eviction by scores and the baselines: SnapKV, PyramidKV and DapQ (SnapKV with pseudo queries at the
answer's positions) against independent naive implementations, PyramidKV's per-layer budgets, and what full,
random, window and StreamingLLM keep. The budget rule and the identity with the full cache when nothing is evicted
are checked for every method in test_method_contract.py."""

from __future__ import annotations

import math

import pytest
import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.kernels.window_attention import aggregate_gqa, window_attention
from kvbench.engine.rope import rope_inv_freq, rotate_keys
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.methods import build_method
from kvbench.methods.base import CompressionContext
from kvbench.methods.dapq import PseudoQueryScorer
from kvbench.methods.scoring import pyramid_layer_budgets
from tests.helpers import assert_kept_slots_are_untouched, needle_sample, prefilled


@pytest.mark.parametrize("name", ["random", "window", "streamingllm", "snapkv", "pyramidkv"])
@pytest.mark.parametrize("compress", ["prompt", "context"])
def test_every_layer_keeps_the_budget_and_pyramidkv_its_pyramid(tiny_lm, name, compress):
    budget = 48
    jobs = [Job(build_method({"name": name}), budget, name)]
    ((_, row),) = list(
        run_sample(tiny_lm, needle_sample(), jobs, RunOptions(compress=compress, seed=0, fail_fast=True))
    )
    layers = tiny_lm.config.num_hidden_layers
    if name == "pyramidkv":
        expected = pyramid_layer_budgets(budget, 32, row["compressed_tokens"], layers, 20.0)
        assert expected != [budget] * layers  # the prompt is long enough for a real pyramid
        assert row["kept_per_layer_compressed"] == expected
    else:
        assert row["kept_per_layer_compressed"] == [budget] * layers
    assert row["kv_bytes_compressed"] == row["kv_bytes_full"] * budget // row["compressed_tokens"]


def test_fractional_budget_keeps_that_fraction(tiny_lm):
    jobs = [Job(build_method({"name": "snapkv"}), 0.25, "s")]
    ((_, row),) = list(
        run_sample(tiny_lm, needle_sample(), jobs, RunOptions(compress="prompt", seed=0, fail_fast=True))
    )
    assert row["budget_entries"] == round(0.25 * row["compressed_tokens"])
    assert abs(row["kept_fraction_compressed"] - 0.25) < 0.01


def test_every_sample_is_compressed_not_only_the_first(tiny_lm):
    """A stale per-run counter made a peer harness compress only its first sample: check each row."""
    jobs = [Job(build_method({"name": "snapkv"}), 40, "s")]
    for index in range(3):
        sample = needle_sample()
        sample.sample_id = f"s{index}"
        sample.context = sample.context + " Extra sentence." * index
        ((_, row),) = list(run_sample(tiny_lm, sample, jobs, RunOptions(compress="prompt", seed=0, fail_fast=True)))
        assert row["compressed"] and row["kept_entries_compressed"] == 40 * 4 * 2


@pytest.mark.parametrize(
    ("budget", "window", "prompt_len", "layers"),
    [
        (128, 32, 2000, 30),
        (64, 32, 1000, 30),
        (200, 32, 5000, 24),
        (37, 8, 900, 7),
        (512, 64, 4000, 32),
        (96, 32, 150, 30),
    ],
)
def test_pyramid_budgets_average_exactly_to_the_budget(budget, window, prompt_len, layers):
    budgets = pyramid_layer_budgets(budget, window, prompt_len, layers, 20.0)
    assert len(budgets) == layers
    assert sum(budgets) == budget * layers
    assert all(b1 >= b2 for b1, b2 in zip(budgets, budgets[1:], strict=False))
    assert all(window <= b <= prompt_len for b in budgets)
    if prompt_len >= 2 * (budget - window):
        most, least = budgets[0] - window, budgets[-1] - window
        assert abs(least - (budget - window) / 20) <= 1 or most == prompt_len - window
    else:
        assert budgets == [budget] * layers  # uniform SnapKV fallback


# --- SnapKV / PyramidKV against a naive reference --------------------------------------------------------


def naive_snapkv_indices(queries, keys, budget, window, kernel, pool, scaling):
    """Loops over heads, rows and keys: softmax per window row over visible keys, column sums, GQA mean,
    pooling with stride 1 and padding kernel//2, top-(budget-window) with ties to the earlier slot, + window."""
    num_heads, num_kv = queries.shape[0], keys.shape[0]
    group = num_heads // num_kv
    length = keys.shape[1]
    selected = []
    for kv in range(num_kv):
        column = [0.0] * length
        for h in range(kv * group, (kv + 1) * group):
            for row in range(window):
                query_pos = length - window + row
                logits = [float(queries[h, row] @ keys[kv, j]) * scaling for j in range(query_pos + 1)]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                total = sum(weights)
                for j, weight in enumerate(weights):
                    column[j] += weight / total / group
        prefix = column[: length - window]
        pooled = []
        for i in range(len(prefix)):
            span = [prefix[j] for j in range(i - kernel // 2, i + kernel // 2 + 1) if 0 <= j < len(prefix)]
            pooled.append(max(span) if pool == "max" else sum(span) / kernel)
        order = sorted(range(len(pooled)), key=lambda i: (-pooled[i], i))[: budget - window]
        selected.append(sorted(order) + list(range(length - window, length)))
    return selected


def hand_made_layer(num_kv: int, length: int, dim: int, seed: int) -> tuple[KVLayer, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, num_kv, length, dim, generator=generator)
    layer = KVLayer()
    layer.update(keys, torch.randn(1, num_kv, length, dim, generator=generator), positions=torch.arange(length))
    return layer, keys[0].clone()


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("group", [1, 2])
def test_snapkv_selection_equals_naive_reference(pool, group):
    num_kv, length, dim, window, kernel, budget = 2, 13, 4, 3, 3, 7
    layer, keys = hand_made_layer(num_kv, length, dim, seed=7)
    queries = torch.randn(num_kv * group, window, dim, generator=torch.Generator().manual_seed(8))
    cache = KVCache(1)
    cache.layers = [layer]
    ctx = CompressionContext(
        budget=budget,
        prompt_len=length,
        num_heads=num_kv * group,
        num_kv_heads=num_kv,
        window_queries=[queries],
        window_positions=torch.arange(length - window, length),
        scaling=dim**-0.5,
    )
    build_method({"name": "snapkv", "window": window, "kernel": kernel, "pool": pool}).compress(cache, ctx)
    expected = naive_snapkv_indices(queries, keys, budget, window, kernel, pool, dim**-0.5)
    assert layer.positions.tolist() == expected
    for kv in range(num_kv):
        assert torch.equal(layer.keys[0, kv], keys[kv, expected[kv]])


def test_pyramidkv_selection_equals_naive_reference_per_layer():
    num_kv, group, length, dim, window, kernel, budget, layers = 2, 2, 40, 4, 4, 3, 12, 3
    cache = KVCache(layers)
    built = [hand_made_layer(num_kv, length, dim, seed=10 + i) for i in range(layers)]
    cache.layers = [layer for layer, _ in built]
    queries = [
        torch.randn(num_kv * group, window, dim, generator=torch.Generator().manual_seed(20 + i)) for i in range(layers)
    ]
    ctx = CompressionContext(
        budget=budget,
        prompt_len=length,
        num_heads=num_kv * group,
        num_kv_heads=num_kv,
        window_queries=queries,
        window_positions=torch.arange(length - window, length),
        scaling=dim**-0.5,
    )
    method = build_method({"name": "pyramidkv", "window": window, "kernel": kernel, "pool": "avg", "beta": 2.0})
    method.compress(cache, ctx)
    # hand-computed: least = 8/2 = 4, most = 16 - 4 = 12, step 4 -> 12, 8, 4 (+ window 4)
    assert [layer.get_seq_length() for layer in cache.layers] == [16, 12, 8]
    for (layer, keys), layer_queries, layer_budget in zip(built, queries, [16, 12, 8], strict=True):
        expected = naive_snapkv_indices(layer_queries, keys, layer_budget, window, kernel, "avg", dim**-0.5)
        assert layer.positions.tolist() == expected


# --- DapQ -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pseudo", ["forward", "rotate"])
def test_dapq_scores_with_queries_at_future_positions_and_keeps_the_budget(tiny_lm, pseudo, monkeypatch):
    budget, window = 24, 8
    seen = []
    original = PseudoQueryScorer.on_attention

    def spy(self, layer_idx, query, layer, query_positions, scaling):
        seen.append(query_positions.tolist())
        return original(self, layer_idx, query, layer, query_positions, scaling)

    monkeypatch.setattr(PseudoQueryScorer, "on_attention", spy)
    method = build_method({"name": "dapq", "pseudo": pseudo, "pseudo_tokens": 16, "window": window})
    cache, ctx = prefilled(tiny_lm, budget, 16)
    compressed = cache.copy()
    method.setup(compressed, ctx)
    if pseudo == "forward":
        assert seen[0] == list(range(ctx.prompt_len, ctx.prompt_len + 16))
        assert ctx.record["dapq_forward_tokens"] == 16
    assert compressed.seen_tokens == ctx.prompt_len and compressed.layers[0].get_seq_length() == ctx.prompt_len
    method.compress(compressed, ctx)
    assert compressed.kept_per_layer() == [[budget] * 2] * 4
    assert all(not layer.extras for layer in compressed.layers)
    for layer in compressed.layers:  # the real window is kept
        assert (layer.positions[:, -window:] == torch.arange(ctx.prompt_len - window, ctx.prompt_len)).all()
    assert_kept_slots_are_untouched(cache, compressed)


def test_dapq_rotated_queries_sit_at_future_positions(tiny_lm):
    """rotate: q rotated by +n against k equals q against k rotated by -n (RoPE is relative), with every
    prompt key visible to queries at the future positions."""
    n = 8
    method = build_method({"name": "dapq", "pseudo": "rotate", "pseudo_tokens": n})
    cache, ctx = prefilled(tiny_lm, 24, n)
    moved = method.rotated_scores(cache, ctx)
    inv_freq = rope_inv_freq(tiny_lm.model)
    future = ctx.window_positions + n
    for layer, queries, scores in zip(cache.layers, ctx.window_queries, moved, strict=True):
        back = rotate_keys(layer.keys, torch.full(layer.positions.shape, -n), inv_freq)[0]
        probs = window_attention(queries, back, future, layer.positions, ctx.scaling)
        torch.testing.assert_close(scores, aggregate_gqa(probs.sum(dim=1), 2, "mean"), rtol=1e-4, atol=1e-5)
        assert torch.allclose(scores.sum(dim=-1), torch.full((2,), float(n)), atol=1e-4)


# --- baselines ------------------------------------------------------------------------------------------


def test_window_streaming_and_random_keep_the_right_slots():
    length, budget = 50, 12
    ctx = CompressionContext(budget=budget, prompt_len=length, num_heads=2, num_kv_heads=2, seed=3)

    def fresh() -> KVCache:
        cache = KVCache(2)
        cache.layers = [hand_made_layer(2, length, 4, seed=i)[0] for i in range(2)]
        return cache

    window = fresh()
    build_method({"name": "window"}).compress(window, ctx)
    assert window.layers[0].positions[0].tolist() == list(range(38, 50))

    streaming = fresh()
    build_method({"name": "streamingllm", "n_sink": 4}).compress(streaming, ctx)
    assert streaming.layers[1].positions[1].tolist() == [0, 1, 2, 3] + list(range(42, 50))

    first, second = fresh(), fresh()
    for cache in (first, second):
        build_method({"name": "random", "window": 4}).compress(cache, ctx)
    assert torch.equal(first.layers[0].positions, second.layers[0].positions)  # seeded
    kept = first.layers[0].positions
    assert kept[:, -4:].tolist() == [list(range(46, 50))] * 2 and kept.shape == (2, budget)
    assert not torch.equal(kept[0], kept[1])  # heads draw independently


def test_streamingllm_never_exceeds_budget_while_decoding(tiny_lm):
    class SizeLog:
        def __init__(self):
            self.sizes = []

        def on_attention(self, layer_idx, query, layer, query_positions, scaling):
            self.sizes.append(layer.get_seq_length())

    sample = needle_sample(max_new_tokens=60)
    method = build_method({"name": "streamingllm"})
    jobs = [Job(method, 40, "s")]
    original = method.before_forward
    log = SizeLog()

    def attach_and_forward(cache, ctx, num_new):
        if log not in cache.observers:
            cache.observers.append(log)
        original(cache, ctx, num_new)

    method.before_forward = attach_and_forward
    ((_, row),) = list(run_sample(tiny_lm, sample, jobs, RunOptions(compress="prompt", seed=0, fail_fast=True)))
    assert row["output_tokens"] == 60
    assert log.sizes and max(log.sizes) <= 40
    assert row["max_layer_len_decode"] <= 40


def test_rerotation_moves_keys_to_new_positions(tiny_lm):
    """Re-rotating a key computed at position p by delta equals the key computed at position p + delta."""
    rotary = next(m for m in tiny_lm.model.modules() if hasattr(m, "inv_freq"))
    dim = tiny_lm.config.head_dim
    raw = torch.randn(1, 2, 5, dim, generator=torch.Generator().manual_seed(0))

    def rope(x, positions):
        cos, sin = rotary(x, positions[None])
        half = dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos[:, None] + rotated * sin[:, None]

    old = torch.tensor([3, 10, 20, 30, 41])
    new = torch.arange(5)
    moved = rotate_keys(rope(raw, old), (new - old).expand(2, -1), rope_inv_freq(tiny_lm.model))
    torch.testing.assert_close(moved, rope(raw, new), rtol=1e-5, atol=1e-5)


def test_streamingllm_rerotate_mode_runs_with_contiguous_positions(tiny_lm):
    jobs = [Job(build_method({"name": "streamingllm", "rerotate": True}), 32, "s")]
    ((_, row),) = list(
        run_sample(tiny_lm, needle_sample(20), jobs, RunOptions(compress="prompt", seed=0, fail_fast=True))
    )
    assert row["status"] == "ok" and row["compressed"] and row["max_layer_len_decode"] <= 32


def test_unknown_method_or_parameter_fails_naming_the_closest_valid_one():
    with pytest.raises(ValueError, match=r"unknown method 'snapk'.*Did you mean 'snapkv'"):
        build_method({"name": "snapk"})
    with pytest.raises(ValueError, match=r"unknown parameter 'windw' for method snapkv"):
        build_method({"name": "snapkv", "windw": 3})
