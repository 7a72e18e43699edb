from __future__ import annotations

from dataclasses import dataclass

from kvbench.engine.quant.codecs import TensorCodec, UniformCodec, channel_group_size
from kvbench.methods.base import register_method
from kvbench.methods.quantized import QuantizedMethod


@register_method("rtn")
@dataclass
class RTN(QuantizedMethod):
    """Plain per-token round-to-nearest KV quantisation: the baseline every quantiser is compared with (KIVI's
    "per-token keys" ablation, the fake-quant setting of many harnesses, here with packed storage).

    Keys and values alike: asymmetric uniform codes per slot in groups of `group_size` consecutive channels, one
    fp16 scale and minimum per group; the newest `residual_length` slots stay fp (0: every slot is quantised as
    soon as it is cached, including the prompt's last tokens).

    Hyperparameters: k_bits=4, v_bits=4, group_size=32, residual_length=0. Bits in {2, 3, 4, 8, 16} (16: that
    tensor unquantised); groups hold min(group_size, head dim) channels, which must divide the head dim. `base` /
    `base_params`: an eviction method whose kept slots are stored this way (`kvbench.methods.quantized`).
    """

    k_bits: int = 4
    v_bits: int = 4
    group_size: int = 32
    residual_length: int = 0

    def codec(self, head_dim: int | None = None) -> UniformCodec:
        group = channel_group_size(self.group_size, head_dim)
        return UniformCodec(
            keys=TensorCodec(self.k_bits, group, "channel", "sliding", self.residual_length),
            values=TensorCodec(self.v_bits, group, "channel", "sliding", self.residual_length),
        )
