from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import ClassVar

from kvbench.engine.cache import KVCache
from kvbench.engine.quant.transformers_layer import TransformersQuantizedLayer
from kvbench.methods.base import CompressionContext, Method, register_method

BACKENDS = {"quanto": "optimum.quanto", "hqq": "hqq"}
PACKAGES = {"quanto": "optimum-quanto", "hqq": "hqq"}


def backend_available(backend: str) -> bool:
    module = BACKENDS[backend]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package (optimum)
        return False


@register_method("transformers_quantized")
@dataclass
class TransformersQuantized(Method):
    """transformers' own quantised KV cache (`QuantizedCache` layers, quanto or HQQ backend) inside kvbench's
    decode loop: an independent "KIVI-like" reference on the same prompts, not the KIVI implementation
    (`kvbench.engine.quant.transformers_layer` says what transformers does). Optional extra: `pip install
    'kvbench[quantized]'` (optimum-quanto); without the backend the method fails in one line.

    Hyperparameters (transformers' defaults): backend=quanto (quanto | hqq), nbits=4 (quanto: 2 | 4; hqq: 1-4, 8),
    q_group_size=64, residual_length=128, axis_key=0, axis_value=0. Bytes are the backend's tensors (codes,
    scales, shifts/zeros) plus the fp residual.
    """

    compresses: ClassVar[bool] = True  # the stored cache differs from the full one: a full-cache row is added
    takes_budget: ClassVar[bool] = False
    keeps_slot_subset: ClassVar[bool] = False  # transformers' quantised layers hold the K/V
    plain_kv_layers: ClassVar[bool] = False

    backend: str = "quanto"
    nbits: int = 4
    q_group_size: int = 64
    residual_length: int = 128
    axis_key: int = 0
    axis_value: int = 0

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend '{self.backend}'. Valid backends: {', '.join(BACKENDS)}.")
        if not backend_available(self.backend):
            raise ValueError(
                f"transformers_quantized backend '{self.backend}' needs the {PACKAGES[self.backend]} package, "
                f"not installed here (pip install {PACKAGES[self.backend]})"
            )

    def inner_layer(self):
        from transformers.cache_utils import HQQQuantizedLayer, QuantoQuantizedLayer

        layer_class = QuantoQuantizedLayer if self.backend == "quanto" else HQQQuantizedLayer
        return layer_class(
            nbits=self.nbits,
            axis_key=self.axis_key,
            axis_value=self.axis_value,
            q_group_size=self.q_group_size,
            residual_length=self.residual_length,
        )

    def after_compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        cache.layers = [TransformersQuantizedLayer.from_layer(layer, self.inner_layer()) for layer in cache.layers]
