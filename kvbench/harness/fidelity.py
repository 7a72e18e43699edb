"""Fidelity of a compressed cache against the full cache of the same prompt, on every row.

The reference is the full cache's greedy continuation of the prompt (`Reference.tokens`) together with the
full cache's next-token distributions along it (`Reference.logprobs`, teacher-forced). The runner builds it
once per sample: from the `full` job of the sweep when there is one (its cache is reused, so this costs one
copy of the prefilled cache and one forward of the continuation), otherwise by decoding it once.

Every row then records

* `token_match`: the fraction of positions where the row's greedy output equals the reference, over the longer
  of the two outputs (a missing token counts as a mismatch);
* `first_divergence`: the first position where they differ (null: identical outputs);
* `kl_full`: the mean over the reference tokens of KL(full || compressed) between next-token distributions,
  teacher-forced on the reference continuation: position 0 uses the logits after the question tail, the others
  one forward of the reference tokens on a copy of the row's cache as it stands after compression and tail.
  Decode-time evictions (`decode_budget`, methods evicting in `before_forward`) are not replayed inside that
  one forward (the greedy token match does include them);
* `fidelity_reference`: where the reference came from ("full_row" or "decoded"), null when it could not be
  built (then the three fields above are null too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvbench.engine.cache import KVCache
from kvbench.engine.generation import forward_tokens, greedy_decode
from kvbench.engine.measure import Stopwatch
from kvbench.engine.models import LoadedModel

FIELDS = ("token_match", "first_divergence", "kl_full", "fidelity_reference")


@dataclass
class Reference:
    """The full cache's greedy continuation and its next-token log-probabilities `[len(tokens), vocab]`."""

    tokens: list[int]
    logprobs: torch.Tensor
    source: str  # "full_row": the sweep's full job; "decoded": decoded for the fidelity metrics alone


def token_match(reference: list[int], tokens: list[int]) -> float:
    """Fraction of positions, over the longer output, where both outputs hold the same token (1.0 if both empty)."""
    longest = max(len(reference), len(tokens))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(reference, tokens, strict=False)) / longest


def first_divergence(reference: list[int], tokens: list[int]) -> int | None:
    """First position where the outputs differ (a shorter output diverges where it ends); None if identical."""
    for index, (a, b) in enumerate(zip(reference, tokens, strict=False)):
        if a != b:
            return index
    return None if len(reference) == len(tokens) else min(len(reference), len(tokens))


def mean_kl(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean over positions of KL(p || q) from log-probabilities `[n, vocab]` (nats)."""
    p = reference_logprobs.float()
    per_position = (p.exp() * (p - logprobs.float())).sum(dim=-1)
    # KL >= 0; float rounding can leave -1e-8 where the distributions agree.
    return float(per_position.clamp_min(0.0).mean()) if per_position.numel() else 0.0


def teacher_forced_logprobs(
    lm: LoadedModel, cache: KVCache, first_logits: torch.Tensor, tokens: list[int]
) -> torch.Tensor:
    """Next-token log-probabilities along `tokens`, `[len(tokens), vocab]`: row 0 from `first_logits` (the logits
    that predict tokens[0]), the others from one forward of tokens[:-1] appended to `cache` (which grows)."""
    rows = [first_logits.reshape(1, -1)]
    if len(tokens) > 1:
        rows.append(forward_tokens(lm, cache, tokens[:-1], logits_to_keep=len(tokens) - 1).reshape(len(tokens) - 1, -1))
    return torch.log_softmax(torch.cat(rows).float(), dim=-1)


def kl_to_reference(
    lm: LoadedModel, cache: KVCache, first_logits: torch.Tensor, reference: Reference | None
) -> float | None:
    """Mean KL(full || this cache) along the reference; works on a copy, so `cache` is left as it was."""
    if reference is None or not reference.tokens:
        return None
    probe = cache.copy()
    logprobs = teacher_forced_logprobs(lm, probe, first_logits, reference.tokens)
    del probe
    return mean_kl(reference.logprobs, logprobs)


def row_fields(reference: Reference | None, tokens: list[int], kl: float | None) -> dict[str, Any]:
    """The fidelity fields of one row (all null without a reference)."""
    if reference is None:
        return dict.fromkeys(FIELDS)
    return {
        "token_match": token_match(reference.tokens, tokens),
        "first_divergence": first_divergence(reference.tokens, tokens),
        "kl_full": kl,
        "fidelity_reference": reference.source,
    }


def reference_row_fields(reference: Reference) -> dict[str, Any]:
    """The full row compared with itself (the reference is its own output and distributions)."""
    return row_fields(reference, reference.tokens, mean_kl(reference.logprobs, reference.logprobs))


def truncate_full_cache(cache: KVCache, length: int) -> None:
    """Drop every slot from position `length` on, in a full (never evicted) cache whose slots are in order. A
    recurrent state cannot be rewound: a cache with state layers must not have gone past `length`."""
    for layer in cache.layers:
        if not layer.spec.attends or layer.spec.bounded:
            if cache.seen_tokens > length:
                raise ValueError(
                    f"cannot rewind a {layer.spec.kind} layer to {length} tokens; build the reference from a copy"
                )
            continue
        if layer.get_seq_length() <= length:
            continue
        order = torch.arange(length, device=layer.positions.device).expand(layer.num_heads, length)
        if not torch.equal(layer.positions[:, :length], order):
            raise ValueError("truncate_full_cache needs a full cache whose slots are positions 0, 1, 2, ...")
        layer.keep(order)
    cache.seen_tokens = length


def build_reference(
    lm: LoadedModel,
    cache: KVCache,
    prefix_len: int,
    tail: list[int],
    prefix_logits: torch.Tensor,
    tokens: list[int],
    source: str,
) -> Reference:
    """The reference for `tokens` (the full cache's greedy output), from `cache`, a full cache holding at least the
    `prefix_len` prefilled tokens that this function may modify (a copy, or the full job's own cache after its
    decode). The tail and the continuation go through the same forwards as in `runner.run_job`, so a row whose
    cache was not compressed gets exactly the reference's distributions."""
    truncate_full_cache(cache, prefix_len)
    first = forward_tokens(lm, cache, tail) if tail else prefix_logits
    return Reference(tokens=list(tokens), logprobs=teacher_forced_logprobs(lm, cache, first, tokens), source=source)


def decode_reference(
    lm: LoadedModel,
    cache: KVCache,
    prefix_len: int,
    tail: list[int],
    prefix_logits: torch.Tensor,
    max_new_tokens: int,
    stop_at_eos: bool,
    stop: Callable[[list[int]], bool] | None,
    stopwatch: Stopwatch,
) -> Reference:
    """Decode the full cache's greedy continuation (no `full` job in the sweep), then build its reference.
    `cache` is a full cache of the `prefix_len` prefilled tokens that this function may modify."""
    # Recurrent states and sliding windows cannot be rewound after decoding: such caches build the reference from a
    # copy taken now (copy-on-write: nothing is copied until one side writes).
    rewindable = all(layer.spec.attends and not layer.spec.bounded for layer in cache.layers)
    untouched = None if rewindable else cache.copy()
    first = forward_tokens(lm, cache, tail) if tail else prefix_logits
    decoded = greedy_decode(lm, cache, first, max_new_tokens, lambda num_new: None, stopwatch, stop_at_eos, stop)
    target = cache if untouched is None else untouched
    return build_reference(lm, target, prefix_len, tail, prefix_logits, decoded.tokens, "decoded")
