"""The contract every registered method keeps, checked for each name in the registry (a new method joins by
registering): it builds from its conf/method yaml, whose keys are exactly the dataclass's fields; it runs on the
tiny model without an error row; a budget keeps exactly what the method's budget rule says; and a budget that
holds the whole prompt and every generated token decodes the full cache's greedy tokens."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

import kvbench.api as kv
from kvbench.harness.prompt import build_prompt
from kvbench.harness.sample import Sample
from kvbench.methods import METHODS
from kvbench.methods.prefixkv import write_calibration

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
BUDGET = 40
MAX_NEW_TOKENS = 4
# The tiny model's head dim is 16: quantisers' default groups of 32 or 64 channels do not divide it (check_model
# refuses them), and smaller calibrations keep the test fast.
TINY_MODEL_PARAMS = {
    "kivi": {"group_size": 16, "residual_length": 32},
    "rtn": {"group_size": 16},
    "gear": {"group_size": 16, "streaming_gap": 32},
    "rotatekv": {"group_size": 16, "calibration_tokens": 256},
    "transformers_quantized": {"q_group_size": 16},
    "simlayerkv": {"lazy_threshold": 0.45},  # the random tiny model's attention is flat: a mix of lazy layers
    "threshold": {"window": 16, "threshold": 0.5},  # its default window (128) holds the whole prompt
}
# Methods that need an optional dependency (skipped, with the reason, only where it is missing).
OPTIONAL_MODULES = {"transformers_quantized": "optimum.quanto"}


def sample() -> Sample:
    """A short needle prompt (90 tokens of the tiny model's tokenizer)."""
    context = "The grass is green and the sky is blue. " * 3 + "The magic number is 4242. " + "Filler. " * 3
    return Sample("contract", context, "What is the magic number?", "Answer:", ["4242"], "string_match_all", 4)


@pytest.fixture(scope="module")
def lm():
    tokenizer = os.environ.get("KVBENCH_TOKENIZER")  # a bare GPU image: the exported tokenizer, no GGUF
    return kv.load_model("tiny_random", device="cpu", **({"tokenizer": tokenizer} if tokenizer else {}))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, lm) -> Path:
    """Per-model artefacts of this module's runs (razor's head profile, rotatekv's channel order, prefixkv's
    calibration), kept out of the user's cache."""
    path = tmp_path_factory.mktemp("artefacts")
    prefixkv = OmegaConf.load(CONF / "prefixkv.yaml")
    text = " ".join(f"Line {i}: the fox number {i % 13} jumps over the lazy dog." for i in range(400))
    write_calibration(lm, path, text, "test text", prefixkv.calibration_samples, prefixkv.calibration_tokens)
    return path


@pytest.fixture(scope="module")
def prompt_tokens(lm) -> int:
    return len(build_prompt(lm.tokenizer, sample()))


@pytest.fixture(scope="module")
def rows_of(lm, cache_dir, prompt_tokens):
    """(name, compress) -> {"full": the full-cache row, budget: the method's row} of one run of the method at
    BUDGET and at a budget that holds the prompt and every generated token, on one shared prefill."""
    roomy = prompt_tokens + MAX_NEW_TOKENS

    @functools.cache
    def run(name: str, compress: str) -> dict[Any, dict[str, Any]]:
        method = built(name)
        rows = kv.evaluate(
            lm, [sample()], [method], [BUDGET, roomy], include_full=True, compress=compress, cache_dir=cache_dir
        )
        errors = [(row["method"], row["budget"], row.get("error")) for row in rows if row["status"] != "ok"]
        assert not errors, errors
        by_budget = {row["budget"]: row for row in rows if row["method"] == name}
        (full,) = [row for row in rows if row["method"] == "full" and row["budget"] is None]
        return {**by_budget, "full": full}

    return run


def built(name: str):
    """The method from its yaml, with the tiny model's parameters."""
    return kv.build_method(name, **TINY_MODEL_PARAMS.get(name, {}))


def needs_optional(name: str) -> None:
    if name in OPTIONAL_MODULES:
        pytest.importorskip(OPTIONAL_MODULES[name], reason=f"{name} needs the optional {OPTIONAL_MODULES[name]}")


@pytest.mark.parametrize("name", METHODS.names())
def test_yaml_keys_are_the_dataclass_fields_and_it_builds_from_the_yaml(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    fields = {f.name for f in dataclasses.fields(METHODS.get(name)) if f.init}
    assert cfg.name == name
    assert set(cfg) - {"name"} == fields
    needs_optional(name)
    method = kv.build_method(name)
    assert type(method) is METHODS.get(name)
    assert {key: getattr(method, key) for key in fields} == {
        key: getattr(type(method)(), key) if value is None else value
        for key, value in OmegaConf.to_container(cfg).items()
        if key != "name"
    }


@pytest.mark.parametrize("compress", ["prompt", "context"])
@pytest.mark.parametrize("name", METHODS.names())
def test_runs_on_the_tiny_model_and_keeps_exactly_its_budget(name, compress, lm, rows_of, prompt_tokens):
    """compress=context compresses the context only, then feeds the multi-token question to the (possibly
    ragged) compressed cache."""
    needs_optional(name)
    rows = rows_of(name, compress)
    method = built(name)
    layers, heads = lm.config.num_hidden_layers, lm.config.num_key_value_heads
    slot_bytes = 2 * lm.config.head_dim * torch.empty((), dtype=lm.dtype).element_size()  # K + V per slot
    full = rows["full"]
    assert full["prompt_tokens"] == prompt_tokens
    assert full["kept_entries"] == (prompt_tokens + full["output_tokens"] - 1) * layers * heads
    split = full["compressed_tokens"]  # the compressed segment: the prompt, or the context before the question
    assert split == prompt_tokens if compress == "prompt" else BUDGET < split < prompt_tokens
    every_slot = split * layers * heads
    if not method.compresses:  # the full cache: no budget sweep
        assert set(rows) == {None, "full"}
        return
    if not method.takes_budget:  # a quantiser alone keeps every slot, packed; the budget is not swept
        assert set(rows) == {None, "full"}
        row = rows[None]
        if name == "threshold":  # what it keeps is an outcome of its threshold, reported in its record
            kept = row["method_record"]["threshold_kept_entries"]
            assert row["kept_entries_compressed"] == kept < every_slot
            assert row["kv_bytes_logical_compressed"] == kept * slot_bytes
            return
        assert row["kept_entries_compressed"] == every_slot
        assert row["kv_bytes_compressed"] < full["kv_bytes_full"]
        return
    row = rows[BUDGET]
    assert row["compressed"] is True and row["budget_entries"] == BUDGET and row["compressed_tokens"] == split
    kept = row["kept_entries_compressed"]
    record = row["method_record"] or {}
    if name == "razor":  # budget = entries per NON-retrieval KV head; retrieval heads keep the whole segment
        retrieval = record["razor_retrieval_heads"]
        assert 1 <= retrieval < layers * heads
        assert kept == BUDGET * layers * heads + retrieval * (split - BUDGET)
    elif name == "simlayerkv":  # budget = a lazy layer's window; the other layers keep the whole segment
        lazy = record["simlayerkv_lazy_layers"]
        assert 1 <= lazy < layers
        assert kept == (BUDGET * lazy + split * (layers - lazy)) * heads
    elif name == "mikv":  # no token left behind: the base's budget is the high-precision part
        assert kept == every_slot
        assert row["kept_entries"] == full["kept_entries"]
        assert record["mikv_high_entries"] == BUDGET * layers * heads  # the base (h2o) evicts every decode step
        assert record["mikv_high_entries"] + record["mikv_low_entries"] == row["kept_entries"]
        assert row["kv_bytes_compressed"] < full["kv_bytes_full"]
    elif name == "quest":  # selects pages per decode step, frees nothing: every slot held, bytes read reported
        assert kept == every_slot and record["memory_freed"] is False
        assert record["quest_decode_steps"] == row["output_tokens"] - 1
        assert 0 < record["quest_bytes_read_per_step"] < record["quest_bytes_held_per_step"]
        assert row["kv_bytes_compressed"] > full["kv_bytes_full"]  # + the page bounds
    elif name == "kv_direct":  # the recent budget keeps K/V, every older token is recomputed from checkpoints
        assert kept == BUDGET * layers * heads
        assert row["kv_bytes"] == record["kv_direct_window_kv_bytes"] + record["kv_direct_checkpoint_bytes"]
        assert row["output_ids"] == full["output_ids"]  # recomputation is exact: nothing is lost
    else:  # eviction: exactly the budget per KV head and layer on average (per-layer / per-head allocations)
        assert kept == BUDGET * layers * heads
        assert sum(row["kept_per_layer_compressed"]) == BUDGET * layers
        assert math.isclose(row["kept_fraction_compressed"], BUDGET / split)
        if name == "prefixkv":
            assert row["kept_per_layer_compressed"] == record["prefixkv_layer_budgets"]
    if name == "hierarchical":  # its budget caps the whole cache while decoding too
        assert row["max_layer_len_decode"] <= BUDGET and row["kept_entries"] == BUDGET * layers * heads
    if method.plain_kv_layers:  # K/V tensors of the kept slots, nothing else
        assert row["kv_bytes_logical_compressed"] == kept * slot_bytes  # padded (ragged) heads aside
        assert row["kv_bytes_logical_compressed"] <= row["kv_bytes_compressed"] < full["kv_bytes_full"]


@pytest.mark.parametrize("compress", ["prompt", "context"])
@pytest.mark.parametrize("name", METHODS.names())
def test_a_budget_holding_every_token_decodes_the_full_caches_tokens(name, compress, rows_of, prompt_tokens):
    """The budget is the prompt plus every generated token: decode-time methods cap the whole cache."""
    needs_optional(name)
    method = built(name)
    rows = rows_of(name, compress)
    if not (method.compresses and method.takes_budget):  # full and quantisers alone: no budgeted row at all
        assert set(rows) == {None, "full"}
        return
    roomy = rows[prompt_tokens + MAX_NEW_TOKENS]
    full = rows["full"]
    assert full["output_tokens"] == MAX_NEW_TOKENS
    assert roomy["compressed"] is False
    assert roomy["kept_entries_compressed"] == full["kept_entries_compressed"]
    assert roomy["kept_entries"] == full["kept_entries"]
    assert roomy["output_ids"] == full["output_ids"]
    if method.plain_kv_layers:
        assert roomy["kv_bytes_compressed"] == full["kv_bytes_full"]
