"""Quantised storage on a model with sliding-window layers: the methods that replace every layer at once
(`cache.layers = [...]`: kivi, rtn, gear, fp8, transformers_quantized, ...) are handed the full-attention layers only
(`layers=global`), and what they store must be what the model's cache then holds."""

from __future__ import annotations

import json

import pytest
import torch
from model_matrix import WINDOW, config_kwargs

from kvbench import api
from kvbench.engine.architecture import compressible_layers
from kvbench.engine.cache import KVCache, LayerSubset
from kvbench.engine.generation import forward_tokens
from kvbench.engine.quant.layer import QuantKVLayer, quantize_cache
from kvbench.harness.options import RunOptions
from kvbench.methods.kivi import KIVI
from tests.helpers import sky_sample


@pytest.fixture(scope="module")
def gemma3_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3_text") / "config.json"
    path.write_text(json.dumps({"model_type": "gemma3_text", **config_kwargs("gemma3_text"), "vocab_size": 49152}))
    cfg = {"kind": "hf", "name": "gemma3_text", "name_or_path": str(path), "config_only": True}
    return api.load_model(cfg, device="cpu", dtype="float32")


def test_replacing_all_layers_of_a_subset_replaces_them_in_the_full_cache(gemma3_tiny):
    cache = KVCache(gemma3_tiny.layer_specs)
    with torch.inference_mode():
        forward_tokens(gemma3_tiny, cache, list(range(3, 3 + 2 * WINDOW)))
    full = compressible_layers(gemma3_tiny.layer_specs, "global")
    sliding = [i for i in range(len(cache.layers)) if i not in full]
    before = [cache.layers[i] for i in sliding]
    subset = LayerSubset(cache, full)
    quantize_cache(subset, KIVI().codec(gemma3_tiny.head_dim))
    assert all(isinstance(cache.layers[i], QuantKVLayer) for i in full)
    assert [cache.layers[i] for i in sliding] == before  # the sliding layers are left as they were
    assert list(subset.layers) == [cache.layers[i] for i in full]
    with pytest.raises(ValueError, match="subset of 2 layers was assigned 1"):
        subset.layers = [cache.layers[full[0]]]


def test_kivi_rows_hold_quantised_full_layers_and_untouched_sliding_layers(gemma3_tiny):
    sample = sky_sample()
    method = api.build_method("kivi", residual_length=32)  # a short fp residual: most of the prompt is 2-bit codes
    rows = api.evaluate(gemma3_tiny, [sample], [method], [None], include_full=True, kernels="torch")
    by_label = {row["method"]: row for row in rows}
    assert {row["status"] for row in rows} == {"ok"}
    full, kivi = by_label["full"]["kv_bytes_by_type"], by_label["kivi"]["kv_bytes_by_type"]
    assert kivi["sliding"] == full["sliding"]
    assert kivi["full"] < full["full"] / 3  # 2-bit codes (+ scales, fp residual) instead of fp32
    assert by_label["kivi"]["kv_bytes"] == kivi["full"] + kivi["sliding"]
    assert RunOptions().layers == "global"
