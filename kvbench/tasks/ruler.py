"""RULER (Hsieh et al. 2024, NVIDIA/RULER): 13 synthetic long-context tasks generated offline.

Hyperparameters (`conf/task/ruler.yaml`): `subtasks` (default all 13: niah_single_1/2/3, niah_multikey_1/2/3,
niah_multivalue, niah_multiquery, vt, cwe, fwe, qa_1, qa_2), `lengths` (target total lengths in tokens: prompt
+ generation), `num_samples` per subtask and length, `seed`, `question_position` (before | after | both, or a
list), `squad_path` / `hotpotqa_path` (qa_1 / qa_2 data: local file or hub id, default none: the qa subtasks are then
skipped with a notice; see `kvbench.tasks.ruler_qa`),
`use_chat_template`.

Every sample is generated with the model's own tokenizer: for each sample a search over the haystack size
finds the largest size whose prompt (as `kvbench.harness.prompt.build_prompt` builds it, chat template included) plus
the subtask's generation length fits the target length, so the sample is within one haystack unit of it.
Samples depend only on (seed, subtask, length, index) and the tokenizer: selecting fewer subtasks or samples
gives the same samples. The generators live in `kvbench.tasks.ruler_generators`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kvbench.harness.prompt import build_prompt
from kvbench.registry import AT_LEAST_ONE, unknown_name_message
from kvbench.tasks.base import QUESTION_POSITIONS, Sample, Task, as_list, register_task
from kvbench.tasks.ruler_generators import (
    GENERATION_LENGTHS,
    QA_SUBTASKS,
    SUBTASKS,
    Draft,
    Generator,
    QAData,
    family,
    make_generator,
    metric_for,
    separator_for,
)
from kvbench.tasks.ruler_qa import QADataUnavailable, load_qa
from kvbench.tasks.sizing import largest_fitting

log = logging.getLogger(__name__)

QA_HINTS = {
    "qa_1": "task.squad_path=<SQuAD v2 dev-v2.0.json, a JSONL file, or a hub id such as rajpurkar/squad_v2>",
    "qa_2": "task.hotpotqa_path=<hotpot_dev_distractor_v1.json, a JSONL file, or a hub id such as hotpotqa/hotpot_qa>",
}


def fit_size(total: Callable[[int], int], limit: int, minimum: int, hint: int | None = None) -> int:
    """Largest size n >= minimum with total(n) <= limit, for a total that grows with n: gallop from `hint`
    (or a linear estimate) to bracket it, then bisect. Raises ValueError if even `minimum` does not fit."""
    cache: dict[int, bool] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = total(n) <= limit
        return cache[n]

    if not fits(minimum):
        raise ValueError(f"even the smallest haystack ({minimum}) needs {total(minimum)} tokens > {limit}")
    if hint is None:
        probe = max(2 * minimum, minimum + 8)
        base, grown = total(minimum), total(probe)
        rate = (grown - base) / (probe - minimum)
        hint = minimum + int((limit - base) / rate) if rate > 0 else probe
    return largest_fitting(fits, hint, minimum)


@register_task("ruler")
@dataclass
class RulerTask(Task):
    """RULER's 13 synthetic tasks (NIAH x8, variable tracking, common / frequent words extraction, QA x2) at
    each target length; metric string_match_all (string_match_part for qa)."""

    subtasks: list[str] = field(default_factory=lambda: list(SUBTASKS))
    lengths: list[int] = field(default_factory=lambda: [4096], metadata=AT_LEAST_ONE)
    num_samples: int = field(default=500, metadata=AT_LEAST_ONE)
    seed: int = 42
    question_position: Any = "after"
    squad_path: str | None = None  # None: qa_1 skipped with a notice (no network unless a hub id is given)
    hotpotqa_path: str | None = None
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        self.subtasks = [str(s) for s in as_list(self.subtasks)]
        for subtask in self.subtasks:
            if subtask not in SUBTASKS:
                raise ValueError(unknown_name_message("RULER subtask", subtask, SUBTASKS))
        self.lengths = [int(n) for n in as_list(self.lengths)]
        if not self.lengths or any(n <= 0 for n in self.lengths):
            raise ValueError(f"task.lengths must be positive token counts, got {self.lengths}")
        if int(self.num_samples) < 0:
            raise ValueError(f"task.num_samples must be >= 0, got {self.num_samples}")
        self.num_samples = int(self.num_samples)
        self.positions = [str(p) for p in as_list(self.question_position)]
        for position in self.positions:
            if position not in QUESTION_POSITIONS:
                valid = ", ".join(QUESTION_POSITIONS)
                raise ValueError(f"unknown question_position '{position}'. Valid question_positions: {valid}.")

    def qa_sources(self) -> dict[str, str | None]:
        return {"qa_1": self.squad_path, "qa_2": self.hotpotqa_path}

    def load_qa_data(self) -> dict[str, QAData]:
        """QA data of the selected qa subtasks; missing ones are skipped with a single warning line."""
        loaded: dict[str, QAData] = {}
        missing: dict[str, str] = {}
        for subtask in self.subtasks:
            if subtask in QA_SUBTASKS:
                try:
                    loaded[subtask] = load_qa(QA_SUBTASKS[subtask], self.qa_sources()[subtask])
                except QADataUnavailable as err:
                    missing[subtask] = str(err)
        if missing:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in missing.items())
            hints = " ".join(QA_HINTS[name] for name in missing)
            skipped = ", ".join(missing)
            log.warning(f"RULER: skipping {skipped} (data not available: {reasons}). To run them, pass {hints}")
        return loaded

    def samples(self, tokenizer: Any, max_context: int) -> Iterator[Sample]:
        qa_data = self.load_qa_data()
        subtasks = [s for s in self.subtasks if family(s) != "qa" or s in qa_data]

        def count_tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        for length in self.lengths:
            if length > max_context:
                log.warning(f"RULER: skipping length {length}: longer than the model's maximum context {max_context}")
                continue
            for subtask in subtasks:
                generator = make_generator(subtask, length, count_tokens, qa_data.get(subtask))
                yield from self.subtask_samples(tokenizer, subtask, length, generator)

    def subtask_samples(self, tokenizer: Any, subtask: str, length: int, generator: Generator) -> Iterator[Sample]:
        max_new_tokens = GENERATION_LENGTHS[family(subtask)]
        hint = None
        for index in range(self.num_samples):
            seed = self.sample_seed(subtask, length, index)

            def total(size: int, seed: str = seed, index: int = index) -> int:
                draft = generator.draft(seed, index, size)
                return max(len(build_prompt(tokenizer, self.make_sample(subtask, draft, p, 0))) for p in self.positions)

            try:
                size = fit_size(lambda n: total(n) + max_new_tokens, length, generator.min_size, hint)
            except ValueError as err:
                raise ValueError(f"RULER {subtask} cannot fit in {length} tokens: {err}") from None
            hint = size
            draft = generator.draft(seed, index, size)
            for position in self.positions:
                sample = self.make_sample(subtask, draft, position, max_new_tokens)
                prompt_tokens = len(build_prompt(tokenizer, sample))
                sample.sample_id = f"ruler-{subtask}-{length}-{index}-{position}"
                sample.meta = {
                    "subtask": subtask,
                    "family": family(subtask),
                    "length": length,
                    "index": index,
                    "question_position": position,
                    "prompt_tokens": prompt_tokens,
                    "total_tokens": prompt_tokens + max_new_tokens,
                    **draft.meta,
                }
                yield sample

    def sample_seed(self, subtask: str, length: int, index: int) -> str:
        """The random.Random seed of one sample: independent of which other subtasks/lengths are selected."""
        return f"ruler|{self.seed}|{subtask}|{length}|{index}"

    def make_sample(self, subtask: str, draft: Draft, position: str, max_new_tokens: int) -> Sample:
        return Sample(
            sample_id=subtask,
            context=draft.context,
            question=draft.question,
            answer_prefix=draft.answer_prefix,
            answers=list(draft.answers),
            metric=metric_for(subtask),
            max_new_tokens=max_new_tokens,
            question_position=position,
            use_chat_template=self.use_chat_template,
            separator=separator_for(subtask),
        )
