"""The kvpress cross-check and zoo table scripts stay runnable: their method specs build, and the kvbench side of the
cross-check reads kept indices correctly (known answers on the tiny model, no kvpress needed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import kvbench.api as kv
from kvbench.engine.generation import prefill
from kvbench.engine.measure import Stopwatch
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, compress_copy, shared_prefill
from kvbench.methods.base import METHODS

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))  # zoo_table imports its sibling table_rows
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


parity = load_script("kvpress_parity")
zoo = load_script("zoo_table")


@pytest.mark.parametrize("case", sorted(parity.CASES))
def test_parity_specs_build(case: str) -> None:
    spec = {k: v for k, v in parity.CASES[case][1].items() if k != "budget"}
    assert kv.build_method(spec).name == spec["name"]


def test_zoo_specs_cover_registered_zoo_and_quantiser_twins() -> None:
    names = zoo.registered_zoo()
    assert names == [name for name in zoo.ZOO2 if name in METHODS.names()]
    specs = zoo.method_specs(names, quant_base=True)
    quantisers = [n for n in dict.fromkeys([*names, *zoo.BASELINES]) if n in zoo.QUANTISERS]
    assert len(specs) == len(dict.fromkeys([*names, *zoo.BASELINES])) + len(quantisers)
    based = [s for s in specs if isinstance(s, dict)]
    assert {s["name"] for s in based} == set(quantisers) | (zoo.SNAPKV_BASED & set(names))
    assert all(s["base"] == "snapkv" for s in based)
    for spec in specs:
        kv.build_method(spec)


@pytest.fixture(scope="module")
def tiny():
    lm = kv.load_model("tiny_random", device="cpu", dtype="float32")
    ids = (
        torch.randperm(lm.model.config.vocab_size - 10, generator=torch.Generator().manual_seed(0))[:96] + 10
    ).tolist()
    return lm, ids


def test_kvbench_kept_knorm_is_lowest_key_norms(tiny) -> None:
    lm, ids = tiny
    kept, _ = parity.kvbench_kept(lm, ids, {"name": "knorm"}, 40)
    keys = prefill(lm, ids, 0, Stopwatch(lm.device)).cache.layers
    for layer_kept, layer in zip(kept, keys, strict=True):
        norms = layer.keys[0].norm(dim=-1)  # [Hkv, T]
        expected = [sorted(torch.topk(-n, 40).indices.tolist()) for n in norms]
        assert layer_kept == expected


def test_kvbench_kept_streamingllm_and_rerotated_positions(tiny) -> None:
    lm, ids = tiny
    sinks_recent = [*range(4), *range(len(ids) - 36, len(ids))]
    kept, _ = parity.kvbench_kept(lm, ids, {"name": "streamingllm", "n_sink": 4, "decode_evict": False}, 40)
    assert all(head == sinks_recent for layer in kept for head in layer)
    # key_rerotation renumbers the kept slots 0..n-1: the original slots are recovered from the values
    rerotated, _ = parity.kvbench_kept(lm, ids, {"name": "key_rerotation", "base": "knorm"}, 40)
    plain, _ = parity.kvbench_kept(lm, ids, {"name": "knorm"}, 40)
    assert rerotated == plain


@pytest.mark.parametrize("rerotate", [True, False])
def test_finch_next_token_follows_the_kept_keys_as_kvpress_pipeline(tiny, rerotate: bool) -> None:
    """kvpress's pipeline continues at the compressed length after a re-rotating FinchPress; kvbench's finch too
    (found by the zoo table: the next token sat at its original position, far past the renumbered keys)."""
    lm, ids = tiny
    method = kv.build_method({"name": "finch", "rerotate": rerotate})
    pre, _ = shared_prefill(lm, ids, [method], Stopwatch(lm.device))
    options = RunOptions(budgets=(40,), kernels="torch")
    job = Job(method=method, budget=40, key="k")
    kept = compress_copy(lm, pre, job, ids, options, Stopwatch(lm.device), context_end=len(ids) - 8)
    expected = 40 if rerotate else len(ids)
    assert kept.cache.next_positions(1, "cpu").tolist() == [expected]
    if rerotate:
        assert all(layer.positions.tolist() == [list(range(40))] * layer.num_heads for layer in kept.cache.layers)
