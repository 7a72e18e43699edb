from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from kvbench.engine.cache import KVCache
from kvbench.engine.layers.paged import PagedLayer
from kvbench.methods.base import CompressionContext, Method, register_method


class ReadTally:
    """Bytes each decode step reads and holds, summed over the paged layers, averaged over the steps, written into
    the row's `method_record` as they come."""

    def __init__(self, record: dict[str, Any], num_layers: int) -> None:
        self.record, self.num_layers = record, num_layers
        self.calls = 0
        self.read = 0
        self.held = 0

    def __call__(self, read: int, held: int) -> None:
        self.calls += 1
        self.read += read
        self.held += held
        steps = self.calls / self.num_layers
        self.record["quest_decode_steps"] = self.calls // self.num_layers
        self.record["quest_bytes_read_per_step"] = self.read / steps
        self.record["quest_bytes_held_per_step"] = self.held / steps


@register_method("quest")
@dataclass
class Quest(Method):
    """Quest (Tang et al., ICML 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", arXiv
    2406.10774; mit-han-lab/Quest, KVCache-Factory): query-aware page selection per decode step, NOTHING freed.

    The cache is cut into pages of `page_size` consecutive slots; each page keeps the elementwise min m and max M of
    its keys (kept current as tokens are appended). At each decode step, page p's score for query q is the upper
    bound sum_i max(q_i m_i, q_i M_i) of q . k over its keys; each KV head attends over only its top-k pages, k =
    ceil(budget / page_size) (the budget is the tokens READ per step, rounded up to whole pages, so a budget >= the
    cache reads everything and equals the full cache). The first `dense_layers` layers read every page (the paper
    leaves its first two layers dense). Prefill and multi-token forwards (the question tail) attend densely.

    Memory: every slot stays, plus the page bounds (2 x pages x head_dim per KV head per layer), so `kv_bytes` is
    ABOVE the full cache's; rows say `memory_freed: false` and report the bytes read per decode step (the selected
    pages' K/V + every page's bounds, summed over layers) next to the bytes held (`method_record`:
    quest_bytes_read_per_step, quest_bytes_held_per_step, quest_decode_steps).

    kvbench's choices: GQA (Quest is for MHA): a KV head's page score is the max over its query heads' bounds, and
    the group reads the same pages (the cache is never expanded). The last, partial page is a candidate like any
    other (its bounds over its filled slots). Quest's own kernels pick pages from a token budget by floor; kvbench
    rounds up so a budget never reads fewer tokens than it names.

    Hyperparameters: page_size=16 (Quest's default), dense_layers=2.
    """

    keeps_slot_subset: ClassVar[bool] = False  # nothing is evicted; the layers hold page bounds besides K/V
    plain_kv_layers: ClassVar[bool] = False

    page_size: int = 16
    dense_layers: int = 2

    def validate(self) -> None:
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or self.page_size < 1:
            raise ValueError(f"quest page_size must be an int >= 1, got {self.page_size!r}")
        if isinstance(self.dense_layers, bool) or not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise ValueError(f"quest dense_layers must be an int >= 0, got {self.dense_layers!r}")

    def pages_read(self, budget: int) -> int:
        """Pages a selective layer reads per decode step (per KV head)."""
        return max(1, math.ceil(budget / self.page_size))

    def setup(self, cache: KVCache, ctx: CompressionContext) -> None:
        ctx.record["memory_freed"] = False

    def after_compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        """Every layer becomes a `PagedLayer` (the prompt's slots unchanged)."""
        tally = ReadTally(ctx.record, len(cache.layers))
        for index, layer in enumerate(cache.layers):
            pages = None if index < self.dense_layers else self.pages_read(ctx.budget)
            cache.layers[index] = PagedLayer.from_layer(layer, self.page_size, pages, tally)
        ctx.record["quest_pages_read"] = self.pages_read(ctx.budget)
