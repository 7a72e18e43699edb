"""MiKV over any eviction method: lo_bits=16 is the full cache, drop=true is the base, the balancer is invisible to
attention in exact arithmetic, no token is ever dropped, and the bytes are the packed stores'."""

from __future__ import annotations

import pytest
import torch

from kvbench.engine.generation import forward_tokens, prefill
from kvbench.engine.layers.mixed_precision import MiKVLayer
from kvbench.engine.measure import Stopwatch
from kvbench.engine.quant.packing import packed_row_bytes
from kvbench.engine.quant.segments import SegmentStore
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.harness.sample import Sample
from kvbench.methods import build_method
from kvbench.methods.base import CompressionContext
from kvbench.methods.mikv import balancer

BUDGET = 24
BASES = ("h2o", "snapkv", "tova", "streamingllm", "adakv")  # adakv: per-head counts, padded slots


def story(new_tokens: int) -> Sample:
    context = "The lighthouse keeper counted 7 ships, then 12 boats, then 3 whales before dawn. " * 5
    return Sample("s", context, "How many boats?", "He counted", ["12"], "string_match_all", new_tokens,
                  meta={"ignore_eos": True})  # fmt: skip


def rows_for(lm, configs: dict[str, dict], compress: str, new_tokens: int = 24, budget: int = BUDGET):
    jobs = [Job(build_method({"name": "full"}), None, "full")]
    jobs += [Job(build_method(config), budget, key) for key, config in configs.items()]
    return {
        job.key: row
        for job, row in run_sample(lm, story(new_tokens), jobs, RunOptions(compress=compress, seed=0, fail_fast=True))
    }


@pytest.mark.parametrize("compress", ["prompt", "context"])
def test_lo_bits_16_is_the_full_cache_and_drop_is_the_base(tiny_lm, compress):
    configs = {}
    for base in BASES:
        configs[f"base:{base}"] = {"name": base}
        configs[f"drop:{base}"] = {"name": "mikv", "base": base, "drop": True}
        configs[f"16:{base}"] = {"name": "mikv", "base": base, "lo_bits": 16}
    rows = rows_for(tiny_lm, configs, compress)
    full = rows["full"]
    for base in BASES:
        assert rows[f"base:{base}"]["compressed"]
        assert rows[f"16:{base}"]["output_ids"] == full["output_ids"], base
        assert rows[f"16:{base}"]["kv_bytes"] == full["kv_bytes"], base  # unchanged fp slots, no beta
        assert rows[f"drop:{base}"]["output_ids"] == rows[f"base:{base}"]["output_ids"], base
        assert rows[f"drop:{base}"]["kv_bytes"] == rows[f"base:{base}"]["kv_bytes"], base
        kept = "kept_per_layer_compressed"
        assert rows[f"drop:{base}"][kept] == rows[f"base:{base}"][kept], base


def test_balancer_is_invisible_to_attention_logits():
    """(q / beta) . (beta k) == q . k to fp32 rounding, and reading beta-scaled keys back as k / beta gives the
    logits of dividing the queries instead; beta is shared by each RoPE pair and is 1 where there is no signal."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn((2, 50, 16), generator=generator)
    keys[:, :, 3] *= 40  # an outlier channel
    keys[1, :, 5] = 0
    queries = torch.randn((4, 16), generator=generator)  # 2 query heads per KV head
    beta = balancer(queries.abs(), keys)
    assert torch.equal(beta[:, :8], beta[:, 8:])
    assert float(beta[0, 3]) < 1.0  # the outlier channel (and its RoPE partner) is squeezed
    q = queries.unflatten(0, (2, 2))
    plain = torch.einsum("hgd,htd->hgt", q, keys)
    balanced = torch.einsum("hgd,htd->hgt", q / beta[:, None], keys * beta[:, None])
    assert torch.allclose(balanced, plain, rtol=1e-5, atol=1e-5)
    stored = keys * beta[:, None]
    read_back = torch.einsum("hgd,htd->hgt", q, stored / beta[:, None])
    assert torch.allclose(read_back, balanced, rtol=1e-5, atol=1e-5)


def test_balancer_lowers_the_logit_error_of_2_bit_keys(tiny_lm):
    """On keys with an outlier channel, per-token 2-bit keys give smaller attention-logit errors with the balancer."""
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn((2, 64, 16), generator=generator)
    keys[:, :, 2] *= 30
    keys[:, :, 10] *= 30  # RoPE partner of channel 2
    queries = torch.randn((4, 30, 16), generator=generator)
    errors = {}
    for balance in (False, True):
        beta = balancer(queries.abs().amax(dim=1), keys) if balance else None
        layer = MiKVLayer(2, beta, drop=False)
        layer.dtype, layer.device = keys.dtype, keys.device
        layer.low_keys, layer.low_values = SegmentStore(keys[:, :0]), SegmentStore(keys[:, :0])
        layer.low_positions = torch.empty((2, 0), dtype=torch.long)
        layer.demote(keys, keys, torch.arange(64).expand(2, -1))
        read = layer.low_keys.materialize(torch.float32)
        read = read / beta[:, None] if beta is not None else read
        q = queries.unflatten(0, (2, 2))
        errors[balance] = float((torch.einsum("hgqd,htd->hgqt", q, read - keys)).abs().mean())
    assert errors[True] < errors[False]


def test_every_token_stays_and_decode_evictions_are_demoted(tiny_lm):
    """Over H2O (evicts one slot per decode step): after every forward each (layer, head) holds T + generated
    entries, exactly BUDGET of them high precision; bytes follow the formula."""
    method = build_method({"name": "mikv", "base": "h2o", "lo_bits": 2})
    ids = torch.randint(100, 40000, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    observer = method.prefill_observer()
    pre = prefill(tiny_lm, ids, 0, Stopwatch(tiny_lm.device), [observer])
    cache = pre.cache.copy()
    ctx = CompressionContext.for_prompt(tiny_lm, BUDGET, len(ids), pre, input_ids=ids, prefill_stats=observer)
    method.setup(cache, ctx)
    method.compress(cache, ctx)
    config = tiny_lm.config
    layers, heads, dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    token = ids[-1]
    for step in range(20):
        seen = len(ids) + step
        assert cache.kept_per_layer() == [[seen] * heads] * layers, step
        assert all(layer.high_entries() == heads * BUDGET for layer in cache.layers), step
        low = seen - BUDGET
        low_bytes = 2 * heads * low * (packed_row_bytes(dim, 2) + 2 * 2)  # K and V: codes + fp16 scale, zero
        high_bytes = 2 * heads * BUDGET * dim * 4
        assert cache.kv_bytes() == layers * (high_bytes + low_bytes + heads * dim * 2), step  # + fp16 beta
        method.before_forward(cache, ctx, 1)
        token = int(forward_tokens(tiny_lm, cache, [token]).argmax())
    rows = rows_for(tiny_lm, {"mikv": {"name": "mikv", "base": "h2o"}}, "prompt", new_tokens=8)
    record = rows["mikv"]["method_record"]
    assert record["mikv_high_entries"] == layers * heads * BUDGET
    row = rows["mikv"]
    seen = row["prompt_tokens"] + row["output_tokens"] - 1  # the last token is never fed back
    assert record["mikv_high_entries"] + record["mikv_low_entries"] == seen * layers * heads
    assert 2 < record["mikv_bits_per_element"] < 32


def test_bad_input_is_one_line():
    with pytest.raises(ValueError, match=r"^mikv cannot wrap 'kv_direct' \(it does not evict by choosing slots\)"):
        build_method({"name": "mikv", "base": "kv_direct"})
    with pytest.raises(ValueError, match=r"^unsupported lo_bits 5\. Valid lo_bits: 2, 3, 4, 8, 16\.$"):
        build_method({"name": "mikv", "lo_bits": 5})
