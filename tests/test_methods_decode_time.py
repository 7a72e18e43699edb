"""Decode-time eviction: H2O, TOVA, the hierarchical popularity policy and decode-time budgets for any scorer (Knorm,
Expected Attention, SnapKV, ...), with Knorm's and Expected Attention's prompt scores.

Hand-made cases with known answers, the decode-time variants equal to the full cache when their budget is never
reached, what the cache holds at the end of a row (at the budget, or the budget plus the appended tokens), exact
per-head counts, and the budget held at every step of a 200-token generation. The budget rule and the identity with
the full cache for every method's defaults are in test_method_contract.py."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.generation import forward_tokens, prefill
from kvbench.engine.measure import Stopwatch
from kvbench.engine.rope import rotary_embedding, unrotate
from kvbench.harness.options import RunOptions
from kvbench.harness.prompt import build_prompt
from kvbench.harness.runner import Job, run_sample
from kvbench.harness.sample import Sample
from kvbench.methods import build_method
from kvbench.methods.base import CompressionContext
from kvbench.methods.decode_budget import RecentQueries
from kvbench.methods.expected_attention import QueryStatistics
from kvbench.methods.h2o import H2O_SCORE, DecodeAccumulator, accumulated_attention
from kvbench.methods.hierarchical import COUNT, LEVEL, PopularityTracker, level_sizes, target_levels, topk_hits
from kvbench.methods.tova import LastQueryEvictor
from tests.helpers import needle_sample, one_hot


def random_ids(n: int, seed: int = 0, vocab: int = 49152) -> list[int]:
    return torch.randint(100, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hand_layer(keys: torch.Tensor, values: torch.Tensor | None = None, start: int = 0) -> KVLayer:
    """A layer holding `keys [Hkv, L, d]` at positions start..start+L-1."""
    layer = KVLayer()
    values = torch.ones_like(keys) if values is None else values
    layer.update(keys[None], values[None], positions=torch.arange(start, start + keys.shape[1]))
    return layer


def append_slot(layer: KVLayer, key: torch.Tensor, position: int) -> None:
    layer.update(key[None, :, None], torch.ones_like(key)[None, :, None], positions=torch.tensor([position]))


def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    return [w / sum(weights) for w in weights]


def context_for(lm, method, ids: list[int], budget: int):
    """Prefill `ids` with the method's observers, then setup (+ compress when the prompt exceeds the budget)."""
    observer = method.prefill_observer()
    if observer is not None and hasattr(observer, "bind_model"):
        observer.bind_model(lm)
    window = min(method.window_queries_needed(), len(ids))
    pre = prefill(lm, ids, window, Stopwatch(lm.device), [observer] if observer is not None else [])
    cache = pre.cache.copy()
    ctx = CompressionContext.for_prompt(lm, budget, len(ids), pre, input_ids=ids, prefill_stats=observer)
    method.setup(cache, ctx)
    if budget < len(ids):
        method.compress(cache, ctx)
    return pre, cache, ctx


# ---------------------------------------------------------------- end to end on the tiny model


def test_decode_time_variants_whose_budget_is_never_reached_give_full_output(tiny_lm):
    sample = Sample("s", "alpha beta gamma delta " * 12, "Which word?", "Answer:", ["x"], "string_match_all", 24)
    methods = [
        build_method({"name": "h2o", "decode_evict": False}),
        build_method({"name": "snapkv", "decode_budget": 400}),
        build_method({"name": "knorm", "decode_budget": 400, "decode_interval": 1}),
    ]
    for compress in ("prompt", "context"):
        jobs = [Job(build_method({"name": "full"}), None, "full")]
        jobs += [Job(method, 400, method.label()) for method in methods]
        rows = {
            job.key: row
            for job, row in run_sample(tiny_lm, sample, jobs, RunOptions(compress=compress, seed=0, fail_fast=True))
        }
        reference = rows.pop("full")
        assert reference["output_tokens"] == 24  # generation long enough to matter
        assert reference["prompt_tokens"] + 24 < 400
        for label, row in rows.items():
            assert not row["compressed"], label
            assert row["output_ids"] == reference["output_ids"], (compress, label)
            assert row["kv_bytes"] == reference["kv_bytes"], (compress, label)


@pytest.mark.parametrize("compress", ["prompt", "context"])
def test_decode_time_methods_end_at_the_budget_and_prefill_only_ones_append(tiny_lm, compress):
    """Every (layer, KV head) keeps exactly the budget after compression and, for the decode-time methods,
    after generation too; prefill-only scorers append the question tail and the generated tokens."""
    sample = Sample("s", "one two three four five six " * 30, "Which number?", "A:", ["x"], "string_match_all", 12)
    budget = 40
    jobs = [Job(build_method({"name": name}), budget, name) for name in ("h2o", "tova", "knorm", "expected_attention")]
    jobs.append(Job(build_method({"name": "h2o", "decode_evict": False}), budget, "h2o_prefill_only"))
    layers, heads = tiny_lm.config.num_hidden_layers, tiny_lm.config.num_key_value_heads
    slot_bytes = 2 * tiny_lm.config.head_dim * 4  # K + V, fp32
    for job, row in run_sample(tiny_lm, sample, jobs, RunOptions(compress=compress, seed=0, fail_fast=True)):
        assert row["compressed"] and row["compressed_tokens"] > budget
        assert row["kept_per_layer_compressed"] == [budget] * layers, job.key
        assert (
            row["kv_bytes_compressed"] == row["kv_bytes_logical_compressed"] == layers * heads * budget * slot_bytes
        ), job.key
        assert row["kv_bytes_compressed"] < row["kv_bytes_full"]
        appended = row["prompt_tokens"] - row["compressed_tokens"] + row["output_tokens"] - 1  # tail + decode
        if job.key in ("h2o", "tova"):  # decode-time eviction: the cache ends at the budget
            assert row["kv_bytes"] == row["kv_bytes_compressed"], job.key
            assert row["max_layer_len_decode"] == budget
        else:  # generated (and question-tail) tokens are appended
            assert row["kv_bytes"] == row["kv_bytes_compressed"] + layers * heads * appended * slot_bytes, job.key


@pytest.mark.parametrize("name", ["h2o", "tova", "knorm", "expected_attention"])
def test_compressed_caches_are_per_head_exact(tiny_lm, name):
    ids = random_ids(90, seed=3)
    method = build_method({"name": name})
    pre, cache, _ = context_for(tiny_lm, method, ids, budget=24)
    assert cache.kept_per_layer() == [[24] * tiny_lm.config.num_key_value_heads] * tiny_lm.config.num_hidden_layers
    tensor_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert cache.kv_bytes() == tensor_bytes < pre.cache.kv_bytes()
    for layer in cache.layers:  # original positions, original order
        assert bool((layer.positions[:, 1:] > layer.positions[:, :-1]).all())
        if name == "tova":  # one index set per layer
            assert bool((layer.positions == layer.positions[:1]).all())
        if name == "expected_attention":  # sinks kept
            assert bool((layer.positions[:, :4] == torch.arange(4)).all())
        if name == "h2o":  # the recent half is the last 12 prompt positions
            assert bool((layer.positions[:, -12:] == torch.arange(78, 90)).all())


@pytest.mark.parametrize(
    ("config", "cap", "attention_cap"),
    [
        ({"name": "h2o"}, 32, 33),
        ({"name": "tova"}, 32, 33),
        ({"name": "streamingllm"}, 32, 32),
        ({"name": "snapkv", "window": 8, "kernel": 3, "decode_budget": 32, "decode_interval": 8}, 32, 32),
        ({"name": "expected_attention", "decode_budget": 32, "decode_interval": 1}, 32, 32),
    ],
)
def test_decode_time_budget_holds_at_every_step(tiny_lm, config, cap, attention_cap):
    """200 generated tokens: the cache is within the cap after every step and reaches it; H2O and TOVA evict
    right after each layer's attention (as their official code does), so only inside that call a layer holds
    one slot more. Window scorers re-score with the queries of the slots at the end of the cache."""
    method = build_method(config)
    ids = random_ids(48, seed=5)
    _, cache, ctx = context_for(tiny_lm, method, ids, budget=cap)

    class LengthProbe:
        longest = 0

        def on_attention(self, layer_idx, query, layer, query_positions, scaling):
            LengthProbe.longest = max(LengthProbe.longest, layer.get_seq_length())

    cache.observers.insert(0, LengthProbe())
    recent = next((obs for obs in cache.observers if isinstance(obs, RecentQueries)), None)
    token = ids[-1]
    for _ in range(200):
        method.before_forward(cache, ctx, 1)
        if recent is not None:
            for layer in cache.layers:
                window = recent.positions.shape[0]
                assert torch.equal(layer.positions[:, -window:], recent.positions.expand(layer.num_heads, -1))
        token = int(torch.argmax(forward_tokens(tiny_lm, cache, [token])))
        assert max(layer.get_seq_length() for layer in cache.layers) <= cap
    assert LengthProbe.longest <= attention_cap
    assert all(layer.get_seq_length() >= cap - config.get("decode_interval", 0) for layer in cache.layers)
    assert cache.seen_tokens == 48 + 200  # original positions continue
    if "decode_budget" in config:
        assert ctx.record["decode_rescores"] > 0


def test_decode_budget_validation():
    with pytest.raises(ValueError, match="decode_interval"):
        build_method({"name": "knorm", "decode_budget": 16, "decode_interval": 16})
    with pytest.raises(ValueError, match="decode_budget"):
        build_method({"name": "snapkv", "decode_budget": 0})
    assert build_method({"name": "pyramidkv", "decode_budget": 64}).label() == "pyramidkv(decode_budget=64)"


# ---------------------------------------------------------------- hierarchical popularity policy


def test_hierarchical_thresholds_and_topk_hits():
    assert target_levels(torch.tensor([0, 1, 4, 5, 9, 10, 40])).tolist() == [0, 1, 1, 2, 2, 3, 3]
    probs = torch.tensor([[[0.1, 0.6, 0.3, 0.0], [0.5, 0.2, 0.3, 0.0]]])
    assert topk_hits(probs, 2).tolist() == [[1.0, 1.0, 2.0, 0.0]]
    assert topk_hits(torch.tensor([[[1.0, 0.0, 0.0]]]), 2).tolist() == [[1.0, 0.0, 0.0]]  # zeros never count


def test_hierarchical_promotion_demotion_and_eviction_over_two_windows():
    """A 1-layer, 1-head cache driven by hand-made attention: query e_i * 10 against keys e_p * 10 puts all
    of a row's attention on the slot at position i (top-1 = that slot)."""
    dim, prompt = 32, 6
    method = build_method({"name": "hierarchical", "topk": 1, "period": 10, "window": 16, "n_sink": 1})
    cache = KVCache(1)
    keys = torch.stack([one_hot(p, dim) for p in range(prompt)])[None, None]
    cache.next_positions(prompt, "cpu")
    cache.update(keys, torch.zeros_like(keys), 0)
    # prefill profile: 10 rows hit position 2 -> level 3, 5 hit position 3 -> 2, 1 hits position 4 -> 1
    window = torch.stack([one_hot(2, dim)] * 10 + [one_hot(3, dim)] * 5 + [one_hot(4, dim)])[None]
    ctx = CompressionContext(
        budget=16,
        prompt_len=prompt,
        num_heads=1,
        num_kv_heads=1,
        window_queries=[window],
        window_positions=torch.full((16,), prompt - 1),
        scaling=1.0,
    )
    method.setup(cache, ctx)
    layer = cache.layers[0]
    tracker = next(obs for obs in cache.observers if isinstance(obs, PopularityTracker))
    assert layer.extras[LEVEL].tolist() == [[0, 0, 3, 2, 1, 0]]

    def levels() -> dict[int, int]:
        return dict(zip(layer.positions[0].tolist(), layer.extras[LEVEL][0].long().tolist(), strict=True))

    def step(target: int) -> None:
        method.before_forward(cache, ctx, 1)
        assert layer.get_seq_length() + 1 <= ctx.budget
        position = cache.next_positions(1, "cpu")
        key = one_hot(int(position), dim)[None, None, None]
        layer.update(key, torch.zeros_like(key), positions=position)
        tracker.on_attention(0, one_hot(target, dim)[None, None, None], layer, position, 1.0)

    # window 1 (tokens at positions 6..15): 5 hits on position 1, then 5 on position 6
    for target in [1] * 5 + [6] * 5:
        step(target)
    assert layer.get_seq_length() == 16 and levels()[6] == 1 and levels()[15] == 1
    assert layer.extras[COUNT][0].tolist()[:7] == [0, 5, 0, 0, 0, 0, 5]
    # window 2 (positions 16..25): every row hits position 3. Its first step promotes (one step toward the
    # target), then evicts the oldest slot of the lowest level, position 4 (1 -> 0); then 5 and the g's.
    step(3)
    assert levels() == {0: 0, 1: 1, 2: 2, 3: 1, 5: 0, 6: 2, **{p: 0 for p in range(7, 16)}, 16: 1}
    for _ in range(9):
        step(3)
    assert sorted(levels()) == [0, 1, 2, 3, 6, 15] + list(range(16, 26))
    # end of window 2: 3 climbs to 2 (10 hits), everything unused steps down; then 1 (level 0, oldest) goes
    step(3)
    assert levels() == {0: 0, 2: 1, 3: 2, 6: 1, 15: 0, **{p: 0 for p in range(16, 26)}, 26: 1}
    assert [entry[0] for entry in ctx.record["level_sizes"]] == [0, 10, 11, 20, 21]
    assert ctx.record["level_sizes"][0][1:] == [3.0, 1.0, 1.0, 1.0]
    assert ctx.record["level_sizes"][-1][1:] == [12.0, 2.0, 1.0, 0.0]


def test_hierarchical_never_exceeds_the_budget_over_200_decode_steps(tiny_lm):
    budget = 64
    sample = needle_sample(max_new_tokens=200)
    seen = []
    method = build_method({"name": "hierarchical"})
    original = method.before_forward

    def checked(cache, ctx, num_new):
        original(cache, ctx, num_new)
        seen.append(max(layer.get_seq_length() for layer in cache.layers) + num_new)

    method.before_forward = checked
    ((_, row),) = list(
        run_sample(tiny_lm, sample, [Job(method, budget, "h")], RunOptions(compress="context", seed=0, fail_fast=True))
    )
    assert row["output_tokens"] == 200 and len(seen) == 200  # the question tail + 199 decode steps
    assert max(seen) <= budget and row["max_layer_len_decode"] <= budget
    history = row["method_record"]["level_sizes"]
    assert sum(history[0][1:]) == row["compressed_tokens"]  # before compression
    assert all(sum(entry[1:]) <= budget for entry in history[1:])
    fed = len(sample_tail(tiny_lm, sample)) + 199  # question tail + decode steps
    assert fed - 10 < history[-1][0] <= fed  # recorded every 10 fed tokens


def sample_tail(lm, sample):
    prompt = build_prompt(lm.tokenizer, sample)
    return prompt.input_ids[prompt.context_end :]


def test_level_sizes_average_over_layers_and_heads():
    cache = KVCache(2)
    cache.next_positions(3, "cpu")
    for layer_idx in range(2):
        cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), layer_idx)
        cache.layers[layer_idx].extras[LEVEL] = torch.tensor([[0.0, 1.0, 3.0], [3.0, 3.0, 2.0]])
    assert level_sizes(cache) == [0.5, 0.5, 0.5, 1.5]


def test_plot_popularity_script_draws_level_sizes(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "plot_popularity.py"
    spec = importlib.util.spec_from_file_location("plot_popularity", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [
        {
            "status": "ok",
            "method": "hierarchical",
            "method_label": "hierarchical",
            "compress": "prompt",
            "budget": budget,
            "method_record": {"level_sizes": [[0, 90, 5, 3, 2], [0, 30, 5, 3, 2], [10, 20, 15, 3, 2]]},
        }
        for budget in (40, 64)
    ] + [{"status": "ok", "method": "snapkv", "method_record": None}]
    steps, levels = module.mean_curve([rows[0]["method_record"]["level_sizes"]] * 2)
    assert steps == [0, 10] and levels == [[30, 5, 3, 2], [20, 15, 3, 2]]  # post-compression state at 0
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    paths = module.popularity_figures(module.read_jsonl(tmp_path / "samples.jsonl"), tmp_path)
    assert sorted(p.name for p in paths) == ["popularity_hierarchical_prompt.pdf", "popularity_hierarchical_prompt.png"]
    assert all(p.stat().st_size > 0 for p in paths)


# ---------------------------------------------------------------- H2O by hand


def test_h2o_prefill_sums_match_naive_attention_in_any_chunking():
    torch.manual_seed(0)
    layer = hand_layer(torch.randn(2, 7, 4))
    queries = torch.randn(4, 7, 4)
    positions = torch.arange(7)
    naive = torch.zeros(2, 7)
    for head in range(4):
        for row in range(7):
            logits = [float(queries[head, row] @ layer.keys[0, head // 2, col]) * 0.5 for col in range(row + 1)]
            for col, p in enumerate(softmax(logits)):
                naive[head // 2, col] += p / 2  # mean over the GQA group of 2
    for chunk_elements in (1, 20, 1 << 20):  # one row at a time, a few rows, everything at once
        sums = accumulated_attention(queries, layer, positions, 0.5, "mean", chunk_elements)
        torch.testing.assert_close(sums, naive, rtol=1e-5, atol=1e-6)


def test_h2o_accumulates_across_decode_steps_and_evicts_the_lightest_old_slot():
    # One KV head, two query heads (GQA mean), d = 2, budget 4 = 2 heavy + 2 recent.
    keys = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.5, 0.0], [2.0, 0.0]]])
    layer = hand_layer(keys)
    layer.extras[H2O_SCORE] = torch.tensor([[1.0, 0.2, 0.5, 0.1]])
    evictor = DecodeAccumulator(budget=4, recent=2, gqa_agg="mean")

    # Step 1: both heads' queries are zero -> uniform 1/5 over the 5 slots.
    append_slot(layer, torch.tensor([[0.0, 0.0]]), position=4)
    evictor.on_attention(0, torch.zeros(1, 2, 1, 2), layer, torch.tensor([4]), 1.0)
    # scores 1.2, 0.4, 0.7, 0.3, 0.2; the older three compete for 2 places: slot 1 (0.4) goes.
    assert layer.positions.tolist() == [[0, 2, 3, 4]]
    torch.testing.assert_close(layer.extras[H2O_SCORE], torch.tensor([[1.2, 0.7, 0.3, 0.2]]))

    # Step 2: head 0 looks along x (strongly at position 3, key 2.0), head 1 is uniform.
    append_slot(layer, torch.tensor([[0.0, 0.0]]), position=5)
    query = torch.tensor([[[[3.0, 0.0]], [[0.0, 0.0]]]])
    evictor.on_attention(0, query, layer, torch.tensor([5]), 1.0)
    key_x = [1.0, 0.5, 2.0, 0.0, 0.0]  # slots: positions 0, 2, 3, 4, 5
    focused = softmax([3.0 * x for x in key_x])
    added = [(f + 0.2) / 2 for f in focused]
    expected = [1.2 + added[0], 0.7 + added[1], 0.3 + added[2], 0.2 + added[3], added[4]]
    # position 3 climbs past position 2, which is now the lightest of the three older slots
    assert expected[2] > expected[1] and expected[1] < expected[0]
    assert layer.positions.tolist() == [[0, 3, 4, 5]]
    torch.testing.assert_close(
        layer.extras[H2O_SCORE], torch.tensor([[expected[0], expected[2], expected[3], expected[4]]])
    )


# ---------------------------------------------------------------- TOVA by hand


def test_tova_evicts_the_lowest_head_averaged_slot_for_every_kv_head():
    # Two KV heads (4 query heads), 5 slots, budget 4. Keys along x with different magnitudes per KV head.
    keys = torch.zeros(2, 5, 2)
    keys[0, :, 0] = torch.tensor([0.0, 1.0, 2.0, 0.5, 1.5])
    keys[1, :, 0] = torch.tensor([3.0, 0.0, 2.5, 1.0, 0.2])
    layer = hand_layer(keys)
    query = torch.zeros(1, 4, 1, 2)
    query[0, :, 0, 0] = torch.tensor([1.0, 0.5, 1.0, 2.0])
    rows = []
    for head in range(4):
        rows.append(softmax([float(query[0, head, 0, 0]) * float(keys[head // 2, s, 0]) for s in range(5)]))
    averaged = [sum(row[s] for row in rows) / 4 for s in range(5)]
    lowest = min(range(5), key=lambda s: averaged[s])
    per_kv_head_lowest = [min(range(5), key=lambda s, kv=kv: rows[2 * kv][s] + rows[2 * kv + 1][s]) for kv in range(2)]
    assert per_kv_head_lowest[0] != per_kv_head_lowest[1]  # a per-head policy would evict different slots
    LastQueryEvictor(budget=4).on_attention(0, query, layer, torch.tensor([5]), 1.0)
    kept = [s for s in range(5) if s != lowest]
    assert layer.positions.tolist() == [kept, kept]
    assert torch.equal(layer.keys[0, :, :, 0], keys[:, kept, 0])


# ---------------------------------------------------------------- Knorm by hand


def test_knorm_keeps_the_lowest_norm_keys_per_head():
    keys = torch.tensor(
        [
            [[3.0, 0.0], [0.1, 0.1], [1.0, 1.0], [0.0, 0.5], [2.0, 2.0]],  # norms 3, .14, 1.41, .5, 2.83
            [[0.2, 0.0], [4.0, 0.0], [0.0, 0.3], [1.0, 0.0], [0.0, 0.1]],  # norms .2, 4, .3, 1, .1
        ]
    )
    cache = KVCache(1)
    cache.layers[0] = hand_layer(keys)
    ctx = CompressionContext(budget=3, prompt_len=5, num_heads=2, num_kv_heads=2)
    build_method({"name": "knorm"}).compress(cache, ctx)
    assert cache.layers[0].positions.tolist() == [[1, 2, 3], [0, 2, 4]]
    assert cache.kv_bytes() == 2 * 2 * 3 * 2 * 4


# ---------------------------------------------------------------- Expected Attention


def test_unrotate_recovers_the_pre_rope_queries_of_the_model(tiny_lm):
    """The prefill observer's un-rotated queries equal q_proj's output (the pre-RoPE queries)."""
    captured = []
    attention = tiny_lm.model.model.layers[0].self_attn
    handle = attention.q_proj.register_forward_hook(lambda module, args, out: captured.append(out.detach()))
    stats = QueryStatistics(skip=4)
    stats.bind_model(tiny_lm)
    try:
        prefill(tiny_lm, random_ids(40, seed=7), 0, Stopwatch(tiny_lm.device), [stats])
    finally:
        handle.remove()
    config = tiny_lm.config
    pre_rope = captured[0][0].view(40, config.num_attention_heads, config.head_dim).transpose(0, 1)[:, 4:].double()
    mean, covariance = stats.moments(0, config.num_attention_heads, config.head_dim)
    centered = pre_rope - pre_rope.mean(dim=1, keepdim=True)
    torch.testing.assert_close(mean, pre_rope.mean(dim=1).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(covariance, (centered.transpose(1, 2) @ centered / 36).float(), rtol=0, atol=1e-4)
    assert stats.count[0] == 36
    # and the inversion itself is exact to fp32 rounding
    cos, sin = stats.rope(torch.arange(4, 40), torch.device("cpu"))
    rotated, _ = apply_rotary_pos_emb(pre_rope.float(), pre_rope.float(), cos, sin, unsqueeze_dim=0)
    assert float((unrotate(rotated, cos, sin) - pre_rope.float()).abs().max()) < 1e-5


def test_expected_attention_score_matches_an_independent_computation(tiny_lm):
    torch.manual_seed(1)
    num_heads, num_kv_heads, head_dim, length, n_future = 4, 2, 16, 9, 6
    rotary = rotary_embedding(tiny_lm.model)
    stats = QueryStatistics(skip=2)
    stats.rotary = rotary
    # Feed post-RoPE queries built from known pre-RoPE ones at positions 0..7 (the first two are skipped).
    pre_rope = torch.randn(num_heads, 8, head_dim)
    cos, sin = rotary(torch.zeros(1), torch.arange(8)[None])
    rotated, _ = apply_rotary_pos_emb(pre_rope[None], pre_rope[None], cos, sin)
    stats.on_attention(0, rotated, None, torch.arange(8), head_dim**-0.5)
    keys, values = torch.randn(num_kv_heads, length, head_dim), torch.randn(num_kv_heads, length, head_dim)
    layer = hand_layer(keys, values)  # positions 0..8, so the future positions are 9..14
    method = build_method({"name": "expected_attention", "n_future_positions": n_future, "n_sink": 2})
    ctx = CompressionContext(budget=5, prompt_len=length, num_heads=num_heads, num_kv_heads=num_kv_heads)
    ctx.prefill_stats = stats
    scores = method.layer_scores(0, layer, 5, ctx).scores

    # Independent: rotate the basis with transformers' own RoPE at each future position and average.
    eye = torch.eye(head_dim)[None, None]  # rows = basis vectors
    future_cos, future_sin = rotary(torch.zeros(1), torch.arange(length, length + n_future)[None])
    rotations = [
        apply_rotary_pos_emb(eye, eye, future_cos[:, p : p + 1], future_sin[:, p : p + 1])[0][0, 0].T
        for p in range(n_future)
    ]
    r_bar = torch.stack(rotations).mean(dim=0).double()
    used = pre_rope[:, 2:].double()
    expected = torch.zeros(num_kv_heads, length, dtype=torch.float64)
    for head in range(num_heads):
        mu = r_bar @ used[head].mean(dim=0)
        centered = used[head] - used[head].mean(dim=0)
        sigma = r_bar @ (centered.T @ centered / used.shape[1]) @ r_bar.T
        logits = [
            float(mu @ keys[head // 2, j].double()) / math.sqrt(head_dim)
            + float(keys[head // 2, j].double() @ sigma @ keys[head // 2, j].double()) / (2 * head_dim)
            for j in range(2, length)
        ]
        for j, p in zip(range(2, length), softmax(logits), strict=True):
            expected[head // 2, j] += p / 2
    expected = expected * values.double().norm(dim=-1)
    torch.testing.assert_close(scores[:, 2:].double(), expected[:, 2:], rtol=1e-4, atol=1e-7)
    assert bool(torch.isinf(scores[:, :2]).all())  # sinks are always kept
