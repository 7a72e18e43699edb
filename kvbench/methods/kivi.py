from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.engine.quant.codecs import TensorCodec, UniformCodec, channel_group_size
from kvbench.methods.base import register_method
from kvbench.methods.quantized import QuantizedMethod, changed_alone, check_whole_groups


@register_method("kivi")
@dataclass
class KIVI(QuantizedMethod):
    """KIVI (Liu et al., ICML 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache").

    Asymmetric round-to-nearest codes packed into bytes (`kvbench.engine.quant`): keys per channel (one fp16 scale and
    minimum per channel per G consecutive slots, post-RoPE keys), values per token (per G consecutive channels).
    Full-precision residuals as in the official code (jy-yuan/KIVI, `models/llama_kivi.py`): after a prefill of T
    tokens the last T mod R keys and the last min(T, R) values stay fp; while decoding, the fp key buffer is
    quantised R slots at a time when it reaches R (so it holds 0..R-1), and the fp value buffer keeps the newest
    R (the oldest is quantised when it overflows). The prefill's own attention uses the unquantised K/V.

    Hyperparameters: k_bits=2, v_bits=2 (KIVI-2; the official README recommends 4 for GQA models),
    group_size=32, residual_length=128 (paper LongBench runs; `example.py` uses 32). Bits in {2, 3, 4, 8, 16}
    (16: that tensor unquantised); residual_length must be a positive multiple of group_size; value groups (along
    channels) hold min(group_size, head dim) channels, which must divide the head dim (rows record it as
    `quant.v_group_size`). `base` / `base_params`: an eviction method whose kept slots are stored this way
    (`kvbench.methods.quantized`). A constant group stores scale 0 (the official code divides by zero: [QUIRK] fixed).
    """

    # Tested alone and over snapkv (per-row batches: quantised layers are not stacked): tests/test_batched.py. A base
    # must be batchable itself (`Composed.batch_refusal`).
    batchable: ClassVar[bool] = True

    k_bits: int = 2
    v_bits: int = 2
    group_size: int = 32
    residual_length: int = 128

    def __post_init__(self) -> None:
        grouped = changed_alone(self, "group_size", "residual_length")
        check_whole_groups("residual_length", self.residual_length, self.group_size, grouped)
        super().__post_init__()

    def codec(self, head_dim: int | None = None) -> UniformCodec:
        values_group = channel_group_size(self.group_size, head_dim)
        return UniformCodec(
            keys=TensorCodec(self.k_bits, self.group_size, "token", "block", self.residual_length),
            values=TensorCodec(self.v_bits, values_group, "channel", "sliding", self.residual_length),
        )
