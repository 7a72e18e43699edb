from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.engine.cache import KVLayer
from kvbench.engine.kernels import window_scores
from kvbench.engine.kernels.window_attention import GQA_AGGREGATIONS
from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scorer import LayerScores, ScoringMethod
from kvbench.methods.scoring import POOLINGS, pool_scores


@register_method("snapkv")
@dataclass
class SnapKV(ScoringMethod):
    """SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

    At the end of prefill, the last `window` prompt queries attend to all keys (softmax in fp32, causal
    inside the window); each older key's score is the sum of its attention over the window rows, averaged
    over the GQA group (`gqa_agg`), then pooled along the sequence. Each KV head keeps its top-(budget -
    window) older keys plus the window. Generated tokens are appended uncompressed.

    Hyperparameters: window=32, kernel=7, pool=max (the paper's LongBench settings; kvpress uses 64/5/avg),
    gqa_agg=mean. When budget < window, only the last `budget` slots are kept.

    Chunked prefill (`prefill_chunk`): after every chunk that leaves a layer over budget, the window is the
    last `window` queries seen (the chunk's tail, reaching into the previous chunk when the chunk is shorter),
    scoring the slots kept so far plus the chunk; evicted slots never come back, so the final selection is a
    cascade of per-chunk selections rather than one judgement by the prompt's last queries.
    """

    supports_chunked_prefill: ClassVar[bool] = True
    batchable: ClassVar[bool] = True  # tested: tests/test_batched.py

    window: int = 32
    kernel: int = 7
    pool: str = "max"
    gqa_agg: str = "mean"

    def validate(self) -> None:
        if self.pool not in POOLINGS:
            raise ValueError(f"unknown pool '{self.pool}'. Valid pools: {', '.join(POOLINGS)}.")
        if self.gqa_agg not in GQA_AGGREGATIONS:
            raise ValueError(f"unknown gqa_agg '{self.gqa_agg}'. Valid gqa_aggs: {', '.join(GQA_AGGREGATIONS)}.")
        if self.window < 1 or self.kernel < 1:
            raise ValueError(f"window and kernel must be >= 1, got window={self.window} kernel={self.kernel}")
        if self.pool != "none" and self.kernel > 1 and self.kernel % 2 == 0:
            # Stride-1 pooling with padding kernel // 2 keeps the length only for odd kernels.
            raise ValueError(
                f"kernel must be odd (pooling keeps the token count), got {self.kernel}. "
                f"Valid kernels: 1, 3, 5, 7, ... (or pool=none)"
            )

    def window_queries_needed(self) -> int:
        return self.window

    def decode_grows_only(self) -> bool:
        """Without `decode_budget` nothing is evicted after the prefill (nor for PyramidKV, which inherits this)."""
        return self.decode_budget is None

    def layer_scores(self, layer_idx: int, layer: KVLayer, budget: int, ctx: CompressionContext) -> LayerScores:
        """Pooled, GQA-aggregated window attention of the keys before the window; the window is protected."""
        window = min(self.window, budget)
        queries = ctx.window_queries[layer_idx][:, -window:]
        prefix = layer.get_seq_length() - window
        # Fused kernel on ctx.kernels="triton": the [H, window, T] probabilities are never materialised.
        per_kv_head = window_scores(
            queries,
            layer.keys[0],
            ctx.window_positions[-window:],
            layer.positions,
            ctx.scaling,
            reduce="sum",
            gqa_agg=self.gqa_agg,
            num_scored=prefix,
            impl=ctx.kernels,
        )
        return LayerScores(pool_scores(per_kv_head, self.kernel, self.pool), protected=window)
