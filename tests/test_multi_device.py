"""Models split over devices (`model=hf model.device_map=auto`): each cache layer lives on its layer's device.

A CPU has one real device, so the second device here is `meta`: torch refuses to mix meta and CPU tensors in one
operation exactly as it refuses cuda:0 with cuda:1, so a code path that put a layer's tensors on another layer's
device, or on the model's first device, fails here as it would on two GPUs. Meta tensors have no values, so only
the paths that need none run on them (appends, masks, copies, byte counts, attention). The device_map option
itself is checked end to end on CPU, where accelerate places every layer on the CPU."""

from __future__ import annotations

import types

import pytest
import torch

from kvbench import api
from kvbench.engine.architecture import FULL, SLIDING, LayerSpec
from kvbench.engine.attention import CACHE_KWARG, kvbench_attention
from kvbench.engine.cache import KVCache
from kvbench.engine.generation import greedy_decode, prefill
from kvbench.engine.kernels.window_attention import window_attention
from kvbench.engine.measure import Stopwatch

HEADS, KV_HEADS, DIM = 4, 2, 8
DEVICES = [torch.device("cpu"), torch.device("meta"), torch.device("meta")]
SPECS = [
    LayerSpec(SLIDING, window=4, num_kv_heads=KV_HEADS, head_dim=DIM, value_head_dim=DIM),
    LayerSpec(FULL, num_kv_heads=KV_HEADS, head_dim=DIM, value_head_dim=DIM),
    LayerSpec(FULL, num_kv_heads=KV_HEADS, head_dim=DIM, value_head_dim=DIM),
]


def attention_module(layer_idx: int) -> torch.nn.Module:
    """What kvbench's attention function reads from a decoder layer's attention module."""
    module = torch.nn.Module()
    module.layer_idx = layer_idx
    module.config = types.SimpleNamespace(kvbench_attn_backend="sdpa")
    return module


def forward(cache: KVCache, num_tokens: int) -> list[torch.Tensor]:
    """One forward of `num_tokens` through every layer's attention, each layer's Q/K/V on its own device; positions
    are made on the CPU (the model's first device), as `forward_tokens` makes them on the embeddings' device."""
    cache.next_positions(num_tokens, "cpu")
    outputs = []
    for layer_idx, device in enumerate(DEVICES):
        query = torch.randn(1, HEADS, num_tokens, DIM, device=device)
        key = torch.randn(1, KV_HEADS, num_tokens, DIM, device=device)
        value = torch.randn(1, KV_HEADS, num_tokens, DIM, device=device)
        key, value = cache.update(key, value, layer_idx)  # as a transformers attention module does first
        out, _ = kvbench_attention(attention_module(layer_idx), query, key, value, None, **{CACHE_KWARG: cache})
        outputs.append(out)
    return outputs


def test_each_cache_layer_stays_on_the_device_of_its_key_values():
    cache = KVCache(SPECS)
    # Prefill in two chunks (the second builds a mask from stored positions), then two decode steps.
    for num_tokens in (5, 3, 1, 1):
        outputs = forward(cache, num_tokens)
        assert [out.device for out in outputs] == DEVICES
        assert [out.shape for out in outputs] == [(1, num_tokens, HEADS, DIM)] * len(DEVICES)
    for layer, device in zip(cache.layers, DEVICES, strict=True):
        assert layer.keys.device == layer.values.device == layer.positions.device == device
        mask, _ = layer.attention_mask(torch.tensor([10, 11]))  # positions from the first device
        assert mask.device == device
    # The sliding layer (window 4) holds the 3 positions its next query sees; the full layers all 10.
    assert [layer.get_seq_length() for layer in cache.layers] == [3, 10, 10]
    per_slot = KV_HEADS * 2 * DIM * 4  # K and V of every KV head, fp32
    assert cache.kv_bytes_by_type() == {"sliding": 3 * per_slot, "full": 20 * per_slot}
    copy = cache.copy()
    copy.reserve(4)  # room for appends, made on each layer's device by the copy's first write
    forward(copy, 2)
    assert [layer.keys.device for layer in copy.layers] == DEVICES
    assert [layer.get_seq_length() for layer in copy.layers] == [3, 12, 12]
    assert [layer.get_seq_length() for layer in cache.layers] == [3, 10, 10]  # the original is untouched


def test_window_scores_compare_positions_on_the_layer_device():
    """Window queries and their positions are recorded where the prefill ran them; a method scores each layer's
    keys with them on that layer's device (SnapKV, H2O, Finch, DAPQ use this function)."""
    queries = torch.randn(HEADS, 3, DIM, device="meta")
    keys = torch.randn(KV_HEADS, 7, DIM, device="meta")
    key_positions = torch.arange(7, device="meta").expand(KV_HEADS, -1)
    probs = window_attention(queries, keys, torch.tensor([4, 5, 6]), key_positions, DIM**-0.5)
    assert probs.device.type == "meta" and probs.shape == (HEADS, 3, 7)


@pytest.fixture
def saved_tiny(tiny_lm, tmp_path):
    """The tiny random Llama and its tokenizer as a local model directory."""
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


def test_device_map_auto_places_the_model_and_decodes_what_the_plain_load_decodes(saved_tiny, tiny_lm):
    cfg = {"kind": "hf", "name": "tiny_saved", "name_or_path": saved_tiny}
    placed = api.load_model({**cfg, "device_map": "auto"}, device="cpu", dtype="float32")
    plain = api.load_model(cfg, device="cpu", dtype="float32")
    assert placed.model is not plain.model
    # One device: accelerate places every layer on the CPU (and records no hf_device_map, as for any single device).
    assert {param.device for param in placed.model.parameters()} == {torch.device("cpu")}
    assert placed.device == torch.device("cpu") and placed.layer_specs == plain.layer_specs
    ids = tiny_lm.tokenizer("The grass is green. The sky is blue. " * 8).input_ids
    tokens = []
    for lm in (placed, plain):
        stopwatch = Stopwatch(lm.device)
        pre = prefill(lm, ids, 0, stopwatch)
        tokens.append(greedy_decode(lm, pre.cache, pre.last_logits, 8, lambda n: None, stopwatch).tokens)
        assert {layer.keys.device for layer in pre.cache.layers} == {torch.device("cpu")}
    assert tokens[0] == tokens[1] and len(tokens[0]) == 8


def test_device_map_with_random_weights_is_refused_in_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}')
    cfg = {"kind": "hf", "name_or_path": str(path), "config_only": True, "device_map": "auto"}
    with pytest.raises(ValueError, match="model.device_map needs real weights"):
        api.load_model(cfg, device="cpu", dtype="float32")
