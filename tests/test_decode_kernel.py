"""Decode steps through the Triton split-K kernel (`kernels=triton`) give the torch path's logits and tokens:
plain, evicted, ragged (padded heads) and logit-biased caches. With a GPU the tiny model runs on CUDA (`kernel_lm`)
and the kernel is compiled; without one it runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import importlib

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton package is not installed (pip install triton)")
if not torch.cuda.is_available() and not triton.knobs.runtime.interpret:
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)", allow_module_level=True)

from kvbench.engine.generation import forward_tokens, prefill  # noqa: E402
from kvbench.engine.measure import Stopwatch  # noqa: E402
from kvbench.harness.options import RunOptions  # noqa: E402
from kvbench.harness.runner import Job, run_sample  # noqa: E402
from kvbench.harness.sample import Sample  # noqa: E402
from kvbench.methods import build_method  # noqa: E402
from kvbench.methods.base import CompressionContext  # noqa: E402


def sample() -> Sample:
    return Sample(
        sample_id="s",
        context=" ".join(["The grass is green. The sky is blue."] * 12),
        question="What colour is the sky?",
        answer_prefix="The sky is",
        answers=["blue"],
        metric="string_match_all",
        max_new_tokens=5,
    )


def compressed_cache(lm, name: str, budget: int, biased: bool):
    token_ids = list(range(100, 260))
    pre = prefill(lm, token_ids, 32, Stopwatch(lm.device))
    cache = pre.cache.copy()
    if name != "full":
        ctx = CompressionContext.for_prompt(lm, budget, len(token_ids), pre)
        build_method({"name": name}).compress(cache, ctx)
    if biased:  # a per-slot logit bias (RazorAttention's compensation token uses it): additive mask
        for layer in cache.layers:
            bias = torch.linspace(-1.0, 1.0, layer.get_seq_length()).expand(layer.num_heads, -1)
            layer.extras["logit_bias"] = bias.clone()
    return cache


@pytest.mark.parametrize(("name", "biased"), [("full", False), ("snapkv", False), ("adakv", False), ("snapkv", True)])
def test_decode_step_logits_match_the_torch_path(kernel_lm, monkeypatch, name, biased):
    decode_module = importlib.import_module(
        "kvbench.engine.kernels.decode_attention"
    )  # the package re-exports a function
    calls = []
    kernel = decode_module.decode_attention_triton
    monkeypatch.setattr(decode_module, "decode_attention_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    cache = compressed_cache(kernel_lm, name, 40, biased)
    if name == "adakv":
        assert any(layer.padded for layer in cache.layers)  # ragged heads: padding slots must stay hidden
    logits, launches = {}, {}
    for kernels in ("torch", "triton"):
        step, before = cache.copy(), len(calls)
        step.decode_kernels = kernels
        logits[kernels] = torch.stack([forward_tokens(kernel_lm, step, [token]) for token in (7, 8, 9)])
        launches[kernels] = len(calls) - before
    assert launches == {"torch": 0, "triton": 3 * kernel_lm.config.num_hidden_layers}
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-5, atol=1e-5)


def test_decode_kernels_run_on_cuda_when_available(kernel_lm):
    from kvbench.engine.kernels.dispatch import resolve_kernels

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert kernel_lm.device.type == expected
    assert resolve_kernels("triton", kernel_lm.device) == "triton"
    if torch.cuda.is_available():
        assert resolve_kernels("auto", kernel_lm.device) == "triton"  # a GPU run decodes with the kernel by default


@pytest.mark.parametrize("name", ["full", "streamingllm", "h2o"])
def test_generated_tokens_match_with_triton_decode(kernel_lm, name):
    method = build_method({"name": name})
    jobs = [Job(method, None if name == "full" else 48, name)]
    rows = {
        kernels: next(
            iter(
                run_sample(
                    kernel_lm, sample(), jobs, RunOptions(compress="prompt", seed=0, fail_fast=True, kernels=kernels)
                )
            )
        )[1]
        for kernels in ("torch", "triton")
    }
    assert rows["triton"]["output_ids"] == rows["torch"]["output_ids"]
    assert rows["triton"]["output_tokens"] == 5
