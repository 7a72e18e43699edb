"""Synthetic prompts of given lengths for efficiency benchmarks (`experiment=efficiency`): memory and latency
vs context length, not accuracy.

Each sample is a plain prompt (no chat template, no question) of exactly `length - max_new_tokens` tokens of
the model's tokenizer, followed by exactly `max_new_tokens` greedy tokens (EOS does not stop generation, so
every row decodes the same number of steps). Content: `noise` (the repeated NIAH filler sentences) or
`random` (seeded random ordinary tokens of the vocabulary). Metric: `none` (rows are not scored).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvbench.harness.metrics import METRICS
from kvbench.harness.prompt import build_prompt
from kvbench.registry import AT_LEAST_ONE
from kvbench.tasks.base import PlannedSample, Sample, Task, check_lengths, register_task
from kvbench.tasks.haystack import haystack_text

CONTENTS = ("noise", "random")


@METRICS.register("none")
def no_metric(prediction: str, references: Sequence[str]) -> None:
    """Efficiency rows carry no accuracy: the score is null."""
    return None


def content_ids(tokenizer: Any, content: str, num_tokens: int, seed: int) -> list[int]:
    """At least `num_tokens` token ids of the requested content."""
    if content == "noise":
        text = haystack_text("noise", min_chars=4 * num_tokens + 1000)  # >= 1 token per 4 characters
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(f"synthetic-{seed}")
    return [rng.choice(ordinary) for _ in range(num_tokens + num_tokens // 4 + 16)]


def fit_context(tokenizer: Any, sample: Sample, ids: list[int], target: int) -> int:
    """Set `sample.context` to a decoded prefix of `ids` whose prompt is `target` tokens (or the longest that
    stays below it when re-tokenisation cannot hit it exactly); returns the prompt's length."""
    count, best = target, None
    for _ in range(12):  # decoding and re-tokenising shifts a few tokens; a few corrections converge
        sample.context = tokenizer.decode(ids[: max(0, count)])
        total = len(build_prompt(tokenizer, sample))
        if total <= target and (best is None or total > best[1]):
            best = (count, total)
        if total == target:
            return total
        count += target - total
    if best is None:
        raise ValueError(f"synthetic_length: could not build a prompt of at most {target} tokens")
    sample.context = tokenizer.decode(ids[: best[0]])
    return best[1]


@register_task("synthetic_length")
@dataclass
class SyntheticLength(Task):
    """Prompts of fixed lengths for latency / memory measurements. Fields mirror conf/task/synthetic_length.yaml.

    lengths: total tokens per sample (prompt + max_new_tokens, as in NIAH); max_new_tokens: tokens generated
    per sample (EOS ignored); content: noise | random; samples_per_length: repeats per length (different random
    content, for timing spread); seed.
    """

    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192], metadata=AT_LEAST_ONE)
    max_new_tokens: int = field(default=32, metadata=AT_LEAST_ONE)
    content: str = "noise"
    samples_per_length: int = field(default=1, metadata=AT_LEAST_ONE)
    seed: int = 42

    def __post_init__(self) -> None:
        if self.content not in CONTENTS:
            raise ValueError(f"unknown content '{self.content}'. Valid contents: {', '.join(CONTENTS)}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"synthetic_length max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for length in self.lengths:
            if int(length) <= self.max_new_tokens:
                raise ValueError(f"synthetic_length length {length} must exceed max_new_tokens={self.max_new_tokens}")

    def samples(self, tokenizer: Any, max_context: int) -> Iterator[Sample]:
        return (planned.build() for planned in self.planned_samples(tokenizer, max_context))

    def planned_samples(self, tokenizer: Any, max_context: int) -> Iterator[PlannedSample]:
        check_lengths(self.lengths, max_context)
        for length in self.lengths:
            for index in range(self.samples_per_length):
                yield PlannedSample(
                    sample_id=f"synthetic-{self.content}-L{int(length)}-i{index}",
                    recipe=self.recipe(length=int(length), index=index),
                    build=functools.partial(self._sample, tokenizer, int(length), index),
                )

    def _sample(self, tokenizer: Any, length: int, index: int) -> Sample:
        target = length - self.max_new_tokens
        sample = Sample(
            sample_id=f"synthetic-{self.content}-L{length}-i{index}",
            context="",
            question="",
            answer_prefix="",
            answers=[],
            metric="none",
            max_new_tokens=self.max_new_tokens,
            use_chat_template=False,
            separator="",
            meta={"length": length, "content": self.content, "ignore_eos": True},
        )
        ids = content_ids(tokenizer, self.content, target, self.seed * 1_000_003 + length * 101 + index)
        sample.meta["prompt_tokens"] = fit_context(tokenizer, sample, ids, target)
        return sample
