"""fp8, turboquant and kvquant on the packed store: round-trip bounds, inner-product unbiasedness, exact bytes,
bad input in one line and the stored caches of the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from kvbench.engine.generation import prefill
from kvbench.engine.measure import Stopwatch
from kvbench.engine.quant.fp8 import FP8Segment, calibrate_scale, fp8_error_bound, fp8_max
from kvbench.engine.quant.kvquant import encode_nuq, fit_calibration, normalise
from kvbench.engine.quant.packing import pack, packed_row_bytes, unpack
from kvbench.engine.quant.turboquant import beta_codebook, encode_turbo, turbo_nbytes
from kvbench.methods import build_method
from kvbench.methods.base import CompressionContext


def compressed_cache(lm, method, tokens, tmp_path):
    """Prefill `tokens`, then setup/compress/after_compress on a copy, as the runner does."""
    pre = prefill(lm, tokens, 0, Stopwatch(lm.device), [])
    cache = pre.cache.copy()
    ctx = CompressionContext.for_prompt(lm, len(tokens), len(tokens), pre, cache_dir=tmp_path)
    method.setup(cache, ctx)
    method.compress(cache, ctx)
    method.after_compress(cache, ctx)
    return pre, cache, ctx


def spread(heads: int, n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Values over many binades (so normals and subnormals of both formats are hit)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(heads, n, d, generator=generator) * torch.exp(4 * torch.randn(heads, n, d, generator=generator))


# ---------------------------------------------------------------- fp8


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_fp8_round_trip_within_the_format_bound(fmt, granularity):
    x = spread(3, 40, 16)
    scale = calibrate_scale(x, fmt, granularity, None)
    expected_amax = x.abs().amax() if granularity == "tensor" else x.abs().amax(dim=(1, 2))
    assert torch.allclose(scale, (expected_amax / fp8_max(fmt)).reshape(-1))
    segment = FP8Segment.encode(x, fmt, scale)
    error = (segment.materialize(torch.float32) - x).abs()
    per_head = scale.expand(3)[:, None, None]
    assert bool((error <= fp8_error_bound(x, fmt, per_head)).all())
    # the bound is tight: some element sits at more than half of it (not a vacuous bound)
    assert float((error / fp8_error_bound(x, fmt, per_head)).max()) > 0.5
    assert segment.nbytes() == 3 * 40 * 16 + scale.numel() * 4
    # the largest element maps to the format's max exactly
    assert float(segment.codes.float().abs().max()) == fp8_max(fmt)


def test_fp8_saturates_beyond_the_calibrated_range_and_scale_one_stores_nothing():
    x = torch.tensor([[[1.0, -2.0, 1000.0, 1e6]]])
    e4m3 = FP8Segment.encode(x, "e4m3", None)
    assert e4m3.materialize(torch.float32).tolist() == [[[1.0, -2.0, 448.0, 448.0]]]
    assert e4m3.nbytes() == 4  # scale 1.0: nothing but the codes
    e5m2 = FP8Segment.encode(x, "e5m2", None)
    assert e5m2.materialize(torch.float32).tolist() == [[[1.0, -2.0, 1024.0, 57344.0]]]


def test_fp8_cache_scales_from_the_prefill_fixed_while_decoding(tiny_lm, tmp_path):
    tokens = list(range(3, 3 + 30))
    method = build_method({"name": "fp8", "granularity": "head", "k_range": 200, "v_range": 100})
    pre, cache, ctx = compressed_cache(tiny_lm, method, tokens, tmp_path)
    assert ctx.record["quant"]["granularity"] == "head"
    for original, layer in zip(pre.cache.layers, cache.layers, strict=True):
        keys = original.keys[0]
        expected = keys.abs().amax(dim=(1, 2)) / 200
        assert torch.allclose(layer.codec.key_scale, expected)
        assert bool(((layer.keys[0] - keys).abs() <= fp8_error_bound(keys, "e4m3", expected[:, None, None])).all())
        heads, n, d = keys.shape
        assert layer.nbytes() == 2 * heads * n * d + 2 * heads * 4
        scale = layer.codec.key_scale
        step = torch.zeros(1, heads, 1, d)
        layer.update(step, step, positions=torch.tensor([[n]]))
        assert layer.codec.key_scale is scale  # fixed after the prefill
        assert layer.kstore.kinds() == [("fp8", n + 1)]


# ---------------------------------------------------------------- turboquant


def test_one_bit_packing_round_trip():
    codes = torch.randint(0, 2, (2, 5, 13), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    packed = pack(codes, 1)
    assert packed.shape[-1] == packed_row_bytes(13, 1) == 2
    assert torch.equal(unpack(packed, 1, 13), codes)


def test_beta_codebook_is_lloyd_max_of_the_coordinate_law():
    """Known answers: d large -> the Gaussian Lloyd-Max levels scaled by 1/sqrt(d) (1 bit: +-sqrt(2/pi)/sqrt(d),
    2 bits: +-0.4528/sqrt(d), +-1.510/sqrt(d)); and each centroid is the conditional mean of its cell under a
    Monte-Carlo sample of true rotated unit vectors."""
    d = 1024
    one = torch.tensor([-1, 1.0], dtype=torch.float64) * math.sqrt(2 / math.pi)
    assert torch.allclose(beta_codebook(d, 1) * math.sqrt(d), one, atol=2e-3)
    two = beta_codebook(d, 2) * math.sqrt(d)
    assert torch.allclose(two, torch.tensor([-1.510, -0.4528, 0.4528, 1.510], dtype=torch.float64), atol=5e-3)
    g = torch.randn(20000, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u = (g / g.norm(dim=-1, keepdim=True)).flatten()
    book = beta_codebook(16, 2)
    cells = torch.bucketize(u, (book[1:] + book[:-1]) / 2)
    means = torch.stack([u[cells == i].mean() for i in range(4)])
    assert torch.allclose(means, book, atol=4e-3)


def test_turboquant_mse_error_matches_the_paper_and_bytes_are_exact():
    """Paper Theorem 1: the MSE of unit vectors tends to the Gaussian Lloyd-Max distortions 1 - 2/pi = 0.3634,
    0.1175, 0.03454, 0.009497 at b = 1..4 (quoted rounded as 0.36, 0.117, 0.03, 0.009)."""
    x = torch.randn(4, 256, 64, generator=torch.Generator().manual_seed(1))
    for bits, paper in ((1, 1 - 2 / math.pi), (2, 0.1175), (3, 0.03454), (4, 0.009497)):
        segment = encode_turbo(x, bits, qjl=False, norm_correction=False, seed=0)
        unit = x / x.norm(dim=-1, keepdim=True)
        mse = float((segment.materialize(torch.float32) / x.norm(dim=-1, keepdim=True) - unit).pow(2).sum(-1).mean())
        assert abs(mse - paper) / paper < 0.05, (bits, mse)
        assert segment.nbytes() == turbo_nbytes(4, 256, 64, bits, False) == 4 * 256 * (8 * bits + 2)
    with_qjl = encode_turbo(x, 3, qjl=True, norm_correction=False, seed=0)
    assert with_qjl.nbytes() == turbo_nbytes(4, 256, 64, 3, True) == 4 * 256 * (8 * 2 + 2 + 8 + 2)
    corrected = encode_turbo(x, 2, qjl=False, norm_correction=True, seed=0).materialize(torch.float32)
    assert torch.allclose(corrected.norm(dim=-1), x.norm(dim=-1), rtol=2e-3)  # norm correction: norms exact (fp16)


def test_turboquant_qjl_inner_products_are_unbiased_and_mse_alone_is_not():
    """Statistical and seeded: over 3000 seeds (rotation signs and QJL matrix), the mean of <y, x^> with QJL is
    within 4 standard errors of <y, x>; the MSE-only codes at the same MSE width shrink it (paper: by ~2/pi at
    1 bit), far outside that interval."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(1, 1, 32, generator=generator)
    y = x[0, 0] + 0.5 * torch.randn(32, generator=generator)
    truth = float(x[0, 0] @ y)
    seeds = range(3000)
    prod = torch.tensor([float(encode_turbo(x, 2, True, False, s).materialize(torch.float32)[0, 0] @ y) for s in seeds])
    mse = torch.tensor([float(encode_turbo(x, 1, False, False, s).materialize(torch.float32)[0, 0] @ y) for s in seeds])
    standard_error = float(prod.std()) / math.sqrt(len(prod))
    assert abs(float(prod.mean()) - truth) < 4 * standard_error
    assert abs(float(mse.mean()) - truth) > 10 * float(mse.std()) / math.sqrt(len(mse))
    assert float(mse.mean()) < truth  # the MSE codes shrink inner products


def test_turboquant_presets_match_vllm_layouts_and_bytes(tiny_lm, tmp_path):
    tokens = list(range(3, 3 + 24))
    heads, d = tiny_lm.config.num_key_value_heads, tiny_lm.config.head_dim
    # per slot and head: key bytes + value bytes (vLLM: ceil(d * b / 8) + 2 for turbo keys, d for fp8 keys,
    # ceil(d * b / 8) + 4 for uniform values)
    expected = {"k8v4": d + 8 + 4, "4bit_nc": 8 + 2 + 8 + 4, "k3v4_nc": 6 + 2 + 8 + 4, "3bit_nc": 6 + 2 + 6 + 4}
    for preset, per_slot in expected.items():
        method = build_method({"name": "turboquant", "preset": preset})
        _, cache, ctx = compressed_cache(tiny_lm, method, tokens, tmp_path)
        assert ctx.record["quant"]["preset"] == preset
        assert all(layer.nbytes() == heads * len(tokens) * per_slot for layer in cache.layers)
    kinds = {"k8v4": ("fp8", "uniform"), "3bit_nc": ("turbo", "uniform")}
    for preset, (key_kind, value_kind) in kinds.items():
        method = build_method({"name": "turboquant", "preset": preset})
        _, cache, _ = compressed_cache(tiny_lm, method, tokens, tmp_path)
        assert cache.layers[0].kstore.kinds() == [(key_kind, 24)]
        assert cache.layers[0].vstore.kinds() == [(value_kind, 24)]
    protected = build_method({"name": "turboquant", "boundary_layers": 1})
    pre, cache, ctx = compressed_cache(tiny_lm, protected, tokens, tmp_path)
    assert ctx.record["quant"]["coded_layers"] == len(cache.layers) - 2
    assert torch.equal(cache.layers[0].keys, pre.cache.layers[0].keys)
    assert not hasattr(cache.layers[0], "kstore") and hasattr(cache.layers[1], "kstore")


# ---------------------------------------------------------------- bad input


def test_bad_hyperparameters_are_one_line(tiny_lm):
    cases = [
        ({"name": "fp8", "format": "e3m4"}, "unknown fp8 format 'e3m4'. Valid: e4m3, e5m2."),
        ({"name": "fp8", "granularity": "token"}, "unknown fp8 granularity 'token'. Valid: tensor, head."),
        ({"name": "fp8", "calibrate": "max"}, "unknown fp8 calibrate 'max'. Valid: prefill, none."),
        ({"name": "fp8", "k_range": 500}, r"k_range must be null or in \(0, 448\] for e4m3, got 500"),
        ({"name": "turboquant", "preset": "2bit"}, "unknown turboquant preset '2bit'. Valid presets: k8v4,"),
        ({"name": "turboquant", "k_bits": 5}, "unsupported key bits 5 for turbo. Valid: 1, 2, 3, 4."),
        ({"name": "turboquant", "qjl": True, "k_bits": 1}, "unsupported key bits 1 for turbo with qjl. Valid: 2, 3"),
        ({"name": "turboquant", "values": "uniform", "v_bits": 1}, "unsupported value bits 1 for uniform."),
        ({"name": "turboquant", "keys": "int4"}, "unknown key storage 'int4'. Valid: turbo, fp8, uniform."),
        ({"name": "turboquant", "boundary_layers": -1}, "boundary_layers must be >= 0, got -1"),
    ]
    for params, message in cases:
        with pytest.raises(ValueError, match=message):
            build_method(params)


# ---------------------------------------------------------------- kvquant


def test_kvquant_dense_and_sparse_golden_case():
    """Hand-made keys of 1 head x 3 slots x 2 channels, thresholds and a 2-bit codebook: entries outside their
    channel's [lo, hi] are kept exactly; the rest decode to the nearest codebook level of z = (x - mid) / half."""
    x = torch.tensor([[[0.5, 10.0], [-3.0, 2.0], [1.875, -0.25]]])
    low, high = torch.tensor([[-1.0, -2.0]]), torch.tensor([[2.0, 2.0]])
    book = torch.tensor([-1.0, -0.25, 0.5, 1.0])
    segment = encode_nuq(x, book, 2, low, high, 0.0)
    # channel 0: mid 0.5, half 1.5; channel 1: mid 0, half 2. z(0.5)=0 -> -0.25 (|0+0.25| < 0.5) -> 0.125;
    # z(1.875)=0.917 -> 1.0 -> 2.0; channel 1: z(2)=1 -> 2.0; z(-0.25)=-0.125 -> -0.25 -> -0.5
    expected = torch.tensor([[[0.125, 10.0], [-3.0, 2.0], [2.0, -0.5]]])
    assert torch.equal(segment.materialize(torch.float32), expected)
    assert segment.outlier_slots.tolist() == [0, 1] and segment.outlier_channels.tolist() == [1, 0]
    assert segment.nbytes() == 3 * packed_row_bytes(2, 2) + 2 * (4 + 2 + 2)
    # values: per-token thresholds (fraction 0: the token's min and max), stored per slot in 16 bits
    values = encode_nuq(x, book, 2, None, None, 0.0)
    assert values.low.tolist() == [0.5, -3.0, -0.25] and values.high.tolist() == [10.0, 2.0, 1.875]
    assert values.outlier_values.numel() == 0
    assert values.nbytes() == 3 * packed_row_bytes(2, 2) + 3 * 2 * 2
    assert values.materialize(torch.float32)[0, :, 0].tolist() == [0.5, -3.0, 1.875]  # each token's min / max


def test_kvquant_calibration_thresholds_are_channel_quantiles_and_codebook_is_kmeans():
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(2, 500, 8, generator=generator) * torch.arange(1, 9).float()
    values = torch.randn(2, 500, 8, generator=generator)
    calibration = fit_calibration(keys, values, 2, 0.02, torch.float32)
    expected_low = torch.quantile(keys.permute(0, 2, 1), 0.01, dim=-1)
    assert torch.allclose(calibration.key_low.float(), expected_low, rtol=1e-3, atol=1e-3)
    z = normalise(keys, calibration.key_low.float()[:, None], calibration.key_high.float()[:, None]).flatten()
    book = calibration.key_book.double()
    cells = torch.bucketize(z.double(), (book[1:] + book[:-1]) / 2)
    means = torch.stack([z[cells == i].double().mean() for i in range(4)])
    assert torch.allclose(means, book, atol=2e-3)  # each centroid is the mean of its cell (k-means fixed point)
    assert calibration.nbytes() == 2 * (2 * 8 * 2) + 2 * 4 * 2


def test_kvquant_cache_pre_rope_sinks_calibration_cache_and_bytes(tiny_lm, tmp_path):
    tokens = list(range(3, 3 + 40))
    method = build_method({"name": "kvquant", "bits": 8, "outlier_fraction": 0.02, "calibration_tokens": 256})
    pre, cache, ctx = compressed_cache(tiny_lm, method, tokens, tmp_path)
    assert len(list((tmp_path / "kvquant").glob("*.pt"))) == 1, "the calibration is cached per model"
    heads, d = tiny_lm.config.num_key_value_heads, tiny_lm.config.head_dim
    for original, layer in zip(pre.cache.layers, cache.layers, strict=True):
        assert layer.kstore.kinds() == [("sink", 1), ("nuq", 39)]
        keys, values = original.keys[0], original.values[0]
        assert torch.equal(layer.keys[0][:, :1], keys[:, :1]) and torch.equal(layer.values[0][:, :1], values[:, :1])
        # 8-bit nuq codes, pre-RoPE then re-rotated: close to the cached post-RoPE keys
        assert float((layer.keys[0] - keys).abs().max()) < 0.05 * float(keys.abs().max())
        key_segment, value_segment = layer.kstore.segments[1], layer.vstore.segments[1]
        outliers = key_segment.outlier_values.numel() + value_segment.outlier_values.numel()
        expected = (
            2 * heads * 1 * d * 4  # fp32 sink slot (the tiny model runs in fp32), keys and values
            + 2 * heads * 39 * d  # 8-bit codes
            + 39 * 2 * 2  # per-token value thresholds (fp16 low, high)
            + outliers * 8  # int32 slot + int16 channel + fp16 value
            + 2 * heads * d * 2
            + 2 * 256 * 2  # calibration: key thresholds + two 8-bit codebooks
        )
        assert layer.nbytes() == expected
    again = build_method({"name": "kvquant", "bits": 8, "outlier_fraction": 0.02, "calibration_tokens": 256})
    _, cache_again, _ = compressed_cache(tiny_lm, again, tokens, tmp_path)
    assert torch.equal(cache_again.layers[0].keys, cache.layers[0].keys)  # the cached calibration, same codes


def test_kvquant_bad_hyperparameters_are_one_line():
    for params, message in (
        ({"name": "kvquant", "bits": 5}, "unsupported bits 5. Valid bits: 2, 3, 4, 8."),
        ({"name": "kvquant", "outlier_fraction": 0.6}, r"outlier_fraction must be in \[0, 0.5\), got 0.6"),
        ({"name": "kvquant", "calibration_tokens": 4}, "calibration_tokens must be an int >= 16, got 4"),
    ):
        with pytest.raises(ValueError, match=message):
            build_method(params)
