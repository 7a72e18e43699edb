"""Batched evaluation (`batch_size=B`): rows equal to batch-1 rows (greedy tokens, kept entries, bytes) on prompts of
different lengths, for stacked caches (the full cache, eviction scorers, a head-adaptive method) and for per-row
batches (decode-time evictors, a decode budget, quantised storage, a composition); padding slots never attended and a
per-row batch decoding each row as batch 1 (hand-made cases); refusals of what cannot batch and of bad values, in one
line, before any model work (CLI and API)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import kvbench.api as kv
from kvbench import config as run_config
from kvbench.engine import attention
from kvbench.engine.batched import (
    PER_ROW,
    STACKED,
    BatchedKVCache,
    PerRowBatch,
    Sequence,
    batch_attention,
    batched_greedy_decode,
    forward_batch,
    stack_refusal,
)
from kvbench.engine.cache import PAD_POSITION, KVCache
from kvbench.engine.generation import QueryRecorder, forward_tokens, greedy_decode
from kvbench.engine.measure import Stopwatch
from kvbench.harness.options import RunOptions
from kvbench.harness.results import CLAIMS_DIR
from kvbench.harness.sample import Sample
from tests.helpers import SMALL_NIAH, TINY, cli, composed

# Fields that must be identical between batch 1 and batch B (times, peaks of device memory are measurements).
SAME = (
    "key",
    "status",
    "output_ids",
    "output_tokens",
    "prediction",
    "kept_entries",
    "kept_per_layer",
    "kept_fraction",
    "kv_bytes",
    "kv_bytes_logical",
    "kv_bytes_compressed",
    "kv_bytes_peak",
    "kv_bytes_reserved",
    "kept_entries_compressed",
    "max_layer_len_decode",
    "token_match",
    "first_divergence",
    "compressed",
    "budget_entries",
)


def samples(lengths: tuple[int, ...] = (30, 12, 22, 5), max_new: tuple[int, ...] = (6, 3, 6, 5)) -> list[Sample]:
    """Prompts of different lengths (so the stacked caches need padding) and different max_new_tokens."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
    return [
        Sample(
            sample_id=f"s{i}",
            context=" ".join(words[(i + j) % len(words)] for j in range(n)),
            question="Which word came first?",
            answer_prefix="Answer:",
            answers=["alpha"],
            metric="string_match_all",
            max_new_tokens=m,
            meta={"ignore_eos": True},
        )
        for i, (n, m) in enumerate(zip(lengths, max_new, strict=True))
    ]


# A short observation window so the scorers select among the prompt tokens (the default 32 would keep only the window
# at these budgets), and AdaKV's heads keep different counts (padded heads).
METHODS = {
    "full": ({"name": "full"}, [None]),
    "snapkv": ({"name": "snapkv", "window": 4}, [16, 24]),
    "adakv": ({"name": "adakv", "base_params": {"window": 4}}, [16]),
    "pyramidkv": ({"name": "pyramidkv", "window": 4}, [16]),  # layers keep different counts
    "streamingllm": ({"name": "streamingllm", "decode_evict": False}, [16]),
    "streamingllm_rerotate": ({"name": "streamingllm", "decode_evict": False, "rerotate": True}, [16]),
}


def rows_equal_at_batch_3(tiny_lm, cfg: dict, budgets: list, compress: str) -> list[dict]:
    """The rows of `samples()` at batch_size=3, checked equal (the SAME fields) to the batch-1 rows."""
    method = kv.build_method(cfg)
    sequential = kv.evaluate(tiny_lm, samples(), method, budgets, include_full=True, compress=compress)
    batched = kv.evaluate(tiny_lm, samples(), method, budgets, include_full=True, compress=compress, batch_size=3)
    assert [row["key"] for row in batched] == [row["key"] for row in sequential]
    for one, many in zip(sequential, batched, strict=True):
        assert one["status"] == "ok", one.get("error")
        assert {k: many[k] for k in SAME if k in one} == {k: one[k] for k in SAME if k in one}
        assert "batch_size" not in one
    return batched


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("compress", ["prompt", "context"])
def test_batched_rows_equal_sequential_rows(tiny_lm, name, compress):
    cfg, budgets = METHODS[name]
    batched = rows_equal_at_batch_3(tiny_lm, cfg, budgets, compress)
    # 4 samples at B=3: a batch of 3, then one of 1 (which needs no padding).
    assert [row["batch_size"] for row in batched if row["method"] == "full"] == [3, 3, 3, 1]
    assert {row["batch_attention"] for row in batched} == {STACKED}
    assert batched[-1]["batch_padding_fraction"] == 0.0
    assert 0.0 < batched[0]["batch_padding_fraction"] < 1.0
    if name != "full":  # the methods evicted for real on the longer prompts
        assert any(row["compressed"] for row in batched if row["method"] != "full")


# Methods whose caches cannot be stacked: they evict while decoding (inside attention, by observers: h2o, tova; before
# each forward: streamingllm's default decode_evict=true, a scorer's decode_budget) or store codes (kivi), so each row
# attends over its own cache. `max_len`: the bound decode-time eviction keeps every compressed row's layers within at
# compress=prompt (without it a layer would grow by every decoded token); `quantised`: codes are held (KIVI with its
# default 128-slot fp residual keeps these short prompts in fp; a residual of 8 flushes codes while decoding).
PER_ROW_METHODS = {
    "h2o": ({"name": "h2o"}, [16], {"max_len": 16}),
    "tova": ({"name": "tova"}, [16], {"max_len": 16}),
    "streamingllm": ({"name": "streamingllm"}, [16], {"max_len": 16}),
    "snapkv_decode_budget": (
        {"name": "snapkv", "window": 4, "decode_budget": 20, "decode_interval": 4},
        [16],
        {"max_len": 20},
    ),
    "kivi": ({"name": "kivi"}, [None], {}),
    "kivi_residual_8": ({"name": "kivi", "group_size": 8, "residual_length": 8}, [None], {"quantised": True}),
    "snapkv_kivi": ({"name": "kivi", "base": "snapkv", "base_params": {"window": 4}}, [16], {}),
    "snapkv_kivi_residual_8": (
        {"name": "kivi", "base": "snapkv", "base_params": {"window": 4}, "group_size": 8, "residual_length": 8},
        [16],
        {"quantised": True},
    ),
}


@pytest.mark.parametrize("name", list(PER_ROW_METHODS))
@pytest.mark.parametrize("compress", ["prompt", "context"])
def test_per_row_batched_rows_equal_sequential_rows(tiny_lm, name, compress):
    cfg, budgets, exercised = PER_ROW_METHODS[name]
    batched = rows_equal_at_batch_3(tiny_lm, cfg, budgets, compress)
    rows = [row for row in batched if row["method"] != "full"]
    assert [row["batch_size"] for row in rows] == [3, 3, 3, 1]
    assert all(row["batch_attention"] == PER_ROW and row["batch_padding_fraction"] == 0.0 for row in rows)
    # The full cache's rows still stack (with padding) beside them.
    assert [row["batch_attention"] for row in batched if row["method"] == "full"] == [STACKED] * 4
    if "max_len" in exercised and compress == "prompt":  # no question tail: decoding starts at the budget
        compressed = [row for row in rows if row["compressed"]]
        assert compressed and all(row["max_layer_len_decode"] <= exercised["max_len"] for row in compressed)
    if exercised.get("quantised"):
        assert all(row["kv_bytes_compressed"] < row["kv_bytes_full"] for row in rows)


def test_per_row_batches_run_each_rows_decode_kernels(kernel_lm, monkeypatch):
    # kernels=triton: each row's single-token steps read its packed codes with the packed decode kernel (the Triton
    # interpreter without a GPU), as its batch-1 decode does; the rows are the batch-1 rows.
    cfg, budgets, _ = PER_ROW_METHODS["kivi_residual_8"]
    method = kv.build_method(cfg)
    sequential = kv.evaluate(kernel_lm, samples(), method, budgets, kernels="triton")
    packed_queries = []
    packed_step = attention.decode_step_packed

    def counted_packed_step(query, *args):
        packed_queries.append(query.shape[0])
        return packed_step(query, *args)

    monkeypatch.setattr(attention, "decode_step_packed", counted_packed_step)
    batched = kv.evaluate(kernel_lm, samples(), method, budgets, kernels="triton", batch_size=3)
    # One call per row, layer and decode step (5 + 2 + 5 + 4 forwards over 4 layers), each with that row's query.
    assert packed_queries == [1] * (16 * 4)
    for one, many in zip(sequential, batched, strict=True):
        assert one["status"] == "ok", one.get("error")
        assert {k: many[k] for k in SAME} == {k: one[k] for k in SAME}
        assert many["batch_attention"] == PER_ROW


def test_cases_above_exercise_padded_heads_and_uneven_layers(tiny_lm):
    # AdaKV's heads keep different counts (padding inside each per-sample cache), PyramidKV's layers do.
    rows = kv.evaluate(tiny_lm, samples(), kv.build_method(METHODS["adakv"][0]), [16], batch_size=3)
    assert any(row["kv_bytes_logical"] < row["kv_bytes"] for row in rows)
    rows = kv.evaluate(tiny_lm, samples(), kv.build_method(METHODS["pyramidkv"][0]), [16], batch_size=3)
    assert all(len(set(row["kept_per_layer"])) == len(row["kept_per_layer"]) for row in rows)


def test_padding_fraction_counts_stacked_slots(tiny_lm):
    caches = []
    for n in (7, 3):
        cache = KVCache(tiny_lm.layer_specs)
        forward_tokens(tiny_lm, cache, list(range(10, 10 + n)))
        caches.append(cache)
    batch = BatchedKVCache.stack(caches, reserve=2)
    assert batch.padding_fraction == pytest.approx(4 / 14)  # per layer and head: 7 + 3 held of 2 x 7 stacked
    assert (batch.layers[0].positions[1, :, 3:] == PAD_POSITION).all()


def test_padding_is_never_attended(tiny_lm):
    # A short prompt decoded alone vs stacked beside a longer one, its padding slots filled with huge K/V: equal.
    short, long = [5, 9, 14], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    alone = KVCache(tiny_lm.layer_specs)
    logits = forward_tokens(tiny_lm, alone, short)
    reference = greedy_decode(tiny_lm, alone, logits, 6, lambda n: None, Stopwatch(tiny_lm.device), stop_at_eos=False)

    caches, firsts = [], []
    for ids in (short, long):
        cache = KVCache(tiny_lm.layer_specs)
        firsts.append(forward_tokens(tiny_lm, cache, ids))
        caches.append(cache)
    batch = BatchedKVCache.stack(caches, reserve=6)
    for layer in batch.layers:  # poison the padding of the short row
        layer._keys[0, :, len(short) : len(long)] = 1e4
        layer._values[0, :, len(short) : len(long)] = 1e4
    tokens = [[int(torch.argmax(first))] for first in firsts]
    for _ in range(5):
        logits = forward_batch(tiny_lm, batch, [t[-1] for t in tokens])
        for row, lg in enumerate(logits):
            tokens[row].append(int(torch.argmax(lg)))
    assert tokens[0] == reference.tokens
    # Same through the decode loop, which stacks with zero padding: the short row's tokens are the batch-1 ones.
    caches = []
    for ids in (short, long):
        cache = KVCache(tiny_lm.layer_specs)
        forward_tokens(tiny_lm, cache, ids)
        caches.append(cache)
    sequences = [Sequence(cache, first, 6, stop_at_eos=False) for cache, first in zip(caches, firsts, strict=True)]
    decoded, layout = batched_greedy_decode(tiny_lm, sequences, Stopwatch(tiny_lm.device))
    assert decoded[0].tokens == reference.tokens
    assert layout.attention == STACKED and layout.padding_fraction == pytest.approx(7 / 20)
    # The decoded slots went back to each sequence's own cache, at its own positions.
    assert caches[0].layers[0].positions[0].tolist() == list(range(len(short) + 5))
    assert caches[0].kv_bytes() == alone.kv_bytes()


def prefilled(lm, ids: list[int]) -> tuple[KVCache, torch.Tensor]:
    cache = KVCache(lm.layer_specs)
    return cache, forward_tokens(lm, cache, ids)


def test_per_row_batch_decodes_each_row_as_batch_1(tiny_lm):
    # Two caches of very different lengths, decoded per row: each row's greedy tokens and final cache are its
    # batch-1 ones (the same attention code on its own cache), and no slot is padding.
    prompts = [[5, 9, 14], [(7 * i) % 200 + 3 for i in range(120)]]
    references = []
    for ids in prompts:
        alone, first = prefilled(tiny_lm, ids)
        decoded = greedy_decode(tiny_lm, alone, first, 8, lambda n: None, Stopwatch(tiny_lm.device), stop_at_eos=False)
        references.append((decoded.tokens, alone))
    calls: list[int] = []
    sequences = []
    for row, ids in enumerate(prompts):
        cache, first = prefilled(tiny_lm, ids)
        hook = (lambda n, row=row: calls.append(row)) if row == 0 else None
        sequences.append(Sequence(cache, first, 8 if row else 5, stop_at_eos=False, before_forward=hook))
    sequences[0].grows_only = False  # its hook may evict: the batch attends per row
    decoded, layout = batched_greedy_decode(tiny_lm, sequences, Stopwatch(tiny_lm.device))
    assert (layout.attention, layout.padding_fraction) == (PER_ROW, 0.0)
    assert decoded[0].tokens == references[0][0][:5] and decoded[1].tokens == references[1][0]
    assert calls == [0] * 4  # before each of the short row's 4 forwards, never after it left the batch
    long_cache, long_alone = sequences[1].cache, references[1][1]
    assert long_cache.seen_tokens == long_alone.seen_tokens == len(prompts[1]) + 7
    for layer, alone_layer in zip(long_cache.layers, long_alone.layers, strict=True):
        assert torch.equal(layer.positions, alone_layer.positions)
        assert layer.keys.shape == alone_layer.keys.shape
    assert long_cache.kv_bytes() == long_alone.kv_bytes()
    assert long_cache.reserved_kv_bytes() == long_alone.reserved_kv_bytes()
    assert decoded[1].max_layer_len == len(prompts[1]) + 7 and decoded[0].max_layer_len == len(prompts[0]) + 4


def test_per_row_attention_is_the_batch_1_code(tiny_lm):
    # A per-row batch of one row gives bit-identical logits to a batch-1 forward (same shapes everywhere; with
    # B rows only the model's matmuls see other rows, as in any batched forward).
    alone, first = prefilled(tiny_lm, [3, 1, 4, 1, 5, 9])
    row = alone.copy()
    batch = PerRowBatch([row], tiny_lm.device)
    token = int(torch.argmax(first))
    for _ in range(3):
        logits = forward_batch(tiny_lm, batch, [token])[0]
        assert torch.equal(logits, forward_tokens(tiny_lm, alone, [token]))
        token = int(torch.argmax(logits))


def test_stacking_is_chosen_for_plain_caches_only(tiny_lm):
    caches = [prefilled(tiny_lm, ids) for ids in ([5, 9, 14], [3, 1, 4, 1, 5, 9, 2])]
    sequences = [Sequence(cache, first, 4) for cache, first in caches]
    assert batch_attention(sequences) == STACKED
    sequences[1].grows_only = False  # e.g. a decode budget evicts before its forwards
    assert batch_attention(sequences) == PER_ROW
    sequences[1].grows_only = True
    caches[1][0].observers.append(QueryRecorder(2))  # an observer works on the sequence's own slots
    assert stack_refusal(caches[1][0]) == "attention observers work on its slots while decoding"
    assert batch_attention(sequences) == PER_ROW
    with pytest.raises(ValueError, match="cannot batch this cache: attention observers"):
        BatchedKVCache.stack([cache for cache, _ in caches], reserve=2)


def test_refusals_are_one_line_before_model_work(tiny_lm):
    for bad in (0, -2, 1.5, "3", True):
        with pytest.raises(ValueError, match=r"^batch_size must be an integer >= 1, got "):
            RunOptions(batch_size=bad)
    untested = r"its batched rows are not tested equal to batch-1 rows \(batchable methods: .*h2o, kivi, .*snapkv"
    with pytest.raises(ValueError, match=rf"^method quest cannot run with batch_size=2: {untested}"):
        kv.evaluate(tiny_lm, samples(), "quest", [16], batch_size=2)
    # A composition batches when its base does too.
    with pytest.raises(ValueError, match=rf"^method kivi cannot run with batch_size=2: its base knorm: {untested}"):
        kv.evaluate(tiny_lm, samples(), kv.build_method({"name": "kivi", "base": "knorm"}), [16], batch_size=2)
    with pytest.raises(ValueError, match=r"^batch_size=2 cannot run with prefill_chunk=8"):
        kv.evaluate(tiny_lm, samples(), "snapkv", [16], batch_size=2, prefill_chunk=8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["batch_size=0"], "batch_size must be >= 1, got 0"),
        (["batch_size=abc"], "batch_size must be an int, got 'abc'"),
        (["method=quest", "batch_size=2"], "method quest cannot run with batch_size=2: "),
        (["task=conversation", "batch_size=2"], "batch_size=2 cannot run the conversation scenario"),
    ],
)
def test_config_refuses_bad_batch_settings(tmp_path, overrides, message):
    cfg = composed(tmp_path, *overrides, task=[] if "task=conversation" in overrides else SMALL_NIAH)
    with pytest.raises(ValueError) as err:
        run_config.check_values(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_cli_refusal_is_one_line_and_writes_nothing(tmp_path):
    result = cli(tmp_path, *TINY, *SMALL_NIAH, "method=quest", "batch_size=2")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: method quest cannot run with batch_size=2")
    assert not (tmp_path / "results").exists()


def test_cli_batched_run_writes_the_batch_1_rows_and_frees_its_claims(tmp_path):
    task = ["task.lengths=[128,200]", "task.depths=[0,50]", "task.max_new_tokens=4", "budget=[16]"]
    rows = {}
    for b in (1, 3):
        result = cli(tmp_path, *TINY, *task, f"batch_size={b}", f"run_name=b{b}")
        assert result.returncode == 0, result.stderr
        run = tmp_path / "results" / f"b{b}"
        rows[b] = {row["key"]: row for row in map(json.loads, (run / "samples.jsonl").read_text().splitlines())}
        assert not list((run / CLAIMS_DIR).iterdir())
    assert rows[3].keys() == rows[1].keys() and len(rows[1]) == 8  # 4 samples x (snapkv, full)
    for key, row in rows[3].items():
        assert {k: row[k] for k in SAME} == {k: rows[1][key][k] for k in SAME}
        assert row["sample_recipe"] == rows[1][key]["sample_recipe"] is not None
    assert sorted(row["batch_size"] for row in rows[3].values()) == [1, 1, 3, 3, 3, 3, 3, 3]


def test_samples_with_different_jobs_left_batch_as_they_run_alone(tiny_lm):
    # A resumed run hands samples with different jobs left: the k-th jobs stack whatever they are.
    options = RunOptions(budgets=(16,), fail_fast=True)
    methods = [kv.build_method("full"), kv.build_method(METHODS["snapkv"][0])]
    work = [(s, kv.plan(tiny_lm, s, methods, options)) for s in samples()]
    work[1] = (work[1][0], work[1][1][:1])  # only full left for the second sample
    work[2] = (work[2][0], work[2][1][1:])  # only snapkv left for the third
    sequential = list(kv.iter_rows(tiny_lm, work, options))
    batched = list(kv.iter_rows(tiny_lm, work, dataclasses.replace(options, batch_size=4)))
    assert [row["key"] for row in batched] == [row["key"] for row in sequential] and len(batched) == 6
    for one, many in zip(sequential, batched, strict=True):
        assert {k: many[k] for k in SAME} == {k: one[k] for k in SAME}
