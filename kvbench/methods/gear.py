from __future__ import annotations

from dataclasses import dataclass

from kvbench.engine.quant.codecs import channel_group_size
from kvbench.engine.quant.gear import GearCodec, GearTensorCodec
from kvbench.methods.base import register_method
from kvbench.methods.quantized import QuantizedMethod, changed_alone, check_whole_groups


@register_method("gear")
@dataclass
class GEAR(QuantizedMethod):
    """GEAR (Kang et al., 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative
    Inference of LLM", arXiv 2403.05527), the GEAR-KIVI variant, stored packed (`kvbench.engine.quant.gear`).

    Each block of slots is stored as quantised backbone (keys per channel in groups of `group_size` slots, values
    per slot in groups of `group_size` channels) + sparse outliers kept exactly (`outlier_ratio` s: floor(s*Hkv*d/2)
    largest and as many smallest entries per row, official rule) + a rank-r approximation of the quantisation
    residual per KV head by seeded power iteration (`loops`). Streaming buffer: the newest slots stay fp; the
    prefill's first T - T mod `streaming_gap` slots form one block with `prefill_rank`, then every
    `streaming_gap` generated slots form a block with `decode_rank`. kv_bytes counts codes, scales, minima,
    outlier values and int16 indices, factors and the fp buffer.

    Hyperparameters (official run scripts, Llama-3-8B): k_bits=v_bits=2, group_size=64, outlier_ratio=0.02,
    prefill_rank=4, decode_rank=2, loops=3, streaming_gap=64 (a multiple of group_size), seed=0 (the official
    power iteration is unseeded: [QUIRK] fixed). Official reported accuracies come from a simulated (fake-quant)
    path; kvbench stores the packed data. `base` / `base_params`: an eviction method whose kept slots are stored
    this way (`kvbench.methods.quantized`); decode-time eviction re-encodes the kept slots.
    """

    k_bits: int = 2
    v_bits: int = 2
    group_size: int = 64
    outlier_ratio: float = 0.02
    prefill_rank: int = 4
    decode_rank: int = 2
    loops: int = 3
    streaming_gap: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        # The codec knows the gap as its residual length: name it as the user set it.
        grouped = changed_alone(self, "group_size", "streaming_gap")
        check_whole_groups("streaming_gap", self.streaming_gap, self.group_size, grouped)
        super().__post_init__()

    def codec(self, head_dim: int | None = None) -> GearCodec:
        shared = {
            "flush": "block",
            "residual_length": self.streaming_gap,
            "outlier_ratio": float(self.outlier_ratio),
            "prefill_rank": self.prefill_rank,
            "decode_rank": self.decode_rank,
            "loops": self.loops,
            "seed": self.seed,
        }
        return GearCodec(
            keys=GearTensorCodec(
                bits=self.k_bits, group_size=self.group_size, axis="token", layout="channel", role=0, **shared
            ),
            values=GearTensorCodec(
                bits=self.v_bits,
                group_size=channel_group_size(self.group_size, head_dim),
                axis="channel",
                layout="token",
                role=1,
                **shared,
            ),
        )
