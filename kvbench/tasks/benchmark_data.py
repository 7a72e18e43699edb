"""Data plumbing shared by the benchmarks that ship their data as JSONL (LongBench, InfiniteBench).

* `read_jsonl` / `parse_jsonl`: rows with their line numbers; a malformed line fails naming file and line.
* `hub_dataset_file`: one file of a Hugging Face dataset repository through `huggingface_hub` (cached; with
  HF_HUB_OFFLINE set only the local cache is used). Failures become one-line `DataUnavailableError`s that
  say how to get the data.
* `split_template`: a benchmark prompt template cut after its filled `{context}` into kvbench's context part
  (what compress=context compresses) and question part.
* `seeded_subset`: `limit` rows drawn deterministically from the seed, kept in file order.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvbench.engine.hub import hub_offline, local_files_only, why_no_hub
from kvbench.harness.jsonl import iter_jsonl

CONTEXT_FIELD = "{context}"


class DataUnavailableError(FileNotFoundError):
    """A data set is neither in the given directory nor obtainable from the hub; the message is one line."""


@dataclass(frozen=True)
class Row:
    """One JSONL record and where it came from (for error messages)."""

    source: str
    line: int
    data: dict[str, Any]

    def where(self) -> str:
        return f"{self.source}:{self.line}"


def parse_jsonl(lines: Iterable[str | bytes], source: str, required: Sequence[str] = ()) -> list[Row]:
    """Rows of JSONL text (blank lines skipped); a bad line or a missing field fails with `source:line`."""
    rows = []
    for number, data in iter_jsonl(lines, source):
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{source}:{number}: missing field '{missing[0]}' (needs {', '.join(required)})")
        rows.append(Row(source, number, data))
    return rows


def read_jsonl(path: Path, required: Sequence[str] = ()) -> list[Row]:
    with open(path, "rb") as handle:  # bytes: a line that is not UTF-8 is reported with its file and line
        rows = parse_jsonl(handle, str(path), required)
    if not rows:
        raise ValueError(f"{path} holds no rows (empty data file)")
    return rows


def hub_dataset_file(hub_id: str, filename: str, subject: str, local_name: str) -> Path:
    """Local path of `filename` in dataset repo `hub_id`, downloaded (and cached) unless HF_HUB_OFFLINE is set.

    Failing that, a one-line error starting with `subject` (e.g. "longbench subtask 'narrativeqa'") says how
    to get the data: a local directory holding `local_name`, or a download.
    """
    from huggingface_hub import hf_hub_download

    offline = local_files_only()  # an unreachable hub fails at once instead of retrying for a minute
    try:
        return Path(hf_hub_download(hub_id, filename, repo_type="dataset", local_files_only=offline))
    except Exception as err:
        local = f"pass task.data_dir=<dir with {local_name}>"
        if hub_offline():
            message = f"no local data and HF_HUB_OFFLINE is set; {local} or unset HF_HUB_OFFLINE to download {hub_id}"
        elif offline:
            message = f"no local copy of {hub_id} and {why_no_hub()}; {local}"
        else:
            message = f"cannot download {filename} from {hub_id} ({_one_line(err)}); {local}"
        raise DataUnavailableError(f"{subject}: {message}") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def split_template(template: str, context: str, fields: Mapping[str, Any]) -> tuple[str, str]:
    """(instructions + filled context, the rest of the template filled): their concatenation is exactly
    `template.format(context=context, **fields)`."""
    if template.count(CONTEXT_FIELD) != 1:
        raise ValueError(f"prompt template must contain {CONTEXT_FIELD} exactly once: {template[:80]!r}")
    head, tail = template.split(CONTEXT_FIELD)
    return head.format(**fields) + context, tail.format(**fields)


def seeded_subset(rows: Sequence[Any], limit: int | None, seed: int, salt: str) -> list[Any]:
    """All rows, or `limit` of them drawn with a seeded RNG (salted per subtask), in their original order."""
    if limit is None or limit >= len(rows):
        return list(rows)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    picked = sorted(random.Random(f"{salt}-{seed}").sample(range(len(rows)), limit))
    return [rows[i] for i in picked]


def load_protocol(path: Path) -> dict[str, dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def choose_subtasks(value: Any, valid: Sequence[str], task: str, default: Sequence[str] | None = None) -> list[str]:
    """`all`/None -> `default` (or every valid name); a name or a list -> checked against `valid`."""
    if value is None or value == "all":
        return list(default if default is not None else valid)
    names = [value] if isinstance(value, str) else list(value)
    for name in names:
        if name not in valid:
            raise ValueError(f"unknown {task} subtask '{name}'. Valid subtasks: {', '.join(valid)}.")
    if not names:
        raise ValueError(f"{task}: subtasks is empty. Valid subtasks: {', '.join(valid)}.")
    return names
