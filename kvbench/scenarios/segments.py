"""Segment reuse: a prompt assembled from separately encoded, cached segments (KVLink's training-free part).

A prompt is [chat-template opening] [segment 1] ... [segment n] [question + template closing + answer prefix],
the segments being a system instruction block, a memory list, tool descriptions and documents
(`kvbench.tasks.segments`). Modes (rows `segments/<mode>`):

* `joint`: the whole prompt prefilled at once (the reference);
* `reuse`: each segment's K/V encoded ONCE, alone, and kept in an in-process store (`SEGMENT_STORE`) shared by
  all samples of the process; then spliced after the opening and re-rotated to its global position with the
  shared helper (`kvbench.engine.rope.rerotate`); only missing segments and the question are forwarded;
* `reuse_norotate`: the same pieces spliced at their global positions in the cache (masks, later positions)
  but with keys still rotated at their encoding positions (the ablation: wrong relative positions).

Where a segment is encoded: alone, at positions 0..n-1 (no other token before it; its first token therefore
plays the attention-sink role a prompt's first token plays), then moved to its global position. The chat template's
opening is one more such piece. Reused segments therefore equal exactly a joint encoding whose attention is
block-diagonal (each piece sees only itself, the question sees everything) - tested against such a masked forward
- and a prompt of ONE segment (no template opening) equals the joint encoding. Segments never attend to each
other: that is the approximation `reuse` measures against `joint`. (KVLink's evaluation lets every document also
see a shared system prefix; a piece encoded after a prefix would depend on its distance to it, so it could not
be moved exactly: not done here.)

Store key: a hash of the model identity and the segment's token ids. Rows add `cache_hits` / `cache_misses`
(pieces, the opening included), `bytes_reused` (K/V bytes taken from the store), `segments`, `segment_tokens`,
and the fields of `kvbench.scenarios.modes`. The assembled cache is then compressed by the job's method like any
prefilled prompt (compress=prompt).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kvbench.engine.models import LoadedModel
from kvbench.engine.rope import check_shiftable_rope, rope_inv_freq
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job
from kvbench.harness.sample import Sample
from kvbench.scenarios import register_scenario
from kvbench.scenarios.kv_pieces import KVPiece, assemble, encode_piece
from kvbench.scenarios.modes import Built, error_rows, render_around_context, run_modes

SCENARIO = "segments"
MODES: tuple[str, ...] = ("joint", "reuse", "reuse_norotate")


class SegmentStore:
    """Separately encoded segments kept across samples; the least recently used are dropped while the store holds
    more than `max_bytes` of K/V (a piece larger than that is used once and not kept)."""

    def __init__(self, max_bytes: int = 2 * 2**30) -> None:
        self.max_bytes = max_bytes
        self.pieces: OrderedDict[str, KVPiece] = OrderedDict()

    @staticmethod
    def key(lm: LoadedModel, token_ids: list[int]) -> str:
        payload = json.dumps([lm.identity, token_ids], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()

    def nbytes(self) -> int:
        return sum(piece.nbytes() for piece in self.pieces.values())

    def get_or_encode(self, key: str, encode: Callable[[], KVPiece]) -> tuple[KVPiece, bool]:
        """The stored piece (hit: True) or a freshly encoded and stored one (hit: False)."""
        if key in self.pieces:
            self.pieces.move_to_end(key)
            return self.pieces[key], True
        piece = encode()
        self.pieces[key] = piece
        held = self.nbytes()
        while held > self.max_bytes and self.pieces:
            held -= self.pieces.popitem(last=False)[1].nbytes()
        return piece, False

    def clear(self) -> None:
        self.pieces.clear()


SEGMENT_STORE = SegmentStore()


@dataclass
class SegmentLayout:
    """A segments prompt as token ids: opening, segments, question (+ closing and answer prefix)."""

    head: list[int]
    segments: list[list[int]]
    tail: list[int]

    @property
    def prompt_ids(self) -> list[int]:
        return [t for part in (self.head, *self.segments, self.tail) for t in part]

    def starts(self) -> list[int]:
        """Global position of every segment's first token."""
        starts, position = [], len(self.head)
        for ids in self.segments:
            starts.append(position)
            position += len(ids)
        return starts


def segment_layout(tokenizer: Any, sample: Sample) -> SegmentLayout:
    head, tail = render_around_context(tokenizer, sample)
    segments = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in sample.meta["segments"]]
    return SegmentLayout(head, segments, tail)


def check_fits(layout: SegmentLayout, kinds: list[str], max_context: int, max_new_tokens: int) -> None:
    """One line naming the first segment that does not fit the model context (prompt + generated tokens)."""
    room = max_context - max_new_tokens - len(layout.tail)
    end = len(layout.head)
    for index, ids in enumerate(layout.segments):
        end += len(ids)
        if end > room:
            raise ValueError(
                f"segment {index + 1} of {len(layout.segments)} ({kinds[index]}, {len(ids)} tokens) ends at token "
                f"{end}, but the model context of {max_context} tokens leaves {room} for the segments (question "
                f"{len(layout.tail)} + {max_new_tokens} generated tokens); use fewer or shorter segments"
            )


def reuse_builder(lm: LoadedModel, layout: SegmentLayout, rotate: bool, store: SegmentStore) -> Callable[[], Built]:
    def build() -> Built:
        forwarded, hits, misses, reused = 0, 0, 0, 0

        def fetch(ids: list[int]) -> KVPiece:
            nonlocal forwarded, hits, misses, reused
            piece, hit = store.get_or_encode(store.key(lm, ids), lambda: encode_piece(lm, [], ids, 0))
            if hit:
                hits, reused = hits + 1, reused + piece.nbytes()
            else:
                misses, forwarded = misses + 1, forwarded + len(ids)
            return piece

        pieces = [fetch(layout.head)] if layout.head else []  # the opening is at its global position already
        inv_freq = rope_inv_freq(lm.model) if rotate else None
        for start, ids in zip(layout.starts(), layout.segments, strict=True):
            pieces.append(fetch(ids).moved(start, inv_freq))
        cache = assemble(pieces, lm.config.num_hidden_layers, next_position=len(layout.prompt_ids) - len(layout.tail))
        fields = {"cache_hits": hits, "cache_misses": misses, "bytes_reused": reused}
        return Built(cache, layout.tail, fields, forwarded)

    return build


@register_scenario(SCENARIO)
def run_segments(lm: LoadedModel, sample: Sample, jobs: list[Job], settings: RunOptions) -> Iterator[tuple[Job, dict]]:
    modes = list(sample.meta.get("modes") or MODES)
    try:
        unknown = [mode for mode in modes if mode not in MODES]
        if unknown:
            raise ValueError(f"unknown segments mode '{unknown[0]}'. Valid modes: {', '.join(MODES)}.")
        layout = segment_layout(lm.tokenizer, sample)
        kinds = sample.meta.get("segment_kinds") or ["segment"] * len(layout.segments)
        check_fits(layout, kinds, lm.max_context, sample.max_new_tokens)
        if any(mode != "joint" for mode in modes):
            check_shiftable_rope(lm.model, "task=segments (reuse)")
    except Exception as err:
        yield from error_rows(jobs, modes, SCENARIO, err, settings.fail_fast)
        return
    ids = layout.prompt_ids
    common = {"segments": len(layout.segments), "segment_tokens": [len(s) for s in layout.segments]}
    builders: dict[str, Callable[[], Built]] = {}
    for mode in modes:
        if mode == "joint":
            builders[mode] = lambda: Built(None, ids, {"cache_hits": 0, "cache_misses": 0, "bytes_reused": 0})
        else:
            builders[mode] = reuse_builder(lm, layout, mode == "reuse", SEGMENT_STORE)
    for job, row in run_modes(lm, sample, jobs, settings, SCENARIO, ids, builders, "joint"):
        yield job, ({**row, **common} if row.get("status") == "ok" else row)
