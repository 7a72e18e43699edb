"""Batched evaluation (`batch_size=B`): rows equal to batch-1 rows (greedy tokens, kept entries, bytes) for the full
cache, an eviction scorer and a head-adaptive method on prompts of different lengths; padding slots never attended
(a hand-made case); refusals of what cannot batch and of bad values, in one line, before any model work (CLI and
API)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import kvbench.api as kv
from kvbench import config as run_config
from kvbench.engine.batched import BatchedKVCache, Sequence, batched_greedy_decode, forward_batch
from kvbench.engine.cache import PAD_POSITION, KVCache
from kvbench.engine.generation import forward_tokens, greedy_decode
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


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("compress", ["prompt", "context"])
def test_batched_rows_equal_sequential_rows(tiny_lm, name, compress):
    cfg, budgets = METHODS[name]
    method = kv.build_method(cfg)
    sequential = kv.evaluate(tiny_lm, samples(), method, budgets, include_full=True, compress=compress)
    batched = kv.evaluate(tiny_lm, samples(), method, budgets, include_full=True, compress=compress, batch_size=3)
    assert [row["key"] for row in batched] == [row["key"] for row in sequential]
    for one, many in zip(sequential, batched, strict=True):
        assert one["status"] == "ok", one.get("error")
        assert {k: many[k] for k in SAME if k in one} == {k: one[k] for k in SAME if k in one}
        assert "batch_size" not in one
    # 4 samples at B=3: a batch of 3, then one of 1 (which needs no padding).
    assert [row["batch_size"] for row in batched if row["method"] == "full"] == [3, 3, 3, 1]
    assert batched[-1]["batch_padding_fraction"] == 0.0
    assert 0.0 < batched[0]["batch_padding_fraction"] < 1.0
    if name != "full":  # the methods evicted for real on the longer prompts
        assert any(row["compressed"] for row in batched if row["method"] != "full")


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
    decoded, padding = batched_greedy_decode(tiny_lm, sequences, Stopwatch(tiny_lm.device))
    assert decoded[0].tokens == reference.tokens
    assert padding == pytest.approx(7 / 20)
    # The decoded slots went back to each sequence's own cache, at its own positions.
    assert caches[0].layers[0].positions[0].tolist() == list(range(len(short) + 5))
    assert caches[0].kv_bytes() == alone.kv_bytes()


def test_refusals_are_one_line_before_model_work(tiny_lm):
    for bad in (0, -2, 1.5, "3", True):
        with pytest.raises(ValueError, match=r"^batch_size must be an integer >= 1, got "):
            RunOptions(batch_size=bad)
    with pytest.raises(ValueError, match=r"^method h2o cannot run with batch_size=2: .*batchable methods: .*snapkv"):
        kv.evaluate(tiny_lm, samples(), "h2o", [16], batch_size=2)
    with pytest.raises(ValueError, match=r"^method snapkv cannot run with batch_size=2: decode_budget evicts"):
        kv.evaluate(tiny_lm, samples(), kv.build_method("snapkv", decode_budget=32), [16], batch_size=2)
    with pytest.raises(ValueError, match=r"^method streamingllm cannot run with batch_size=2: decode_evict=true"):
        kv.evaluate(tiny_lm, samples(), "streamingllm", [16], batch_size=2)
    with pytest.raises(ValueError, match=r"^batch_size=2 cannot run with prefill_chunk=8"):
        kv.evaluate(tiny_lm, samples(), "snapkv", [16], batch_size=2, prefill_chunk=8)
    with pytest.raises(ValueError, match=r"^method kivi cannot run with batch_size=2"):
        kv.evaluate(tiny_lm, samples(), "kivi", [None], batch_size=2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["batch_size=0"], "batch_size must be >= 1, got 0"),
        (["batch_size=abc"], "batch_size must be an int, got 'abc'"),
        (["method=h2o", "batch_size=2"], "method h2o cannot run with batch_size=2: "),
        (["task=conversation", "batch_size=2"], "batch_size=2 cannot run the conversation scenario"),
    ],
)
def test_config_refuses_bad_batch_settings(tmp_path, overrides, message):
    cfg = composed(tmp_path, *overrides, task=[] if "task=conversation" in overrides else SMALL_NIAH)
    with pytest.raises(ValueError) as err:
        run_config.check_values(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_cli_refusal_is_one_line_and_writes_nothing(tmp_path):
    result = cli(tmp_path, *TINY, *SMALL_NIAH, "method=kivi", "batch_size=2")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: method kivi cannot run with batch_size=2")
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
