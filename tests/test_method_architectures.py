"""Every registered method on the architectures of `tests/model_matrix.py` (tiny random configs, fp32, CPU),
through kvbench's public API: one short sample at a budget below the prompt, no error row. A method that cannot
serve an architecture is refused before any sample by `api.check_model`, in one line, and only where the test
expects it (below, with the reason). The layers the policy hands to a method hold what its budget rule says
(eviction methods: exactly the budget on average); the others hold what the policy says: sliding layers their
window, chunked layers their chunk, linear-attention / SSM states their unchanged bytes.

A new method joins by registering; methods whose optional dependency is missing are skipped with the reason."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import pytest
from model_matrix import WINDOW, config_kwargs
from omegaconf import OmegaConf
from test_method_contract import CONF, OPTIONAL_MODULES, TINY_MODEL_PARAMS, sample
from transformers import AutoConfig

from kvbench import api
from kvbench.harness.prompt import build_prompt
from kvbench.methods import METHODS
from kvbench.methods.prefixkv import write_calibration

BUDGET = 24  # below the sliding window (32)
CHUNK = 16  # llama4_text's attention_chunk_size in the matrix
# Calibrations sized for the tiny model (the defaults read thousands of tokens): only runtime differs.
PARAMS = {**TINY_MODEL_PARAMS, "kvquant": {"calibration_tokens": 256}}

# Each architecture's layer kinds as the matrix's configs build them (f: full, s: sliding, c: chunked, x: a
# linear-attention / SSM / conv state, h: SSM state + full attention in one layer).
LAYERS = {
    "llama": "ffff",
    "smollm3": "ffff",
    "mistral": "ssss",
    "gemma2": "sfsf",
    "gemma3_text": "sfsf",
    "gpt_oss": "sfsf",
    "llama4_text": "cccf",
    "gpt_neox": "ffff",
    "deepseek_v3": "ffff",
    "qwen3_next": "xfxf",
    "falcon_h1": "hhhh",
    "lfm2": "xfxf",
    "gemma4_text": "sssf",
}
KINDS = {"f": "full_attention", "s": "sliding_attention", "c": "chunked_attention", "x": "state", "h": "hybrid"}
# Why methods that move or remove the rotary embedding of cached keys / queries (`Method.rope_dependent`) are
# refused: one RoPE helper cannot serve every attention layer.
ROPE_REFUSALS = {
    "gemma3_text": "2 rotary tables (RoPE differs per layer type)",
    "gemma4_text": "2 rotary tables (RoPE differs per layer type)",
    "smollm3": "NoPE layers (no rotary embedding in some layers)",
    "llama4_text": "NoPE layers (no rotary embedding in some layers)",
}
# kv_direct recomputes K/V from the residual stream with one shared RoPE over all-full-attention layers (its own
# check, before the RoPE one).
MIXED_LAYERS = "layers other than full attention (sliding, chunked, linear attention / SSM: layer_types)"
KV_DIRECT_REFUSALS = {
    **{arch: MIXED_LAYERS for arch in ("gemma2", "gemma3_text", "gpt_oss", "llama4_text", "gemma4_text")},
    **{arch: MIXED_LAYERS for arch in ("qwen3_next", "falcon_h1", "lfm2")},
    "gpt_neox": "partial rotary dimensions",
}
# MLA caches a latent (kv_lora_rank wide, plus the shared RoPE key) that the module expands after the cache: only
# position-based methods (`Method.position_only`) run on it.
LATENT = {"deepseek_v3": "24 latent + 8 RoPE-key dims per token"}
# key_rerotation renumbers the one position counter every layer shares: sliding / chunked windows are defined on it.
BOUNDED = {"mistral": "sliding_attention", "llama4_text": "chunked_attention"}
BOUNDED |= {arch: "sliding_attention" for arch in ("gemma2", "gemma3_text", "gpt_oss", "gemma4_text")}
# Methods that store the cache in a layer type of their own (`Method.plain_kv_layers` false) would drop the SSM
# state a hybrid layer holds beside its K/V.
HYBRID_REFUSAL = "stores the cache in its own layer type, which cannot keep the SSM state that architecture"
HYBRID_ARCHS = {"falcon_h1"}
# (architecture, layer policy): each kind of layer and each RoPE / attention variant at least once. Under
# layers=all, methods whose scoring state assumes one slot per prompt token (`Method.handles_bounded_layers`) are
# refused on models with sliding / chunked layers; the others compress those layers too.
CASES = [(arch, "global") for arch in LAYERS] + [(arch, "all") for arch in ("gemma3_text", "llama4_text", "gpt_oss")]
# A fast subset: sliding + global layers, linear-attention states between attention layers, a hybrid layer.
FAST = {("gemma3_text", "global"), ("qwen3_next", "global"), ("falcon_h1", "global")}


def built(name: str):
    return api.build_method(name, **PARAMS.get(name, {}))


def expected_refusal(arch: str, name: str, policy: str = "global") -> str | None:
    """The reason `api.check_model` must give for this method on this architecture (None: it must run)."""
    if name in OPTIONAL_MODULES:  # refused only where its optional dependency is missing: skipped instead
        return None
    method = built(name)
    if policy == "all" and arch in BOUNDED and method.compresses and not method.handles_bounded_layers():
        return (
            f"method {name} assumes one slot per prompt token in every layer it compresses, but architecture "
            f"'{arch}' has sliding / chunked layers and layers=all hands them to it: use layers=global (those "
            "layers keep their window)"
        )
    if arch in LATENT and method.compresses and not method.position_only:
        return (
            f"method {name} reads or re-encodes cached K/V, but architecture '{arch}' caches an MLA latent "
            f"({LATENT[arch]}) that its attention expands to per-head K/V after the cache; only position-based "
            "methods (streamingllm, window, random) run on it"
        )
    if name == "kv_direct" and arch in KV_DIRECT_REFUSALS:
        return f"kv_direct cannot recompute K/V for model_type '{arch}': missing {KV_DIRECT_REFUSALS[arch]}"
    if name == "key_rerotation" and arch in BOUNDED:
        return (
            f"key_rerotation renumbers the positions every layer shares; architecture '{arch}' has {BOUNDED[arch]} "
            "layers whose windows are defined on them"
        )
    if arch in HYBRID_ARCHS and method.compresses and not method.plain_kv_layers:
        return f"method {name} {HYBRID_REFUSAL} '{arch}' holds beside the K/V of its hybrid layers"
    if arch in ROPE_REFUSALS and method.rope_dependent():
        return f"method {name} re-rotates keys with one RoPE, but architecture '{arch}' has {ROPE_REFUSALS[arch]}"
    return None


@functools.cache
def run(arch: str, policy: str, tmp: str) -> dict[str, Any]:
    """One evaluate of every registered method that `check_model` accepts on `arch` (shared prefill), with the
    full-cache reference: {"lm", "prompt_tokens", "refused": {name: message}, "rows": {name: row}, "full": row}."""
    try:
        AutoConfig.for_model(arch, **config_kwargs(arch))
    except (ValueError, KeyError) as err:  # pragma: no cover - an architecture this transformers lacks
        pytest.skip(f"transformers cannot build {arch}: {err}")
    root = Path(tmp) / f"{arch}-{policy}"
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": arch, **config_kwargs(arch, vocab_size=49152)}))
    cfg = {"kind": "hf", "name": arch, "name_or_path": str(root / "config.json"), "config_only": True}
    lm = api.load_model(cfg, device="cpu", dtype="float32")
    prefixkv = OmegaConf.load(CONF / "prefixkv.yaml")
    text = " ".join(f"Line {i}: the fox number {i % 13} jumps over the lazy dog." for i in range(400))
    if arch not in LATENT:  # prefixkv is refused on an MLA latent cache (and its calibration says so)
        write_calibration(lm, root, text, "test text", prefixkv.calibration_samples, prefixkv.calibration_tokens)
    refused, methods = {}, []
    for name in METHODS.names():
        try:
            method = built(name)
            api.check_model(lm, [method], policy)
        except (ValueError, ImportError) as err:
            refused[name] = str(err)
            continue
        methods.append(method)
    rows = api.evaluate(lm, [sample()], methods, [BUDGET], include_full=True, cache_dir=root, layers=policy)
    by_name = {row["method"]: row for row in rows}
    return {
        "lm": lm,
        "prompt_tokens": len(build_prompt(lm.tokenizer, sample())),
        "refused": refused,
        "rows": by_name,
        "full": by_name["full"],
    }


# Known engine gaps, reported by the test until fixed (strict: a fix turns the case into a failure to remove here).
KNOWN_ERRORS: dict[str, str] = {}


def case_params(known_errors: bool = False) -> list:
    params = []
    for case in CASES:
        marks = [] if case in FAST else [pytest.mark.slow]
        if known_errors and case[0] in KNOWN_ERRORS:
            marks.append(pytest.mark.xfail(reason=KNOWN_ERRORS[case[0]], strict=True))
        params.append(pytest.param(*case, marks=marks, id="-".join(case)))
    return params


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("architectures"))


@pytest.mark.parametrize(("arch", "policy"), case_params())
def test_refusals_are_the_expected_ones_in_one_line(arch, policy, tmp):
    result = run(arch, policy, tmp)
    assert [spec.kind for spec in result["lm"].layer_specs] == [KINDS[k] for k in LAYERS[arch]]
    for name in METHODS.names():
        want = expected_refusal(arch, name, policy)
        got = result["refused"].get(name)
        if name in OPTIONAL_MODULES and got is not None:
            assert "\n" not in got and OPTIONAL_MODULES[name].split(".")[-1] in got
            continue
        assert got == want, (name, got)


@pytest.mark.parametrize(("arch", "policy"), case_params(known_errors=True))
def test_every_accepted_method_runs_without_an_error_row(arch, policy, tmp):
    result = run(arch, policy, tmp)
    errors = {name: row.get("error") for name, row in result["rows"].items() if row["status"] != "ok"}
    assert not errors, errors
    assert set(result["rows"]) == {"full"} | (set(METHODS.names()) - set(result["refused"]))


def policy_layers(arch: str, policy: str) -> list[bool]:
    """Per attention layer (state layers hold no slots): whether the policy hands it to the method."""
    kinds = [k for k in LAYERS[arch] if k != "x"]
    return [k in "fh" or policy == "all" for k in kinds]


def left_alone(kind: str, prompt: int) -> float:
    """What an attention layer a method is not handed holds after the prompt's prefill: its window or chunk."""
    return {"f": prompt, "h": prompt, "s": min(prompt, WINDOW - 1), "c": prompt % CHUNK}[kind]


@pytest.mark.parametrize(("arch", "policy"), case_params())
def test_compressed_layers_keep_the_budget_and_the_others_what_the_policy_says(arch, policy, tmp):
    result = run(arch, policy, tmp)
    prompt, full = result["prompt_tokens"], result["full"]
    assert prompt > WINDOW and BUDGET < WINDOW - 1
    handed = policy_layers(arch, policy)
    kinds = [k for k in LAYERS[arch] if k != "x"]
    assert full["kept_per_layer_compressed"] == [left_alone(k, prompt) for k in kinds]
    for name, row in result["rows"].items():
        if name == "full":
            continue
        if row["status"] != "ok":  # reported by test_every_accepted_method_runs_without_an_error_row
            continue
        method = built(name)
        kept = row["kept_per_layer_compressed"]
        if "state" in full["kv_bytes_by_type"]:  # linear-attention / SSM states: never touched
            assert row["kv_bytes_by_type"]["state"] == full["kv_bytes_by_type"]["state"], name
        if policy == "global" and "sliding" in full["kv_bytes_by_type"]:  # held as by the full cache
            assert row["kv_bytes_by_type"]["sliding"] == full["kv_bytes_by_type"]["sliding"], name
        for layer, (kind, mine) in enumerate(zip(kinds, handed, strict=True)):
            if not mine:
                assert kept[layer] == left_alone(kind, prompt), (name, layer)
        if not any(handed):  # nothing to compress: the method does not act
            assert row["compressed"] is False and row["compressed_layers"] == "none", name
            continue
        if not (method.keeps_slot_subset and method.takes_budget):
            continue
        assert row["compressed"] is True, name
        compressed = [kept[layer] for layer, mine in enumerate(handed) if mine]
        uncompressed = [left_alone(kind, prompt) for kind, mine in zip(kinds, handed, strict=True) if mine]
        record = row["method_record"] or {}
        if name == "simlayerkv":  # a lazy layer keeps its window (the budget), the others everything
            lazy = record["simlayerkv_lazy_layers"]
            assert all(c in (min(BUDGET, h), h) for c, h in zip(compressed, uncompressed, strict=True)), name
            assert sum(c != h for c, h in zip(compressed, uncompressed, strict=True)) <= lazy, name
            if policy == "global":
                assert sum(compressed) == BUDGET * lazy + prompt * (len(compressed) - lazy), name
            continue
        # Exactly the budget per KV head and layer on average (per-layer / per-head allocations vary).
        want = sum(min(BUDGET, held) for held in uncompressed)
        assert math.isclose(sum(compressed), want), (name, compressed)
