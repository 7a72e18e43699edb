"""What every task yields: samples with a context, a question and references, plus a metric name."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from kvbench.registry import Registry

QuestionPosition = Literal["before", "after", "both"]
QUESTION_POSITIONS: tuple[str, ...] = ("before", "after", "both")


@dataclass
class Sample:
    """One evaluation item. `context` is what compress=context compresses; `question` may go before/after it."""

    sample_id: str
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    metric: str
    max_new_tokens: int
    question_position: QuestionPosition = "after"
    use_chat_template: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Stable hash of everything that determines the prompt and its scoring (used in result keys)."""
        payload = asdict(self)
        payload.pop("meta")
        text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Task(ABC):
    """A benchmark: a dataclass whose fields mirror `conf/task/<name>.yaml`, registered with
    `@TASKS.register(name)`.

    `samples(tokenizer, max_context)` yields the samples in a deterministic order for the configured seed;
    `max_context` is the model's maximum sequence length (prompt + generation).
    """

    name: ClassVar[str] = ""

    @abstractmethod
    def samples(self, tokenizer: Any, max_context: int) -> Iterator[Sample]: ...

    def figures(self, rows: Any, out_dir: Path) -> list[Path]:
        """Draw task-specific figures (PNG + PDF) from the run's rows; returns the files written.

        `rows` is a pandas DataFrame with one row per sample x method x budget: columns `method`,
        `method_label`, `budget`, `compress`, `question_position`, `score`, `status`, ... and the sample's
        meta flattened as `meta.<key>`.
        """
        return []


TASKS: Registry[type[Task]] = Registry("task")


def register_task(name: str):
    """Class decorator: register a Task dataclass under `name`."""

    def decorator(cls: type[Task]) -> type[Task]:
        cls.name = name
        return TASKS.register(name)(cls)

    return decorator


def build_task(cfg: Any) -> Task:
    """Create a task from its config (`name` + fields); unknown fields fail in one line."""
    params = dict(cfg)
    name = params.pop("name", None)
    cls = TASKS.get(name)
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ValueError(f"unknown field '{unknown[0]}' for task {name}. Valid fields: {', '.join(sorted(valid))}.")
    return cls(**params)


def as_list(value: Any) -> list:
    """Config values that may be a scalar or a list (e.g. question_position) as a list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return list(value)
    return [value]
