"""GEAR, RotateKV and OCTOPUS-reconstructed on the packed store (kvbench.engine.quant): reconstruction properties,
exact byte formulas, bad input and end-to-end rows on the tiny model."""

from __future__ import annotations

import pytest
import torch

from kvbench.engine.generation import forward_tokens, prefill
from kvbench.engine.measure import Stopwatch
from kvbench.engine.quant.gear import GearSegment, encode_gear, outlier_count
from kvbench.engine.quant.octopus import (
    codebooks,
    encode_octopus,
    lloyd_max,
    nearest,
    reconstruct,
    rotated_unit_samples,
)
from kvbench.engine.quant.packing import packed_row_bytes
from kvbench.engine.quant.rotation import ChannelTransform, RotatedSegment, check_transform
from kvbench.engine.quant.segments import UniformSegment, uniform_nbytes
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.methods import build_method
from kvbench.methods.base import CompressionContext
from tests.helpers import needle_sample


def heavy_tailed(heads: int, n: int, d: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(heads, n, d, generator=generator)
    spikes = torch.randn(heads, n, d, generator=generator).pow(5)  # rare large entries
    return (base + 0.3 * spikes).to(torch.float16)


def gear(x, rank=4, ratio=0.02, seed=0, axis="channel", layout="token"):
    return encode_gear(x, 2, 16, axis, layout, ratio, rank, 3, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("axis", "layout"), [("token", "channel"), ("channel", "token")])
def test_gear_rank0_no_outliers_is_the_plain_quantiser_bit_for_bit(axis, layout):
    x = heavy_tailed(2, 64, 32)
    segment = gear(x, rank=0, ratio=0.0, axis=axis, layout=layout)
    plain = UniformSegment.encode(x, 2, 16, axis)
    assert torch.equal(segment.backbone.packed, plain.packed)
    assert torch.equal(segment.materialize(torch.float16), plain.materialize(torch.float16))
    assert segment.nbytes() == plain.nbytes() == uniform_nbytes(2, 64, 32, 2, 16, axis)


def test_gear_recovers_more_than_the_quantiser_and_keeps_outliers_exactly():
    x = heavy_tailed(2, 64, 32, seed=1)
    plain = UniformSegment.encode(x, 2, 16, "channel").materialize(torch.float32)
    full = gear(x)
    err_plain = float((plain - x.float()).norm())
    err_gear = float((full.materialize(torch.float32) - x.float()).norm())
    assert err_gear < 0.8 * err_plain
    errors = [float((gear(x, rank=r).materialize(torch.float32) - x.float()).norm()) for r in (0, 2, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    rows = full.materialize(torch.float16).permute(1, 0, 2).reshape(64, 64)
    expected = x.permute(1, 0, 2).reshape(64, 64).gather(-1, full.outliers.indices.long())
    assert torch.equal(rows.gather(-1, full.outliers.indices.long()), expected)
    again = gear(x)
    assert torch.equal(again.q, full.q) and torch.equal(again.backbone.packed, full.backbone.packed)


@pytest.mark.parametrize(
    ("heads", "n", "d", "rank", "ratio"), [(2, 64, 32, 4, 0.02), (3, 128, 64, 2, 0.05), (1, 32, 16, 0, 0.1)]
)
def test_gear_bytes_formula(heads, n, d, rank, ratio):
    x = heavy_tailed(heads, n, d)
    for axis, layout, rows in (("channel", "token", n), ("token", "channel", heads * d)):
        segment = gear(x, rank=rank, ratio=ratio, axis=axis, layout=layout)
        k = min(outlier_count(ratio, heads, d), (heads * d if layout == "token" else n) // 2)
        outliers = rows * 2 * k * (2 + 2)  # per row 2k entries: fp16 value + int16 index
        factors = heads * (n + d) * rank * 2
        assert isinstance(segment, GearSegment)
        assert segment.nbytes() == uniform_nbytes(heads, n, d, 2, 16, axis) + outliers + factors


def test_hadamard_size_and_head_group_errors_are_one_line():
    with pytest.raises(ValueError, match=r"hadamard size \(head_group 3 x head dim 64\) 192 is not a power of two"):
        check_transform(3, 64, 3)
    with pytest.raises(ValueError, match="head_group 2 does not divide the 3 KV heads. Valid head groups: 1, 3"):
        check_transform(3, 64, 2)
    check_transform(8, 128, 4)


def test_rotated_transform_round_trip_and_rotatekv_beats_rtn_on_outlier_channels():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 16, generator=generator)
    x[:, :, 3] *= 12  # an outlier channel, the case rotation is for
    order = torch.randperm(32, generator=generator)
    transform = ChannelTransform(2, 16, 2, order)
    assert torch.allclose(transform.inverse(transform.forward(x)), x, atol=1e-5)
    rotated = RotatedSegment.encode(x, transform, 2, 16, 1.0).materialize(torch.float32)
    plain = UniformSegment.encode(x, 2, 16, "channel").materialize(torch.float32)
    assert float((rotated - x).pow(2).mean()) < float((plain - x).pow(2).mean())


def test_octopus_round_trip_bytes_and_seed():
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    for bits in (2, 3, 4):
        segment = encode_octopus(x, bits, seed=0)
        books = codebooks(64, bits)
        assert sum(books.split) == 3 * bits
        expected = 2 * 10 * (sum(packed_row_bytes(21, b) for b in books.split) + packed_row_bytes(1, bits) + 2)
        assert segment.nbytes() == expected
        error = float((segment.materialize(torch.float32) - x.float()).pow(2).sum() / x.float().pow(2).sum())
        assert error < {2: 0.2, 3: 0.06, 4: 0.02}[bits]
    assert torch.equal(encode_octopus(x, 3, 0).streams[0], encode_octopus(x, 3, 0).streams[0])
    assert not torch.equal(encode_octopus(x, 3, 0).streams[0], encode_octopus(x, 3, 1).streams[0])


def compressed_cache(lm, method, tokens, tmp_path):
    """Prefill `tokens` with the method's observer, then setup/compress/after_compress as the runner does."""
    observer = method.prefill_observer()
    if observer is not None and hasattr(observer, "bind_model"):
        observer.bind_model(lm)
    pre = prefill(lm, tokens, 0, Stopwatch(lm.device), [observer] if observer is not None else [])
    cache = pre.cache.copy()
    ctx = CompressionContext.for_prompt(lm, len(tokens), len(tokens), pre, prefill_stats=observer, cache_dir=tmp_path)
    method.setup(cache, ctx)
    method.compress(cache, ctx)
    method.after_compress(cache, ctx)
    return pre, cache, ctx


def test_gear_streaming_blocks_and_cache_bytes(tiny_lm, tmp_path):
    method = build_method({"name": "gear", "group_size": 16, "streaming_gap": 32})
    pre, cache, _ = compressed_cache(tiny_lm, method, list(range(3, 3 + 75)), tmp_path)
    layer = cache.layers[0]
    assert layer.kstore.kinds() == [("gear", 64), ("fp", 11)] and layer.vstore.kinds() == [("gear", 64), ("fp", 11)]
    assert layer.kstore.segments[0].rank == 4
    for token in range(21):
        forward_tokens(tiny_lm, cache, [token + 5])
    assert layer.kstore.kinds() == [("gear", 64), ("gear", 32)] and layer.kstore.segments[1].rank == 2
    assert cache.kv_bytes() == sum(lay.kstore.nbytes() + lay.vstore.nbytes() for lay in cache.layers)
    assert cache.kv_bytes() < pre.cache.kv_bytes() * 96 / 75 / 2


def test_rotatekv_sinks_exact_round_trip_calibration_cache_and_eviction(tiny_lm, tmp_path):
    tokens = list(range(3, 3 + 60))
    method = build_method({"name": "rotatekv", "group_size": 16, "calibration_tokens": 128, "n_sinks": 4})
    pre, cache, ctx = compressed_cache(tiny_lm, method, tokens, tmp_path)
    assert list((tmp_path / "rotatekv").glob("*.pt")), "the calibrated order is cached per model"
    sink_counts = ctx.record["quant"]["sink_tokens_per_layer"]
    assert len(sink_counts) == 4 and min(sink_counts) >= 1 and max(sink_counts) <= 4
    for original, layer in zip(pre.cache.layers, cache.layers, strict=True):
        sinks = layer.sink_columns()
        assert sinks.any()
        assert torch.equal(layer.keys[0][:, sinks], original.keys[0][:, sinks])  # bit-exact 16-bit sinks
        assert torch.equal(layer.values[0][:, sinks], original.values[0][:, sinks])
        kinds = {kind for kind, _ in layer.kstore.kinds()}
        assert kinds == {"sink", "rotated"}
    # 8 bits, no clipping: the pre-RoPE rotated store reads back as the cached post-RoPE keys
    fine = build_method({"name": "rotatekv", "group_size": 16, "calibration_tokens": 128, "k_bits": 8,
                         "v_bits": 8, "k_clip": 1.0, "v_clip": 1.0})  # fmt: skip
    pre, cache, _ = compressed_cache(tiny_lm, fine, tokens, tmp_path)
    for original, layer in zip(pre.cache.layers, cache.layers, strict=True):
        scale = original.keys.abs().max()
        assert float((layer.keys - original.keys).abs().max()) < 0.02 * float(scale)
    # decode-time eviction from rotated layers (StreamingLLM base), rows end to end
    evicting = build_method({"name": "rotatekv", "group_size": 16, "calibration_tokens": 128, "base": "streamingllm"})
    jobs = [Job(evicting, 24, "rot+stream"), Job(build_method({"name": "full"}), None, "full")]
    rows = {
        job.key: row
        for job, row in run_sample(
            tiny_lm, needle_sample(12), jobs, RunOptions(compress="prompt", seed=0, fail_fast=True, cache_dir=tmp_path)
        )
    }
    assert rows["rot+stream"]["status"] == "ok" and rows["rot+stream"]["max_layer_len_decode"] <= 24


def test_bad_input_is_one_line(tiny_lm):
    with pytest.raises(ValueError, match="unsupported bits 5. Valid bits: 2, 3, 4."):
        build_method({"name": "octopus", "bits": 5})
    with pytest.raises(ValueError, match="streaming_gap 40 is not a positive multiple of group_size 16"):
        build_method({"name": "gear", "group_size": 16, "streaming_gap": 40})
    with pytest.raises(ValueError, match="k_clip must be in"):
        build_method({"name": "rotatekv", "k_clip": 1.5})
    with pytest.raises(ValueError, match="group_size 12 does not divide the head dim 16"):
        build_method({"name": "rotatekv", "group_size": 12}).check_model(tiny_lm.config)
    build_method({"name": "rotatekv"}).check_model(tiny_lm.config)  # 64 > 16: one group per head vector
    build_method({"name": "rotatekv", "head_group": 2, "group_size": 16}).check_model(tiny_lm.config)


@pytest.mark.xfail(strict=True, reason="OCTOPUS-reconstructed does not reach the paper's claim (docs/quantisation.md)")
def test_octopus_reconstruction_beats_per_coordinate_lloyd_max_like_the_paper_claims():
    """The paper's falsifiable claim: at equal bits, lower MSE on rotated vectors than TurboQuant-MSE (one
    Lloyd-Max codebook per coordinate). kvbench's reconstruction fails it (d=64: 0.166 vs 0.114 at 2 bits, 0.040 vs
    0.033 at 3), so the reconstruction, not the paper, is wrong; strict xfail flips when it is fixed."""
    test = rotated_unit_samples(64, seed=1)
    for bits in (2, 3):
        ours = float((reconstruct(test, codebooks(64, bits)) - test).pow(2).sum(dim=-1).mean())
        per_coordinate = lloyd_max(rotated_unit_samples(64), bits)
        baseline = per_coordinate.to(test.dtype)[nearest(test, per_coordinate).long()]
        assert ours <= float((baseline - test).pow(2).sum(dim=-1).mean())
