"""Head-adaptive budgets: AdaKV (per-head shares of a layer's budget), KVzip (global top-k over layers x heads) and
RazorAttention (retrieval heads keep everything): exact per-(layer, head) kept counts, known answers on hand-made
inputs, kept slots untouched, and scores computed once per sample for a budget sweep. The budget rule and the
identity with the full cache when nothing is evicted are checked for every method in test_method_contract.py."""

from __future__ import annotations

import math

import pytest
import torch

from kvbench.engine.attention import attend
from kvbench.engine.cache import PAD_POSITION, KVLayer
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.methods import build_method
from kvbench.methods.adakv import head_budgets
from kvbench.methods.kvzip import FIRST_REPEAT_PROMPT, NEXT_REPEAT_PROMPT, chat_template_parts, global_topk_mask
from kvbench.methods.razor import compress_layer
from tests.helpers import assert_kept_slots_are_untouched, needle_sample, one_hot, prefilled


def run(lm, name_or_cfg, budget, compress="prompt", cache_dir=None, sample=None):
    cfg = {"name": name_or_cfg} if isinstance(name_or_cfg, str) else name_or_cfg
    jobs = [Job(build_method({"name": "full"}), None, "full"), Job(build_method(cfg), budget, "m")]
    rows = run_sample(
        lm, sample or needle_sample(8), jobs, RunOptions(compress=compress, seed=0, fail_fast=True, cache_dir=cache_dir)
    )
    return {job.key: row for job, row in rows}


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
        verdict = method.inner.layer_scores(layer_idx, cache.layers[layer_idx], budget, ctx)
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


def test_razor_with_every_head_retrieval_is_identical_to_full(tiny_lm, tmp_path):
    """Razor's budget binds only non-retrieval heads: with all heads retrieval nothing may change."""
    cfg = {"name": "razor", "induction_fraction": 1.0}
    rows = run(tiny_lm, cfg, 16, cache_dir=tmp_path)
    assert rows["m"]["compressed"] is True
    assert rows["m"]["output_ids"] == rows["full"]["output_ids"]
    assert rows["m"]["kept_entries_compressed"] == rows["m"]["compressed_tokens"] * 4 * 2


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
    retrieval = method.retrieval_heads(ctx, len(cache.layers))
    assert int(retrieval.sum()) == 2  # round(0.14 * 8) = 1 induction + at least 1 echo head, here distinct
    assert len(list((tmp_path / "razor").glob("*.json"))) == 1

    def no_profiling(*args, **kwargs):
        raise AssertionError("the cached head profile should have been read")

    monkeypatch.setattr("kvbench.methods.razor.profile_heads", no_profiling)
    assert torch.equal(method.retrieval_heads(ctx, len(cache.layers)), retrieval)
    compressed = cache.copy()
    method.compress(compressed, ctx)
    for layer_idx, layer in enumerate(compressed.layers):
        expected = [ctx.prompt_len if r else budget for r in retrieval[layer_idx].tolist()]
        assert layer.lengths().tolist() == expected
    assert_kept_slots_are_untouched(cache, compressed, skip_biased=True)


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
