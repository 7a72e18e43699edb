"""What every task yields: samples with a context, a question and references, plus a metric name."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from kvbench.harness.sample import QUESTION_POSITIONS, QuestionPosition, Sample
from kvbench.registry import Registry, build_registered

__all__ = [
    "QUESTION_POSITIONS",
    "QuestionPosition",
    "PlannedSample",
    "Sample",
    "Task",
    "TASKS",
    "register_task",
    "build_task",
    "as_list",
]


@dataclass(frozen=True)
class PlannedSample:
    """A generated sample announced before it is built: `recipe` names everything its content depends on except
    the tokenizer (task fields and the sample's coordinates), so a resumed run can recognise it from its rows and
    skip it without generating its prompt. `build()` generates it."""

    sample_id: str
    recipe: str
    build: Callable[[], Sample]


class Task(ABC):
    """A benchmark: a dataclass whose fields mirror `conf/task/<name>.yaml`, registered with
    `@TASKS.register(name)`.

    `samples(tokenizer, max_context)` yields the samples in a deterministic order for the configured seed;
    `max_context` is the model's maximum sequence length (prompt + generation).
    """

    name: ClassVar[str] = ""
    # The scenario (`kvbench.scenarios`) whose runner runs this task's samples; None: single prompts. A scenario
    # prefills its own pieces, so run options of the single-prompt runner (prefill_chunk) do not apply.
    scenario: ClassVar[str | None] = None

    @abstractmethod
    def samples(self, tokenizer: Any, max_context: int) -> Iterator[Sample]: ...

    def planned_samples(self, tokenizer: Any, max_context: int) -> Iterator[Sample | PlannedSample]:
        """The samples in the same order, lazily: generated tasks yield `PlannedSample`s (built on demand, so a
        resumed run skips done ones unbuilt); the default yields the built samples of `samples()`."""
        return self.samples(tokenizer, max_context)

    def recipe(self, **coordinates: Any) -> str:
        """A `PlannedSample.recipe`: this task's name and fields plus the sample's coordinates, as stable JSON."""
        fields = asdict(self) if hasattr(self, "__dataclass_fields__") else {}
        payload = {"task": self.name, "fields": fields, "sample": coordinates}
        return json.dumps(payload, sort_keys=True, default=str)


TASKS: Registry[type[Task]] = Registry("task")


def register_task(name: str):
    """Class decorator: register a Task dataclass under `name`."""

    def decorator(cls: type[Task]) -> type[Task]:
        cls.name = name
        return TASKS.register(name)(cls)

    return decorator


def build_task(cfg: Any) -> Task:
    """Create a task from its config (`name` + fields); unknown fields fail in one line."""
    return build_registered(TASKS, cfg, "field")


def check_lengths(lengths: Any, max_context: int) -> None:
    """One-line error when a requested length exceeds the model's maximum context."""
    too_long = [length for length in lengths if int(length) > max_context]
    if too_long:
        raise ValueError(
            f"task.lengths contains {too_long[0]} > the model's maximum context {max_context}; "
            f"use lengths <= {max_context}"
        )


def as_list(value: Any) -> list:
    """Config values that may be a scalar or a list (e.g. question_position) as a list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return list(value)
    return [value]


def check_prefill_chunk(scenario: str | None, prefill_chunk: int | None) -> None:
    """Scenario samples (conversation, segments, edit) prefill their own pieces: a chunk size would be ignored."""
    if scenario is not None and prefill_chunk is not None:
        raise ValueError(
            f"prefill_chunk={prefill_chunk} applies to single-prompt tasks; the {scenario} task prefills its own "
            "pieces: drop prefill_chunk"
        )
