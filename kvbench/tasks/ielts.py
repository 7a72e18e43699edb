"""IELTS-style reading comprehension with the question before, after or on both sides of the passage.

Why: query-aware eviction (SnapKV, PyramidKV, ...) scores the prompt with its last queries. With the
question AFTER the passage that observation window holds the question; with the question BEFORE it, the
window holds only the end of the passage and the chat template, so the evidence the question needs may be
evicted. Attention-sink methods keep the start of the prompt and the recent tail whatever the position.

Data: `tasks/ielts/passages.jsonl`, passages written for this project (schema in `tasks/ielts/README.md`);
any JSONL file in the same schema can be passed as `data_path`. Each passage has paragraphs labelled A, B,
C... and questions of four types: True/False/Not Given (`tfng`), fill in the blank with one or two words
from the passage (`fill_blank`), multiple choice A-D (`multiple_choice`) and matching a statement to the
paragraph that contains it (`matching`). Every (question, position) is one sample; the metric is
`ielts_exact_match` (see `extract_answer`).

Fields (mirrored by conf/task/ielts.yaml): data_path, question_position (before | after | both, or a list),
question_types, limit (passages, a seeded random subset in file order), questions_per_type (per passage, a
seeded random subset in file order), seed, max_new_tokens, use_chat_template.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbench.harness.jsonl import MalformedRowError, iter_jsonl
from kvbench.harness.metrics import METRICS
from kvbench.registry import AT_LEAST_ONE
from kvbench.tasks.base import QUESTION_POSITIONS, Sample, Task, as_list, register_task
from kvbench.tasks.haystack import TASKS_DIR

DEFAULT_DATA = TASKS_DIR / "ielts" / "passages.jsonl"
QUESTION_TYPES: tuple[str, ...] = ("tfng", "fill_blank", "multiple_choice", "matching")
TFNG_ANSWERS: tuple[str, ...] = ("TRUE", "FALSE", "NOT GIVEN")
MCQ_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
METRIC = "ielts_exact_match"
ANSWER_PREFIX = "Answer:"
BLANK = re.compile(r"_{3,}")
LABEL = re.compile(r"[A-Z]")

INSTRUCTIONS = {
    "tfng": (
        "Does the following statement agree with the information in the passage? Answer TRUE if the statement "
        "agrees with the information, FALSE if the statement contradicts the information, or NOT GIVEN if there "
        "is no information on this.\nStatement: {prompt}"
    ),
    "fill_blank": (
        "Complete the sentence below with ONE OR TWO WORDS taken from the passage. Write only the missing "
        "words.\nSentence: {prompt}"
    ),
    "multiple_choice": "Choose the correct letter, A, B, C or D, according to the passage.\nQuestion: {prompt}\n"
    "{options}\nAnswer with the letter only.",
    "matching": (
        "Which paragraph of the passage, {first}-{last}, contains the following information? Answer with the "
        "paragraph letter only.\nInformation: {prompt}"
    ),
}


class IeltsDataError(ValueError):
    """A malformed passages file; the message is one line naming the file and line number."""


@dataclass(frozen=True)
class Question:
    question_id: str
    type: str
    prompt: str
    answer: str
    options: dict[str, str] | None = None
    alternatives: tuple[str, ...] = ()
    evidence: str | None = None  # label of the paragraph that supports the answer (None for NOT GIVEN)

    @property
    def answers(self) -> list[str]:
        return [self.answer, *self.alternatives]


@dataclass(frozen=True)
class Passage:
    passage_id: str
    title: str
    paragraphs: tuple[tuple[str, str], ...]  # (label, text)
    questions: tuple[Question, ...]
    topic: str | None = None

    @property
    def labels(self) -> list[str]:
        return [label for label, _ in self.paragraphs]

    def render(self) -> str:
        """The context shown to the model: the title, then each paragraph after its label."""
        body = "\n\n".join(f"Paragraph {label}: {text}" for label, text in self.paragraphs)
        return f"Reading passage: {self.title}\n\n{body}"


# ---------------------------------------------------------------------------------------------- loading


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}'{key}' must be a non-empty string, got {value!r}")
    return value


def _parse_question(row: Any, labels: list[str], seen: set[str]) -> Question:
    if not isinstance(row, dict):
        raise ValueError(f"every question must be an object, got {type(row).__name__}")
    qid = _text(row, "question_id", "question ")
    where = f"question '{qid}': "
    if qid in seen:
        raise ValueError(f"{where}duplicate question_id")
    seen.add(qid)
    kind = row.get("type")
    if kind not in QUESTION_TYPES:
        raise ValueError(f"{where}unknown type {kind!r}. Valid types: {', '.join(QUESTION_TYPES)}.")
    prompt = _text(row, "prompt", where)
    answer = _text(row, "answer", where).strip()
    options = row.get("options")
    alternatives = row.get("alternatives", [])
    evidence = row.get("evidence")
    if evidence is not None and evidence not in labels:
        raise ValueError(f"{where}evidence {evidence!r} is not a paragraph label ({', '.join(labels)})")
    if kind != "fill_blank" and alternatives:
        raise ValueError(f"{where}'alternatives' is only allowed for fill_blank questions")
    if kind == "tfng" and answer not in TFNG_ANSWERS:
        raise ValueError(f"{where}tfng answer must be one of {', '.join(TFNG_ANSWERS)}, got {answer!r}")
    if kind == "multiple_choice":
        if not isinstance(options, dict) or not set(options) <= set(MCQ_LETTERS) or len(options) < 2:
            raise ValueError(f"{where}multiple_choice needs 'options': an object with keys among A, B, C, D")
        if not all(isinstance(v, str) and v.strip() for v in options.values()):
            raise ValueError(f"{where}every option must be a non-empty string")
        if answer not in options:
            raise ValueError(f"{where}answer {answer!r} is not among the options ({', '.join(sorted(options))})")
    elif options is not None:
        raise ValueError(f"{where}'options' is only allowed for multiple_choice questions")
    if kind == "matching" and answer not in labels:
        raise ValueError(f"{where}matching answer {answer!r} is not a paragraph label ({', '.join(labels)})")
    if kind == "fill_blank":
        if not BLANK.search(prompt):
            raise ValueError(f"{where}fill_blank prompt needs a blank written as ___ (three or more underscores)")
        if not isinstance(alternatives, list) or not all(isinstance(a, str) and a.strip() for a in alternatives):
            raise ValueError(f"{where}'alternatives' must be a list of non-empty strings")
        for candidate in [answer, *alternatives]:
            if reference_kind(candidate) != "words":
                # The metric infers the answer type from the reference, so such answers would be misread.
                raise ValueError(f"{where}fill_blank answer {candidate!r} reads as a letter or TRUE/FALSE/NOT GIVEN")
    return Question(
        question_id=qid,
        type=kind,
        prompt=prompt.strip(),
        answer=answer,
        options={k: options[k].strip() for k in sorted(options)} if kind == "multiple_choice" else None,
        alternatives=tuple(a.strip() for a in alternatives),
        evidence=evidence,
    )


def parse_passage(row: Any) -> Passage:
    """Validate one JSONL object; raises ValueError with a one-line reason."""
    if not isinstance(row, dict):
        raise ValueError(f"each line must be a JSON object, got {type(row).__name__}")
    passage_id = _text(row, "passage_id", "")
    title = _text(row, "title", "")
    paragraphs = row.get("paragraphs")
    if not isinstance(paragraphs, list) or not paragraphs:
        raise ValueError("'paragraphs' must be a non-empty list of {label, text}")
    labels: list[str] = []
    parsed: list[tuple[str, str]] = []
    for index, paragraph in enumerate(paragraphs):
        expected = chr(ord("A") + index)
        if not isinstance(paragraph, dict) or paragraph.get("label") != expected:
            got = paragraph.get("label") if isinstance(paragraph, dict) else paragraph
            raise ValueError(f"paragraph {index + 1} must have label '{expected}' (labels run A, B, C...), got {got!r}")
        parsed.append((expected, _text(paragraph, "text", f"paragraph {expected}: ").strip()))
        labels.append(expected)
    if len(labels) > 26:
        raise ValueError("at most 26 paragraphs (labels A-Z)")
    questions = row.get("questions")
    if not isinstance(questions, list) or not questions:
        raise ValueError("'questions' must be a non-empty list")
    seen: set[str] = set()
    parsed_questions = tuple(_parse_question(q, labels, seen) for q in questions)
    topic = row.get("topic")
    return Passage(passage_id, title.strip(), tuple(parsed), parsed_questions, topic)


def load_passages(path: str | Path) -> list[Passage]:
    """Read and validate a passages JSONL file; a bad line fails with `<file>:<line>: <reason>`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IELTS passages file not found: {path}")
    passages: list[Passage] = []
    ids: set[str] = set()
    with path.open("rb") as handle:
        try:
            rows = list(iter_jsonl(handle, str(path)))
        except MalformedRowError as err:
            raise IeltsDataError(str(err)) from None
    for number, row in rows:
        try:
            passage = parse_passage(row)
        except ValueError as err:
            raise IeltsDataError(f"{path}:{number}: {err}") from None
        if passage.passage_id in ids:
            raise IeltsDataError(f"{path}:{number}: duplicate passage_id '{passage.passage_id}'")
        ids.add(passage.passage_id)
        passages.append(passage)
    if not passages:
        raise IeltsDataError(f"{path}: no passages")
    return passages


def resolve_data_path(data_path: str | None) -> Path:
    """The shipped set when null; a relative path is tried from the working directory, then the repo root."""
    if not data_path:
        return DEFAULT_DATA
    path = Path(data_path).expanduser()
    if not path.is_absolute() and not path.exists() and (TASKS_DIR.parent / path).exists():
        return TASKS_DIR.parent / path
    return path


# ---------------------------------------------------------------------------------------------- samples


def question_text(question: Question, passage: Passage) -> str:
    """The question with its per-type instruction, as placed before/after the passage."""
    template = INSTRUCTIONS[question.type]
    if question.type == "multiple_choice":
        options = "\n".join(f"{letter}. {text}" for letter, text in (question.options or {}).items())
        return template.format(prompt=question.prompt, options=options)
    if question.type == "matching":
        return template.format(prompt=question.prompt, first=passage.labels[0], last=passage.labels[-1])
    return template.format(prompt=question.prompt)


def _seeded_subset(items: Sequence[Any], count: int | None, seed: str) -> list[Any]:
    """`count` items drawn with a seeded RNG, kept in their original order (all of them when count is None)."""
    if count is None or count >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), count))
    return [items[i] for i in chosen]


@register_task("ielts")
@dataclass
class Ielts(Task):
    """IELTS-style reading comprehension (question-position test). Fields mirror conf/task/ielts.yaml.

    data_path: JSONL in the schema of tasks/ielts/README.md (null: the shipped set); question_position:
    before | after | both or a list (one sample per question and position); question_types: subset of tfng,
    fill_blank, multiple_choice, matching; limit: max passages (seeded subset); questions_per_type: max
    questions of each type per passage (seeded subset); max_new_tokens: answers are one or two words.
    """

    data_path: str | None = None
    question_position: Any = field(default_factory=lambda: list(QUESTION_POSITIONS))
    question_types: Any = field(default_factory=lambda: list(QUESTION_TYPES))
    limit: int | None = None
    questions_per_type: int | None = None
    seed: int = 42
    max_new_tokens: int = field(default=12, metadata=AT_LEAST_ONE)
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        for position in as_list(self.question_position):
            if position not in QUESTION_POSITIONS:
                raise ValueError(
                    f"unknown question_position '{position}'. Valid question_positions: "
                    f"{', '.join(QUESTION_POSITIONS)}."
                )
        for kind in as_list(self.question_types):
            if kind not in QUESTION_TYPES:
                raise ValueError(f"unknown question_type '{kind}'. Valid question_types: {', '.join(QUESTION_TYPES)}.")
        if not as_list(self.question_position) or not as_list(self.question_types):
            raise ValueError("ielts question_position and question_types must not be empty")
        for name in ("limit", "questions_per_type"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ielts {name} must be a positive int or null, got {value!r}")
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"ielts max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def passages(self) -> list[Passage]:
        passages = load_passages(resolve_data_path(self.data_path))
        return _seeded_subset(passages, self.limit, f"ielts-{self.seed}-passages")

    def samples(self, tokenizer: Any, max_context: int) -> Iterator[Sample]:
        types = as_list(self.question_types)
        positions = as_list(self.question_position)
        for passage in self.passages():
            context = passage.render()
            passage_tokens = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            for question in self._questions(passage, types):
                for position in positions:
                    yield self._sample(passage, question, context, passage_tokens, position)

    def _questions(self, passage: Passage, types: list[str]) -> list[Question]:
        selected: set[str] = set()
        for kind in types:
            of_kind = [q for q in passage.questions if q.type == kind]
            seed = f"ielts-{self.seed}-{passage.passage_id}-{kind}"
            selected.update(q.question_id for q in _seeded_subset(of_kind, self.questions_per_type, seed))
        return [q for q in passage.questions if q.question_id in selected]

    def _sample(self, passage: Passage, question: Question, context: str, passage_tokens: int, position: str) -> Sample:
        evidence_depth = None
        if question.evidence is not None:
            marker = f"Paragraph {question.evidence}: "
            evidence_depth = round(context.index(marker) / len(context), 3)
        return Sample(
            sample_id=f"ielts-{passage.passage_id}-{question.question_id}-q{position}",
            context=context,
            question=question_text(question, passage),
            answer_prefix=ANSWER_PREFIX,
            answers=question.answers,
            metric=METRIC,
            max_new_tokens=int(self.max_new_tokens),
            question_position=position,
            use_chat_template=self.use_chat_template,
            meta={
                "subtask": question.type,
                "passage_id": passage.passage_id,
                "question_id": question.question_id,
                "question_type": question.type,
                "passage_tokens": passage_tokens,
                "num_paragraphs": len(passage.paragraphs),
                "evidence_paragraph": question.evidence,
                "evidence_depth": evidence_depth,
            },
        )


# ---------------------------------------------------------------------------------------------- metric

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = re.compile(r"[^\w\s]|_")
LEADING_LETTER = re.compile(r"^\W*([A-Za-z])(?![A-Za-z0-9])")
CAPITAL_LETTER = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")


def normalize(text: str) -> str:
    """Lower case, punctuation -> spaces, drop the articles a/an/the, collapse whitespace."""
    text = PUNCTUATION.sub(" ", text.lower())
    return " ".join(ARTICLES.sub(" ", text).split())


def reference_kind(reference: str) -> str:
    """How a reference is read: `tfng` (TRUE/FALSE/NOT GIVEN), `letter` (one letter: MCQ or matching) or
    `words` (fill in the blank)."""
    if normalize(reference) in ("true", "false", "not given"):
        return "tfng"
    if re.fullmatch(r"\s*[A-Za-z]\s*", reference):
        return "letter"
    return "words" if normalize(reference) else "empty"


def extract_answer(prediction: str, kind: str, num_words: int = 1) -> str | None:
    """The answer at the start of a prediction (the model may add words after it).

    tfng: the first of `true`, `false`, `not given` among the normalised words; letter: a lone letter at the
    very start (any case, e.g. "b)", "(C)"), else the first standalone capital letter ("Paragraph C" -> C);
    words: the first `num_words` normalised words.
    """
    if kind == "tfng":
        words = normalize(prediction).split()
        for index, word in enumerate(words):
            if word == "not" and index + 1 < len(words) and words[index + 1] == "given":
                return "not given"
            if word in ("true", "false"):
                return word
        return None
    if kind == "letter":
        match = LEADING_LETTER.match(prediction) or CAPITAL_LETTER.search(prediction)
        return match.group(1).upper() if match else None
    words = normalize(prediction).split()
    return " ".join(words[:num_words]) if words else None


@METRICS.register(METRIC)
def ielts_exact_match(prediction: str, references: Sequence[str]) -> float:
    """1 if the answer extracted from the start of the prediction equals a reference after normalisation.

    The question type is read from the reference (see `reference_kind`): TRUE/FALSE/NOT GIVEN compare the
    first such word(s); a one-letter reference compares the first standalone letter; any other reference of
    k words compares the first k normalised words of the prediction. Best over references.
    """
    if not references:
        raise ValueError(f"{METRIC} needs at least one reference")
    best = 0.0
    for reference in references:
        kind = reference_kind(reference)
        if kind == "empty":
            continue
        expected = reference.strip().upper() if kind == "letter" else normalize(reference)
        got = extract_answer(prediction, kind, len(expected.split()))
        best = max(best, float(got == expected))
    return best


# ---------------------------------------------------------------------------------------------- figure

CHANCE = {"tfng": 1 / len(TFNG_ANSWERS), "multiple_choice": 1 / len(MCQ_LETTERS)}  # chance level per type
