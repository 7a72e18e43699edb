"""LongBench v1 (Bai et al., 2023, "LongBench: A Bilingual, Multitask Benchmark for Long Context
Understanding"; THUDM/LongBench) and LongBench-E.

21 data sets in 6 categories (single-doc QA, multi-doc QA, summarisation, few-shot, synthetic, code).
LongBench-E (`variant: e`) has 13 of them with rows spread evenly over lengths, scored per length bucket
(0-4k, 4-8k, 8k+ words/characters, the `length` field; `meta.length_bucket`).

Protocol (tasks/longbench/protocol.yaml, from THUDM/LongBench): each data set's prompt template, maximum
generation length, metric, first-line rule and chat-template use. The whole filled template is the user
message: the sample's context is the template up to and including the filled `{context}`, its question the
rest with `{input}` filled, no answer prefix and no extra separator, so the prompt text is LongBench's own.
Contexts longer than the model's maximum are truncated in the middle by the prompt builder (LongBench
truncates the whole prompt in the middle; kvbench keeps the instructions and question whole).

Data: local JSONL (`data_dir/<subtask>.jsonl`, `<subtask>_e.jsonl` for LongBench-E; the hub's fields input,
context, answers, all_classes, length, _id) or the hub dataset `hub_id` (its data.zip, cached by
huggingface_hub). Fields: subtasks (all or a list), variant (v1 | e), data_dir, hub_id, limit (rows per
subtask, a seeded subset), seed.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbench.tasks.base import Sample, Task, register_task
from kvbench.tasks.benchmark_data import (
    DataUnavailableError,
    Row,
    choose_subtasks,
    hub_dataset_file,
    load_protocol,
    parse_jsonl,
    read_jsonl,
    seeded_subset,
    split_template,
)
from kvbench.tasks.haystack import TASKS_DIR
from kvbench.tasks.text_metrics import bind_metric

PROTOCOL = load_protocol(TASKS_DIR / "longbench" / "protocol.yaml")
SUBTASKS: tuple[str, ...] = tuple(PROTOCOL)
E_SUBTASKS: tuple[str, ...] = tuple(name for name, spec in PROTOCOL.items() if spec["longbench_e"])
VARIANTS = ("v1", "e")
HUB_ARCHIVE = "data.zip"
REQUIRED_FIELDS = ("input", "context", "answers")


def length_bucket(length: int) -> str:
    """LongBench-E's buckets of the `length` field."""
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


@register_task("longbench")
@dataclass
class LongBench(Task):
    """LongBench v1 / LongBench-E. Fields mirror conf/task/longbench.yaml."""

    subtasks: Any = "all"
    variant: str = "v1"
    data_dir: str | None = None
    hub_id: str | None = "THUDM/LongBench"
    limit: int | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown longbench variant '{self.variant}'. Valid variants: {', '.join(VARIANTS)}.")
        valid = E_SUBTASKS if self.variant == "e" else SUBTASKS
        self.subtasks = choose_subtasks(self.subtasks, valid, f"longbench ({self.variant})")

    def samples(self, tokenizer: Any, max_context: int) -> Iterator[Sample]:
        for subtask in self.subtasks:
            rows = seeded_subset(self.rows(subtask), self.limit, self.seed, f"longbench-{self.variant}-{subtask}")
            for row in rows:
                try:
                    yield self.sample(subtask, row)
                except (KeyError, TypeError, ValueError, IndexError) as err:
                    raise ValueError(f"{row.where()}: bad longbench row ({type(err).__name__}: {err})") from None

    def file_name(self, subtask: str) -> str:
        return f"{subtask}_e.jsonl" if self.variant == "e" else f"{subtask}.jsonl"

    def rows(self, subtask: str) -> list[Row]:
        """The subtask's rows from `data_dir`, else from the hub archive."""
        name = self.file_name(subtask)
        if self.data_dir:
            path = Path(self.data_dir).expanduser() / name
            if not path.is_file():
                hub = f" or unset task.data_dir to download {self.hub_id}" if self.hub_id else ""
                raise DataUnavailableError(f"longbench subtask '{subtask}': {path} not found; put {name} there{hub}")
            return read_jsonl(path, REQUIRED_FIELDS)
        subject = f"longbench subtask '{subtask}'"
        if not self.hub_id:
            raise DataUnavailableError(f"{subject}: no data; pass task.data_dir=<dir with {name}> or set task.hub_id")
        archive = hub_dataset_file(self.hub_id, HUB_ARCHIVE, subject, name)
        return _archive_rows(archive, name)

    def sample(self, subtask: str, row: Row) -> Sample:
        spec = PROTOCOL[subtask]
        data = row.data
        context, question = split_template(spec["prompt"], str(data["context"]), {"input": str(data["input"])})
        answers = data["answers"]
        answers = [str(a) for a in answers] if isinstance(answers, list) else [str(answers)]
        params: dict[str, Any] = {}
        if spec["first_line"]:
            params["first_line"] = True
        if spec["metric"] == "classification":
            classes = data.get("all_classes")
            if not classes:
                raise ValueError(f"{subtask} rows need 'all_classes' (the class names) for classification")
            params["all_classes"] = [str(c) for c in classes]
        meta: dict[str, Any] = {
            "subtask": subtask,
            "variant": self.variant,
            "row": row.line,
            "id": data.get("_id"),
            "language": data.get("language"),
            "length": data.get("length"),
        }
        if self.variant == "e" and isinstance(data.get("length"), int):
            meta["length_bucket"] = length_bucket(data["length"])
        prefix = "longbench-e" if self.variant == "e" else "longbench"
        return Sample(
            sample_id=f"{prefix}/{subtask}/{data.get('_id') or row.line}",
            context=context,
            question=question,
            answer_prefix="",
            answers=answers,
            metric=bind_metric(spec["metric"], **params),
            max_new_tokens=int(spec["max_new_tokens"]),
            question_position="after",
            use_chat_template=bool(spec["chat_template"]),
            meta=meta,
            separator="",
        )


def _archive_rows(archive: Path, name: str) -> list[Row]:
    """Rows of `name` inside the hub's data.zip (stored as data/<name>)."""
    with zipfile.ZipFile(archive) as bundle:
        members = [m for m in bundle.namelist() if m == name or m.endswith("/" + name)]
        if not members:
            raise DataUnavailableError(f"{archive} has no {name}; pass task.data_dir=<dir with {name}>")
        with bundle.open(members[0]) as raw:
            return parse_jsonl(raw, f"{archive}!{members[0]}", REQUIRED_FIELDS)
