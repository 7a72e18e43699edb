from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.methods.base import CompressionContext, register_method
from kvbench.methods.scoring import pyramid_layer_budgets
from kvbench.methods.snapkv import SnapKV


@register_method("pyramidkv")
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling"). SnapKV's selection with per-layer budgets that shrink linearly from the first layer to the
    last; layer l keeps most - l*(most-least)/(L-1) + window with least = (budget-window)/beta and
    most = 2(budget-window) - least (capped at T - window). A float step with sum-preserving rounding makes
    the layer average exactly the budget (the official integer division overshoots). Falls back to uniform
    SnapKV when T < 2(budget - window).

    Hyperparameters: as SnapKV (window=32, kernel=7, pool=max, gqa_agg=mean) plus beta=20.

    Chunked prefill (`prefill_chunk`): SnapKV's per-chunk selection with the per-layer budgets recomputed for
    the tokens seen so far (uniform while they are fewer than 2(budget - window)); each layer stays within its
    current budget + chunk and the layer average within budget + chunk. A layer cut early to a small budget
    does not regain slots when later chunks raise its share.
    """

    supports_chunked_prefill: ClassVar[bool] = True
    batchable: ClassVar[bool] = True  # tested: tests/test_batched.py (layers of different lengths stack)

    beta: float = 20.0

    def layer_budgets(self, ctx: CompressionContext, num_layers: int) -> list[int]:
        window = min(self.window, ctx.budget)
        return pyramid_layer_budgets(ctx.budget, window, ctx.prompt_len, num_layers, self.beta)
