"""AdaKV, KVzip, RazorAttention, DapQ and the hierarchical popularity policy: identity with full when nothing is
evicted, exact per-(layer, head) kept counts, known answers on hand-made inputs, ragged caches fed a multi-token
question (compress=context), and the decode-time budget."""

from __future__ import annotations

import math

import pytest
import torch

from kvbench.engine.attention import attend
from kvbench.engine.cache import PAD_POSITION, KVCache, KVLayer
from kvbench.engine.generation import prefill
from kvbench.engine.kernels.window_attention import aggregate_gqa, window_attention
from kvbench.engine.measure import Stopwatch
from kvbench.engine.rope import rope_inv_freq, rotate_keys
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.methods import build_method
from kvbench.methods.adakv import head_budgets
from kvbench.methods.base import CompressionContext
from kvbench.methods.dapq import PseudoQueryScorer
from kvbench.methods.hierarchical import COUNT, LEVEL, PopularityTracker, level_sizes, target_levels, topk_hits
from kvbench.methods.kvzip import FIRST_REPEAT_PROMPT, NEXT_REPEAT_PROMPT, chat_template_parts, global_topk_mask
from kvbench.methods.razor import compress_layer
from tests.helpers import needle_sample

NEW_METHODS = ["adakv", "kvzip", "razor", "dapq", "hierarchical"]


def run(lm, name_or_cfg, budget, compress="prompt", cache_dir=None, sample=None):
    cfg = {"name": name_or_cfg} if isinstance(name_or_cfg, str) else name_or_cfg
    jobs = [Job(build_method({"name": "full"}), None, "full"), Job(build_method(cfg), budget, "m")]
    rows = run_sample(
        lm, sample or needle_sample(8), jobs, RunOptions(compress=compress, seed=0, fail_fast=True, cache_dir=cache_dir)
    )
    return {job.key: row for job, row in rows}


def prefilled(lm, budget: int, window: int, cache_dir=None) -> tuple[KVCache, CompressionContext]:
    text = " ".join(f"Item {i} is {i * 7 % 13}." for i in range(40))
    ids = lm.tokenizer(text)["input_ids"]
    pre = prefill(lm, ids, window, Stopwatch(lm.device))
    ctx = CompressionContext.for_prompt(lm, budget, len(ids), pre, input_ids=ids, cache_dir=cache_dir)
    return pre.cache, ctx


def assert_kept_slots_are_untouched(original: KVCache, compressed: KVCache, skip_biased: bool = False) -> None:
    """Every kept (non-padding) slot holds exactly the original K/V of its position."""
    for full, layer in zip(original.layers, compressed.layers, strict=True):
        for head in range(layer.num_heads):
            real = layer.positions[head] != PAD_POSITION
            if skip_biased and "logit_bias" in layer.extras:
                real &= layer.extras["logit_bias"][head] == 0
            positions = layer.positions[head, real]
            assert torch.equal(layer.keys[0, head, real], full.keys[0, head, positions])
            assert torch.equal(layer.values[0, head, real], full.values[0, head, positions])


# --- every method -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW_METHODS)
def test_budget_at_least_prompt_is_identical_to_full(tiny_lm, name, tmp_path):
    # hierarchical evicts while decoding, so its "no eviction" budget covers the generated tokens too
    rows = run(tiny_lm, name, 10_000, cache_dir=tmp_path)
    assert rows["m"]["compressed"] is False
    assert rows["m"]["output_ids"] == rows["full"]["output_ids"]
    assert rows["m"]["kv_bytes_compressed"] == rows["full"]["kv_bytes_full"]


def test_razor_with_every_head_retrieval_is_identical_to_full(tiny_lm, tmp_path):
    """Razor's budget binds only non-retrieval heads: with all heads retrieval nothing may change."""
    cfg = {"name": "razor", "induction_fraction": 1.0}
    rows = run(tiny_lm, cfg, 16, cache_dir=tmp_path)
    assert rows["m"]["compressed"] is True
    assert rows["m"]["output_ids"] == rows["full"]["output_ids"]
    assert rows["m"]["kept_entries_compressed"] == rows["m"]["compressed_tokens"] * 4 * 2


@pytest.mark.parametrize("name", NEW_METHODS)
@pytest.mark.parametrize("compress", ["prompt", "context"])
def test_compressed_runs_shrink_memory_and_report_bytes_honestly(tiny_lm, name, compress, tmp_path):
    """compress=context feeds the multi-token question after a (possibly ragged) compression."""
    budget = 40
    row = run(tiny_lm, name, budget, compress, cache_dir=tmp_path)["m"]
    layers, heads = tiny_lm.config.num_hidden_layers, tiny_lm.config.num_key_value_heads
    assert row["status"] == "ok" and row["compressed"] is True
    assert row["kv_bytes_logical_compressed"] <= row["kv_bytes_compressed"] < row["kv_bytes_full"]
    per_slot = row["kv_bytes_full"] // (row["compressed_tokens"] * layers * heads)
    assert row["kv_bytes_logical_compressed"] == row["kept_entries_compressed"] * per_slot
    if name == "razor":
        assert row["kept_entries_compressed"] >= budget * layers * heads
    else:
        assert row["kept_entries_compressed"] == budget * layers * heads


# --- AdaKV ------------------------------------------------------------------------------------------------


def test_adakv_head_budgets_follow_the_formula_and_keep_the_total():
    # 3 heads, B' = 2: the top 6 of all scores are head 0's five best and head 1's best -> n = [5, 1, 0];
    # n*(1-0.2) + 0.2*2 = [4.4, 1.2, 0.4]: rounding each gives 5 in total, the largest remainder fixes it.
    scores = torch.tensor(
        [
            [0.90, 0.80, 0.70, 0.60, 0.50, 0.01],
            [0.55, 0.02, 0.02, 0.02, 0.02, 0.02],
            [0.03, 0.03, 0.03, 0.03, 0.03, 0.03],
        ]
    )
    assert head_budgets(scores, 2, 0.2) == [5, 1, 0]
    assert head_budgets(scores, 2, 1.0) == [2, 2, 2]  # alpha = 1: uniform SnapKV
    assert head_budgets(scores, 2, 0.0) == [5, 1, 0]
    assert sum(round(v) for v in [4.4, 1.2, 0.4]) == 5  # what per-head rounding would have kept


def test_adakv_per_head_counts_match_the_rule_and_only_kept_slots_remain(tiny_lm):
    budget, window = 24, 8
    method = build_method({"name": "adakv", "base_params": {"window": window}})
    cache, ctx = prefilled(tiny_lm, budget, window)
    compressed = cache.copy()
    method.setup(compressed, ctx)
    method.compress(compressed, ctx)
    for layer_idx, layer in enumerate(compressed.layers):
        verdict = method.scorer.layer_scores(layer_idx, cache.layers[layer_idx], budget, ctx)
        expected = [b + window for b in head_budgets(verdict.scores, budget - window, 0.2)]
        assert layer.lengths().tolist() == expected
        assert sum(expected) == budget * layer.num_heads
        for head, count in enumerate(expected):  # each head: its own top-b_h (ties to earlier) + the window
            order = torch.sort(verdict.scores[head], descending=True, stable=True).indices[: count - window]
            want = sorted(order.tolist()) + list(range(ctx.prompt_len - window, ctx.prompt_len))
            assert layer.positions[head, :count].tolist() == want
    assert_kept_slots_are_untouched(cache, compressed)


def test_adakv_with_alpha_one_is_snapkv(tiny_lm):
    snap = run(tiny_lm, "snapkv", 40)["m"]
    ada = run(tiny_lm, {"name": "adakv", "alpha": 1.0}, 40)["m"]
    assert ada["output_ids"] == snap["output_ids"] and ada["kv_bytes_compressed"] == snap["kv_bytes_compressed"]


def test_adakv_wraps_pyramidkv_budgets(tiny_lm):
    row = run(tiny_lm, {"name": "adakv", "base": "pyramidkv"}, 40)["m"]
    pyramid = run(tiny_lm, "pyramidkv", 40)["m"]
    assert row["kept_per_layer_compressed"] == pyramid["kept_per_layer_compressed"]
    with pytest.raises(ValueError, match="scoring method"):
        build_method({"name": "adakv", "base": "streamingllm"})


# --- KVzip ------------------------------------------------------------------------------------------------


def test_kvzip_global_topk_is_exact_and_uneven():
    scores = torch.tensor(
        [
            [[9.0, 8.0, 0.1, 0.2], [0.3, 0.4, 0.5, 7.0]],
            [[6.0, 0.6, 0.7, 0.8], [5.0, 4.0, 3.0, 0.9]],
        ]
    )
    mask = global_topk_mask(scores, 2 * 2 * 2)  # budget 2 per head, 2 layers x 2 heads
    assert int(mask.sum()) == 8
    assert mask.sum(dim=-1).tolist() == [[2, 1], [1, 4]]
    assert mask[1, 1].all() and mask[0, 0, :2].all() and mask[0, 1, 3] and mask[1, 0, 0]


def test_kvzip_repeat_inputs_follow_the_official_recipe(tiny_lm):
    method = build_method({"name": "kvzip", "chunk_size": 50})
    _, ctx = prefilled(tiny_lm, 32, 0)
    encode = lambda text: tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    _, suffix = chat_template_parts(tiny_lm.tokenizer)
    inputs = method.repeat_inputs(ctx, 4)
    assert [(start, end) for start, end, _ in inputs] == [
        (s, min(s + 50, ctx.prompt_len)) for s in range(4, ctx.prompt_len, 50)
    ]
    assert inputs[0][2] == encode(FIRST_REPEAT_PROMPT) + suffix + ctx.input_ids[4:54]
    assert inputs[1][2] == encode(NEXT_REPEAT_PROMPT) + ctx.input_ids[46:54] + suffix + ctx.input_ids[54:104]


def test_kvzip_keeps_the_global_topk_of_its_scores_without_touching_the_cache(tiny_lm):
    budget = 20
    method = build_method({"name": "kvzip", "chunk_size": 64})
    cache, ctx = prefilled(tiny_lm, budget, 0)
    before = [layer.keys.clone() for layer in cache.layers]
    scores = method.score(cache, ctx)
    assert all(torch.equal(layer.keys, k) for layer, k in zip(cache.layers, before, strict=True))
    assert cache.seen_tokens == ctx.prompt_len and cache.layers[0].get_seq_length() == ctx.prompt_len
    sinks = ctx.record["kvzip_sinks"]
    assert torch.isinf(scores[:, :, :sinks]).all() and torch.isfinite(scores[:, :, sinks:]).all()
    assert ((scores[:, :, sinks:] > 0) & (scores[:, :, sinks:] <= 1)).all()
    assert ctx.record["kvzip_forward_tokens"] > ctx.prompt_len - sinks
    compressed = cache.copy()
    method.compress(compressed, ctx)
    expected = global_topk_mask(scores, budget * scores.shape[0] * scores.shape[1])
    assert compressed.kept_per_layer() == expected.sum(dim=-1).tolist()
    assert compressed.kept_entries() == budget * scores.shape[0] * scores.shape[1]
    for layer, mask in zip(compressed.layers, expected, strict=True):
        for head in range(layer.num_heads):
            kept = layer.positions[head][layer.positions[head] != PAD_POSITION]
            assert kept.tolist() == torch.nonzero(mask[head]).flatten().tolist()
    assert len({n for heads in compressed.kept_per_layer() for n in heads}) > 1  # uneven on a real model
    assert_kept_slots_are_untouched(cache, compressed)


# --- RazorAttention ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_razor_compensation_token_counts_n_drop_times(backend):
    torch.manual_seed(0)
    heads, length, dim, budget, sinks = 2, 30, 8, 10, 2
    layer = KVLayer()
    layer.update(torch.randn(1, heads, length, dim), torch.randn(1, heads, length, dim), positions=torch.arange(length))
    keys, values = layer.keys.clone(), layer.values.clone()
    compress_layer(layer, torch.tensor([False, True]), budget, sinks, compensation=True)
    recent = budget - sinks - 1
    n_drop = length - sinks - recent
    assert layer.lengths().tolist() == [budget, length]
    query = torch.randn(1, 4, 1, dim)  # GQA: query heads 0,1 -> KV head 0 (compressed), 2,3 -> KV head 1 (full)
    mask, causal = layer.attention_mask(torch.tensor([length]))
    out = attend(query, layer.keys, layer.values, mask, causal, 0.5, backend)
    k_hat, v_hat = keys[0, 0, sinks : length - recent].mean(0), values[0, 0, sinks : length - recent].mean(0)
    kept = list(range(sinks)) + list(range(length - recent, length))
    for h in range(4):
        kv = h // 2
        if kv == 0:
            k = torch.cat([keys[0, 0, kept], k_hat[None]])
            v = torch.cat([values[0, 0, kept], v_hat[None]])
            weight = torch.tensor([1.0] * len(kept) + [float(n_drop)])
        else:
            k, v, weight = keys[0, 1], values[0, 1], torch.ones(length)
        e = weight * torch.exp(k @ query[0, h, 0] * 0.5)
        torch.testing.assert_close(out[0, h, 0], (e[:, None] * v).sum(0) / e.sum(), rtol=1e-5, atol=1e-5)
    bias = layer.extras["logit_bias"]
    assert math.isclose(float(bias[0, sinks]), math.log(n_drop), rel_tol=1e-6) and int((bias != 0).sum()) == 1


def test_razor_keeps_retrieval_heads_full_and_caches_the_profile(tiny_lm, tmp_path, monkeypatch):
    budget = 16
    method = build_method({"name": "razor"})
    cache, ctx = prefilled(tiny_lm, budget, 0, cache_dir=tmp_path)
    retrieval = method.retrieval_heads(ctx)
    assert int(retrieval.sum()) == 2  # round(0.14 * 8) = 1 induction + at least 1 echo head, here distinct
    assert len(list((tmp_path / "razor").glob("*.json"))) == 1

    def no_profiling(*args, **kwargs):
        raise AssertionError("the cached head profile should have been read")

    monkeypatch.setattr("kvbench.methods.razor.profile_heads", no_profiling)
    assert torch.equal(method.retrieval_heads(ctx), retrieval)
    compressed = cache.copy()
    method.compress(compressed, ctx)
    for layer_idx, layer in enumerate(compressed.layers):
        expected = [ctx.prompt_len if r else budget for r in retrieval[layer_idx].tolist()]
        assert layer.lengths().tolist() == expected
    assert_kept_slots_are_untouched(cache, compressed, skip_biased=True)


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


# --- hierarchical -----------------------------------------------------------------------------------------


def test_hierarchical_thresholds_and_topk_hits():
    assert target_levels(torch.tensor([0, 1, 4, 5, 9, 10, 40])).tolist() == [0, 1, 1, 2, 2, 3, 3]
    probs = torch.tensor([[[0.1, 0.6, 0.3, 0.0], [0.5, 0.2, 0.3, 0.0]]])
    assert topk_hits(probs, 2).tolist() == [[1.0, 1.0, 2.0, 0.0]]
    assert topk_hits(torch.tensor([[[1.0, 0.0, 0.0]]]), 2).tolist() == [[1.0, 0.0, 0.0]]  # zeros never count


def one_hot(index: int, dim: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(index), dim).float() * 10


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
    from kvbench.harness.prompt import build_prompt

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


def test_razor_profile_scores_echo_and_induction_heads_on_hand_made_attention():
    """Query head 0 looks at the previous occurrence of its token (echo), head 1 at the token after it
    (induction); one-hot keys per slot make those attentions ~1."""
    from kvbench.methods.razor import RepeatAttention

    offset, period, dim = 1, 6, 16
    length = offset + 2 * period
    layer = KVLayer()
    keys = torch.stack([one_hot(slot, dim) for slot in range(length)])[None, None]
    layer.update(keys, torch.zeros_like(keys), positions=torch.arange(length))
    echo_rows = [one_hot(max(r - period, 0), dim) for r in range(length)]
    induction_rows = [one_hot(max(r - period + 1, 0), dim) for r in range(length)]
    query = torch.stack([torch.stack(echo_rows), torch.stack(induction_rows)])[None]  # [1, 2 heads, n, d]
    observer = RepeatAttention(offset, period)
    observer.on_attention(0, query, layer, torch.arange(length), 1.0)
    assert observer.echo[0][0] > 0.99 and observer.echo[0][1] < 0.01
    assert observer.induction[0][1] > 0.99 and observer.induction[0][0] < 0.01


@pytest.mark.parametrize("name", ["kvzip", "dapq"])
def test_budget_sweeps_score_once_per_sample(tiny_lm, name, monkeypatch):
    """The extra forwards of KVzip / DapQ do not depend on the budget: one per sample, same rows as alone."""
    from kvbench.methods.dapq import DapQ
    from kvbench.methods.kvzip import KVzip

    cls, attr = (KVzip, "score") if name == "kvzip" else (DapQ, "rotated_scores")
    calls = []
    original = getattr(cls, attr)

    def counted(self, cache, ctx):
        calls.append(ctx.budget)
        return original(self, cache, ctx)

    monkeypatch.setattr(cls, attr, counted)
    method = build_method({"name": name})
    jobs = [Job(method, budget, str(budget)) for budget in (24, 40)]
    rows = {
        job.key: row
        for job, row in run_sample(
            tiny_lm, needle_sample(8), jobs, RunOptions(compress="context", seed=0, fail_fast=True)
        )
    }
    assert calls == [24]
    assert rows["40"]["method_record"][f"{name}_scores_shared"] is True
    alone = run(tiny_lm, name, 40, "context")["m"]
    assert (
        rows["40"]["output_ids"] == alone["output_ids"]
        and rows["40"]["kept_per_layer_compressed"] == alone["kept_per_layer_compressed"]
    )
