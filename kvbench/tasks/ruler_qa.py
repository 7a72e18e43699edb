"""Question-answering data of RULER's qa_1 (SQuAD v2 dev) and qa_2 (HotpotQA dev, distractor setting).

A source is a local file or a hub id:

* SQuAD: the official `dev-v2.0.json`, or JSONL rows with the hub fields (`title`, `context`, `question`,
  `answers: {text: [...]}`); hub id e.g. `rajpurkar/squad_v2` (split `validation`).
* HotpotQA: the official `hotpot_dev_distractor_v1.json` (a list of `{question, answer, context: [[title,
  [sentences]]], supporting_facts}`), or JSONL rows in that form or the hub's (`context: {title, sentences}`);
  hub id e.g. `hotpotqa/hotpot_qa` (config `distractor`, split `validation`).

As in RULER, unanswerable SQuAD questions are dropped, a SQuAD question's gold document is its paragraph and
its preferred distractors the other paragraphs of the same article; a HotpotQA question brings its ten
paragraphs (two supporting, eight distractors) and a HotpotQA document is "title\\nsentences".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kvbench.harness.jsonl import decode_utf8, read_jsonl
from kvbench.tasks.ruler_generators import QAData, QAItem

T = TypeVar("T")
DATASETS = ("squad", "hotpotqa")
HUB_SPLIT = "validation"
HUB_CONFIGS = {"squad": None, "hotpotqa": "distractor"}
_QUIET_LOGGERS = ("huggingface_hub", "datasets", "fsspec", "urllib3")


class QADataUnavailable(RuntimeError):
    """The data set could not be found (missing file, or a hub id that cannot be reached)."""


_CACHE: dict[tuple[str, str], QAData | QADataUnavailable] = {}


def load_qa(dataset: str, source: str | None) -> QAData:
    """Load (once per process) `dataset` from `source`; raises QADataUnavailable when it is not there."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown QA dataset '{dataset}'. Valid datasets: {', '.join(DATASETS)}.")
    if not source:
        raise QADataUnavailable("no file or hub id given")
    key = (dataset, str(source))
    if key not in _CACHE:
        try:
            _CACHE[key] = build(dataset, read_rows(dataset, str(source)), str(source))
        except QADataUnavailable as err:
            _CACHE[key] = err
    cached = _CACHE[key]
    if isinstance(cached, QADataUnavailable):
        raise cached
    return cached


def looks_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.endswith((".json", ".jsonl")) or source[:1] in "/.~"


def read_rows(dataset: str, source: str) -> list[dict[str, Any]]:
    if looks_local(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise QADataUnavailable(f"file not found: {path}")
        return list(read_file(dataset, path))
    return read_hub(dataset, source)


def read_file(dataset: str, path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".jsonl":
        yield from read_jsonl(path)
        return
    try:
        data = json.loads(decode_utf8(path.read_bytes(), str(path)))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if dataset == "squad":
        if not isinstance(data, dict) or "data" not in data:
            raise ValueError(f"{path}: not a SQuAD file (expected an object with 'data')")
        yield from squad_official_rows(data)
    else:
        if not isinstance(data, list):
            raise ValueError(f"{path}: not a HotpotQA file (expected a list of questions)")
        yield from data


def squad_official_rows(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Flatten the official SQuAD layout into hub-style rows."""
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                texts = [] if qa.get("is_impossible") else [a["text"] for a in qa.get("answers", [])]
                yield {
                    "title": article.get("title", ""),
                    "context": paragraph["context"],
                    "question": qa["question"],
                    "answers": {"text": texts},
                }


def read_hub(dataset: str, source: str) -> list[dict[str, Any]]:
    """Rows of a hub data set through `datasets` (respects HF_HUB_OFFLINE); its retry chatter is silenced so an
    unreachable hub gives one notice line, not a page of warnings."""
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    try:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        import datasets

        loaded = datasets.load_dataset(source, HUB_CONFIGS[dataset], split=HUB_SPLIT)
        return [dict(row) for row in loaded]
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise QADataUnavailable(f"cannot load hub data set '{source}' ({reason})") from None
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def answer_texts(answers: Any) -> list[str]:
    if isinstance(answers, dict):
        answers = answers.get("text", [])
    if isinstance(answers, str):
        return [answers]
    return [a["text"] if isinstance(a, dict) else str(a) for a in answers or []]


def dedupe(values: Iterable[T]) -> list[T]:
    return list(dict.fromkeys(values))


def hotpot_paragraphs(context: Any) -> list[tuple[str, list[str]]]:
    """(title, sentences) pairs from either the official list layout or the hub's dict of columns."""
    if isinstance(context, dict):
        return list(zip(context["title"], context["sentences"], strict=True))
    return [(title, sentences) for title, sentences in context]


def hotpot_supporting_titles(facts: Any) -> set[str]:
    if isinstance(facts, dict):
        return set(facts.get("title", []))
    return {fact[0] for fact in facts or []}


def build(dataset: str, rows: list[dict[str, Any]], source: str) -> QAData:
    try:
        return build_squad(rows, source) if dataset == "squad" else build_hotpotqa(rows, source)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{source}: malformed {dataset} rows ({type(err).__name__}: {err})") from None


def build_squad(rows: list[dict[str, Any]], source: str) -> QAData:
    docs = sorted({row["context"] for row in rows})
    index = {doc: i for i, doc in enumerate(docs)}
    articles: dict[str, list[int]] = {}
    for row in rows:
        paragraphs = articles.setdefault(row.get("title", ""), [])
        if index[row["context"]] not in paragraphs:
            paragraphs.append(index[row["context"]])
    items = []
    for row in rows:
        answers = dedupe(answer_texts(row["answers"]))
        if not answers:  # RULER keeps only answerable questions
            continue
        gold = index[row["context"]]
        related = [d for d in articles[row.get("title", "")] if d != gold]
        items.append(QAItem(query=row["question"], answers=answers, gold=[gold], related=related, supporting=[gold]))
    return QAData(name=f"squad ({source})", items=items, docs=docs)


def build_hotpotqa(rows: list[dict[str, Any]], source: str) -> QAData:
    def doc_text(title: str, sentences: list[str]) -> str:
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({doc_text(t, s) for row in rows for t, s in hotpot_paragraphs(row["context"])})
    index = {doc: i for i, doc in enumerate(docs)}
    items = []
    for row in rows:
        paragraphs = hotpot_paragraphs(row["context"])
        gold = dedupe(index[doc_text(t, s)] for t, s in paragraphs)
        titles = hotpot_supporting_titles(row.get("supporting_facts"))
        supporting = dedupe(index[doc_text(t, s)] for t, s in paragraphs if t in titles)
        answers = answer_texts(row["answer"])
        if answers:
            items.append(QAItem(query=row["question"], answers=answers, gold=gold, supporting=supporting))
    return QAData(name=f"hotpotqa ({source})", items=items, docs=docs)
