"""The compressed cache and the decode loop: physical shrinkage, original positions, masks, generate-equality, the
model's cache keyword, and what a row reports the cache held (after compression, after the question tail, at the
end of the row and at its peak)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from kvbench.engine.cache import PAD_POSITION, KVCache
from kvbench.engine.generation import cache_argument, forward_tokens, greedy_decode, prefill
from kvbench.engine.measure import Stopwatch
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.harness.sample import Sample
from kvbench.methods import build_method


def random_ids(n: int, seed: int = 0, vocab: int = 49152) -> list[int]:
    return torch.randint(100, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_generate(lm, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate with its stock SDPA attention and DynamicCache."""
    lm.model.set_attn_implementation("sdpa")
    try:
        out = lm.model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=lm.eos_token_ids
        )
    finally:
        lm.model.set_attn_implementation("kvbench")
    return out[0, len(ids) :].tolist()


def test_full_decoding_matches_model_generate(tiny_lm):
    for seed, length in [(0, 37), (1, 120)]:
        ids = random_ids(length, seed)
        stopwatch = Stopwatch(tiny_lm.device)
        pre = prefill(tiny_lm, ids, 0, stopwatch)
        ours = greedy_decode(tiny_lm, pre.cache.copy(), pre.last_logits, 24, lambda n: None, stopwatch).tokens
        assert ours == reference_generate(tiny_lm, ids, 24)


def test_prefill_cache_holds_kv_heads_with_original_positions(tiny_lm):
    ids = random_ids(50)
    pre = prefill(tiny_lm, ids, 8, Stopwatch(tiny_lm.device))
    config = tiny_lm.config
    for layer in pre.cache.layers:
        assert layer.keys.shape == (1, config.num_key_value_heads, 50, config.head_dim)  # never repeat_kv-expanded
        assert torch.equal(layer.positions, torch.arange(50).expand(config.num_key_value_heads, -1))
    assert pre.window_queries[0].shape == (config.num_attention_heads, 8, config.head_dim)
    assert pre.window_positions.tolist() == list(range(42, 50))


def test_keep_physically_shrinks_and_bytes_are_tensor_bytes(tiny_lm):
    pre = prefill(tiny_lm, random_ids(64), 0, Stopwatch(tiny_lm.device))
    cache = pre.cache.copy()
    full_bytes = cache.kv_bytes()
    assert full_bytes == sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    indices = torch.tensor([[0, 5, 9, 63], [1, 2, 3, 60]])
    for layer in cache.layers:
        layer.keep(indices)
    for layer in cache.layers:
        assert layer.keys.shape[2] == 4 and layer.values.shape[2] == 4
        assert layer.positions.tolist() == indices.tolist()
    assert cache.kv_bytes() == full_bytes * 4 // 64
    assert cache.kv_bytes() == sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )
    assert cache.kept_per_layer() == [[4, 4]] * len(cache.layers)
    # the copy that was compressed is independent of the shared prefill cache
    assert pre.cache.layers[0].keys.shape[2] == 64


def test_ragged_heads_report_physical_and_logical_bytes(tiny_lm):
    pre = prefill(tiny_lm, random_ids(40), 0, Stopwatch(tiny_lm.device))
    cache = pre.cache.copy()
    layer = cache.layers[0]
    indices = torch.tensor([[0, 1, 2, 3], [0, 7, 0, 0]])
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    layer.keep(indices, valid)
    assert layer.lengths().tolist() == [4, 2]
    assert layer.positions[1, 2:].tolist() == [PAD_POSITION, PAD_POSITION]
    slot_bytes = 2 * layer.keys.shape[-1] * layer.keys.element_size()
    assert layer.nbytes() == 2 * 4 * slot_bytes
    assert layer.logical_nbytes() == 6 * slot_bytes


def test_decode_positions_continue_the_original_sequence(tiny_lm):
    """After eviction the cache is short, but new tokens sit at prompt length + i (not the compressed length)."""

    class PositionLog:
        def __init__(self):
            self.seen = []

        def on_attention(self, layer_idx, query, layer, query_positions, scaling):
            if layer_idx == 0:
                self.seen.append(query_positions.tolist())

    ids = random_ids(80)
    sample_jobs = [Job(build_method({"name": "window"}), 16, "w")]
    pre = prefill(tiny_lm, ids, 0, Stopwatch(tiny_lm.device))
    cache = pre.cache.copy()
    sample_jobs[0].method.compress(cache, _ctx(16, 80))
    assert cache.layers[0].get_seq_length() == 16
    log = PositionLog()
    cache.observers.append(log)
    greedy_decode(tiny_lm, cache, pre.last_logits, 6, lambda n: None, Stopwatch(tiny_lm.device))
    assert log.seen == [[80], [81], [82], [83], [84]]
    assert cache.layers[0].positions[0, -5:].tolist() == [80, 81, 82, 83, 84]


def _ctx(budget: int, prompt_len: int):
    from kvbench.methods.base import CompressionContext

    return CompressionContext(budget=budget, prompt_len=prompt_len, num_heads=4, num_kv_heads=2)


def test_masks_follow_positions_not_lengths(tiny_lm):
    """A multi-token input over an evicted cache must equal explicit attention over the kept keys only."""
    ids = random_ids(60)
    pre = prefill(tiny_lm, ids, 0, Stopwatch(tiny_lm.device))
    cache = pre.cache.copy()
    keep = torch.tensor([0, 1, 2, 10, 20, 30, 40, 50, 59])
    for layer in cache.layers:
        layer.keep(keep.expand(layer.num_heads, -1))
    # reference: a fresh cache holding exactly those slots, evaluated with the eager backend and explicit masks
    reference = KVCache(len(cache.layers))
    reference.layers = [layer.copy() for layer in cache.layers]
    reference.seen_tokens = cache.seen_tokens
    tail = random_ids(5, seed=3)
    logits = forward_tokens(tiny_lm, cache, tail)
    tiny_lm.model.config.kvbench_attn_backend = "eager"
    try:
        expected = forward_tokens(tiny_lm, reference, tail)
    finally:
        tiny_lm.model.config.kvbench_attn_backend = "sdpa"
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_pyramidkv_then_multi_token_question(tiny_lm):
    """Per-layer lengths differ after PyramidKV; feeding the question (many tokens) afterwards must work."""
    sample = Sample(
        sample_id="t",
        context=" ".join(["The grass is green. The sky is blue."] * 30),
        question="What colour is the sky? Answer in one word, please, and be brief about it.",
        answer_prefix="The sky is",
        answers=["blue"],
        metric="string_match_all",
        max_new_tokens=4,
    )
    jobs = [Job(build_method({"name": "pyramidkv", "window": 8}), 64, "p")]
    ((_, row),) = list(run_sample(tiny_lm, sample, jobs, RunOptions(compress="context", seed=0, fail_fast=True)))
    assert row["status"] == "ok" and row["compressed"]
    per_layer = row["kept_per_layer_compressed"]
    assert len(set(per_layer)) > 1  # layers really hold different lengths
    assert sum(per_layer) / len(per_layer) == 64
    assert row["output_tokens"] >= 1


def test_context_mode_without_compression_equals_prompt_mode(tiny_lm):
    sample = Sample(
        sample_id="t",
        context="Alpha beta gamma delta. " * 20,
        question="Which letter comes first?",
        answer_prefix="It is",
        answers=["alpha"],
        metric="string_match_all",
        max_new_tokens=12,
    )
    jobs = [Job(build_method({"name": "full"}), None, "f")]
    ((_, prompt_row),) = list(run_sample(tiny_lm, sample, jobs, RunOptions(compress="prompt", seed=0, fail_fast=True)))
    ((_, context_row),) = list(
        run_sample(tiny_lm, sample, jobs, RunOptions(compress="context", seed=0, fail_fast=True))
    )
    assert prompt_row["output_ids"] == context_row["output_ids"]
    assert context_row["compressed_tokens"] < context_row["prompt_tokens"]


def test_forward_does_not_use_the_deprecated_past_key_values_argument(tiny_lm):
    cache = KVCache(tiny_lm.config.num_hidden_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        logits = forward_tokens(tiny_lm, cache, [1, 2, 3])
    assert cache.layers[0].get_seq_length() == 3 and torch.isfinite(logits).all()


def test_the_cache_keyword_follows_the_model_signature():
    class Recent:
        def forward(self, input_ids=None, cache=None, use_cache=None): ...

    class Older:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...

    assert cache_argument(Recent) == "cache" and cache_argument(Older) == "past_key_values"


def context_needle(max_new_tokens: int = 12) -> Sample:
    """A needle prompt whose question tail is several tokens long (compress=context feeds it after compression)."""
    context = "The grass is green and the sky is blue. " * 12 + "The magic number is 4242. " + "Filler. " * 20
    return Sample("s", context, "What is the magic number?", "Answer:", ["4242"], "string_match_all", max_new_tokens)


def slot_bytes(lm) -> int:
    return 2 * lm.config.head_dim * 4  # K + V, fp32


@pytest.mark.parametrize("name", ["streamingllm", "tova", "h2o"])
def test_rows_report_the_cache_at_the_end_of_the_row_and_its_peak(tiny_lm, name):
    """compress=context: the question tail and decoding keep evicting; the row says what is held at the end."""
    budget = 40
    jobs = [Job(build_method({"name": name}), budget, name)]
    ((_, row),) = list(
        run_sample(tiny_lm, context_needle(), jobs, RunOptions(compress="context", seed=0, fail_fast=True))
    )
    layers, heads = tiny_lm.config.num_hidden_layers, tiny_lm.config.num_key_value_heads
    per_token = layers * heads * slot_bytes(tiny_lm)
    split = row["compressed_tokens"]
    assert row["compressed"] and row["prompt_tokens"] > split
    assert row["kept_entries_compressed"] == budget * layers * heads
    assert math.isclose(row["kept_fraction_compressed"], budget / split)
    # The end of the row: still at the budget, but part of it is now question and generated tokens.
    assert row["kept_entries"] == budget * layers * heads
    assert row["kv_bytes"] == budget * per_token
    assert row["kept_fraction"] < row["kept_fraction_compressed"]
    # Peak: every forward appends its tokens before those evictions (tova/h2o evict inside the forward).
    tail = row["prompt_tokens"] - split
    expected_peak = (budget + tail if name != "streamingllm" else budget) * per_token
    assert row["kv_bytes_peak"] == expected_peak
    assert row["kept_entries_tail"] == budget * layers * heads


@pytest.mark.parametrize("name", ["streamingllm", "tova", "h2o"])
def test_decode_evict_false_appends_the_tail_and_the_generated_tokens(tiny_lm, name):
    budget = 40
    jobs = [Job(build_method({"name": name, "decode_evict": False}), budget, name)]
    ((_, row),) = list(
        run_sample(tiny_lm, context_needle(), jobs, RunOptions(compress="context", seed=0, fail_fast=True))
    )
    layers, heads = tiny_lm.config.num_hidden_layers, tiny_lm.config.num_key_value_heads
    appended = row["prompt_tokens"] - row["compressed_tokens"] + row["output_tokens"] - 1  # tail + decoded
    assert row["kept_entries_compressed"] == budget * layers * heads
    assert row["kept_entries"] == (budget + appended) * layers * heads
    assert row["kept_fraction"] == row["kept_fraction_compressed"]  # the context is never evicted again
    assert row["kv_bytes_peak"] == row["kv_bytes"]  # the cache only grows after compression
