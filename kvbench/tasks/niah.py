"""Needle in a haystack (gkamradt's LLMTest_NeedleInAHaystack grid, RULER's needle format).

A grid of context lengths x depths. The needle "One of the special magic numbers for {key} is: {value}."
(random adjective-noun key, 7-digit value) sits at a sentence boundary at the requested depth of a `noise`
or `essay` haystack. The haystack is sized in tokens of the model's own tokenizer so that prompt + generation
fits the cell's length. Metric: string_match_all.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kvbench.harness.prompt import build_prompt
from kvbench.registry import AT_LEAST_ONE
from kvbench.tasks.base import (
    QUESTION_POSITIONS,
    PlannedSample,
    Sample,
    Task,
    as_list,
    check_lengths,
    register_task,
)
from kvbench.tasks.haystack import HAYSTACKS, haystack_text, insert_at_depth, random_key, random_number

NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"


@functools.lru_cache(maxsize=4)
def _haystack_ids(tokenizer: Any, kind: str, max_tokens: int) -> tuple[int, ...]:
    # ~3 characters per token is a safe lower bound for English text, so this yields enough tokens.
    text = haystack_text(kind, min_chars=4 * max_tokens + 1000)
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


@register_task("niah")
@dataclass
class NIAH(Task):
    """Needle in a haystack. Fields mirror conf/task/niah.yaml.

    lengths: total tokens per cell (prompt + generation); depths: needle depth in percent of the haystack;
    haystack: noise | essay; samples_per_cell: different keys/values per cell; question_position: before |
    after | both (or a list of them, each run separately).
    """

    lengths: list[int] = field(default_factory=lambda: [1024, 2048], metadata=AT_LEAST_ONE)
    depths: list[float] = field(default_factory=lambda: [0, 25, 50, 75, 100])
    haystack: str = "noise"
    samples_per_cell: int = field(default=1, metadata=AT_LEAST_ONE)
    question_position: Any = "after"
    max_new_tokens: int = field(default=32, metadata=AT_LEAST_ONE)
    seed: int = 42
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"unknown haystack '{self.haystack}'. Valid haystacks: {', '.join(HAYSTACKS)}.")
        for position in as_list(self.question_position):
            if position not in QUESTION_POSITIONS:
                raise ValueError(
                    f"unknown question_position '{position}'. Valid question_positions: "
                    f"{', '.join(QUESTION_POSITIONS)}."
                )
        for depth in self.depths:
            if not 0 <= float(depth) <= 100:
                raise ValueError(f"niah depth {depth} is outside [0, 100]")

    def samples(self, tokenizer: Any, max_context: int) -> Iterator[Sample]:
        return (planned.build() for planned in self.planned_samples(tokenizer, max_context))

    def planned_samples(self, tokenizer: Any, max_context: int) -> Iterator[PlannedSample]:
        check_lengths(self.lengths, max_context)
        for length in self.lengths:
            for depth in self.depths:
                for index in range(self.samples_per_cell):
                    rng = random.Random(f"niah-{self.seed}-{length}-{depth}-{index}")
                    key, value = random_key(rng), random_number(rng)
                    for position in as_list(self.question_position):
                        coords = (int(length), float(depth), index, key, value, str(position))
                        yield PlannedSample(
                            sample_id=self.sample_id(int(length), float(depth), index, str(position)),
                            recipe=self.recipe(length=coords[0], depth=coords[1], index=index, position=coords[5]),
                            build=functools.partial(self._sample, tokenizer, *coords),
                        )

    def sample_id(self, length: int, depth: float, index: int, position: str) -> str:
        return f"niah-{self.haystack}-L{length}-d{depth:g}-i{index}-q{position}"

    def _sample(
        self, tokenizer: Any, length: int, depth: float, index: int, key: str, value: str, position: str
    ) -> Sample:
        sample = Sample(
            sample_id=self.sample_id(length, depth, index, position),
            context="",
            question=QUESTION.format(key=key),
            answer_prefix=ANSWER_PREFIX.format(key=key),
            answers=[value],
            metric="string_match_all",
            max_new_tokens=self.max_new_tokens,
            question_position=position,
            use_chat_template=self.use_chat_template,
            meta={"length": length, "depth": depth, "haystack": self.haystack, "key": key},
        )
        needle = NEEDLE.format(key=key, value=value)
        limit = length - self.max_new_tokens
        sample.context = needle
        overhead = len(build_prompt(tokenizer, sample))
        if overhead > limit:
            raise ValueError(f"niah length {length} is too short for the prompt template ({overhead} tokens)")
        haystack_ids = _haystack_ids(tokenizer, self.haystack, length)
        budget = limit - overhead
        # Decoding a token prefix and re-tokenising it inside the prompt can shift a few tokens: shrink until it fits.
        while True:
            haystack = tokenizer.decode(haystack_ids[:budget]).strip()
            sample.context = insert_at_depth(haystack, needle, depth)
            total = len(build_prompt(tokenizer, sample))
            if total <= limit or budget == 0:
                break
            budget = max(0, budget - (total - limit))
        sample.meta["prompt_tokens"] = total
        return sample
