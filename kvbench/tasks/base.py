"""What every task yields: samples with a context, a question and references, plus a metric name."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

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
    # Text placed between the parts, e.g. LongBench's own instruction wording; empty by default.
    instruction: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Stable hash of everything that determines the prompt and its scoring (used in result keys)."""
        payload = asdict(self)
        payload.pop("meta")
        text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Task(ABC):
    """A benchmark. Subclasses are registered with `@TASKS.register(name)` and built from `conf/task/<name>.yaml`.

    `samples(tokenizer, max_context)` yields the samples in a deterministic order for the configured seed.
    """

    name: str = ""

    @abstractmethod
    def samples(self, tokenizer: Any, max_context: int) -> Iterator[Sample]: ...

    def figure_kinds(self) -> list[str]:
        """Task-specific figures (besides accuracy_vs_budget) the report should draw."""
        return []


TASKS: Registry[type[Task]] = Registry("task")
