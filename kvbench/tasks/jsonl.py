"""Your own prompts: `task=jsonl task.path=<file>`, one sample per JSONL line.

Each line is an object with `context` and `question` (strings), `answers` (a string or a list of strings),
and optionally `answer_prefix` (default ""), `metric` (a registered metric, default `task.metric`), `id`
(default `line<N>`), `max_new_tokens` and `meta` (an object kept in the row). A missing file, a malformed
line, a missing or mistyped field, an unknown field or metric fails in one line naming file:line.

Fields (mirrored by conf/task/jsonl.yaml): path, metric, max_new_tokens, question_position, use_chat_template,
limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbench.harness.jsonl import MalformedRowError, iter_jsonl
from kvbench.harness.metrics import METRICS
from kvbench.tasks.base import QUESTION_POSITIONS, Sample, Task, register_task

REQUIRED = ("context", "question", "answers")
OPTIONAL = ("answer_prefix", "metric", "id", "max_new_tokens", "meta")


class JsonlTaskError(ValueError):
    """A bad task file or line; the message names file:line."""


def parse_row(row: dict[str, Any], defaults: JsonlTask, where: str, number: int) -> Sample:
    unknown = sorted(set(row) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise JsonlTaskError(f"{where}: unknown field '{unknown[0]}'. Valid fields: {', '.join(REQUIRED + OPTIONAL)}.")
    missing = [key for key in REQUIRED if key not in row]
    if missing:
        raise JsonlTaskError(f"{where}: missing field '{missing[0]}' (required: {', '.join(REQUIRED)})")
    for key in ("context", "question", "answer_prefix"):
        if key in row and not isinstance(row[key], str):
            raise JsonlTaskError(f"{where}: field '{key}' must be a string, got {type(row[key]).__name__}")
    if not row["context"].strip() and not row["question"].strip():
        raise JsonlTaskError(f"{where}: fields 'context' and 'question' are both empty: nothing to ask the model")
    answers = [row["answers"]] if isinstance(row["answers"], str) else row["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise JsonlTaskError(f"{where}: field 'answers' must be a string or a non-empty list of strings")
    metric = row.get("metric", defaults.metric)
    if metric not in METRICS:
        raise JsonlTaskError(f"{where}: unknown metric '{metric}'. Valid metrics: {', '.join(METRICS.names())}.")
    max_new = row.get("max_new_tokens", defaults.max_new_tokens)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise JsonlTaskError(f"{where}: field 'max_new_tokens' must be a positive int, got {max_new!r}")
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        raise JsonlTaskError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
    return Sample(
        sample_id=str(row.get("id", f"line{number}")),
        context=row["context"],
        question=row["question"],
        answer_prefix=row.get("answer_prefix", ""),
        answers=answers,
        metric=metric,
        max_new_tokens=max_new,
        question_position=defaults.question_position,
        use_chat_template=defaults.use_chat_template,
        meta=meta,
    )


@register_task("jsonl")
@dataclass
class JsonlTask(Task):
    path: str | None = None
    metric: str = "string_match_all"  # for lines without their own `metric`
    max_new_tokens: int = 32  # for lines without their own `max_new_tokens`
    question_position: str = "after"
    use_chat_template: bool = True
    limit: int | None = None  # first N lines

    def __post_init__(self) -> None:
        if not self.path:
            raise JsonlTaskError("task=jsonl needs task.path=<file.jsonl> (fields: context, question, answers, ...)")
        if self.question_position not in QUESTION_POSITIONS:
            raise JsonlTaskError(
                f"unknown question_position '{self.question_position}'. "
                f"Valid question_positions: {', '.join(QUESTION_POSITIONS)}."
            )
        if self.metric not in METRICS:
            raise JsonlTaskError(f"unknown metric '{self.metric}'. Valid metrics: {', '.join(METRICS.names())}.")
        if Path(self.path).is_dir():
            raise JsonlTaskError(f"task.path '{self.path}' is a directory; name a JSONL file, one prompt per line")
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"task.path '{self.path}' does not exist (a JSONL file, one prompt per line)")

    def samples(self, tokenizer: Any, max_context: int) -> Iterator[Sample]:
        """Every sample is parsed before the first is yielded, so a bad line fails before any model work."""
        path = Path(self.path)
        samples, ids = [], set()
        with path.open("rb") as handle:
            try:
                for number, row in iter_jsonl(handle, str(path)):
                    sample = parse_row(row, self, f"{path}:{number}", number)
                    if sample.sample_id in ids:
                        raise JsonlTaskError(f"{path}:{number}: duplicate id '{sample.sample_id}'")
                    ids.add(sample.sample_id)
                    samples.append(sample)
            except MalformedRowError as err:
                raise JsonlTaskError(str(err)) from None
        if not samples:
            raise JsonlTaskError(f"{path}: no prompts (one JSON object per line)")
        yield from samples[: self.limit] if self.limit is not None else samples
