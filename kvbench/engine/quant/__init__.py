"""Quantised KV storage: packed low-bit codes that the cache really holds.

* `quantizer`: asymmetric uniform quantise/dequantise in groups along the token or channel axis;
* `packing`: b-bit codes (b in {2, 3, 4, 8}) packed into bytes, padding counted;
* `segments`: segment kinds (fp, uniform; the extension point for GEAR/RotateKV/OCTOPUS) and `SegmentStore`;
* `codecs`: when slots move from the fp tail into codes (KIVI's residual rules, RTN);
* `layer`: `QuantKVLayer`, a `KVLayer` whose keys and values are segment stores;
* `gear`, `octopus`, `rotation`, `lowrank`, `transforms`: the segment kinds of GEAR, OCTOPUS and RotateKV;
* `transformers_layer`: transformers' own quantised cache layer as a cross-check.

The policies that decide what is stored this way are methods (`kvbench.methods.quantized.QuantizedMethod`).
"""

from kvbench.engine.quant.codecs import TensorCodec, UniformCodec
from kvbench.engine.quant.layer import QuantKVLayer, quantize_cache
from kvbench.engine.quant.packing import pack, packed_row_bytes, unpack
from kvbench.engine.quant.quantizer import dequantize, quantize
from kvbench.engine.quant.segments import FPSegment, Segment, SegmentStore, UniformSegment, uniform_nbytes

__all__ = [
    "FPSegment",
    "QuantKVLayer",
    "Segment",
    "SegmentStore",
    "TensorCodec",
    "UniformCodec",
    "UniformSegment",
    "dequantize",
    "pack",
    "packed_row_bytes",
    "quantize",
    "quantize_cache",
    "uniform_nbytes",
    "unpack",
]
