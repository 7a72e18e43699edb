"""Wrappers over any scorer (chunk, per_layer, threshold, key_rerotation, compression_ratio_decoding), channel pruning
(think), merging (cam, merging, minicache) and selection without freeing memory (quest): known answers on hand-made
tensors from each method's rule, exact budgets (or the threshold rule), composition, and one-line refusals. The
registry-wide contract (yaml, budget rule on the tiny model, a roomy budget == full) is in test_method_contract.py."""

from __future__ import annotations

import math

import pytest
import torch

from kvbench.engine.attention import attend
from kvbench.engine.cache import PAD_POSITION, KVCache
from kvbench.engine.layers.channel_pruned import ChannelPrunedLayer
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.methods import build_method
from kvbench.methods.base import CompressionContext
from kvbench.methods.chunk import chunk_budgets, chunked_keep
from kvbench.methods.compression_ratio_decoding import fraction_cap
from kvbench.methods.key_rerotation import contiguous_positions
from kvbench.methods.merging import merge_evicted
from kvbench.methods.per_layer import weighted_layer_budgets
from kvbench.methods.scorer import LayerScores
from kvbench.methods.think import channel_scores, kept_channels
from tests.helpers import assert_kept_slots_are_untouched, needle_sample, prefilled


def run(lm, cfgs: dict, budget, compress="prompt", sample=None):
    """Rows by key of one shared run: "full" plus each `cfgs` entry at `budget`."""
    jobs = [Job(build_method({"name": "full"}), None, "full")]
    jobs += [
        Job(build_method({"name": cfg} if isinstance(cfg, str) else cfg), budget, key) for key, cfg in cfgs.items()
    ]
    options = RunOptions(compress=compress, seed=0, fail_fast=True)
    return {job.key: row for job, row in run_sample(lm, sample or needle_sample(8), jobs, options)}


def hand_cache(keys: torch.Tensor, values: torch.Tensor | None = None) -> KVCache:
    """A one-layer cache holding `keys [Hkv, L, d]` (and values) at positions 0..L-1."""
    cache = KVCache(1)
    values = torch.randn_like(keys) if values is None else values
    cache.next_positions(keys.shape[1], "cpu")
    cache.update(keys[None], values[None], 0)
    return cache


def hand_ctx(cache: KVCache, budget: int) -> CompressionContext:
    heads = cache.layers[0].num_heads
    return CompressionContext(
        budget=budget, prompt_len=cache.layers[0].get_seq_length(), num_heads=heads, num_kv_heads=heads
    )


# --- chunk ------------------------------------------------------------------------------------------------------


def test_chunk_shares_are_proportional_and_sum_to_the_budget():
    # chunks of 4, 4, 2 slots keeping 4 of 10: 1.6, 1.6, 0.8 -> floors 1, 1, 0; the two largest remainders
    # (0.8, then the first 0.6) get the two missing slots.
    assert chunk_budgets(10, 4, 4) == [2, 1, 1]
    assert chunk_budgets(12, 6, 4) == [2, 2, 2]
    assert sum(chunk_budgets(1000, 333, 64)) == 333


def test_chunk_keeps_each_chunks_own_top_scores_plus_the_protected_tail():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 0.1, 0.2, 0.3, 0.4, 5.0, 0.0]])  # head 0; tail of 2 protected
    kept = chunked_keep(LayerScores(scores, protected=2), budget=2 + 5, chunk_length=4)
    # 10 scored, 5 selectable: shares 2, 2, 1 (4*5/10 = 2, 2, 1): chunk 0 -> 0, 1; chunk 1 -> 6, 7; chunk 2 -> 8.
    assert kept.tolist() == [[0, 1, 6, 7, 8, 10, 11]]
    # A global top-5 would have taken 0, 1, 2, 3, 8: the chunks spread the selection.


def test_chunk_with_one_chunk_is_its_base_and_keeps_exactly_the_budget(tiny_lm):
    rows = run(
        tiny_lm,
        {
            "knorm": "knorm",
            "one": {"name": "chunk", "base": "knorm", "chunk_length": 4096},
            "chunked": {"name": "chunk", "base": "knorm", "chunk_length": 16},
        },
        32,
    )
    assert rows["one"]["output_ids"] == rows["knorm"]["output_ids"]
    assert rows["chunked"]["kept_entries_compressed"] == rows["knorm"]["kept_entries_compressed"]


def test_chunk_selection_is_per_chunk_on_the_model(tiny_lm):
    budget, window = 24, 8
    method = build_method({"name": "chunk", "chunk_length": 20, "base_params": {"window": window}})
    cache, ctx = prefilled(tiny_lm, budget, window)
    compressed = cache.copy()
    method.compress(compressed, ctx)
    scored = ctx.prompt_len - window
    shares = chunk_budgets(scored, budget - window, 20)
    for layer_idx, layer in enumerate(compressed.layers):
        verdict = method.inner.layer_scores(layer_idx, cache.layers[layer_idx], budget, ctx)
        for head in range(layer.num_heads):
            want = []
            for index, share in enumerate(shares):
                part = verdict.scores[head, index * 20 : (index + 1) * 20]
                order = torch.sort(part, descending=True, stable=True).indices[:share]
                want += sorted((index * 20 + order).tolist())
            want += list(range(scored, ctx.prompt_len))
            assert layer.positions[head].tolist() == want
    assert_kept_slots_are_untouched(cache, compressed)


def test_chunk_refuses_bad_hyperparameters():
    with pytest.raises(ValueError, match="chunk_length"):
        build_method({"name": "chunk", "chunk_length": 0})
    with pytest.raises(ValueError, match="scoring method"):
        build_method({"name": "chunk", "base": "streamingllm"})
    with pytest.raises(ValueError, match="decode_budget"):
        build_method({"name": "chunk", "base_params": {"decode_budget": 64}})


# --- per_layer --------------------------------------------------------------------------------------------------


def test_per_layer_budgets_follow_the_weights_and_keep_the_total():
    assert weighted_layer_budgets(10, [1, 1, 2], 100) == [8, 7, 15]  # 7.5, 7.5, 15: the tie to the earlier layer
    # 0, 7.5, 22.5 with a 12-slot prompt: layer 2 is capped, then layer 1; layer 0 (weight 0) takes the rest.
    assert weighted_layer_budgets(10, [0, 1, 3], 12) == [6, 12, 12]
    assert weighted_layer_budgets(5, [1, 1], 100) == [5, 5]


def test_per_layer_keeps_its_layer_budgets_on_the_model(tiny_lm):
    layers = tiny_lm.config.num_hidden_layers
    weights = [float(i + 1) for i in range(layers)]
    rows = run(tiny_lm, {"m": {"name": "per_layer", "layer_weights": weights}, "snap": "snapkv"}, 32)
    row = rows["m"]
    expected = weighted_layer_budgets(32, weights, row["compressed_tokens"])
    assert row["kept_per_layer_compressed"] == expected
    assert row["kept_entries_compressed"] == rows["snap"]["kept_entries_compressed"]


def test_per_layer_refuses_bad_weights(tiny_lm):
    with pytest.raises(ValueError, match="layer_weights"):
        build_method({"name": "per_layer", "layer_weights": [1.0, -1.0]})
    with pytest.raises(ValueError, match="the model has"):
        build_method({"name": "per_layer", "layer_weights": [1.0]}).check_model(tiny_lm.config)


# --- threshold --------------------------------------------------------------------------------------------------


def norm_keys(norms: list[list[float]], dim: int = 4) -> torch.Tensor:
    """Keys `[Hkv, L, dim]` with the given L2 norms (knorm scores them -norm)."""
    return torch.tensor(norms)[:, :, None] * torch.nn.functional.normalize(torch.ones(dim), dim=0)


def test_threshold_evicts_exactly_the_low_scores_outside_the_window():
    norms = [[1.0, 5.0, 2.0, 6.0, 9.0, 9.0], [7.0, 1.0, 8.0, 1.0, 9.0, 1.0]]
    cache = hand_cache(norm_keys(norms))
    method = build_method({"name": "threshold", "base": "knorm", "threshold": -4.0, "window": 2})
    ctx = hand_ctx(cache, 6)
    method.setup(cache, ctx)
    method.after_compress(cache, ctx)
    layer = cache.layers[0]
    # Slots 0..3 are judged (positions < 6 - 2): kept iff -norm >= -4; slots 4, 5 are in the window.
    real = [row[row != PAD_POSITION].tolist() for row in layer.positions]
    assert real == [[0, 2, 4, 5], [1, 3, 4, 5]]
    assert ctx.record["threshold_kept_entries"] == 8
    assert math.isclose(ctx.record["threshold_kept_fraction"], 8 / 12)
    assert cache.kept_entries() == 8


def test_threshold_judges_each_slot_once_while_decoding():
    cache = hand_cache(norm_keys([[1.0, 1.0, 1.0]]))
    method = build_method({"name": "threshold", "base": "knorm", "threshold": -4.0, "window": 2, "decoding": True})
    ctx = hand_ctx(cache, 3)
    method.setup(cache, ctx)
    method.after_compress(cache, ctx)
    for norm in (9.0, 1.0, 9.0):  # new slots at positions 3, 4, 5
        method.before_forward(cache, ctx, 1)
        cache.next_positions(1, "cpu")
        cache.update(norm_keys([[norm]])[None], torch.zeros(1, 1, 1, 4), 0)
    method.before_forward(cache, ctx, 1)
    # Judged: 0 (prefill), then 1, 2, 3 as they left the window; 3 (norm 9) is below the threshold.
    assert cache.layers[0].positions.tolist() == [[0, 1, 2, 4, 5]]
    assert ctx.record["threshold_decode_evicted"] == 1
    # Raising the threshold later does not re-judge the slots already judged.
    method.threshold = 100.0
    method.before_forward(cache, ctx, 1)
    assert cache.layers[0].positions.tolist() == [[0, 1, 2, 4, 5]]


def test_threshold_takes_no_budget_and_refuses_bad_hyperparameters(tiny_lm):
    method = build_method({"name": "threshold"})
    assert method.takes_budget is False
    with pytest.raises(ValueError, match="window"):
        build_method({"name": "threshold", "window": -1})
    with pytest.raises(ValueError, match="decode_budget"):
        build_method({"name": "threshold", "decode_budget": 64})


# --- key_rerotation ---------------------------------------------------------------------------------------------


def rotate_by(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """R(delta) k for keys `[L, d]` in the rotate-half layout, written out pair by pair."""
    out = keys.clone().double()
    half = inv_freq.shape[0]
    for i in range(half):
        angle = delta.double() * float(inv_freq[i])
        a, b = keys[:, i].double(), keys[:, i + half].double()
        out[:, i] = a * angle.cos() - b * angle.sin()
        out[:, i + half] = a * angle.sin() + b * angle.cos()
    return out


def test_contiguous_positions_renumber_each_head_and_keep_padding():
    positions = torch.tensor([[3, 7, 9], [2, 5, PAD_POSITION]])
    assert contiguous_positions(positions).tolist() == [[0, 1, 2], [0, 1, PAD_POSITION]]


def test_key_rerotation_rotates_the_bases_kept_keys_to_contiguous_positions(tiny_lm):
    budget, window = 24, 8
    base = build_method({"name": "snapkv", "window": window})
    method = build_method({"name": "key_rerotation", "base_params": {"window": window}})
    cache, ctx = prefilled(tiny_lm, budget, window)
    reference, rotated = cache.copy(), cache.copy()
    base.compress(reference, ctx)
    method.compress(rotated, ctx)
    inv_freq = next(
        m.inv_freq for m in tiny_lm.model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)
    )
    assert rotated.seen_tokens == budget
    for ref, layer in zip(reference.layers, rotated.layers, strict=True):
        assert layer.positions.tolist() == [list(range(budget))] * layer.num_heads
        assert torch.equal(layer.values, ref.values)
        for head in range(layer.num_heads):
            delta = torch.arange(budget) - ref.positions[head]
            want = rotate_by(ref.keys[0, head].float(), delta, inv_freq.float())
            torch.testing.assert_close(layer.keys[0, head].double(), want, rtol=1e-4, atol=1e-4)


def test_key_rerotation_over_streamingllm_is_streamingllms_rerotate_mode(tiny_lm):
    rows = run(
        tiny_lm,
        {
            "paper": {"name": "streamingllm", "rerotate": True},
            "wrapped": {"name": "key_rerotation", "base": "streamingllm"},
        },
        32,
    )
    assert rows["wrapped"]["output_ids"] == rows["paper"]["output_ids"]
    assert rows["wrapped"]["kept_entries"] == rows["paper"]["kept_entries"]


def test_key_rerotation_refuses_bases_it_cannot_renumber():
    with pytest.raises(ValueError, match="keeping a subset"):
        build_method({"name": "key_rerotation", "base": "kivi"})
    with pytest.raises(ValueError, match="decode_budget"):
        build_method({"name": "key_rerotation", "base": "knorm", "base_params": {"decode_budget": 64}})


# --- compression_ratio_decoding ---------------------------------------------------------------------------------


def test_fraction_cap_is_the_floor_of_the_fraction_of_tokens_seen():
    assert fraction_cap(100, 0.25) == 25 and fraction_cap(103, 0.25) == 25 and fraction_cap(3, 0.1) == 1
    assert fraction_cap(10, 0.3) == 3  # 10 * 0.3 = 2.9999999999999996 in floats


def test_compression_ratio_decoding_keeps_the_fraction_while_decoding(tiny_lm):
    sample = needle_sample(24)
    rows = run(
        tiny_lm,
        {
            "m": {
                "name": "compression_ratio_decoding",
                "base": "knorm",
                "compression_ratio": 0.5,
                "compression_interval": 4,
            }
        },
        0.5,
        sample=sample,
    )
    row = rows["m"]
    split, new = row["compressed_tokens"], row["output_tokens"]
    layers_heads = tiny_lm.config.num_hidden_layers * tiny_lm.config.num_key_value_heads
    assert row["kept_entries_compressed"] == row["budget_entries"] * layers_heads
    # The last forward (decode step new - 1) saw split + new - 1 tokens: the cap floor(0.5 * seen) held.
    cap = fraction_cap(split + new - 1, 0.5)
    assert cap - 4 <= row["kept_entries"] / layers_heads <= cap
    assert row["max_layer_len_decode"] <= cap
    assert row["method_record"]["decode_rescores"] > 0


def test_compression_ratio_decoding_refuses_bad_hyperparameters():
    with pytest.raises(ValueError, match="compression_ratio"):
        build_method({"name": "compression_ratio_decoding", "compression_ratio": 1.0})
    with pytest.raises(ValueError, match="compression_interval"):
        build_method({"name": "compression_ratio_decoding", "compression_interval": 0})


# --- think ------------------------------------------------------------------------------------------------------


def test_think_channel_scores_follow_the_formula_and_pick_the_top_channels():
    # 2 query heads over 1 KV head, window of 2, d = 4.
    queries = torch.tensor([[[1.0, 0.0, 2.0, 1.0], [1.0, 0.0, 0.0, 1.0]], [[3.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]]])
    keys = torch.tensor([[[1.0, 4.0, 1.0, 0.5], [1.0, 4.0, 3.0, 0.5], [9.0, 9.0, 9.0, 9.0]]])
    positions = torch.tensor([[0, 1, PAD_POSITION]])  # the padding slot must not count
    q2 = torch.tensor([(1 + 1 + 9 + 1) / 4, (0 + 0 + 1 + 1) / 4, (4 + 0 + 0 + 0) / 4, (1 + 1 + 1 + 1) / 4])
    k2 = torch.tensor([1.0, 16.0, 5.0, 0.25])
    scores = channel_scores(queries, keys, positions)
    torch.testing.assert_close(scores, (q2 * k2)[None])  # [3, 8, 5, 0.25]
    assert kept_channels(scores, 2).tolist() == [[1, 2]]


def test_think_layer_stores_exactly_the_kept_channels_and_attends_over_them():
    torch.manual_seed(0)
    heads, length, dim = 2, 6, 8
    layer = KVCache(1)
    keys, values = torch.randn(1, heads, length, dim), torch.randn(1, heads, length, dim)
    layer.next_positions(length, "cpu")
    layer.update(keys, values, 0)
    channels = torch.tensor([[0, 3, 5], [1, 2, 7]])
    pruned = ChannelPrunedLayer.from_layer(layer.layers[0], channels)
    layer.layers[0] = pruned
    assert pruned.keys.shape == (1, heads, length, 3)
    for head in range(heads):
        assert torch.equal(pruned.keys[0, head], keys[0, head][:, channels[head]])
    # bytes: 3 key channels + 8 value channels per slot, plus the int64 channel indices
    assert pruned.nbytes() == heads * length * (3 + 8) * 4 + channels.numel() * 8
    new_key, new_value = torch.randn(1, heads, 1, dim), torch.randn(1, heads, 1, dim)
    layer.next_positions(1, "cpu")
    read_keys, read_values = layer.update(new_key, new_value, 0)
    query = torch.randn(1, 4, 1, dim)  # GQA: query heads 0, 1 -> KV head 0; 2, 3 -> KV head 1
    out = attend(query, read_keys, read_values, None, False, 0.5)
    all_keys, all_values = torch.cat([keys, new_key], dim=2), torch.cat([values, new_value], dim=2)
    for h in range(4):
        kv = h // 2
        kept = channels[kv]
        logits = all_keys[0, kv][:, kept] @ query[0, h, 0, kept] * 0.5
        want = logits.softmax(-1) @ all_values[0, kv]
        torch.testing.assert_close(out[0, h, 0], want, rtol=1e-5, atol=1e-5)
    assert layer.layers[0].keys.shape == (1, heads, length + 1, 3)


def test_think_composes_with_token_eviction(tiny_lm):
    ratio = 0.25
    rows = run(
        tiny_lm,
        {"snap": "snapkv", "both": {"name": "think", "base": "snapkv", "key_channel_compression_ratio": ratio}},
        32,
    )
    snap, both = rows["snap"], rows["both"]
    dim = tiny_lm.config.head_dim
    keep = dim - int(dim * ratio)
    assert both["kept_entries_compressed"] == snap["kept_entries_compressed"]
    assert both["method_record"]["think_kept_channels"] == keep
    layers, heads = tiny_lm.config.num_hidden_layers, tiny_lm.config.num_key_value_heads
    element = 4  # the tiny model is fp32
    slots = both["kept_entries_compressed"]
    assert both["kv_bytes_compressed"] == slots * (keep + dim) * element + layers * heads * keep * 8


def test_think_refuses_bad_hyperparameters():
    with pytest.raises(ValueError, match="key_channel_compression_ratio"):
        build_method({"name": "think", "key_channel_compression_ratio": 1.0})
    with pytest.raises(ValueError, match="window"):
        build_method({"name": "think", "window": 0})
    with pytest.raises(ValueError, match="plain K/V"):
        build_method({"name": "think", "base": "kivi"})


# --- merging ----------------------------------------------------------------------------------------------------


def test_merging_folds_each_evicted_value_into_its_most_similar_kept_key():
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [-1.0, 0.0]]])
    values = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 3.0], [5.0, 5.0]]])
    kept = torch.tensor([[0, 1]])
    merged, received = merge_evicted(keys, values, kept, 0.0, 1.0)
    # slot 2 -> kept 0 (cos 1/sqrt(1.01)); slot 3 -> kept 1; slot 4 (cos -1 and 0) -> kept 1 at s = 0: weight 0.
    s = 1 / math.sqrt(1.01)
    w2 = s * math.sqrt(2) / (math.sqrt(2) + 2)
    w3 = s * math.sqrt(18) / (math.sqrt(18) + 2)
    want0 = (torch.tensor([2.0, 0.0]) + w2 * torch.tensor([1.0, 1.0])) / (1 + w2)
    want1 = (torch.tensor([0.0, 2.0]) + w3 * torch.tensor([3.0, 3.0])) / (1 + w3)
    torch.testing.assert_close(merged[0], torch.stack([want0, want1]))
    torch.testing.assert_close(received[0], torch.tensor([w2, w3]))


def test_merging_preserves_the_weighted_value_mass():
    torch.manual_seed(0)
    keys, values = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    kept = torch.tensor([[0, 3, 5, 9], [1, 2, 7, 11]])
    merged, received = merge_evicted(keys, values, kept, 0.0, 1.0)
    # (1 + W_t) v_t' summed over kept slots == kept values + every evicted value times its weight.
    unit = torch.nn.functional.normalize(keys, dim=-1)
    for head in range(2):
        evicted = [i for i in range(12) if i not in kept[head].tolist()]
        sims = unit[head, evicted] @ unit[head, kept[head]].T
        best, target = sims.max(dim=-1)
        ev_norm = values[head, evicted].norm(dim=-1)
        weight = best.clamp(min=0) * ev_norm / (ev_norm + values[head, kept[head]][target].norm(dim=-1) + 1e-6)
        lhs = ((1 + received[head])[:, None] * merged[head]).sum(0)
        rhs = values[head, kept[head]].sum(0) + (weight[:, None] * values[head, evicted]).sum(0)
        torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(received[head].sum(), weight.sum())


def test_merging_keeps_the_bases_slots_and_keys_with_merged_values(tiny_lm):
    budget, window = 24, 8
    base = build_method({"name": "snapkv", "window": window})
    method = build_method({"name": "merging", "base_params": {"window": window}})
    cache, ctx = prefilled(tiny_lm, budget, window)
    reference, merged = cache.copy(), cache.copy()
    base.compress(reference, ctx)
    method.compress(merged, ctx)
    assert merged.kept_entries() == reference.kept_entries() == budget * len(cache.layers) * 2
    for ref, layer in zip(reference.layers, merged.layers, strict=True):
        assert torch.equal(layer.positions, ref.positions) and torch.equal(layer.keys, ref.keys)
        assert not torch.equal(layer.values, ref.values)


def test_merging_with_a_high_threshold_is_its_base_and_refuses_bad_hyperparameters(tiny_lm):
    rows = run(tiny_lm, {"snap": "snapkv", "m": {"name": "merging", "similarity_threshold": 1.0}}, 32)
    assert rows["m"]["output_ids"] == rows["snap"]["output_ids"]
    with pytest.raises(ValueError, match="merge_fraction"):
        build_method({"name": "merging", "merge_fraction": 0.0})
    with pytest.raises(ValueError, match="similarity_threshold"):
        build_method({"name": "merging", "similarity_threshold": 1.5})
