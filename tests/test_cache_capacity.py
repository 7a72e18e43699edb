"""KVLayer capacity: appends write one slot, the capacity bound holds, copies are copy-on-write, and outputs are
identical to the old grow-by-concatenation cache."""

from __future__ import annotations

import pytest
import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.generation import forward_tokens, prefill
from kvbench.engine.measure import Stopwatch
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.methods import build_method
from tests.helpers import needle_sample

HEADS, DIM = 2, 4


def capacity_bound(layer: KVLayer) -> int:
    """The documented bound on a layer's capacity."""
    length = layer.get_seq_length()
    return length + max(layer.pending, layer.MIN_SLACK, int(layer.GROWTH_FRACTION * length))


def append(layer: KVLayer, start: int, n: int) -> None:
    keys = torch.arange(start, start + n, dtype=torch.float32)[None, None, :, None].expand(1, HEADS, n, DIM)
    layer.update(keys, -keys, positions=torch.arange(start, start + n))


def test_appends_after_reserve_write_in_place_and_capacity_stays_bounded():
    layer = KVLayer()
    append(layer, 0, 40)
    assert layer.capacity == 40  # the first fill (a prefill) takes no slack
    layer.reserve(10)
    buffer = layer.keys.data_ptr()
    for step in range(10):
        append(layer, 40 + step, 1)
        assert layer.keys.data_ptr() == buffer  # one slot written, nothing reallocated or copied
        assert layer.capacity <= capacity_bound(layer)
    assert layer.capacity == 50 and layer.pending == 0
    # Unannounced appends grow amortised: few reallocations, the bound holds after each append.
    reallocations, last = 0, layer.keys.data_ptr()
    for step in range(200):
        append(layer, 50 + step, 1)
        assert layer.capacity <= capacity_bound(layer)
        reallocations += layer.keys.data_ptr() != last
        last = layer.keys.data_ptr()
    assert reallocations <= 12
    assert torch.equal(layer.keys[0, 0, :, 0], torch.arange(250, dtype=torch.float32))
    assert torch.equal(layer.positions, torch.arange(250).expand(HEADS, -1))


def test_keep_compacts_to_kept_plus_pending_and_bytes_report_both():
    layer = KVLayer()
    append(layer, 0, 100)
    layer.reserve(5)
    layer.keep(torch.tensor([[0, 10, 20], [1, 2, 99]]))
    assert layer.get_seq_length() == 3 and layer.capacity == 3 + 5  # physically compacted, room for the 5 appends
    per_slot = 2 * DIM * 4
    assert layer.nbytes() == HEADS * 3 * per_slot  # held slots only
    assert layer.reserved_nbytes() == HEADS * 8 * per_slot  # allocation: held + reserved
    assert layer.keys[0, :, :, 0].tolist() == [[0, 10, 20], [1, 2, 99]]
    for step in range(5):
        append(layer, 100 + step, 1)
        assert layer.capacity == 8
    assert layer.positions.tolist() == [[0, 10, 20, *range(100, 105)], [1, 2, 99, *range(100, 105)]]


def test_copy_is_copy_on_write():
    cache = KVCache(1)
    cache.layers[0].update(torch.ones(1, HEADS, 6, DIM), torch.ones(1, HEADS, 6, DIM), positions=torch.arange(6))
    copy = cache.copy()
    assert copy.layers[0].keys.data_ptr() == cache.layers[0].keys.data_ptr()  # shared until written
    copy.layers[0].keep(torch.tensor([[0, 5], [1, 2]]))
    append(copy.layers[0], 6, 1)
    other = cache.copy()
    append(other.layers[0], 6, 3)
    assert cache.layers[0].get_seq_length() == 6 and torch.equal(cache.layers[0].keys, torch.ones(1, HEADS, 6, DIM))
    assert copy.layers[0].keys[0, :, :, 0].tolist() == [[1, 1, 6], [1, 1, 6]]
    assert other.layers[0].keys[0, 0, :, 0].tolist() == [1, 1, 1, 1, 1, 1, 6, 7, 8]
    assert cache.kv_bytes() == HEADS * 6 * 2 * DIM * 4


def test_assigning_a_tensor_of_another_length_fails():
    layer = KVLayer()
    append(layer, 0, 4)
    with pytest.raises(ValueError, match="use keep"):
        layer.keys = torch.zeros(1, HEADS, 3, DIM)


@pytest.fixture
def concatenating_cache(monkeypatch):
    """The pre-capacity cache: no preallocation and every append reallocates to the exact length (as torch.cat)."""
    monkeypatch.setattr(KVLayer, "MIN_SLACK", 0)
    monkeypatch.setattr(KVLayer, "GROWTH_FRACTION", 0.0)
    monkeypatch.setattr(KVCache, "reserve", lambda self, n: None)


def sweep_rows(lm) -> dict[str, dict]:
    sample = needle_sample(max_new_tokens=12)
    jobs = [
        Job(build_method({"name": "full"}), None, "full"),
        Job(build_method({"name": "snapkv"}), 48, "snapkv"),
        Job(build_method({"name": "streamingllm"}), 40, "streamingllm"),  # evicts at every decode step
        Job(build_method({"name": "h2o"}), 40, "h2o"),  # per-slot extras + decode evictions
        Job(build_method({"name": "adakv"}), 40, "adakv"),  # ragged heads (padding)
    ]
    return {
        job.key: row for job, row in run_sample(lm, sample, jobs, RunOptions(compress="prompt", seed=0, fail_fast=True))
    }


def test_preallocated_cache_decodes_exactly_like_concatenation(tiny_lm, request):
    preallocated = sweep_rows(tiny_lm)
    request.getfixturevalue("concatenating_cache")
    concatenated = sweep_rows(tiny_lm)
    for key, row in preallocated.items():
        assert row["output_ids"] == concatenated[key]["output_ids"], key
        assert row["kv_bytes_compressed"] == concatenated[key]["kv_bytes_compressed"], key
        assert row["kv_bytes"] == concatenated[key]["kv_bytes"], key
    full = preallocated["full"]
    per_token = full["kv_bytes_full"] // full["prompt_tokens"]
    # The full job reserved room for exactly the decode forwards (max_new_tokens - 1) once.
    assert full["kv_bytes_reserved"] == per_token * (full["prompt_tokens"] + 12 - 1)
    assert concatenated["full"]["kv_bytes_reserved"] == concatenated["full"]["kv_bytes"]


def test_decode_logits_identical_with_and_without_capacity(tiny_lm, monkeypatch):
    ids = torch.randint(100, 1000, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    pre = prefill(tiny_lm, ids, 0, Stopwatch(tiny_lm.device))
    reserved, exact = pre.cache.copy(), pre.cache.copy()
    reserved.reserve(8)
    monkeypatch.setattr(KVLayer, "GROWTH_FRACTION", 0.0)
    monkeypatch.setattr(KVLayer, "MIN_SLACK", 0)
    for token in ids[:8]:
        a, b = forward_tokens(tiny_lm, reserved, [token]), forward_tokens(tiny_lm, exact, [token])
        assert torch.equal(a, b)
    assert all(layer.capacity == 78 for layer in reserved.layers)
    assert all(layer.capacity == 78 for layer in exact.layers)
