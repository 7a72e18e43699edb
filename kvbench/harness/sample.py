"""One evaluation item, independent of any task (the prompt builder and the runner use it)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

QuestionPosition = Literal["before", "after", "both"]
QUESTION_POSITIONS: tuple[str, ...] = ("before", "after", "both")
DEFAULT_SEPARATOR = "\n\n"


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
    # Joins question and context (and, without a chat template, the prompt and the answer prefix). Benchmarks
    # whose protocol fixes the exact prompt text (LongBench, InfiniteBench) carry their own joins and use "".
    separator: str = DEFAULT_SEPARATOR

    def __post_init__(self) -> None:
        # A Sample built through the Python API reaches no other check before the model runs.
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"Sample max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if self.question_position not in QUESTION_POSITIONS:
            valid = ", ".join(QUESTION_POSITIONS)
            raise ValueError(
                f"unknown question_position '{self.question_position}'. Valid question_positions: {valid}."
            )

    def fingerprint(self) -> str:
        """Stable hash of everything that determines the prompt and its scoring (used in result keys)."""
        payload = dataclasses.asdict(self)
        payload.pop("meta")
        if payload["separator"] == DEFAULT_SEPARATOR:
            del payload["separator"]  # keeps the keys of samples written before the field existed
        text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
