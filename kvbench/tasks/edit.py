"""Edited-context task (PIE): a cached text is edited in the middle, then the model answers or continues.

Sources, all local: the shipped IELTS passages (`ielts`) and the repository's own Python files (`python`, the
`kvbench` package unless `python_dir` says otherwise). Every sample takes a text of at most `context_chars`
characters and applies one edit in its middle:

* passages: `insert` adds a sentence with a planted registration number and asks for it; `replace` rewrites
  such a sentence (already in the original) with a new number and asks for the NEW one; `delete` removes the
  middle paragraph and asks for a number planted after it (every later token shifts). Metric string_match_all.
* code: a window of whole lines; the line in the middle is deleted, or another line of the file (re-indented)
  is inserted before it or replaces it. The prompt ends with the cursor line; the model continues with the next
  line (metric `code_sim`, LongBench's fuzzy line match; the modes are compared on their greedy tokens).

Samples run in the `edit` scenario (`kvbench.scenarios.edit`): one row per job and mode (`recompute`, `pie`,
`no_rerotate`). `edit_span: [start, end]` replaces the seeded middle span by explicit character offsets of
every original text (an insertion when start == end); a span outside a text fails in one line.

Fields (mirrored by conf/task/edit.yaml): sources, edits, samples_per_edit, context_chars, python_dir, edit_span,
modes, seed, max_new_tokens.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kvbench.engine.rope import check_shiftable_rope
from kvbench.harness.sample import Sample
from kvbench.registry import AT_LEAST_ONE
from kvbench.scenarios.edit import EDIT_KINDS, MODES, SCENARIO, Edit, check_fits, edit_layout
from kvbench.tasks.base import Task, as_list, register_task
from kvbench.tasks.ielts import DEFAULT_DATA, load_passages

SOURCES: tuple[str, ...] = ("ielts", "python")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
PLACES = ("harbour office", "river museum", "county archive", "seed bank", "old observatory", "ferry terminal")


@dataclass(frozen=True)
class EditItem:
    """One edit sample before tokenisation: original text, the edit, question and references."""

    source_id: str
    original: str
    edit: Edit
    question: str
    answer_prefix: str
    answer: str
    metric: str
    use_chat_template: bool
    separator: str


def _fact(place: str, number: str, renumbered: bool = False) -> str:
    if renumbered:
        return f"After the renumbering, the registration number of the {place} is now {number}."
    return f"The registration number of the {place} is {number}."


def passage_item(passage: Any, kind: str, rng: random.Random, context_chars: int) -> EditItem:
    paragraphs = [f"Paragraph {label}: {text}" for label, text in passage.paragraphs]
    kept = [paragraphs[0]]
    for paragraph in paragraphs[1:]:
        if len("\n\n".join([*kept, paragraph])) > context_chars and len(kept) >= 3:
            break
        kept.append(paragraph)
    place, number = rng.choice(PLACES), str(rng.randrange(1_000_000, 10_000_000))
    middle = len(kept) // 2
    question = f"What is the registration number of the {place}?"
    prefix = f"The registration number of the {place} is"
    if kind == "delete":  # the fact sits after the deleted paragraph: it only moves
        kept.insert(len(kept) - 1, _fact(place, number))
        start = len("\n\n".join(kept[:middle])) + 2
        end = start + len(kept[middle]) + 2
        new = ""
    elif kind == "insert":
        start = end = len("\n\n".join(kept[:middle])) + 2
        new = _fact(place, number) + "\n\n"
    else:  # replace: the original states an old number, the edit a new one
        old = str(rng.randrange(1_000_000, 10_000_000))
        kept.insert(middle, _fact(place, old))
        start = len("\n\n".join(kept[:middle])) + 2
        end = start + len(kept[middle])
        new = _fact(place, number, renumbered=True)
        prefix = f"After the renumbering, the registration number of the {place} is"
    original = f"Reading passage: {passage.title}\n\n" + "\n\n".join(kept)
    offset = len(f"Reading passage: {passage.title}\n\n")
    edit = Edit(start + offset, end + offset, new)
    return EditItem(passage.passage_id, original, edit, question, prefix, number, "string_match_all", True, "\n\n")


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _is_code(line: str) -> bool:
    """A line worth predicting or editing: not blank, not a comment, no backtick (code_sim skips those)."""
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#") and "`" not in line and "#" not in line


def code_item(path: Path, kind: str, rng: random.Random, context_chars: int) -> EditItem | None:
    lines = path.read_text(encoding="utf-8").split("\n")
    for _ in range(20):  # a few seeded windows until one ends with a cursor line and a code line to predict
        first = rng.randrange(0, max(1, len(lines) // 2))
        end, size = first, 0
        while end < len(lines) - 2 and size + len(lines[end]) + 1 <= context_chars:
            size += len(lines[end]) + 1
            end += 1
        window = lines[first:end]
        if len(window) < 12 or not _is_code(lines[end]) or not _is_code(lines[end + 1]):
            continue
        middle = next((i for i in range(len(window) // 2, len(window)) if _is_code(window[i])), None)
        donors = [line for i, line in enumerate(lines) if _is_code(line) and not first <= i <= end + 1]
        if middle is None or not donors:
            continue
        original = "\n".join(window) + "\n"
        start = len("\n".join(window[:middle])) + 1 if middle else 0
        donor = _indent(window[middle]) + rng.choice(donors).strip() + "\n"
        if kind == "insert":
            edit = Edit(start, start, donor)
        elif kind == "delete":
            edit = Edit(start, start + len(window[middle]) + 1, "")
        else:
            edit = Edit(start, start + len(window[middle]) + 1, donor)
        name = str(path.relative_to(path.parents[1])) if len(path.parents) > 1 else path.name
        return EditItem(name, original, edit, lines[end] + "\n", "", lines[end + 1], "code_sim", False, "")
    return None


@register_task("edit")
@dataclass
class EditTask(Task):
    """Edited contexts (PIE). Fields mirror conf/task/edit.yaml; see the module docstring."""

    scenario: ClassVar[str | None] = SCENARIO

    sources: Any = field(default_factory=lambda: list(SOURCES))
    edits: Any = field(default_factory=lambda: list(EDIT_KINDS))
    samples_per_edit: int = field(default=2, metadata=AT_LEAST_ONE)
    context_chars: int = field(default=3000, metadata=AT_LEAST_ONE)
    python_dir: str | None = None
    edit_span: Any = None
    modes: Any = field(default_factory=lambda: list(MODES))
    seed: int = 42
    max_new_tokens: int = field(default=20, metadata=AT_LEAST_ONE)

    def __post_init__(self) -> None:
        for name, values, valid in (
            ("sources", self.sources, SOURCES),
            ("edits", self.edits, EDIT_KINDS),
            ("modes", self.modes, MODES),
        ):
            values = as_list(values)
            bad = [v for v in values if v not in valid] or ([None] if not values else [])
            if bad:
                raise ValueError(f"unknown task.{name} value {bad[0]!r}. Valid {name}: {', '.join(valid)}.")
        span = as_list(self.edit_span)
        if self.edit_span is not None and (len(span) != 2 or not all(isinstance(v, int) for v in span)):
            raise ValueError(f"task.edit_span must be null or [start, end] (character offsets), got {self.edit_span}")

    def check_model(self, lm: Any) -> None:
        """Refuse, before any sample, a model whose RoPE cannot be shifted when pie / no_rerotate is asked for."""
        if any(mode != "recompute" for mode in as_list(self.modes)):
            check_shiftable_rope(lm.model, "task=edit (pie)")

    def python_files(self) -> list[Path]:
        root = Path(self.python_dir).expanduser() if self.python_dir else PACKAGE_DIR
        if not root.is_dir():
            raise FileNotFoundError(f"task.python_dir {root} is not a directory")
        files = sorted(p for p in root.rglob("*.py") if len(p.read_text(encoding="utf-8").split("\n")) >= 80)
        if not files:
            raise ValueError(f"task.python_dir {root} has no Python file of 80 lines or more")
        return files

    def items(self) -> Iterator[tuple[str, EditItem]]:
        for source in as_list(self.sources):
            for kind in as_list(self.edits):
                for index in range(int(self.samples_per_edit)):
                    rng = random.Random(f"edit-{self.seed}-{source}-{kind}-{index}")
                    if source == "ielts":
                        passages = load_passages(DEFAULT_DATA)
                        item = passage_item(rng.choice(passages), kind, rng, int(self.context_chars))
                    else:
                        files = self.python_files()
                        item = None
                        while item is None:
                            item = code_item(rng.choice(files), kind, rng, int(self.context_chars))
                    yield f"edit-{source}-{kind}-{index}", item

    def samples(self, tokenizer: Any, max_context: int) -> Iterator[Sample]:
        for sample_id, item in self.items():
            edit = item.edit
            if self.edit_span is not None:
                start, end = as_list(self.edit_span)
                edit = Edit(int(start), int(end), edit.new)
            edit.check(item.original, f"the text of {sample_id} ({item.source_id})")
            sample = Sample(
                sample_id=sample_id,
                context=edit.apply(item.original),
                question=item.question,
                answer_prefix=item.answer_prefix,
                answers=[item.answer],
                metric=item.metric,
                max_new_tokens=int(self.max_new_tokens),
                use_chat_template=item.use_chat_template,
                separator=item.separator,
                meta={
                    "scenario": SCENARIO,
                    "subtask": "edit",
                    "source": item.source_id,
                    "edit_kind": edit.kind,
                    "original": item.original,
                    "edit": edit.as_meta(),
                    "modes": as_list(self.modes),
                },
            )
            check_fits(edit_layout(tokenizer, sample), max_context, sample.max_new_tokens)
            yield sample
