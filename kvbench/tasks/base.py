"""What every task yields: samples with a context, a question and references, plus a metric name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from kvbench.registry import Registry, build_registered
from kvbench.sample import QUESTION_POSITIONS, QuestionPosition, Sample

__all__ = [
    "QUESTION_POSITIONS",
    "QuestionPosition",
    "Sample",
    "Task",
    "TASKS",
    "register_task",
    "build_task",
    "as_list",
]


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
