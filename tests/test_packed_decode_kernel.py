"""The packed decode kernel (codes dequantised inside the kernel) equals its torch reference, under Triton's CPU
interpreter without a GPU (tests/conftest.py sets TRITON_INTERPRET=1), and decode steps of a quantised cache give
the torch path's logits."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton package is not installed (pip install triton)")
if not torch.cuda.is_available() and not triton.knobs.runtime.interpret:
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)", allow_module_level=True)

from kvbench.engine.cache import KVLayer  # noqa: E402
from kvbench.engine.generation import forward_tokens, prefill  # noqa: E402
from kvbench.engine.kernels.packed_decode import (  # noqa: E402
    packed_decode_attention_torch,
    packed_decode_attention_triton,
)
from kvbench.engine.measure import Stopwatch  # noqa: E402
from kvbench.engine.quant import QuantKVLayer  # noqa: E402
from kvbench.methods import build_method  # noqa: E402
from kvbench.methods.base import CompressionContext  # noqa: E402


def quant_layer(heads, n, d, params, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    layer = KVLayer()
    keys, values = torch.randn(2, 1, heads, n, d, generator=gen).to(dtype)
    layer.update(keys, values, positions=torch.arange(n))
    return QuantKVLayer.from_layer(layer, build_method(params).codec())


CASES = [
    ({"name": "kivi", "k_bits": 2, "v_bits": 2, "group_size": 16, "residual_length": 32}, 2, 100, 64),
    ({"name": "kivi", "k_bits": 3, "v_bits": 4, "group_size": 8, "residual_length": 16}, 3, 77, 40),
    ({"name": "kivi", "k_bits": 8, "v_bits": 3, "group_size": 16, "residual_length": 16}, 1, 16, 32),
    ({"name": "rtn", "k_bits": 4, "v_bits": 2, "group_size": 16}, 2, 130, 48),
    ({"name": "rtn", "k_bits": 16, "v_bits": 3, "group_size": 16, "residual_length": 8}, 2, 50, 32),
]


@pytest.mark.parametrize(("params", "heads", "n", "d", "masked"), [(*case, i % 2 == 1) for i, case in enumerate(CASES)])
def test_packed_kernel_equals_the_torch_reference(params, heads, n, d, masked):
    layer = quant_layer(heads, n, d, params)
    operands = layer.packed_operands()
    assert operands is not None
    query = torch.randn(heads * 3, d, generator=torch.Generator().manual_seed(1))
    valid = bias = None
    if masked:
        valid = torch.rand(heads, n, generator=torch.Generator().manual_seed(2)) > 0.3
        bias = torch.linspace(-1, 1, n).expand(heads, -1)
    ref = packed_decode_attention_torch(query, operands, 0.125, valid, bias)
    out = packed_decode_attention_triton(query, operands, 0.125, valid, bias, num_splits=3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the reference itself is attention over the dequantised cache
    keys, values = layer.keys[0], layer.values[0]
    dense = torch.softmax((query.view(heads, 3, d) @ keys.transpose(1, 2)) * 0.125, -1) @ values
    if not masked:
        torch.testing.assert_close(ref, dense.flatten(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base", [None, "snapkv"])
def test_decode_steps_of_a_quantised_cache_match_the_torch_path(tiny_lm, monkeypatch, base):
    import kvbench.engine.kernels.packed_decode as packed_module

    calls = []
    kernel = packed_module.packed_decode_attention_triton
    monkeypatch.setattr(
        packed_module, "packed_decode_attention_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k)
    )
    token_ids = list(range(100, 180))  # short: the interpreter runs every kernel program in Python
    pre = prefill(tiny_lm, token_ids, 32, Stopwatch(tiny_lm.device))
    params = {"name": "kivi", "k_bits": 2, "v_bits": 4, "group_size": 16, "residual_length": 16, "base": base}
    method = build_method(params)
    logits = {}
    for kernels in ("torch", "triton"):
        cache = pre.cache.copy()
        ctx = CompressionContext.for_prompt(tiny_lm, 48, len(token_ids), pre, kernels=kernels)
        method.setup(cache, ctx)
        if base:
            method.compress(cache, ctx)
        method.after_compress(cache, ctx)
        assert all(layer.packed_decode == (kernels == "triton") for layer in cache.layers)
        cache.decode_kernels = kernels
        logits[kernels] = torch.stack([forward_tokens(tiny_lm, cache, [token]) for token in (7, 8, 9)])
    assert len(calls) == 3 * tiny_lm.config.num_hidden_layers  # every triton step read the packed codes
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)
