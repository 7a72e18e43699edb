"""Edited contexts: patch a cached prompt after an insertion, deletion or replacement (PIE, arXiv 2407.03157).

A context was encoded (the "original": opening + text); the user then edits the text in the middle and asks
for the continuation (code) or an answer that depends on the edit (`kvbench.tasks.edit`). Tokens: the opening,
`pre` (text before the edit), `old` (the span removed), `new` (the span inserted), `post` (text after it), and
the tail (question / cursor line + answer prefix), every piece tokenised on its own so all modes see the same
ids. Modes (rows `edit/<mode>`), each starting from the original's cache:

* `recompute`: keep the cache of the opening + `pre`, re-encode `new` + `post` (the reference, exact);
* `pie`: delete the `old` slots, re-rotate every later key by its position shift delta = |new| - |old|
  (R(delta) k with the shared helper `kvbench.engine.rope.rerotate`; values unchanged), encode `new` at its positions
  attending to the opening + `pre` only, and splice it in position order. Later tokens keep K/V computed in the
  old context (semantic staleness) and cannot see `new`: PIE's accepted approximation;
* `no_rerotate`: as `pie` without the re-rotation (later keys keep the rotation of their old positions while
  the cache records the new ones): the paper's "conflict fast encoding" baseline.

Then the tail is prefilled over the patched cache and decoded (the job's method may compress the patched cache
first, compress=prompt). Rows add `reencode_s` (cutting, re-rotating and encoding: the edit's cost, inside
`ttft_s`), `tokens_reencoded`, `edit_kind`, `edit_delta`, `original_prefill_s` (encoding the original, not part
of any mode's cost) and the reference fields of `kvbench.scenarios.modes` against `recompute`. An edit that only
appends (nothing after it) makes `pie` compute exactly what `recompute` computes.

Refused in one line: an edit span outside the text, a prompt longer than the model context, and RoPE variants
whose angles depend on the length (dynamic NTK, LongRoPE), for which R(delta) is not a position shift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kvbench.engine.generation import forward_tokens, prefill
from kvbench.engine.measure import Stopwatch
from kvbench.engine.models import LoadedModel
from kvbench.engine.rope import check_shiftable_rope, rope_inv_freq
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job
from kvbench.harness.sample import Sample
from kvbench.scenarios import register_scenario
from kvbench.scenarios.kv_pieces import assemble, encode_piece, take
from kvbench.scenarios.modes import Built, error_rows, render_around_context, run_modes

SCENARIO = "edit"
MODES: tuple[str, ...] = ("recompute", "pie", "no_rerotate")
EDIT_KINDS: tuple[str, ...] = ("insert", "delete", "replace")


@dataclass(frozen=True)
class Edit:
    """Replace the characters `start:end` of a text by `new` (start == end: insertion; new == "": deletion)."""

    start: int
    end: int
    new: str

    def check(self, text: str, name: str = "the text") -> None:
        if not (0 <= self.start <= self.end <= len(text)):
            raise ValueError(
                f"edit span [{self.start}, {self.end}) is outside {name} ({len(text)} characters); "
                f"valid spans: 0 <= start <= end <= {len(text)}"
            )

    def apply(self, text: str) -> str:
        self.check(text)
        return text[: self.start] + self.new + text[self.end :]

    @property
    def kind(self) -> str:
        if self.start == self.end:
            return "insert"
        return "delete" if not self.new else "replace"

    def as_meta(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "new": self.new}


@dataclass
class EditLayout:
    head: list[int]
    pre: list[int]
    old: list[int]
    new: list[int]
    post: list[int]
    tail: list[int]

    @property
    def original_ids(self) -> list[int]:
        return self.head + self.pre + self.old + self.post

    @property
    def edited_ids(self) -> list[int]:
        return self.head + self.pre + self.new + self.post + self.tail

    @property
    def edit_at(self) -> int:
        """Position of the first edited token."""
        return len(self.head) + len(self.pre)

    @property
    def delta(self) -> int:
        """Position shift of every token after the edit."""
        return len(self.new) - len(self.old)


def edit_of(sample: Sample) -> Edit:
    spec = sample.meta["edit"]
    return Edit(int(spec["start"]), int(spec["end"]), str(spec["new"]))


def edit_layout(tokenizer: Any, sample: Sample) -> EditLayout:
    original, edit = sample.meta["original"], edit_of(sample)
    edit.check(original, f"the text of {sample.sample_id}")
    head, tail = render_around_context(tokenizer, sample)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    pieces = original[: edit.start], original[edit.start : edit.end], edit.new, original[edit.end :]
    return EditLayout(head, *(ids(text) for text in pieces), tail)


def check_fits(layout: EditLayout, max_context: int, max_new_tokens: int) -> None:
    longest = max(len(layout.original_ids), len(layout.edited_ids))
    if longest + max_new_tokens > max_context:
        raise ValueError(
            f"the edited prompt needs {longest} tokens + {max_new_tokens} generated > the model context "
            f"{max_context}; use a shorter text (task.context_chars)"
        )


def edit_builders(lm: LoadedModel, layout: EditLayout, original: Any, modes: list[str]) -> dict[str, Callable]:
    """Every mode's builder, starting from `original` (the original prompt's prefilled cache)."""
    num_layers = lm.config.num_hidden_layers
    at, after_old = layout.edit_at, layout.edit_at + len(layout.old)
    end = len(layout.original_ids)

    def recompute() -> Built:
        cache = assemble([take(original, 0, at)], num_layers, next_position=at)
        again = layout.new + layout.post
        if again:
            forward_tokens(lm, cache, again)
        return Built(cache, layout.tail, {"tokens_reencoded": len(again)}, len(again))

    def patch(rotate: bool) -> Callable[[], Built]:
        def build() -> Built:
            prefix = take(original, 0, at)
            inserted = encode_piece(lm, [prefix], layout.new, at)
            inv_freq = rope_inv_freq(lm.model) if rotate else None
            later = take(original, after_old, end).moved(at + len(layout.new), inv_freq)
            cache = assemble([prefix, inserted, later], num_layers)
            return Built(cache, layout.tail, {"tokens_reencoded": len(layout.new)}, len(layout.new))

        return build

    makers = {"recompute": lambda: recompute, "pie": lambda: patch(True), "no_rerotate": lambda: patch(False)}
    return {mode: makers[mode]() for mode in modes}


@register_scenario(SCENARIO)
def run_edit(lm: LoadedModel, sample: Sample, jobs: list[Job], settings: RunOptions) -> Iterator[tuple[Job, dict]]:
    modes = list(sample.meta.get("modes") or MODES)
    stopwatch = Stopwatch(lm.device)
    try:
        unknown = [mode for mode in modes if mode not in MODES]
        if unknown:
            raise ValueError(f"unknown edit mode '{unknown[0]}'. Valid modes: {', '.join(MODES)}.")
        layout = edit_layout(lm.tokenizer, sample)
        check_fits(layout, lm.max_context, sample.max_new_tokens)
        if not layout.tail:
            raise ValueError(
                f"sample {sample.sample_id}: an edit sample needs a question or cursor line after the text"
            )
        if any(mode != "recompute" for mode in modes):
            check_shiftable_rope(lm.model, "task=edit (pie)")
        original = prefill(lm, layout.original_ids, 0, stopwatch)
    except Exception as err:
        yield from error_rows(jobs, modes, SCENARIO, err, settings.fail_fast)
        return
    common = {
        "edit_kind": edit_of(sample).kind,
        "edit_delta": layout.delta,
        "edit_position": layout.edit_at,
        "original_tokens": len(layout.original_ids),
        "original_prefill_s": original.seconds,
    }
    builders = edit_builders(lm, layout, original.cache, modes)
    for job, row in run_modes(lm, sample, jobs, settings, SCENARIO, layout.edited_ids, builders, "recompute"):
        if row.get("status") == "ok":
            row = {**row, **common, "reencode_s": row["build_s"]}
        yield job, row
