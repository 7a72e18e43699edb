"""Batched greedy decode over several compressed caches of different lengths (`batch_size=B`).

Each sequence is prefilled and compressed on its own (`KVCache`, batch 1); then the B sequences decode together,
one model forward per step for all of them (the weights are read once per step). Two ways to attend:

* stacked (`BatchedKVCache`): `BatchedKVCache.stack` lays the B caches side by side along the batch dimension,
  `[B, Hkv, L, d]` per layer, right-padding the shorter ones with zero K/V at `PAD_POSITION`, which no query can
  see (masks compare stored positions with query positions, as `KVLayer.attention_mask` does). A sequence that
  stops leaves the batch; its decoded slots are appended to its own cache (`BatchedKVCache.write_back`), so that
  cache ends exactly as a batch-1 decode leaves it. Only plain full-attention `KVLayer`s (no logit bias, no
  attention observers) whose slots only grow while decoding can be stacked (`stack_refusal`).
* per row (`PerRowBatch`): every other cache (decode-time eviction by attention observers or before each forward,
  quantised or custom storage). Each row's own batch-1 cache is updated in place and attended by the batch-1
  attention code (`kvbench.engine.attention.cached_attention`) with that row's query: its kernels, observers and
  evictions are those of a batch-1 decode, and no slot is padding.

Every sequence keeps its own original positions (`position_ids` per row) and its own stop. The harness refuses
methods and architectures not tested here before any model work (`kvbench.harness.batched`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvbench.engine.architecture import FULL, cache_argument
from kvbench.engine.attention import CACHE_KWARG
from kvbench.engine.cache import FULL_SPEC, PAD_POSITION, KVCache, KVLayer
from kvbench.engine.measure import Stopwatch
from kvbench.engine.models import LoadedModel

# `BatchLayout.attention` and the rows' `batch_attention`: how a batch attended.
STACKED = "stacked"
PER_ROW = "per_row"


def stack_refusal(cache: KVCache) -> str | None:
    """Why `cache` cannot be stacked (None: it can): only plain full-attention `KVLayer`s without a logit bias, and
    no attention observer (decode-time work on the sequence's own slots, which a stacked batch does not hold)."""
    if cache.model_cache.observers:
        return "attention observers work on its slots while decoding"
    for index, layer in enumerate(cache.layers):
        if type(layer) is not KVLayer:
            return f"layer {index} is held as {type(layer).__name__}, not a plain KVLayer"
        if layer.spec.kind != FULL or layer.spec.latent or layer.spec.bounded:
            return f"layer {index} is a {layer.spec.kind} layer (batched decode stacks full-attention layers only)"
        if "logit_bias" in layer.extras:
            return f"layer {index} carries a per-slot logit bias"
    return None


class BatchedLayer(CacheLayerMixin):
    """One layer of B sequences: keys/values `[B, Hkv, capacity, d]`, positions `[B, Hkv, capacity]`; the first
    `length` slots are held (padding included). Appends write one slot per row in place (capacity is reserved once
    by `BatchedKVCache.stack`)."""

    is_croppable = False
    is_sliding = False
    spec = FULL_SPEC

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, length: int) -> None:
        super().__init__()
        self._keys, self._values, self._positions, self._length = keys, values, positions, length
        self.start = length  # the stacked length: decoded slots follow it
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:, :, : self._length]

    @keys.setter
    def keys(self, tensor: None) -> None:  # `CacheLayerMixin.__init__` clears it; nothing else may assign
        if tensor is not None:
            raise TypeError("a BatchedLayer's slots are written by update() only")

    @property
    def values(self) -> torch.Tensor:
        return self._values[:, :, : self._length]

    @values.setter
    def values(self, tensor: None) -> None:
        if tensor is not None:
            raise TypeError("a BatchedLayer's slots are written by update() only")

    @property
    def positions(self) -> torch.Tensor:
        return self._positions[:, :, : self._length]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a BatchedLayer is built from stacked caches, never lazily")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, positions: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self._length, self._length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            raise RuntimeError(f"batched layer full: {end} slots needed, {self._keys.shape[-2]} reserved")
        self._keys[:, :, start:end] = key_states
        self._values[:, :, start:end] = value_states
        self._positions[:, :, start:end] = positions.to(self.device)[:, None, :]
        self._length = end
        return self.keys, self.values

    def attention_mask(self, query_positions: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Boolean `[B, Hkv, q, L]` (True = attend) for queries at `query_positions` `[B, q]`: a slot is visible
        iff its position is at most the query's, so padding (`PAD_POSITION`) never is."""
        key_pos = self.positions[:, :, None, :]
        query_pos = query_positions.to(self.device)[:, None, :, None]
        return (key_pos <= query_pos) & (key_pos != PAD_POSITION), False

    def drop_unreachable(self, next_position: int) -> None:
        """Full-attention layers keep every slot."""

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (sequences that have not stopped)."""
        self._keys = self._keys.index_select(0, rows)
        self._values = self._values.index_select(0, rows)
        self._positions = self._positions.index_select(0, rows)

    def get_seq_length(self) -> int:
        return self._length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._length + query_length, 0

    def get_max_length(self) -> int:
        return -1


class BatchedKVCache(Cache):
    """B compressed caches decoded together: per-layer `BatchedLayer`s plus each row's next original position.

    `rows[i]` is the index (in the list handed to `stack`) of the sequence in batch row i."""

    def __init__(self, layers: list[BatchedLayer], seen: torch.Tensor, padding_fraction: float) -> None:
        super().__init__(layers=layers)
        self.next_position = seen.tolist()  # per row: the original position its next token takes
        self.device = seen.device
        self.step_positions: torch.Tensor | None = None
        self.observers: list = []
        self.decode_kernels = "torch"  # the split-K kernels take one sequence
        self.padding_fraction = padding_fraction
        self.rows = list(range(len(seen)))

    @classmethod
    def stack(cls, caches: list[KVCache], reserve: int) -> BatchedKVCache:
        """Stack `caches` (each passing `stack_refusal`) along the batch dimension, shorter layers right-padded with
        `PAD_POSITION` slots; room for `reserve` decode steps is allocated once. `padding_fraction`: the share of
        the stacked slots (all layers, heads and rows) that are padding added to stack them."""
        for cache in caches:
            reason = stack_refusal(cache)
            if reason is not None:
                raise ValueError(f"cannot batch this cache: {reason}")
        layers: list[BatchedLayer] = []
        stacked_slots = padding_slots = 0
        for index in range(len(caches[0].layers)):
            parts = [cache.layers[index] for cache in caches]
            length = max(part.get_seq_length() for part in parts)  # layers may differ (PyramidKV): each its own
            first = parts[0]
            heads, key_dim, value_dim = first.num_heads, first.keys.shape[-1], first.values.shape[-1]
            capacity = length + reserve
            keys = first.keys.new_zeros((len(parts), heads, capacity, key_dim))
            values = first.values.new_zeros((len(parts), heads, capacity, value_dim))
            positions = torch.full((len(parts), heads, capacity), PAD_POSITION, dtype=torch.long, device=first.device)
            for row, part in enumerate(parts):
                held = part.get_seq_length()
                keys[row, :, :held] = part.keys[0]
                values[row, :, :held] = part.values[0]
                positions[row, :, :held] = part.positions
                padding_slots += heads * (length - held)
            stacked_slots += len(parts) * heads * length
            layers.append(BatchedLayer(keys, values, positions, length))
        seen = torch.tensor([cache.seen_tokens for cache in caches], dtype=torch.long, device=layers[0].device)
        return cls(layers, seen, padding_slots / stacked_slots if stacked_slots else 0.0)

    @property
    def seen_tokens(self) -> int:
        """The longest row's original length so far (what attention hands `drop_unreachable`)."""
        return max(self.next_position)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens before the current forward of the longest sequence (transformers derives nothing from it: every
        forward passes `position_ids`)."""
        return self.seen_tokens - (1 if self.step_positions is not None else 0)

    def next_positions(self) -> torch.Tensor:
        """`[B, 1]`: each row's next original position (passed as `position_ids`)."""
        self.step_positions = torch.tensor(self.next_position, dtype=torch.long, device=self.device)[:, None]
        self.next_position = [position + 1 for position in self.next_position]
        return self.step_positions

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer_idx].update(key_states, value_states, positions=self.step_positions)

    def write_back(self, row: int, cache: KVCache) -> None:
        """Append batch row `row`'s decoded slots to `cache` (its own, batch-1 cache), as batch-1 decoding would."""
        num_new = self.layers[0].get_seq_length() - self.layers[0].start
        if num_new <= 0:
            return
        for layer, own in zip(self.layers, cache.layers, strict=True):
            # One slot per update, as the decode steps would append them: the layer grows (and reports its reserved
            # capacity, `kv_bytes_reserved`) exactly as under batch-1 decoding.
            for slot in range(layer.start, layer.start + num_new):
                own.update(
                    layer._keys[row : row + 1, :, slot : slot + 1],
                    layer._values[row : row + 1, :, slot : slot + 1],
                    positions=layer._positions[row, 0, slot : slot + 1],
                )
        cache.seen_tokens += num_new

    def drop_rows(self, keep: list[int]) -> None:
        """Keep only batch rows `keep` (in order)."""
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        for layer in self.layers:
            layer.select_rows(index)
        self.next_position = [self.next_position[i] for i in keep]
        self.rows = [self.rows[i] for i in keep]


class RowLayer(CacheLayerMixin):
    """One layer of a `PerRowBatch` as transformers sees it (lengths, mask sizes): the slots are the rows' own."""

    is_croppable = False
    is_sliding = False
    spec = FULL_SPEC

    def __init__(self, batch: PerRowBatch, layer_idx: int) -> None:
        super().__init__()
        self.batch, self.layer_idx = batch, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a RowLayer holds no slots: the rows' own caches do")

    def update(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("a per-row batch is updated through PerRowBatch.update (each row's own cache)")

    def get_seq_length(self) -> int:
        return max(cache.layers[self.layer_idx].get_seq_length() for cache in self.batch.caches)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class PerRowBatch(Cache):
    """B batch-1 caches decoded by one model forward per step, each row attending over its own cache.

    `update` hands each row's new K/V to that row's own cache (`KVCache.update`, at the positions its
    `next_positions` gave) and keeps what each returned; kvbench's attention function then attends per row
    (`row_attention_inputs`, `kvbench.engine.attention.cached_attention`) and concatenates the rows' outputs.
    So every row runs the batch-1 attention code on its own cache (observers, evictions, kernels, storage) and its
    cache ends as a batch-1 decode leaves it: no padding, nothing to write back.

    `rows[i]` is the index (in the list handed in) of the sequence in batch row i."""

    def __init__(self, caches: list[KVCache], device: torch.device | str) -> None:
        self.caches = [cache.model_cache for cache in caches]  # the model forwards through every layer
        super().__init__(layers=[RowLayer(self, index) for index in range(len(self.caches[0].layers))])
        self.device = device
        self.rows = list(range(len(caches)))
        self.padding_fraction = 0.0
        self.row_kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def seen_tokens(self) -> int:
        """The longest row's original length so far."""
        return max(cache.seen_tokens for cache in self.caches)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens before the current forward of the longest sequence (every forward passes `position_ids`)."""
        return max(cache.get_seq_length() for cache in self.caches)

    def next_positions(self) -> torch.Tensor:
        """`[B, 1]`: each row's next original position, from its own cache (which then expects one token)."""
        return torch.stack([cache.next_positions(1, self.device) for cache in self.caches])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append row i's `key_states[i]` / `value_states[i]` to its own cache; the per-row K/V wait for the
        attention function (`row_attention_inputs`). Returns the new states themselves (the attention function
        reads the rows' K/V instead)."""
        self.row_kv[layer_idx] = [
            cache.update(key_states[row : row + 1], value_states[row : row + 1], layer_idx)
            for row, cache in enumerate(self.caches)
        ]
        return key_states, value_states

    def row_attention_inputs(self, layer_idx: int) -> list[tuple[KVCache, torch.Tensor, torch.Tensor]]:
        """(row cache, K, V) per row for layer `layer_idx`'s attention, as each row's `update` returned them (handed
        over once: the per-row K/V are not kept past the layer's attention)."""
        return [
            (cache, key, value) for cache, (key, value) in zip(self.caches, self.row_kv.pop(layer_idx), strict=True)
        ]

    def drop_rows(self, keep: list[int]) -> None:
        """Keep only batch rows `keep` (in order); the others' caches are complete already."""
        self.caches = [self.caches[i] for i in keep]
        self.rows = [self.rows[i] for i in keep]


@dataclass
class BatchedDecoded:
    """One sequence's share of a batched decode."""

    tokens: list[int]
    seconds: float  # wall time of the batched forwards this sequence took part in
    steps: int  # its forwards after the first token
    max_layer_len: int  # its own largest per-layer length (padding added by batching excluded)
    peak_mem_bytes: int | None  # the batched decode's peak (shared by the batch)


@dataclass
class BatchLayout:
    """How a batch attended: `attention` is `STACKED` or `PER_ROW`; `padding_fraction` the share of the stacked
    slots that are padding (0 per row, and for a batch whose every sequence stopped at its first token)."""

    attention: str
    padding_fraction: float
    step_seconds: list[float] = field(default_factory=list)  # wall time of each batched forward, in order


@dataclass
class Sequence:
    """One sequence handed to `batched_greedy_decode`."""

    cache: KVCache  # compressed, after the question tail; receives the decoded slots
    first_logits: torch.Tensor
    max_new_tokens: int
    stop_at_eos: bool = True
    stop: Callable[[list[int]], bool] | None = None
    # Called before each of its forwards on the per-row path, as `greedy_decode` calls it (the runner's
    # `RowMeter.before_forward`: the method's decode-time eviction and the peak bytes). A stacked sequence's cache
    # only grows while decoding (`grows_only`), so there it has nothing to do and its peak is its final size.
    before_forward: Callable[[int], None] | None = None
    # Whether its cache changes while decoding only by appending its tokens (no eviction before a forward): False
    # sends the batch down the per-row path. Attention observers are seen on the cache itself (`stack_refusal`).
    grows_only: bool = True


@torch.inference_mode()
def forward_batch(lm: LoadedModel, cache: BatchedKVCache | PerRowBatch, tokens: list[int]) -> torch.Tensor:
    """One token per row at each row's own next position; returns the last logits `[B, vocab]`."""
    positions = cache.next_positions()
    output = lm.model(
        input_ids=torch.tensor(tokens, device=lm.device)[:, None],
        position_ids=positions,
        **{cache_argument(type(lm.model)): cache},
        use_cache=True,
        logits_to_keep=1,
        **{CACHE_KWARG: cache},
    )
    return output.logits[:, -1]


def batch_attention(sequences: list[Sequence]) -> str:
    """`STACKED` when every sequence's cache can be stacked and only grows while decoding, else `PER_ROW`."""
    stackable = all(seq.grows_only and stack_refusal(seq.cache) is None for seq in sequences)
    return STACKED if stackable else PER_ROW


@torch.inference_mode()  # the caches' buffers are inference tensors (written by the prefill's forwards)
def batched_greedy_decode(
    lm: LoadedModel, sequences: list[Sequence], stopwatch: Stopwatch
) -> tuple[list[BatchedDecoded], BatchLayout]:
    """Greedy decode of `sequences` together, one forward per step for every sequence still running; each stops
    as `greedy_decode` would stop it (EOS, its stop test, its `max_new_tokens`). Returns per-sequence results (in
    order) and how the batch attended (`batch_attention`) with its padding share (`BatchedKVCache.stack`)."""
    tokens: list[list[int]] = [[] for _ in sequences]
    seconds = [0.0] * len(sequences)
    steps = [0] * len(sequences)
    max_lengths = [max(layer.get_seq_length() for layer in seq.cache.layers) for seq in sequences]
    attention = batch_attention(sequences)

    def stopped(i: int, token: int) -> bool:
        seq = sequences[i]
        tokens[i].append(token)
        eos = seq.stop_at_eos and token in lm.eos_token_ids
        return eos or len(tokens[i]) >= seq.max_new_tokens or (seq.stop is not None and seq.stop(tokens[i]))

    running = [i for i, seq in enumerate(sequences) if not stopped(i, int(torch.argmax(seq.first_logits)))]
    padding = 0.0
    step_seconds: list[float] = []
    with stopwatch.phase("decode") as phase:
        if running:
            batch: BatchedKVCache | PerRowBatch
            if attention == STACKED:
                longest = max(sequences[i].max_new_tokens for i in running)
                batch = BatchedKVCache.stack([sequences[i].cache for i in running], reserve=longest)
            else:
                batch = PerRowBatch([sequences[i].cache for i in running], lm.device)
            padding = batch.padding_fraction
            while batch.rows:
                began = time.perf_counter()
                if attention == PER_ROW:
                    for r in batch.rows:
                        hook = sequences[running[r]].before_forward
                        if hook is not None:
                            hook(1)
                logits = forward_batch(lm, batch, [tokens[running[r]][-1] for r in batch.rows])
                chosen = logits.argmax(dim=-1).tolist()  # one device sync per step, not one per sequence
                keep = []
                for row, r in enumerate(batch.rows):
                    i = running[r]
                    steps[i] += 1
                    if attention == PER_ROW:  # its own cache, as `greedy_decode` measures it after each forward
                        length = max(layer.get_seq_length() for layer in sequences[i].cache.layers)
                        max_lengths[i] = max(max_lengths[i], length)
                    if not stopped(i, chosen[row]):
                        keep.append(row)
                    elif attention == STACKED:
                        batch.write_back(row, sequences[i].cache)
                elapsed = time.perf_counter() - began
                step_seconds.append(elapsed)
                for r in batch.rows:
                    seconds[running[r]] += elapsed
                if len(keep) < len(batch.rows):
                    batch.drop_rows(keep)
    if attention == STACKED:  # the stacked rows grew by one slot per step
        max_lengths = [length + steps[i] for i, length in enumerate(max_lengths)]
    decoded = [
        BatchedDecoded(tokens[i], seconds[i], steps[i], max_lengths[i], phase.peak_mem_bytes)
        for i in range(len(sequences))
    ]
    return decoded, BatchLayout(attention, padding, step_seconds)
