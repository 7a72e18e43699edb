"""kvbench on the architectures of `tests/model_matrix.py` (tiny random configs, fp32, CPU), against transformers.

With the full cache, kvbench must compute exactly what the model's own eager forward computes (logits at every
prefill position within 1e-4) and decode what its own `generate` decodes (20 greedy tokens), on prompts longer
than the sliding windows; caches are bounded and counted per layer type; architectures kvbench cannot cache are
refused in one line before any sample runs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from model_matrix import ARCHITECTURES, WINDOW, config_kwargs
from transformers import AutoConfig, AutoModelForCausalLM

from kvbench import api
from kvbench.engine.architecture import UnsupportedModel, compressible_layers
from kvbench.engine.cache import KVCache
from kvbench.engine.generation import forward_tokens, greedy_decode
from kvbench.engine.measure import Stopwatch
from kvbench.harness.options import RunOptions
from kvbench.harness.sample import Sample
from kvbench.report import format_table, summarize
from tests.helpers import sky_sample

PROMPT = 100
NEW_TOKENS = 20


def load(arch: str, tmp_path_factory, **overrides):
    path = tmp_path_factory.mktemp(arch) / "config.json"
    path.write_text(json.dumps({"model_type": arch, **config_kwargs(arch), **overrides}))
    cfg = {"kind": "hf", "name": arch, "name_or_path": str(path), "config_only": True}
    return api.load_model(cfg, device="cpu", dtype="float32")


def eager_reference(lm) -> torch.nn.Module:
    """The same weights under transformers' own eager attention (a config copy: the kvbench model keeps its own)."""
    config = copy.deepcopy(lm.model.config)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    reference.load_state_dict(lm.model.state_dict())
    return reference


def prompt_ids(seed: int = 1) -> list[int]:
    return torch.randint(3, 512, (PROMPT,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_full_cache_decodes_what_transformers_decodes(arch, tmp_path_factory):
    try:
        AutoConfig.for_model(arch, **config_kwargs(arch))
    except (ValueError, KeyError) as err:  # pragma: no cover - an architecture this transformers lacks
        pytest.skip(f"transformers cannot build {arch}: {err}")
    lm = load(arch, tmp_path_factory)
    reference = eager_reference(lm)
    ids = prompt_ids()
    with torch.inference_mode():
        want = reference(torch.tensor([ids])).logits[0]
        cache = KVCache(lm.layer_specs)
        got = forward_tokens(lm, cache, ids, logits_to_keep=len(ids))
        assert (got - want).abs().max().item() < 1e-4
        generated = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, PROMPT:]
    decoded = greedy_decode(lm, cache, got[-1], NEW_TOKENS, lambda n: None, Stopwatch(lm.device), stop_at_eos=False)
    # transformers stops at EOS; up to there the tokens are the same.
    assert decoded.tokens[: len(generated)] == generated.tolist()
    for layer in cache.layers:  # bounded layers never hold more than their next query sees
        bound = layer.spec.max_slots(cache.seen_tokens)
        if bound is not None:
            assert layer.get_seq_length() <= bound


def test_layer_kinds_read_from_the_configs(tmp_path_factory):
    kinds = {arch: [spec.kind for spec in load(arch, tmp_path_factory).layer_specs] for arch in ("qwen2", "gpt_oss")}
    assert kinds["qwen2"] == ["full_attention"] * 2 + ["sliding_attention"] * 2  # max_window_layers=2
    assert kinds["gpt_oss"] == ["sliding_attention", "full_attention"] * 2
    specs = load("gpt_oss", tmp_path_factory).layer_specs
    assert all(spec.sinks for spec in specs) and specs[0].window == WINDOW
    assert all(spec.softcap == 50.0 for spec in load("gemma2", tmp_path_factory).layer_specs)
    mla = load("deepseek_v3", tmp_path_factory).layer_specs[0]
    assert (mla.num_kv_heads, mla.head_dim, mla.value_head_dim, mla.latent) == (1, 24, 8, True)  # the cached latent
    assert [spec.kind for spec in load("qwen3_next", tmp_path_factory).layer_specs] == ["state", "full_attention"] * 2
    assert [spec.rope for spec in load("smollm3", tmp_path_factory).layer_specs] == [True, False, True, False]
    for hybrid in ("jamba", "bamba", "granitemoehybrid", "nemotron_h"):
        assert [spec.kind for spec in load(hybrid, tmp_path_factory).layer_specs] == ["state", "full_attention"] * 2


def test_chunked_prefill_of_a_sliding_model_equals_one_shot(tmp_path_factory):
    lm = load("gemma3_text", tmp_path_factory)
    ids = prompt_ids(2)
    one_shot, chunked = KVCache(lm.layer_specs), KVCache(lm.layer_specs)
    with torch.inference_mode():
        want = forward_tokens(lm, one_shot, ids)
        for start in range(0, len(ids), 24):  # chunks smaller than the window, crossing it
            got = forward_tokens(lm, chunked, ids[start : start + 24])
    assert torch.allclose(got, want, atol=1e-5)
    for a, b in zip(one_shot.layers, chunked.layers, strict=True):
        assert torch.equal(a.positions, b.positions)
        assert torch.allclose(a.keys, b.keys, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_bytes_per_layer_type_equal_the_formula(seed, tmp_path_factory):
    rng = torch.Generator().manual_seed(seed)
    heads, head_dim, window = (int(torch.randint(lo, hi, (1,), generator=rng)) for lo, hi in ((1, 3), (2, 9), (5, 40)))
    head_dim *= 2
    tokens = int(torch.randint(1, 90, (1,), generator=rng))
    lm = load(
        "gemma3_text", tmp_path_factory, num_key_value_heads=heads, num_attention_heads=2 * heads,
        head_dim=head_dim, sliding_window=window,
    )  # fmt: skip
    cache = KVCache(lm.layer_specs)
    with torch.inference_mode():
        forward_tokens(lm, cache, prompt_ids(seed)[:tokens])
    per_token = heads * 2 * head_dim * 4  # fp32 K and V
    full = sum(spec.kind == "full_attention" for spec in lm.layer_specs)
    sliding = len(lm.layer_specs) - full
    expected = {"full": full * tokens * per_token, "sliding": sliding * min(tokens, window - 1) * per_token}
    assert cache.kv_bytes_by_type() == expected
    assert lm.full_kv_bytes(tokens) == sum(expected.values())


def test_state_bytes_are_counted_and_never_compressed(tmp_path_factory):
    lm = load("qwen3_next", tmp_path_factory)
    cache = KVCache(lm.layer_specs)
    with torch.inference_mode():
        forward_tokens(lm, cache, prompt_ids()[:40])
    by_type = cache.kv_bytes_by_type()
    states = [layer for layer in cache.layers if not layer.spec.attends]
    assert by_type["state"] == sum(layer.state_nbytes() for layer in states) > 0
    assert cache.kv_bytes() == sum(by_type.values())
    assert compressible_layers(lm.layer_specs, "all") == [1, 3]


def sample() -> Sample:
    return sky_sample(repeats=10)


@pytest.mark.parametrize("layers", ["global", "all"])
def test_budgets_apply_to_the_layers_the_policy_names(layers, tmp_path_factory):
    lm = load("gemma3_text", tmp_path_factory, vocab_size=49152)
    options = RunOptions(budgets=(16,), kernels="torch", layers=layers)
    method = api.build_method("snapkv", decode_budget=None)
    row = next(iter(api.iter_rows(lm, [(sample(), api.plan(lm, sample(), [method], options))], options)))
    assert row["status"] == "ok" and row["compressed"]
    compressed = row["kept_per_layer_compressed"]
    kinds = [spec.kind for spec in lm.layer_specs]
    for kind, kept in zip(kinds, compressed, strict=True):
        if kind == "full_attention" or layers == "all":
            assert kept == 16
        else:
            assert kept == WINDOW - 1  # a sliding layer keeps its window
    assert row["compressed_layers"] == (
        "2 full_attention" if layers == "global" else "2 sliding_attention(window 32), 2 full_attention"
    )
    assert set(row["kv_bytes_by_type"]) == {"full", "sliding"}
    summary = summarize([row])  # the printed summary says which layers were compressed
    assert list(summary["layers"]) == [row["compressed_layers"]]
    assert "layers: the layers the method compressed" in format_table(summary)


def test_kv_sharing_is_refused_in_one_line(tmp_path_factory):
    with pytest.raises(UnsupportedModel, match="gemma4_text.*shares KV") as err:
        kinds = ["sliding_attention", "full_attention"] * 3
        load("gemma4_text", tmp_path_factory, num_hidden_layers=6, layer_types=kinds, num_kv_shared_layers=2)
    assert "\n" not in str(err.value)


def test_attention_outside_kvbench_is_refused_in_one_line(tmp_path_factory):
    """Zamba 2's hybrid layers run one shared attention block with its own cache class: refused before any sample."""
    zamba = dict(
        mamba_headdim=16,
        mamba_d_state=16,
        n_mamba_heads=8,
        mamba_ngroups=1,
        mamba_d_conv=4,
        mamba_expand=2,
        chunk_size=16,
        num_mem_blocks=1,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
    )
    path = tmp_path_factory.mktemp("zamba2") / "config.json"
    path.write_text(json.dumps({"model_type": "zamba2", **config_kwargs("llama"), **zamba}))
    with pytest.raises(UnsupportedModel, match="zamba2.*does not go through kvbench's attention") as err:
        api.load_model({"kind": "hf", "name": "zamba2", "name_or_path": str(path), "config_only": True}, device="cpu")
    assert "\n" not in str(err.value)


def test_rope_dependent_methods_are_refused_on_nope_layers(tmp_path_factory):
    lm = load("smollm3", tmp_path_factory)
    with pytest.raises(ValueError, match="streamingllm.*NoPE"):
        api.check_model(lm, [api.build_method("streamingllm", rerotate=True)])
    api.check_model(lm, [api.build_method("streamingllm")])  # no re-rotation: fine
