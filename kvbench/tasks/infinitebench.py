"""InfiniteBench (Zhang et al., 2024, "InfiniteBench: Extending Long Context Evaluation Beyond 100K Tokens";
OpenBMB/InfiniteBench).

12 tasks: passkey, number_string, kv_retrieval (retrieval; generated offline here), longbook_sum_eng,
longbook_qa_eng, longbook_choice_eng, longbook_qa_chn, longdialogue_qa_eng, math_find, math_calc, code_run,
code_debug (from the data set).

Protocol (tasks/infinitebench/protocol.yaml, from OpenBMB/InfiniteBench): the prompt templates the benchmark
uses for open models, the maximum generation lengths and each task's metric. The sample's context is the
template up to and including the filled `{context}`, its question the rest. These templates end with an
answer lead-in for a continuing model ("... The pass key is"): without a chat template (or with
use_chat_template false) the prompt is the template verbatim; with one, the lead-in becomes the answer
prefix after the assistant turn start, so the model continues it within the benchmark's short generation
lengths instead of restating it. Contexts longer than the model's maximum are truncated in the middle by
the prompt builder. A generation length above half the model's maximum (math_calc's 30000) is capped there and the
protocol value kept in `meta.max_new_tokens_protocol`.

The synthetic tasks are generated as the benchmark builds them (kvbench.tasks.infinitebench_synthetic),
deterministic from the seed, and sized with the model's tokenizer so that prompt + generation fits each of
`synthetic_lengths` (default: the model's maximum context); the needle / queried pair moves evenly from
depth 0 to 100% over the `synthetic_samples` samples of a length.

Data for the other tasks: local JSONL (`data_dir/<task>.jsonl`, the hub's fields id, context, input, answer,
options) or the hub dataset `hub_id` (one file per task, cached by huggingface_hub). Fields: subtasks (all or
a list), data_dir, hub_id, limit (rows per data task, a seeded subset), synthetic_lengths,
synthetic_samples, use_chat_template, seed.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbench.harness.prompt import build_prompt
from kvbench.registry import AT_LEAST_ONE
from kvbench.tasks.base import Sample, Task, as_list, register_task
from kvbench.tasks.benchmark_data import (
    DataUnavailableError,
    Row,
    choose_subtasks,
    hub_dataset_file,
    load_protocol,
    read_jsonl,
    seeded_subset,
    split_template,
)
from kvbench.tasks.haystack import TASKS_DIR
from kvbench.tasks.infinitebench_synthetic import (
    NUMBER_NEEDLE,
    NUMBER_QUESTION,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    KVPairs,
    Record,
    kv_record,
    noise_record,
    number_string_key,
    passkey_key,
)
from kvbench.tasks.sizing import largest_fitting

PROTOCOL = load_protocol(TASKS_DIR / "infinitebench" / "protocol.yaml")
SUBTASKS: tuple[str, ...] = tuple(PROTOCOL)
CHOICE_TASKS = ("longbook_choice_eng", "code_debug")
OPTION_LETTERS = "ABCD"
REQUIRED_FIELDS = ("context", "answer")
PROBE_UNITS = 64  # second point of the linear token-count estimate of a synthetic context


@register_task("infinitebench")
@dataclass
class InfiniteBench(Task):
    """InfiniteBench. Fields mirror conf/task/infinitebench.yaml."""

    subtasks: Any = "all"
    data_dir: str | None = None
    hub_id: str | None = "xinrongzhang2022/InfiniteBench"
    limit: int | None = None
    synthetic_lengths: Any = None
    synthetic_samples: int = field(default=10, metadata=AT_LEAST_ONE)
    use_chat_template: bool = True
    seed: int = 42

    def __post_init__(self) -> None:
        self.subtasks = choose_subtasks(self.subtasks, SUBTASKS, "infinitebench")
        if self.synthetic_samples < 1:
            raise ValueError(f"synthetic_samples must be >= 1, got {self.synthetic_samples}")

    def samples(self, tokenizer: Any, max_context: int) -> Iterator[Sample]:
        for subtask in self.subtasks:
            if PROTOCOL[subtask]["synthetic"]:
                yield from self.synthetic(subtask, tokenizer, max_context)
                continue
            rows = seeded_subset(self.rows(subtask), self.limit, self.seed, f"infinitebench-{subtask}")
            for row in rows:
                try:
                    yield self.data_sample(subtask, row, tokenizer, max_context)
                except (KeyError, TypeError, ValueError, IndexError) as err:
                    raise ValueError(f"{row.where()}: bad infinitebench row ({type(err).__name__}: {err})") from None

    # ------------------------------------------------------------ data tasks

    def rows(self, subtask: str) -> list[Row]:
        name = f"{subtask}.jsonl"
        subject = f"infinitebench subtask '{subtask}'"
        if self.data_dir:
            path = Path(self.data_dir).expanduser() / name
            if not path.is_file():
                hub = f" or unset task.data_dir to download {self.hub_id}" if self.hub_id else ""
                raise DataUnavailableError(f"{subject}: {path} not found; put {name} there{hub}")
            return read_jsonl(path, REQUIRED_FIELDS)
        if not self.hub_id:
            raise DataUnavailableError(f"{subject}: no data; pass task.data_dir=<dir with {name}> or set task.hub_id")
        return read_jsonl(hub_dataset_file(self.hub_id, name, subject, name), REQUIRED_FIELDS)

    def data_sample(self, subtask: str, row: Row, tokenizer: Any, max_context: int) -> Sample:
        data = row.data
        fields = prompt_fields(subtask, data)
        return self._sample(
            subtask,
            tokenizer,
            sample_id=f"infinitebench/{subtask}/{data.get('id', row.line)}",
            context=str(data["context"]),
            fields=fields,
            answers=reference_answers(subtask, data["answer"], fields),
            max_context=max_context,
            meta={"row": row.line, "id": data.get("id")},
        )

    # ------------------------------------------------------------ synthetic tasks

    def lengths(self, max_context: int) -> list[int]:
        lengths = [int(n) for n in as_list(self.synthetic_lengths)] or [max_context]
        too_long = [n for n in lengths if n > max_context]
        if too_long:
            raise ValueError(
                f"task.synthetic_lengths contains {too_long[0]} > the model's maximum context {max_context}; "
                f"use lengths <= {max_context}"
            )
        return lengths

    def synthetic(self, subtask: str, tokenizer: Any, max_context: int) -> Iterator[Sample]:
        for length in self.lengths(max_context):
            guess = None
            for index in range(self.synthetic_samples):
                depth = 100 * index / (self.synthetic_samples - 1) if self.synthetic_samples > 1 else 50.0
                rng = random.Random(f"infinitebench-{subtask}-{self.seed}-{length}-{index}")
                build = record_builder(subtask, rng, depth)
                make = functools.partial(self._synthetic_sample, subtask, build, tokenizer, length, index, max_context)
                fits = _memo(functools.partial(_fits, make, tokenizer, length))
                if not fits(1):
                    raise ValueError(f"infinitebench {subtask}: length {length} is too short for its prompt")
                if guess is None:
                    guess = _linear_guess(make, tokenizer, length)
                guess = largest_fitting(fits, guess)
                sample = make(guess)
                sample.meta["prompt_tokens"] = len(build_prompt(tokenizer, sample))
                yield sample

    def _synthetic_sample(
        self,
        subtask: str,
        build: Callable[[int], Record],
        tokenizer: Any,
        length: int,
        index: int,
        max_context: int,
        units: int,
    ) -> Sample:
        record = build(units)
        return self._sample(
            subtask,
            tokenizer,
            sample_id=f"infinitebench/{subtask}/L{length}-i{index}",
            context=record.context,
            fields={"input": record.input},
            answers=[record.answer],
            max_context=max_context,
            meta={"length": length, "depth": record.depth, "units": record.units, "index": index},
        )

    # ------------------------------------------------------------ common

    def _sample(
        self,
        subtask: str,
        tokenizer: Any,
        sample_id: str,
        context: str,
        fields: dict[str, str],
        answers: list[str],
        max_context: int,
        meta: dict[str, Any],
    ) -> Sample:
        spec = PROTOCOL[subtask]
        context_part, question = split_template(spec["prompt"], context, fields)
        answer_prefix = ""
        if self.use_chat_template and getattr(tokenizer, "chat_template", None):
            question, answer_prefix = split_answer_prefix(question, spec, fields)
        max_new_tokens = int(spec["max_new_tokens"])
        meta = {"subtask": subtask, **meta}
        if max_new_tokens > max_context // 2:
            meta["max_new_tokens_protocol"] = max_new_tokens
            max_new_tokens = max_context // 2
        return Sample(
            sample_id=sample_id,
            context=context_part,
            question=question,
            answer_prefix=answer_prefix,
            answers=answers,
            metric=spec["metric"],
            max_new_tokens=max_new_tokens,
            question_position="after",
            use_chat_template=self.use_chat_template,
            meta=meta,
            separator="",
        )


def split_answer_prefix(question: str, spec: dict[str, Any], fields: dict[str, str]) -> tuple[str, str]:
    """(question without its closing answer lead-in, the lead-in) for a chat prompt."""
    text = question.rstrip()
    if "answer_prefix_regex" in spec:
        found = re.search(f"(?:{spec['answer_prefix_regex']})$", text)
        lead = found.group(0) if found else None
    else:
        lead = spec["answer_prefix"].format(**fields)
        lead = lead if text.endswith(lead) else None
    if lead is None:
        raise ValueError(f"the prompt does not end with its answer lead-in: ...{text[-80:]!r}")
    return text[: len(text) - len(lead)].rstrip(), lead


def record_builder(subtask: str, rng: random.Random, depth: float) -> Callable[[int], Record]:
    """units -> Record for a synthetic subtask; every random draw happens before sizing, so the key (and the
    first n kv pairs) are the same whatever the size."""
    if subtask == "passkey":
        key = passkey_key(rng)
        return lambda units: noise_record(PASSKEY_NEEDLE, PASSKEY_QUESTION, key, units, depth)
    if subtask == "number_string":
        key = number_string_key(rng)
        return lambda units: noise_record(NUMBER_NEEDLE, NUMBER_QUESTION, key, units, depth)
    if subtask == "kv_retrieval":
        pairs = KVPairs(rng)
        return lambda units: kv_record(pairs, units, depth)
    raise ValueError(f"infinitebench subtask '{subtask}' is not synthetic")


def _fits(make: Callable[[int], Sample], tokenizer: Any, length: int, units: int) -> bool:
    sample = make(units)
    return len(build_prompt(tokenizer, sample)) + sample.max_new_tokens <= length


def _linear_guess(make: Callable[[int], Sample], tokenizer: Any, length: int) -> int:
    one = make(1)
    small = len(build_prompt(tokenizer, one)) + one.max_new_tokens
    large = len(build_prompt(tokenizer, make(PROBE_UNITS)))
    per_unit = max((large + one.max_new_tokens - small) / (PROBE_UNITS - 1), 1e-6)
    return 1 + int((length - small) / per_unit)


def _memo(fits: Callable[[int], bool]) -> Callable[[int], bool]:
    seen: dict[int, bool] = {}

    def cached(units: int) -> bool:
        if units not in seen:
            seen[units] = fits(units)
        return seen[units]

    return cached


def prompt_fields(subtask: str, data: dict[str, Any]) -> dict[str, str]:
    """Template fields of a data row, derived as InfiniteBench's create_prompt does."""
    text = str(data.get("input") or "")
    fields = {"input": text, "question": text}
    if subtask in CHOICE_TASKS:
        options = data.get("options") or []
        if len(options) != len(OPTION_LETTERS):
            raise ValueError(f"{subtask} needs {len(OPTION_LETTERS)} options, got {len(options)}")
        fields.update({f"OPTION_{letter}": str(o) for letter, o in zip(OPTION_LETTERS, options, strict=True)})
    if subtask == "math_find":
        found = re.findall(r"The .+ of", text)
        if not found:
            raise ValueError(f"math_find input names no target ('The ... of'): {text[:80]!r}")
        # "The largest number of" -> "the largest number" (lower-cased, " of" sliced off), as the benchmark does.
        fields["prefix"] = f"What is {found[0].lower()[:-3]} in the following list?"
    if subtask == "code_run":
        found = re.findall(r"func_[0-9]+\(\-?[0-9]+\)", text)
        if not found:
            raise ValueError(f"code_run input has no call func_N(x): {text[:80]!r}")
        fields["func_call"] = found[0]
        fields["func"] = found[0].split("(")[0]
    return fields


def reference_answers(subtask: str, answer: Any, fields: dict[str, str]) -> list[str]:
    """The references a metric expects: [option text, letter] for the choice tasks (InfiniteBench's
    get_answer), the JSON list of values for math_calc, else the answers as strings."""
    if subtask in CHOICE_TASKS:
        options = [fields[f"OPTION_{letter}"] for letter in OPTION_LETTERS]
        if isinstance(answer, list) and len(answer) == 2 and answer[1] in OPTION_LETTERS:
            return [str(answer[0]), str(answer[1])]
        if isinstance(answer, list) and len(answer) == 1:
            answer = answer[0]
        if not isinstance(answer, str) or answer not in options:
            raise ValueError(f"{subtask} answer {answer!r} is not one of the options")
        return [answer, OPTION_LETTERS[options.index(answer)]]
    if subtask == "math_calc":
        values = answer[0] if isinstance(answer, list) and answer and isinstance(answer[0], list) else answer
        if not isinstance(values, list) or not values:
            raise ValueError(f"math_calc answer must be a list of values, got {answer!r}")
        return [json.dumps([int(v) for v in values])]
    items = answer if isinstance(answer, list) else [answer]
    if not items:
        raise ValueError("empty answer")
    return [str(item) for item in items]
