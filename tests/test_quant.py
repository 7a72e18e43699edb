"""Quantised KV storage (kvbench.engine.quant): quantiser bounds, bit packing, segment bytes, KIVI's residual rules,
and the quantised methods end to end on the tiny model."""

from __future__ import annotations

import pytest
import torch

from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.quant import (
    QuantKVLayer,
    SegmentStore,
    UniformSegment,
    dequantize,
    pack,
    packed_row_bytes,
    quantize,
    uniform_nbytes,
    unpack,
)
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.methods import build_method
from tests.helpers import needle_sample


def expanded(param: torch.Tensor, group_size: int, axis: str) -> torch.Tensor:
    """Per-group scale/zero broadcast back to `[Hkv, n, d]`."""
    return param.repeat_interleave(group_size, dim=1 if axis == "token" else 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantiser_error_is_at_most_half_a_step(bits, axis, dtype):
    gen = torch.Generator().manual_seed(bits)
    x = (torch.randn(3, 64, 32, generator=gen) * torch.logspace(-2, 1, 32)).to(dtype)
    x[0, :, 5] += 7.0  # an outlier channel
    q = quantize(x, bits, 16, axis)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    assert q.scale.dtype == (dtype if dtype != torch.float32 else torch.float16)
    err = (dequantize(q, 16, axis, torch.float32) - x.float()).abs()
    bound = expanded(q.scale.float(), 16, axis) / 2
    assert bool((err <= bound * (1 + 1e-6) + 1e-6).all())
    # the grid really is 2^b levels: the error is not trivially small
    assert float(err.max()) > float(bound.max()) / 8


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_constant_groups_reconstruct_exactly(axis):
    x = torch.full((2, 8, 8), 0.375)
    x[1] = -1.25
    q = quantize(x, 2, 4, axis)
    assert bool((q.scale == 0).all())
    assert torch.equal(dequantize(q, 4, axis, torch.float32), x)
    half = torch.randn(2, 1, 8).to(torch.float16).expand(2, 8, 8).contiguous()  # constant along tokens
    assert torch.equal(dequantize(quantize(half, 3, 8, "token"), 8, "token", torch.float16), half)


def test_grouping_axis_shapes_and_errors():
    x = torch.randn(2, 64, 32)
    assert quantize(x, 2, 32, "token").scale.shape == (2, 2, 32)
    assert quantize(x, 2, 8, "channel").scale.shape == (2, 64, 4)
    with pytest.raises(ValueError, match="Valid bits: 2, 3, 4, 8"):
        quantize(x, 5, 8, "channel")
    with pytest.raises(ValueError, match="does not divide head dim 32"):
        quantize(x, 2, 12, "channel")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 13), (2, 3, 64), (4, 1, 9), (2, 0, 8)])
def test_pack_unpack_round_trip_is_bit_exact(bits, shape):
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(len(shape)), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], packed_row_bytes(shape[-1], bits))
    assert torch.equal(unpack(packed, bits, shape[-1]), codes)


def test_packing_layout_and_true_3bit_bytes():
    # code i of a block of 8 sits at bit b*i of a little-endian 8b-bit integer
    codes = torch.tensor([1, 2, 3, 0, 0, 0, 0, 1], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [1 | 2 << 2 | 3 << 4, 1 << 6]
    assert pack(codes, 3).tolist() == [1 | 2 << 3 | (3 & 0b11) << 6, 3 >> 2, 1 << 5]
    assert packed_row_bytes(64, 3) == 24 and packed_row_bytes(64, 4) == 32 and packed_row_bytes(65, 2) == 18


def fp_layer(heads: int, n: int, d: int, dtype=torch.float32, seed: int = 0) -> KVLayer:
    gen = torch.Generator().manual_seed(seed)
    layer = KVLayer()
    keys, values = torch.randn(2, 1, heads, n, d, generator=gen).to(dtype)
    layer.update(keys, values, positions=torch.arange(n))
    return layer


def kivi_codec(bits=2, group_size=32, residual_length=128):
    return build_method(
        {"name": "kivi", "k_bits": bits, "v_bits": bits, "group_size": group_size, "residual_length": residual_length}
    ).codec()


def test_kivi_residual_buffers_after_prefill_and_every_decode_step():
    """The spec's numbers: T=1000, R=128, G=32 -> 896 packed + 104 fp keys, 872 packed + 128 fp values; then the
    fp key buffer is (T + t) mod R and the fp value buffer R after every step."""
    T, R = 1000, 128
    layer = QuantKVLayer.from_layer(fp_layer(2, T, 64), kivi_codec())
    assert layer.kstore.kinds() == [("uniform", 896), ("fp", 104)]
    assert layer.vstore.kinds() == [("uniform", 872), ("fp", 128)]
    gen = torch.Generator().manual_seed(1)
    for t in range(1, 2 * R + 3):
        k, v = torch.randn(2, 1, 2, 1, 64, generator=gen)
        keys, values = layer.update(k, v, positions=torch.tensor([T + t - 1]))
        assert keys.shape == values.shape == (1, 2, T + t, 64)
        assert layer.kstore.fp_tail_len() == (T + t) % R
        assert layer.vstore.fp_tail_len() == R
        assert layer.kstore.num_slots == layer.vstore.num_slots == layer.get_seq_length() == T + t
        # the newest value is stored exactly, the newest key too unless its block was just quantised
        assert torch.equal(values[0, :, -1], v[0, :, -1])
        assert torch.equal(keys[0, :, -1], k[0, :, -1]) == ((T + t) % R != 0)
    assert [kind for kind, _ in layer.kstore.kinds()] in (["uniform", "fp"], ["uniform"])


def test_kivi_keys_are_grouped_per_channel_and_values_per_token():
    layer = QuantKVLayer.from_layer(fp_layer(2, 96, 64), kivi_codec(residual_length=32))
    assert layer.kstore.kinds() == [("uniform", 96)] and layer.vstore.kinds() == [("uniform", 64), ("fp", 32)]
    kq, vq = layer.kstore.segments[0], layer.vstore.segments[0]
    assert (kq.axis, vq.axis) == ("token", "channel")
    assert kq.scale.shape == (2, 96 // 32, 64) and vq.scale.shape == (2, 64, 64 // 32)


@pytest.mark.parametrize("seed", range(6))
def test_kv_bytes_equal_the_formula_for_random_shapes(seed):
    gen = torch.Generator().manual_seed(seed)
    heads, d = int(torch.randint(1, 5, (1,), generator=gen)), [32, 64, 96, 40][seed % 4]
    group = [8, 16, 32, 8][seed % 4]
    residual = group * int(torch.randint(1, 5, (1,), generator=gen))
    n = int(torch.randint(1, 400, (1,), generator=gen))
    bits = [2, 3, 4, 8][seed % 4]
    dtype = [torch.float32, torch.bfloat16][seed % 2]
    layers = [QuantKVLayer.from_layer(fp_layer(heads, n, d, dtype, seed), kivi_codec(bits, group, residual))]
    layers.append(QuantKVLayer.from_layer(fp_layer(2, n, d, dtype, seed), kivi_codec(bits, group, residual)))
    cache = KVCache(0)
    cache.layers = layers
    el = torch.finfo(dtype).bits // 8

    def formula(h: int) -> int:
        kq, vq = n - n % residual, max(0, n - residual)
        keys = uniform_nbytes(h, kq, d, bits, group, "token") + h * (n - kq) * d * el
        values = uniform_nbytes(h, vq, d, bits, group, "channel") + h * (n - vq) * d * el
        # spec formula (d is a multiple of 8 here): codes n_q d b / 8, fp16 scale + min per group
        assert uniform_nbytes(h, kq, d, bits, group, "token") == h * (kq * d * bits // 8 + 2 * 2 * d * (kq // group))
        assert uniform_nbytes(h, vq, d, bits, group, "channel") == h * (vq * d * bits // 8 + 2 * 2 * vq * (d // group))
        return keys + values

    assert cache.kv_bytes() == formula(heads) + formula(2)


def test_bytes_count_padding_of_odd_head_dims():
    store = SegmentStore.of(torch.randn(1, 4, 9))
    store.encode_oldest_fp(4, lambda x: UniformSegment.encode(x, 3, 9, "channel"))
    assert store.nbytes() == 4 * packed_row_bytes(9, 3) + 4 * 2 * 2 == 4 * 6 + 16


def test_copy_is_independent_and_keep_evicts_quantised_slots():
    layer = QuantKVLayer.from_layer(fp_layer(2, 100, 64), kivi_codec(4, 32, 32))
    copy = layer.copy()
    before = copy.keys.clone()
    layer.update(*torch.randn(2, 1, 2, 1, 64), positions=torch.tensor([100]))
    assert copy.get_seq_length() == 100 and torch.equal(copy.keys, before)
    keep = torch.stack([torch.arange(0, 100, 2), torch.arange(1, 100, 2)])
    copy.keep(keep)
    assert copy.get_seq_length() == 50 and copy.per_head
    assert copy.kstore.kinds() == [("uniform", 32), ("fp", 18)] and copy.vstore.kinds() == [("uniform", 18), ("fp", 32)]
    assert torch.equal(copy.positions, keep)
    # re-encoding the kept (already dequantised) slots changes them by at most a step of the new grid
    assert float((copy.keys - before.gather(2, keep[None, :, :, None].expand(-1, -1, -1, 64))).abs().max()) < 0.5


def test_bad_quantiser_parameters_fail_in_one_line():
    with pytest.raises(ValueError, match=r"^unsupported k_bits 5\. Valid k_bits: 2, 3, 4, 8, 16\.$"):
        build_method({"name": "kivi", "k_bits": 5})
    with pytest.raises(ValueError, match=r"residual_length 100 is not a positive multiple of group_size 32"):
        build_method({"name": "kivi", "residual_length": 100})
    with pytest.raises(ValueError, match=r"^unsupported v_bits 1\. Valid v_bits"):
        build_method({"name": "rtn", "v_bits": 1})
    method = build_method({"name": "kivi", "group_size": 48, "residual_length": 96})

    class Config:
        head_dim, hidden_size, num_attention_heads = 64, 576, 9

    with pytest.raises(ValueError, match=r"^group_size 48 does not divide the head dim 64\. Valid group sizes: 1, 2,"):
        method.check_model(Config)
    with pytest.raises(ValueError, match="must be an eviction method"):
        build_method({"name": "kivi", "base": "full"})


def run_rows(lm, *jobs):
    return {
        job.key: row
        for job, row in run_sample(
            lm, needle_sample(), list(jobs), RunOptions(compress="prompt", seed=0, fail_fast=True)
        )
    }


def test_16_bit_storage_is_identical_to_full(tiny_lm):
    full = Job(build_method({"name": "full"}), None, "full")
    kivi = Job(build_method({"name": "kivi", "k_bits": 16, "v_bits": 16}), None, "kivi16")
    rtn = Job(build_method({"name": "rtn", "k_bits": 16, "v_bits": 16}), None, "rtn16")
    rows = run_rows(tiny_lm, full, kivi, rtn)
    for key in ("kivi16", "rtn16"):
        assert rows[key]["output_ids"] == rows["full"]["output_ids"]
        assert rows[key]["kv_bytes_compressed"] == rows["full"]["kv_bytes_compressed"]
        assert rows[key]["bits_per_element"] == rows["full"]["bits_per_element"] == 32  # the tiny model is fp32
        assert rows[key]["budget_entries"] is None


def test_kivi_stores_packed_bytes_and_records_its_bits(tiny_lm):
    full = Job(build_method({"name": "full"}), None, "full")
    params = {"name": "kivi", "group_size": 16, "residual_length": 32}  # the tiny model's head dim is 16
    k2 = Job(build_method(params), None, "k2")
    k4 = Job(build_method({**params, "k_bits": 4, "v_bits": 4}), None, "k4")
    rows = run_rows(tiny_lm, full, k2, k4)
    cfg = tiny_lm.config
    n, layers, heads = rows["full"]["compressed_tokens"], cfg.num_hidden_layers, cfg.num_key_value_heads
    d = cfg.hidden_size // cfg.num_attention_heads
    for key, bits in (("k2", 2), ("k4", 4)):
        row = rows[key]
        assert row["method_record"]["quant"]["k_bits"] == bits
        kq, vq = n - n % 32, n - 32
        per_layer = uniform_nbytes(heads, kq, d, bits, 16, "token") + uniform_nbytes(heads, vq, d, bits, 16, "channel")
        per_layer += heads * ((n - kq) + (n - vq)) * d * 4
        assert row["kv_bytes_compressed"] == layers * per_layer
        assert row["bits_per_element"] == pytest.approx(8 * row["kv_bytes_compressed"] / (2 * layers * heads * n * d))
        assert row["kept_entries_compressed"] == rows["full"]["kept_entries_compressed"]
    assert rows["k2"]["kv_bytes_compressed"] < rows["k4"]["kv_bytes_compressed"] < rows["full"]["kv_bytes_compressed"]


def test_eviction_base_then_quantised_storage(tiny_lm):
    budget = 48
    snap = Job(build_method({"name": "snapkv"}), budget, "snap")
    snap16 = Job(build_method({"name": "kivi", "base": "snapkv", "k_bits": 16, "v_bits": 16}), budget, "snap16")
    tiny = {"group_size": 16, "residual_length": 16}
    snap4 = Job(build_method({"name": "kivi", "base": "snapkv", "k_bits": 4, "v_bits": 4, **tiny}), budget, "snap4")
    rows = run_rows(tiny_lm, snap, snap16, snap4)
    assert rows["snap16"]["output_ids"] == rows["snap"]["output_ids"]
    assert rows["snap16"]["kv_bytes_compressed"] == rows["snap"]["kv_bytes_compressed"]
    layers, heads = tiny_lm.config.num_hidden_layers, tiny_lm.config.num_key_value_heads
    assert (
        rows["snap4"]["kept_entries_compressed"] == budget * layers * heads == rows["snap"]["kept_entries_compressed"]
    )
    assert rows["snap4"]["kv_bytes_compressed"] < rows["snap"]["kv_bytes_compressed"]


@pytest.mark.parametrize("base", ["streamingllm", "h2o"])
def test_decode_time_eviction_from_quantised_layers(tiny_lm, base):
    budget = 40
    job = Job(build_method({"name": "rtn", "base": base, "group_size": 16}), budget, base)
    row = run_rows(tiny_lm, job)[base]
    assert row["status"] == "ok" and row["max_layer_len_decode"] <= budget + 1


def test_kivi_over_snapkv_composes_and_sweeps_budgets(tmp_path):
    from kvbench.app import run
    from kvbench.harness.results import ResultsStore
    from tests.test_app import composed

    overrides = ["method=kivi", "method.base=snapkv", "method.group_size=16", "method.residual_length=16"]
    result = run(composed(tmp_path, *overrides, "budget=[32,48]", "method.k_bits=4"))
    rows = ResultsStore(result["run_dir"]).rows()
    assert sorted((row["method"], row["budget"]) for row in rows) == [("full", None), ("kivi", 32), ("kivi", 48)]
    kivi = [row for row in rows if row["method"] == "kivi"]
    assert all(row["method_params"]["k_bits"] == 4 and row["method_params"]["base"] == "snapkv" for row in kivi)
    full = next(row for row in rows if row["method"] == "full")
    assert full["bits_per_element"] == 32
    assert all(row["bits_per_element"] < full["bits_per_element"] * 48 / row["compressed_tokens"] for row in kivi)


def test_cli_bit_sweep_records_the_bits(tmp_path):
    from tests.test_app import SMALL_NIAH, TINY, cli

    args = [*TINY, *SMALL_NIAH, "method=kivi", "method.group_size=16", "method.residual_length=16"]
    args.append("include_full=false")
    done = cli(tmp_path, "-m", *args, "method.k_bits=2,4")
    assert done.returncode == 0, done.stderr[-2000:]
    from kvbench.harness.results import read_jsonl

    rows = [row for path in tmp_path.rglob("samples.jsonl") for row in read_jsonl(path)]
    assert sorted(row["method_params"]["k_bits"] for row in rows) == [2, 4]
    assert all(row["budget"] is None for row in rows)


def test_group_size_not_dividing_the_head_dim_fails_before_any_forward(tmp_path, monkeypatch):
    import kvbench.harness.runner
    from kvbench.app import run
    from tests.test_app import composed

    monkeypatch.setattr(kvbench.harness.runner, "prefill", lambda *a, **k: pytest.fail("prefill ran"))
    message = "group_size 12 does not divide the head dim 16. Valid group sizes: 1, 2, 4, 8, 16."
    with pytest.raises(ValueError, match=f"^{message}$"):
        run(composed(tmp_path, "method=kivi", "method.group_size=12", "method.residual_length=24"))


def test_transformers_quantized_cross_check_row(tiny_lm):
    """transformers' QuantizedCache layers (quanto) in kvbench's decode loop: same prompt, its own bytes."""
    from kvbench.methods.transformers_quantized import backend_available

    if not backend_available("quanto"):
        pytest.skip("transformers_quantized needs the optional extra kvbench[quantized] (optimum-quanto)")
    full = Job(build_method({"name": "full"}), None, "full")
    params = {"name": "transformers_quantized", "nbits": 4, "q_group_size": 16, "residual_length": 4}
    hf = Job(build_method(params), None, "hf")
    rows = run_rows(tiny_lm, full, hf)
    assert rows["hf"]["status"] == "ok" and rows["hf"]["budget_entries"] is None
    assert rows["hf"]["kept_entries"] == rows["full"]["kept_entries"]
    # quanto's qint4: two codes per byte plus an fp32 scale and shift per 16 values = 8 bits per fp32 element
    # (measured right after the prefill is handed over, so the fp residual is still empty)
    assert rows["hf"]["kv_bytes"] == rows["full"]["kv_bytes"] // 4


def test_transformers_quantized_without_its_backend_fails_in_one_line(monkeypatch):
    import kvbench.methods.transformers_quantized as hf

    monkeypatch.setattr(hf, "backend_available", lambda backend: False)
    with pytest.raises(ValueError, match=r"^transformers_quantized backend 'hqq' needs the hqq package"):
        build_method({"name": "transformers_quantized", "backend": "hqq"})
