"""Triton kernels against their torch references: fresh random inputs, odd lengths, ragged heads, GQA groups
1/4/8, fp32 and bf16, every output element written (outputs and scratch are poisoned with NaN).

Without a GPU the kernels run in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1 before triton is
first imported. The interpreter is slow, so shapes stay small.
"""

from __future__ import annotations

import secrets

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton package is not installed (pip install triton)")
if not torch.cuda.is_available() and not triton.knobs.runtime.interpret:
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)", allow_module_level=True)

from kvbench.engine.cache import PAD_POSITION, KVCache  # noqa: E402
from kvbench.engine.generation import prefill  # noqa: E402
from kvbench.engine.kernels import KERNEL_MODES, resolve_kernels  # noqa: E402
from kvbench.engine.kernels.decode_attention import decode_attention, decode_attention_torch, decode_attention_triton  # noqa: E402
from kvbench.engine.kernels.window_scores import (  # noqa: E402
    GQA_AGGREGATIONS,
    window_scores,
    window_scores_torch,
    window_scores_triton,
)
from kvbench.engine.measure import Stopwatch  # noqa: E402
from kvbench.methods import build_method  # noqa: E402
from kvbench.methods.base import CompressionContext  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (query heads, KV heads, window, keys, head dim): GQA groups 1, 4, 8 and odd lengths.
WINDOW_CASES = [(4, 4, 1, 1, 16), (8, 2, 5, 37, 16), (8, 1, 3, 129, 32), (4, 2, 3, 1000, 16)]
# (query heads, KV heads, slots, head dim)
DECODE_CASES = [(4, 4, 1, 16), (8, 2, 37, 16), (8, 1, 129, 32), (32, 4, 1000, 64)]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-3, atol=1e-5)}


@pytest.fixture
def poisoned(monkeypatch):
    """Every new floating tensor starts as NaN, so an element no kernel wrote shows up in the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(empty_like(*args, **kwargs)))


def fresh_generator() -> torch.Generator:
    """A new seed per call and per run (printed, so pytest shows it with a failure)."""
    seed = secrets.randbits(31)
    print(f"input seed {seed}")
    return torch.Generator().manual_seed(seed)


def window_inputs(heads, kv_heads, window, length, dim, dtype, generator):
    """Shuffled distinct key positions with ~20% padding (ragged heads); every query sees at least one key."""
    queries = torch.randn(heads, window, dim, generator=generator).to(dtype)
    keys = torch.randn(kv_heads, length, dim, generator=generator).to(dtype)
    key_positions = torch.stack([torch.randperm(2 * length, generator=generator)[:length] for _ in range(kv_heads)])
    padded = torch.rand(kv_heads, length, generator=generator) < 0.2
    padded &= key_positions != key_positions.amin(dim=1, keepdim=True)
    key_positions = key_positions.masked_fill(padded, PAD_POSITION)
    earliest = int(key_positions.amin(dim=1).max())
    query_positions = torch.randint(earliest, 2 * length + 1, (window,), generator=generator).sort().values
    return [t.to(DEVICE) for t in (queries, keys, query_positions, key_positions)]


@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: "H{}-Hkv{}-w{}-T{}-d{}".format(*c))
def test_window_scores_triton_matches_reference(case, dtype, reduce, poisoned):
    generator = fresh_generator()
    inputs = window_inputs(*case, dtype, generator)
    gqa_agg = GQA_AGGREGATIONS[int(torch.randint(0, 2, (), generator=generator))]
    expected = window_scores_torch(*inputs, 0.3, reduce, gqa_agg)
    # Small blocks and forced splits so the interpreter also exercises the chunked row statistics.
    got = window_scores_triton(*inputs, 0.3, reduce, gqa_agg, block_n=32, num_splits=3)
    assert got.shape == expected.shape == (case[1], case[3]) and got.dtype == torch.float32
    assert not got.isnan().any(), "an output element was never written"
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


def test_window_scores_default_launch_and_num_scored(poisoned):
    generator = fresh_generator()
    inputs = window_inputs(8, 2, 16, 301, 64, torch.float32, generator)
    for num_scored in (None, 285, 0):
        expected = window_scores_torch(*inputs, 0.125, "sum", "mean", num_scored)
        got = window_scores(*inputs, 0.125, "sum", "mean", num_scored, impl="triton")
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])


def test_window_scores_known_answer():
    # One query seeing two equal keys and a padded one: each visible key gets probability 1/2.
    queries = torch.ones(1, 1, 16, device=DEVICE)
    keys = torch.ones(1, 3, 16, device=DEVICE)
    key_positions = torch.tensor([[0, PAD_POSITION, 1]], device=DEVICE)
    for impl in ("torch", "triton"):
        scores = window_scores(queries, keys, torch.tensor([1], device=DEVICE), key_positions, 1.0, impl=impl)
        assert scores.tolist() == [[0.5, 0.0, 0.5]]


def test_window_scores_refuses_an_unknown_reduction():
    with pytest.raises(ValueError, match=r"unknown reduce 'mean'. Valid reduces: sum, max"):
        window_scores_torch(torch.ones(1, 1, 4), torch.ones(1, 1, 4), torch.zeros(1), torch.zeros(1, 1), 1.0, "mean")


def decode_inputs(heads, kv_heads, slots, dim, dtype, generator, ragged: bool, masked: bool):
    query = torch.randn(heads, dim, generator=generator).to(dtype)
    keys = torch.randn(kv_heads, slots, dim, generator=generator).to(dtype)
    values = torch.randn(kv_heads, slots, dim, generator=generator).to(dtype)
    lengths = valid = bias = None
    if ragged:
        lengths = torch.randint(1, slots + 1, (kv_heads,), generator=generator)
        lengths[0] = slots  # one head uses the whole buffer
    if masked:
        valid = torch.rand(kv_heads, slots, generator=generator) < 0.8
        valid[:, 0] = True
        bias = torch.randn(kv_heads, slots, generator=generator)
        bias[:, 1:].masked_fill_(torch.rand(kv_heads, slots - 1, generator=generator) < 0.1, float("-inf"))
    return [None if t is None else t.to(DEVICE) for t in (query, keys, values, lengths, valid, bias)]


@pytest.mark.parametrize("return_probs", [False, True], ids=["out", "probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "H{}-Hkv{}-L{}-d{}".format(*c))
def test_decode_attention_triton_matches_reference(case, dtype, return_probs, poisoned):
    generator = fresh_generator()
    ragged, masked = bool(torch.randint(0, 2, (), generator=generator)), case[2] > 1
    query, keys, values, lengths, valid, bias = decode_inputs(*case, dtype, generator, ragged or case[2] > 100, masked)
    args = (query, keys, values, case[3] ** -0.5, lengths, valid, bias, return_probs)
    expected = decode_attention_torch(*args)
    got = decode_attention_triton(*args, block_n=32, num_splits=3)
    out, expected_out = (got[0], expected[0]) if return_probs else (got, expected)
    assert out.shape == expected_out.shape and out.dtype == dtype
    assert not out.isnan().any(), "an output element was never written"
    relative = (out.float() - expected_out.float()).norm() / expected_out.float().norm()
    assert relative < (1e-5 if dtype == torch.float32 else 1e-2)
    if return_probs:
        probs, expected_probs = got[1], expected[1]
        assert not probs.isnan().any(), "a probability was never written"
        torch.testing.assert_close(probs, expected_probs, **TOLERANCE[dtype])
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(case[0], device=DEVICE))
        if lengths is not None:
            beyond = torch.arange(case[2], device=DEVICE) >= lengths.repeat_interleave(case[0] // case[1])[:, None]
            assert (probs[beyond] == 0).all()


def test_decode_attention_default_launch_many_splits_and_empty_head(poisoned):
    generator = fresh_generator()
    query, keys, values, *_ = decode_inputs(8, 2, 700, 64, torch.float32, generator, False, False)
    lengths = torch.tensor([0, 613], device=DEVICE)  # a head that kept nothing reads zeros
    for kwargs in (dict(), dict(block_n=16, num_splits=40)):
        out, probs = decode_attention_triton(query, keys, values, 0.125, lengths, return_probs=True, **kwargs)
        expected_out, expected_probs = decode_attention_torch(query, keys, values, 0.125, lengths, return_probs=True)
        torch.testing.assert_close(out, expected_out, **TOLERANCE[torch.float32])
        torch.testing.assert_close(probs, expected_probs, **TOLERANCE[torch.float32])
        assert (out[:4] == 0).all() and (probs[:4] == 0).all()


def test_decode_attention_dispatch_and_known_answer():
    # Two visible slots with equal logits: the output is the mean of their values, the third is hidden.
    query = torch.zeros(2, 16, device=DEVICE)
    keys = torch.randn(1, 3, 16, device=DEVICE)
    values = torch.arange(48, dtype=torch.float32, device=DEVICE).reshape(1, 3, 16)
    valid = torch.tensor([[True, False, True]], device=DEVICE)
    for impl in ("torch", "triton"):
        out, probs = decode_attention(query, keys, values, 1.0, valid=valid, return_probs=True, impl=impl)
        torch.testing.assert_close(out, ((values[0, 0] + values[0, 2]) / 2).expand(2, -1))
        assert probs.tolist() == [[0.5, 0.0, 0.5]] * 2


def test_resolve_kernels(monkeypatch):
    assert KERNEL_MODES == ("auto", "triton", "torch")
    assert resolve_kernels("torch", "cpu") == "torch"
    assert resolve_kernels("auto", "cpu") == "torch"
    if torch.cuda.is_available():
        assert resolve_kernels("auto", "cuda") == resolve_kernels("triton", "cuda") == "triton"
    with pytest.raises(ValueError, match=r"unknown kernels 'cuda'. Valid kernels: auto, triton, torch"):
        resolve_kernels("cuda", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_kernels("triton", "cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="kernels=triton needs a CUDA device"):
        resolve_kernels("triton", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="tiny_lm lives on the CPU, where Triton runs only interpreted")
@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
def test_scorers_keep_the_same_slots_with_triton_kernels(tiny_lm, name):
    """The fused window scores select what the torch path selects, on a real (tiny) model's queries."""
    window, budget = 16, 40
    token_ids = torch.randint(10, 1000, (150,), generator=fresh_generator()).tolist()
    pre = prefill(tiny_lm, token_ids, window, Stopwatch(tiny_lm.device))
    kept: dict[str, KVCache] = {}
    for kernels in ("torch", "triton"):
        cache = pre.cache.copy()
        ctx = CompressionContext.for_prompt(tiny_lm, budget, len(token_ids), pre, kernels=kernels)
        build_method({"name": name, "window": window}).compress(cache, ctx)
        kept[kernels] = cache
    for torch_layer, triton_layer in zip(kept["torch"].layers, kept["triton"].layers, strict=True):
        assert torch.equal(torch_layer.positions, triton_layer.positions)
