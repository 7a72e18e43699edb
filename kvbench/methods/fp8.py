from __future__ import annotations

from dataclasses import dataclass

from kvbench.engine.cache import KVCache
from kvbench.engine.quant.fp8 import FP8Codec
from kvbench.engine.quant.layer import QuantKVLayer
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.quantized import QuantizedMethod


@register_method("fp8")
@dataclass
class FP8(QuantizedMethod):
    """FP8 KV cache: the production baseline of vLLM and SGLang (`--kv-cache-dtype fp8`, `fp8_e4m3`, `fp8_e5m2`),
    stored as one FP8 code per element (`kvbench.engine.quant.fp8`).

    Keys (post-RoPE, as cached) and values become `torch.float8_e4m3fn` (format="e4m3", vLLM's `fp8` on CUDA) or
    `torch.float8_e5m2` codes of x / s with an fp32 scale s per layer and tensor (granularity="tensor", vLLM's
    k_scale / v_scale) or per KV head ("head", vLLM's per-head scales). calibrate="prefill" sets s = amax|x| /
    range on the prefill's slots (vLLM's `calculate_kv_scales`, which computes it on the first forward) and keeps
    it for every decode token (out-of-range values saturate); calibrate="none" is s = 1.0, vLLM's default without
    checkpoint scales (nothing stored). range: `k_range` / `v_range`, null = the format's max (448 / 57344);
    vLLM's `calculate_kv_scales` divides by K_SCALE_CONSTANT=200 and V_SCALE_CONSTANT=100 (headroom for decode
    tokens): set k_range=200 v_range=100 to match it. No fp residual window: every slot is stored FP8 when cached
    (the prefill's own attention uses the unquantised K/V, as vLLM's prefill reads the fresh K/V).

    Bytes: 1 per element + 4 per scale (Hkv scales per tensor with granularity="head", 1 otherwise). `base` /
    `base_params`: an eviction method whose kept slots are stored this way (`kvbench.methods.quantized`).
    """

    format: str = "e4m3"
    granularity: str = "tensor"
    calibrate: str = "prefill"
    k_range: float | None = None
    v_range: float | None = None

    def codec(self, head_dim: int | None = None) -> FP8Codec:
        return FP8Codec(self.format, self.granularity, self.calibrate, self.k_range, self.v_range)

    def store(self, cache: KVCache, ctx: CompressionContext) -> None:
        template = self.codec()
        # One codec per layer: each layer calibrates its own scales on its prefill slots.
        cache.layers = [QuantKVLayer.from_layer(layer, template.for_layer()) for layer in cache.layers]
        ctx.record["quant"] = template.describe()
