"""One way to wrap a base method (`kvbench.methods.compose`): every wrapper refuses a base its capability check
rejects in one line naming the valid bases; every registered method declares the capabilities, and the methods
declared slot-subset really keep unchanged slots of the full cache; a wrapper whose base budget covers the prompt
keeps every slot."""

from __future__ import annotations

import pytest
import torch

from kvbench.engine.cache import PAD_POSITION, KVLayer
from kvbench.engine.generation import prefill
from kvbench.engine.measure import Stopwatch
from kvbench.methods import METHODS, Method, build_method
from kvbench.methods.base import CompressionContext
from kvbench.methods.prefixkv import write_calibration

# The reference classification, written out by hand: a new method must be placed here.
SCORERS = {"adakv", "dapq", "expected_attention", "knorm", "kvcrush", "prefixkv", "pyramidkv", "snapkv"}
SCORERS |= {"chunk", "compression_ratio_decoding", "per_layer", "threshold", "merging"}
SCORERS |= {"cap", "chunkkv", "compactor", "criticaladakv", "criticalkv", "cur", "keydiff", "lagkv", "leverage"}
SCORERS |= {"noncausal", "scissorhands", "nacl", "finch", "lukv", "headkv"}
SCORERS |= {"entropy_chunkkv"}
# Scorers whose kept values (merging) or keys (finch re-rotates) are rewritten: not a subset of the slots unchanged.
MERGERS = {"merging", "finch"}
SLOT_SUBSET = (SCORERS - MERGERS) | {
    "h2o",
    "hierarchical",
    "kvcompose",
    "kvzip",
    "random",
    "simlayerkv",
    "streamingllm",
    "tova",
    "treekv",
    "window",
}
PLAIN_KV = SLOT_SUBSET | {"full", "kv_distill", "razor"}  # full never evicts: no quantiser takes it as base
PLAIN_KV |= {"key_rerotation"} | MERGERS
PLAIN_KV |= {"cam"}  # evicts at decode time, kept values rewritten by its merges
OWN_STORAGE = {"gear", "kivi", "kv_direct", "mikv", "octopus", "rotatekv", "rtn", "transformers_quantized"}
OWN_STORAGE |= {"think", "fp8", "turboquant", "kvquant"}
OWN_STORAGE |= {"minicache", "quest"}  # depth-merged pairs; paged layers with key bounds
QUANTISERS = ("gear", "kivi", "octopus", "rotatekv", "rtn", "fp8", "turboquant", "kvquant")

# Each wrapper, with the registered methods it must accept as base and the reason a refused one gets.
WRAPPERS = {
    **{name: (SCORERS - {name}, "not a scoring method") for name in ("adakv", "kvcrush", "prefixkv")},
    **{
        name: (SCORERS - {name}, "not a scoring method")
        for name in ("chunk", "compression_ratio_decoding", "per_layer", "threshold", "merging")
    },
    "key_rerotation": (SLOT_SUBSET, "it does not evict by keeping a subset of the cache's slots"),
    **{name: (SCORERS - {name}, "not a scoring method") for name in ("chunkkv", "criticaladakv", "criticalkv", "lukv")},
    "headkv": (SCORERS - {"headkv"}, "not a scoring method"),
    "entropy_chunkkv": (SCORERS - {"entropy_chunkkv"}, "not a scoring method"),
    "kv_distill": (SLOT_SUBSET, "it does not keep a subset of the cache's slots as plain K/V"),
    "mikv": (SLOT_SUBSET, "it does not evict by choosing slots"),
    **{
        name: (PLAIN_KV - {"full"}, "method.base must be an eviction method that leaves plain K/V layers")
        for name in (*QUANTISERS, "think")
    },
}

TEXT = " ".join(f"Line {i}: the quick brown fox number {i * 7 % 13} jumps over the lazy dog." for i in range(60))


def test_the_classification_covers_every_registered_method():
    assert set(METHODS.names()) == PLAIN_KV | OWN_STORAGE
    assert not PLAIN_KV & OWN_STORAGE


@pytest.mark.parametrize("name", sorted(PLAIN_KV | OWN_STORAGE))
def test_every_registered_method_declares_its_capabilities(name):
    """Declared by the method's class or a method base class below `Method` (never Method's default), with the
    values of the reference classification; a slot-subset method compresses and holds plain layers."""
    cls = METHODS.get(name)
    for capability in ("keeps_slot_subset", "plain_kv_layers"):
        owner = next(klass for klass in cls.__mro__ if capability in vars(klass))
        assert owner is not Method, (name, capability)
    assert cls.keeps_slot_subset is (name in SLOT_SUBSET), name
    assert cls.plain_kv_layers is (name in PLAIN_KV), name
    if cls.keeps_slot_subset:
        assert cls.compresses and cls.plain_kv_layers


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_every_wrapper_refuses_a_base_of_the_wrong_kind_in_one_line(wrapper):
    valid, reason = WRAPPERS[wrapper]
    listing = f"Valid bases: {', '.join(sorted(valid))}."
    for base in sorted(set(METHODS.names()) - valid):
        with pytest.raises(ValueError) as refused:
            build_method({"name": wrapper, "base": base})
        message = str(refused.value)
        assert "\n" not in message, (wrapper, base)
        if base == wrapper and base in SCORERS:  # a scorer wrapper is a scorer: refused as itself
            assert message == f"{wrapper} cannot wrap itself. {listing}"
        else:
            assert message == f"{wrapper} cannot wrap '{base}' ({reason}). {listing}", base
    with pytest.raises(ValueError, match=rf"^unknown {wrapper} base 'snapk'\. {listing}$"):
        build_method({"name": wrapper, "base": "snapk"})
    for base in sorted(valid):
        method = build_method({"name": wrapper, "base": base})
        assert method.inner.name == base and method.params()["base"] == base


def test_the_named_non_selecting_bases_are_refused():
    """kv_direct (recomputes what it evicts) and kivi (stores quantised) as base of adakv, mikv and kv_distill."""
    for wrapper in ("adakv", "mikv", "kv_distill"):
        for base in ("kv_direct", "kivi"):
            with pytest.raises(ValueError, match=rf"^{wrapper} cannot wrap '{base}' \(.*\)\. Valid bases: .*snapkv"):
                build_method({"name": wrapper, "base": base})


def test_a_wrapper_needs_what_its_base_needs():
    assert build_method({"name": "mikv", "base": "kvzip"}).needs_fresh_prefill
    assert not build_method({"name": "mikv", "base": "h2o"}).needs_fresh_prefill
    assert build_method({"name": "kivi", "base": "snapkv"}).takes_budget
    assert not build_method({"name": "kivi"}).takes_budget
    with pytest.raises(ValueError, match=r"^method.base_params needs method.base\. Valid bases: "):
        build_method({"name": "rtn", "base_params": {"window": 8}})


def compressed(lm, method, ids, budget, cache_dir):
    """Prefill `ids` with the method's observer, then setup / compress / after_compress at `budget` (compress is
    called even when the prompt fits, so the wrapper's own rule is what is tested)."""
    observer = method.prefill_observer()
    if observer is not None and hasattr(observer, "bind_model"):
        observer.bind_model(lm)
    window = method.window_queries_needed()
    pre = prefill(lm, ids, window, Stopwatch(lm.device), [observer] if observer is not None else [])
    cache = pre.cache.copy()
    ctx = CompressionContext.for_prompt(
        lm, budget, len(ids), pre, input_ids=ids, prefill_stats=observer, cache_dir=cache_dir, seed=0
    )
    method.setup(cache, ctx)
    method.compress(cache, ctx)
    method.after_compress(cache, ctx)
    return pre.cache, cache


def prompt(count: int) -> list[int]:
    return torch.randint(100, 40000, (count,), generator=torch.Generator().manual_seed(count)).tolist()


CALIBRATION = {"calibration_samples": 1, "calibration_tokens": 64}


# threshold's default window (128) holds the whole 60-token prompt.
# simlayerkv's default threshold finds no lazy layer in the random tiny model's flat attention.
SMALL = {"prefixkv": CALIBRATION, "threshold": {"window": 8, "threshold": 0.5}, "simlayerkv": {"lazy_threshold": 0.45}}


def config_of(name: str) -> dict:
    return {"name": name, **SMALL.get(name, {})}


@pytest.mark.parametrize("name", sorted(SLOT_SUBSET))
def test_a_slot_subset_method_keeps_unchanged_slots_of_the_full_cache(tiny_lm, tmp_path, name):
    """At a budget under the prompt length: plain layers, fewer slots, and every kept slot's key and value are the
    full cache's at that slot's position."""
    write_calibration(tiny_lm, tmp_path, TEXT, "test text", 1, 64)
    ids = prompt(60)
    full, cache = compressed(tiny_lm, build_method(config_of(name)), ids, 24, tmp_path)
    assert cache.kept_entries() < full.kept_entries()
    for reference, layer in zip(full.layers, cache.layers, strict=True):
        assert type(layer) is KVLayer
        real = layer.positions != PAD_POSITION
        heads = torch.arange(layer.num_heads)[:, None].expand_as(layer.positions)
        positions = torch.where(real, layer.positions, 0)  # padding slots (ragged heads) index nothing
        for mine, theirs in ((layer.keys[0], reference.keys[0]), (layer.values[0], reference.values[0])):
            assert torch.equal(mine[real], theirs[heads, positions][real]), name


WRAPPED = [
    {"name": "adakv", "base": "snapkv"},
    {"name": "kvcrush", "base": "snapkv", "crush_fraction": 0.25},
    {"name": "prefixkv", "base": "snapkv", **CALIBRATION},
    {"name": "kv_distill", "base": "snapkv"},
    {"name": "mikv", "base": "h2o"},
    {"name": "mikv", "base": "snapkv", "lo_bits": 4},
    {"name": "kivi", "base": "snapkv", "group_size": 16, "residual_length": 16},
    {"name": "rtn", "base": "tova", "group_size": 16},
]


@pytest.mark.parametrize("config", WRAPPED, ids=lambda config: f"{config['name']}[{config['base']}]")
@pytest.mark.parametrize("extra", [0, 7])
def test_a_wrapper_whose_base_budget_covers_the_prompt_keeps_every_slot(tiny_lm, tmp_path, config, extra):
    """Budget = prompt length (+ extra): every layer holds every prompt position once per KV head, and where the
    storage is plain or lossless at this size (no demoted or quantised slot) the K/V are the full cache's."""
    write_calibration(tiny_lm, tmp_path, TEXT, "test text", 1, 64)
    ids = prompt(48)
    full, cache = compressed(tiny_lm, build_method(dict(config)), ids, len(ids) + extra, tmp_path)
    assert cache.kept_entries() == full.kept_entries()
    for reference, layer in zip(full.layers, cache.layers, strict=True):
        expected = torch.arange(len(ids), device=layer.device).expand(layer.num_heads, -1)
        assert torch.equal(layer.positions, expected)
        if config["name"] in ("kivi", "rtn"):
            continue  # stored quantised: the slots are all there, their K/V are codes
        assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
        if config["name"] == "mikv":
            assert layer.low_count() == 0
