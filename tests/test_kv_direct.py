"""KV-Direct: recomputed K/V against the ones the prefill stored, greedy tokens identical to the full cache, and
the bytes formula (window K/V + checkpoints)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvbench.engine import attention
from kvbench.engine.generation import prefill
from kvbench.engine.layers.checkpoint import Recomputer, UnsupportedArchitecture, same_shape_projection
from kvbench.engine.measure import Stopwatch
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.harness.sample import Sample
from kvbench.methods import build_method
from kvbench.methods.kv_direct import PrefillResiduals

# fp32 recomputation on CPU with a product shape other than the original (one row at a time instead of the prompt's
# 40 rows): measured max-abs 1.7e-6 (tiny model) and 1.6e-5 (SmolLM2, keys of magnitude ~1-20); the bound leaves a
# margin of ~6x. With the original shapes the recomputation is torch.equal.
RECOMPUTE_BOUND = 1e-4


def random_ids(n: int, seed: int = 0, vocab: int = 49152) -> list[int]:
    return torch.randint(100, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefill_with_residuals(lm, ids):
    observer = PrefillResiduals()
    observer.bind_model(lm)
    pre = prefill(lm, ids, 0, Stopwatch(lm.device), [observer])
    return pre, observer


def assert_close_or_equal(recomputed: torch.Tensor, stored: torch.Tensor, what: str) -> float:
    if torch.equal(recomputed, stored):
        return 0.0
    err = float((recomputed - stored).abs().max())
    assert err < RECOMPUTE_BOUND, (what, err)
    return err


@pytest.mark.parametrize("lm_name", ["tiny_lm", pytest.param("smollm2_lm", marks=pytest.mark.slow)])
def test_recomputed_kv_matches_the_prefilled_cache_per_layer(lm_name, request):
    """Every layer: K/V recomputed from the captured residuals with the prefill's product shape (all T rows, also
    when only the first T - 16 are needed) are torch.equal to the prefill's cached K/V; recomputed with other
    shapes (one row at a time) they differ by at most RECOMPUTE_BOUND. The hooks are gone after the prefill."""
    lm = request.getfixturevalue(lm_name)
    ids = random_ids(40, seed=1)
    pre, observer = prefill_with_residuals(lm, ids)
    assert all(not layer.input_layernorm._forward_pre_hooks for layer in lm.model.model.layers)
    recomputer = Recomputer(lm.model)
    worst = 0.0
    for idx, layer in enumerate(pre.cache.layers):
        assert observer.residuals[idx].shape == (len(ids), lm.config.hidden_size)
        for count in (len(ids), len(ids) - 16):
            keys, values = recomputer.kv(idx, observer.residuals[idx], [len(ids)], count)
            assert torch.equal(keys, layer.keys[:, :, :count]), (idx, count)
            assert torch.equal(values, layer.values[:, :, :count]), (idx, count)
        keys, values = recomputer.kv(idx, observer.residuals[idx], [1] * len(ids), len(ids))
        worst = max(worst, assert_close_or_equal(keys, layer.keys, f"one-row keys layer {idx}"))
        worst = max(worst, assert_close_or_equal(values, layer.values, f"one-row values layer {idx}"))
    print(f"{lm_name}: max-abs one-row vs {len(ids)}-row recomputation {worst:.3g}")


def test_one_row_products_batched_equal_separate_calls():
    """A run of one-token forwards is recomputed as one batched product of one-row matrices: same bits as the
    separate calls (what a decode step did), with and without a bias."""
    torch.manual_seed(0)
    x = torch.randn(7, 24)
    for bias in (False, True):
        linear = torch.nn.Linear(24, 12, bias=bias)
        separate = torch.cat([linear(x[i : i + 1][None])[0] for i in range(7)])
        assert torch.equal(same_shape_projection(linear, x, [1] * 7), separate)
        mixed = torch.cat([linear(x[None, :4])[0], separate[4:]])
        assert torch.equal(same_shape_projection(linear, x, [4, 1, 1, 1]), mixed)


def story_sample(new_tokens: int) -> Sample:
    context = "Once upon a time a small fox lived by the river and watched the boats go by. " * 4
    return Sample(
        "s",
        context,
        "What did the fox watch?",
        "The fox watched",
        ["boats"],
        "string_match_all",
        new_tokens,
        meta={"ignore_eos": True},
    )


def run_methods(lm, methods: list[dict], budgets: list[int], compress: str, new_tokens: int):
    jobs = [Job(build_method({"name": "full"}), None, "full")]
    for config in methods:
        method = build_method(config)  # one object per config: the budget sweep shares its prefill observer
        jobs += [Job(method, budget, f"{config['checkpoint']}@{budget}") for budget in budgets]
    rows = {
        job.key: row
        for job, row in run_sample(
            lm, story_sample(new_tokens), jobs, RunOptions(compress=compress, seed=0, fail_fast=True)
        )
    }
    return rows.pop("full"), rows


VARIANTS = [{"name": "kv_direct", "checkpoint": "per_layer"}, {"name": "kv_direct", "checkpoint": "ids"}]


@pytest.mark.parametrize("compress", ["prompt", "context"])
def test_greedy_tokens_identical_to_full_on_the_tiny_model(tiny_lm, compress):
    full, rows = run_methods(tiny_lm, VARIANTS, [16, 64], compress, 64)
    assert full["output_tokens"] == 64
    for key, row in rows.items():
        assert row["compressed"], key
        assert row["output_ids"] == full["output_ids"], key
        assert row["max_layer_len_decode"] <= max(
            int(key.split("@")[1]), row["prompt_tokens"] - row["compressed_tokens"]
        )
        assert row["method_record"]["kv_direct_recompute_s"] > 0


@pytest.mark.slow
def test_greedy_tokens_identical_to_full_on_smollm2(smollm2_lm):
    """Real weights: what only they show is that recomputation stays bit-identical where logits are close (the
    tiny model's budget sweep covers the budgets; one tight budget and 32 tokens keep the ids replay affordable,
    since it re-prefills the evicted prefix before every forward)."""
    full, rows = run_methods(smollm2_lm, VARIANTS, [16], "prompt", 32)
    assert full["output_tokens"] == 32
    for key, row in rows.items():
        assert row["output_ids"] == full["output_ids"], key


def test_bytes_are_window_kv_plus_checkpoints(tiny_lm):
    """kv_bytes = B tokens' K/V + checkpoints: L*D elements per token seen (per_layer) or 4 bytes per token id
    (ids); a GQA model's per-layer checkpoints cost more than the K/V of the same tokens."""
    config = tiny_lm.config
    layers, hidden, heads, dim = (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_key_value_heads,
        config.head_dim,
    )
    new_tokens, budget = 10, 16
    _, rows = run_methods(tiny_lm, VARIANTS, [budget], "prompt", new_tokens)
    for key, row in rows.items():
        prompt = row["prompt_tokens"]
        window_kv = layers * heads * budget * 2 * dim * 4
        assert row["kv_bytes_compressed"] == window_kv + (
            layers * prompt * hidden * 4 if key.startswith("per_layer") else prompt * 4
        )
        seen = prompt + new_tokens - 1  # the last token is never fed back
        record = row["method_record"]
        checkpoint = layers * seen * hidden * 4 if key.startswith("per_layer") else seen * 4
        assert record["kv_direct_checkpoint_bytes"] == checkpoint, key
        assert record["kv_direct_window_kv_bytes"] == window_kv
        assert row["kv_bytes"] == window_kv + checkpoint
        assert record["kv_direct_full_kv_bytes"] == layers * heads * seen * 2 * dim * 4
    per_layer = rows[f"per_layer@{budget}"]["method_record"]
    # tiny model: D = 64 vs 2 * Hkv * d = 64 per layer: equal; SmolLM2 (576 vs 384) is 1.5x, see docs/methods.md.
    assert per_layer["kv_direct_checkpoint_bytes"] == per_layer["kv_direct_full_kv_bytes"] * hidden / (2 * heads * dim)


def test_unsupported_architecture_is_one_line(tiny_lm):
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        partial_rotary_factor=0.5,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation=attention.ATTN_IMPLEMENTATION)
    with pytest.raises(
        UnsupportedArchitecture,
        match=r"^kv_direct cannot recompute K/V for model_type 'llama': "
        r"missing partial rotary dimensions$",
    ):
        Recomputer(model)
    del model.model.layers[0].self_attn.k_proj
    model.config.partial_rotary_factor = 1.0
    with pytest.raises(UnsupportedArchitecture, match="missing decoder layer part self_attn.k_proj"):
        Recomputer(model)
    with pytest.raises(ValueError, match="Valid checkpoints: per_layer, ids"):
        build_method({"name": "kv_direct", "checkpoint": "layer0"})
