"""IELTS-style task: shipped data, schema errors, metric, question placement, end to end, figure."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from kvbench.harness.metrics import score
from kvbench.harness.options import RunOptions
from kvbench.harness.prompt import build_prompt
from kvbench.harness.runner import Job, run_sample
from kvbench.methods.base import build_method
from kvbench.report.task_figures import position_figure, task_figures
from kvbench.tasks import build_task
from kvbench.tasks.ielts import (
    DEFAULT_DATA,
    QUESTION_TYPES,
    Ielts,
    IeltsDataError,
    ielts_exact_match,
    load_passages,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def passages():
    return load_passages(DEFAULT_DATA)


@pytest.fixture(scope="module")
def tokenizer(tiny_lm):
    return tiny_lm.tokenizer  # the SmolLM2 tokenizer


def valid_row(passage_id: str = "x1") -> dict:
    return {
        "passage_id": passage_id,
        "title": "Owls",
        "paragraphs": [
            {"label": "A", "text": "Owls hunt at night. Their soft feathers make their flight almost silent."},
            {"label": "B", "text": "Barn owls nest in old buildings and hollow trees."},
        ],
        "questions": [
            {"question_id": "q1", "type": "tfng", "prompt": "Owls hunt at night.", "answer": "TRUE"},
            {
                "question_id": "q2",
                "type": "fill_blank",
                "prompt": "Their soft ____ make flight silent.",
                "answer": "feathers",
            },
            {
                "question_id": "q3",
                "type": "multiple_choice",
                "prompt": "Where do barn owls nest?",
                "options": {"A": "in caves", "B": "in old buildings", "C": "on the ground", "D": "in reeds"},
                "answer": "B",
            },
            {"question_id": "q4", "type": "matching", "prompt": "where barn owls nest", "answer": "B"},
        ],
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- shipped data


def test_shipped_passages_schema_and_lengths(passages, tokenizer):
    assert len(passages) >= 12
    assert len({p.passage_id for p in passages}) == len(passages)
    lengths = []
    for passage in passages:
        text = "\n\n".join(t for _, t in passage.paragraphs)
        tokens = len(tokenizer(passage.render(), add_special_tokens=False)["input_ids"])
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= 600 and tokens <= 3000, passage.passage_id
        lengths.append(tokens)
        counts = {kind: sum(q.type == kind for q in passage.questions) for kind in QUESTION_TYPES}
        assert min(counts.values()) >= 2, (passage.passage_id, counts)
        for q in passage.questions:
            where = f"{passage.passage_id}/{q.question_id}"
            if q.type == "multiple_choice":
                assert list(q.options) == ["A", "B", "C", "D"] and q.answer in q.options, where
            if q.type == "matching":
                assert q.answer in passage.labels and q.evidence == q.answer, where
            if q.type == "tfng":
                assert q.answer in ("TRUE", "FALSE", "NOT GIVEN"), where
                assert (q.evidence is None) == (q.answer == "NOT GIVEN"), where
            if q.type == "fill_blank":
                evidence = dict(passage.paragraphs)[q.evidence]
                for answer in q.answers:
                    assert 1 <= len(answer.split()) <= 2, where
                    assert re.search(rf"\b{re.escape(answer)}\b", evidence), where  # copied verbatim
    # spread across the range: a few short, several medium, a couple long
    assert sum(n < 900 for n in lengths) >= 3
    assert sum(1200 <= n <= 2000 for n in lengths) >= 4
    assert sum(n >= 2500 for n in lengths) >= 2


def test_config_mirrors_the_task_fields():
    cfg = OmegaConf.load(ROOT / "conf" / "task" / "ielts.yaml")
    task = build_task(cfg)
    assert task == Ielts()
    assert set(cfg) - {"name"} == {f for f in Ielts.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------- schema errors


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [valid_row("x1"), '{"passage_id": "x2", "title": '])
    with pytest.raises(IeltsDataError) as err:
        load_passages(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2: malformed JSONL row") and "\n" not in message


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda r: r["questions"][2].update(answer="E"), "not among the options"),
        (lambda r: r["questions"][3].update(answer="C"), "not a paragraph label"),
        (lambda r: r["questions"][0].update(answer="YES"), "tfng answer must be one of"),
        (lambda r: r["questions"][0].update(type="essay"), "unknown type 'essay'"),
        (lambda r: r["questions"][1].update(prompt="no blank here"), "needs a blank"),
        (lambda r: r["questions"][1].update(answer="B"), "reads as a letter"),
        (lambda r: r["paragraphs"][1].update(label="C"), "must have label 'B'"),
        (lambda r: r.pop("title"), "'title' must be a non-empty string"),
    ],
)
def test_bad_row_fails_in_one_line_with_file_and_line(tmp_path, mutate, reason):
    bad = valid_row("x3")
    mutate(bad)
    path = write_jsonl(tmp_path / "rows.jsonl", [valid_row("x1"), "", bad])
    with pytest.raises(IeltsDataError) as err:
        load_passages(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: ") and reason in message and "\n" not in message


def test_duplicate_passage_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [valid_row("x1"), valid_row("x1")])
    with pytest.raises(IeltsDataError, match=r":2: duplicate passage_id 'x1'"):
        load_passages(path)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        list(Ielts(data_path=str(tmp_path / "nowhere.jsonl")).samples(None, 4096))


def test_bad_task_fields_fail_in_one_line():
    with pytest.raises(ValueError, match="unknown question_position 'middle'"):
        Ielts(question_position=["before", "middle"])
    with pytest.raises(ValueError, match="unknown question_type 'essay'"):
        Ielts(question_types="essay")
    with pytest.raises(ValueError, match="limit must be a positive int"):
        Ielts(limit=0)


# ---------------------------------------------------------------------------------------------- metric


@pytest.mark.parametrize(
    "prediction, references, expected",
    [
        (" TRUE", ["TRUE"], 1.0),
        ("False. The passage says the opposite.", ["FALSE"], 1.0),
        ("not given", ["NOT GIVEN"], 1.0),
        ("NOT GIVEN", ["TRUE"], 0.0),
        ("The statement is true.", ["TRUE"], 1.0),
        ("TRUE or FALSE", ["FALSE"], 0.0),  # only the first answer-like word counts
        ("Given the passage", ["NOT GIVEN"], 0.0),
        ("B", ["B"], 1.0),
        ("b) the direction of the food", ["B"], 1.0),
        ("(C)", ["C"], 1.0),
        ("Paragraph C: the keepers", ["C"], 1.0),
        ("C. Because the Moon returns", ["B"], 0.0),
        ("The answer is D.", ["D"], 1.0),
        ("Because the Moon returns", ["C"], 0.0),
        ("Grain.", ["grain"], 1.0),
        ("grain into flour", ["grain"], 1.0),
        ("the vibrations of the comb", ["vibrations"], 1.0),
        ("Sugar-water", ["sugar water"], 1.0),
        ("sugar", ["sugar water"], 0.0),
        ("flour", ["grain"], 0.0),
        ("colour", ["color", "colour"], 1.0),
        ("", ["grain"], 0.0),
    ],
)
def test_exact_match_reads_the_answer_at_the_start(prediction, references, expected):
    assert ielts_exact_match(prediction, references) == expected
    assert score("ielts_exact_match", prediction, references) == expected  # registered in METRICS


def test_metric_needs_references():
    with pytest.raises(ValueError):
        ielts_exact_match("TRUE", [])


# ---------------------------------------------------------------------------------------------- samples


def test_one_sample_per_question_and_position_placed_by_build_prompt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "owls.jsonl", [valid_row("owls")])
    task = Ielts(data_path=str(path), question_position=["before", "after", "both"])
    samples = list(task.samples(tokenizer, 4096))
    assert len(samples) == 4 * 3 and len({s.sample_id for s in samples}) == 12
    assert [s.question_position for s in samples[:3]] == ["before", "after", "both"]
    for sample in samples:
        assert sample.metric == "ielts_exact_match" and sample.answer_prefix == "Answer:"
        assert {"passage_id", "question_id", "question_type", "passage_tokens"} <= set(sample.meta)
        prompt = build_prompt(tokenizer, sample)
        head = tokenizer.decode(prompt.input_ids[: prompt.context_end])
        tail = tokenizer.decode(prompt.input_ids[prompt.context_end :])
        assert head.rstrip().endswith("hollow trees.")  # the context ends the compressed segment
        statement = sample.question.splitlines()[-1]
        if sample.meta["question_type"] == "multiple_choice":
            statement = "Where do barn owls nest?"
        in_head, in_tail = statement in head, statement in tail
        assert (in_head, in_tail) == {"before": (True, False), "after": (False, True), "both": (True, True)}[
            sample.question_position
        ]
        if in_head:
            assert head.index(statement) < head.index("Reading passage: Owls")
    by_type = {s.meta["question_type"]: s for s in samples if s.question_position == "after"}
    assert "Answer TRUE if the statement agrees" in by_type["tfng"].question
    assert "ONE OR TWO WORDS" in by_type["fill_blank"].question
    assert "B. in old buildings" in by_type["multiple_choice"].question
    assert "paragraph of the passage, A-B," in by_type["matching"].question
    assert by_type["matching"].answers == ["B"] and by_type["fill_blank"].answers == ["feathers"]


def test_subsets_are_seeded_and_deterministic(tokenizer):
    first = list(Ielts(limit=3, questions_per_type=1, question_position="after").samples(tokenizer, 8192))
    again = list(Ielts(limit=3, questions_per_type=1, question_position="after").samples(tokenizer, 8192))
    other = list(Ielts(limit=3, questions_per_type=1, question_position="after", seed=7).samples(tokenizer, 8192))
    assert [s.__dict__ for s in first] == [s.__dict__ for s in again]
    assert len(first) == 3 * 4 and len({s.meta["passage_id"] for s in first}) == 3
    assert [s.sample_id for s in first] != [s.sample_id for s in other]
    for passage_id in {s.meta["passage_id"] for s in first}:
        assert sorted(s.meta["question_type"] for s in first if s.meta["passage_id"] == passage_id) == sorted(
            QUESTION_TYPES
        )
    only_tfng = list(Ielts(limit=1, question_types=["tfng"], question_position="before").samples(tokenizer, 8192))
    assert only_tfng and all(s.meta["question_type"] == "tfng" for s in only_tfng)


# ---------------------------------------------------------------------------------------------- end to end


def test_two_samples_end_to_end_full_and_snapkv(tiny_lm):
    task = Ielts(limit=1, questions_per_type=1, question_types=["tfng"], question_position=["before", "after"])
    samples = list(task.samples(tiny_lm.tokenizer, tiny_lm.max_context))
    assert len(samples) == 2
    jobs = [
        Job(build_method({"name": "full"}), None, "full"),
        Job(build_method({"name": "snapkv"}), 64, "snapkv64"),
    ]
    for sample in samples:
        rows = {
            job.key: row
            for job, row in run_sample(tiny_lm, sample, jobs, RunOptions(compress="prompt", seed=0, fail_fast=True))
        }
        assert all(row["status"] == "ok" and 0.0 <= row["score"] <= 1.0 for row in rows.values())
        assert rows["full"]["compressed"] is False
        assert rows["snapkv64"]["compressed"] is True and rows["snapkv64"]["kept_per_layer_compressed"] == [64.0] * 4
        assert rows["full"]["prompt_tokens"] > sample.meta["passage_tokens"] > 600


# ---------------------------------------------------------------------------------------------- figure


def test_position_figure_writes_png_and_pdf(tmp_path):
    rows = []
    for method, budget, drop in (("full", None, 0.0), ("snapkv", 64, 0.5), ("snapkv", 128, 0.25)):
        for position, penalty in (("before", drop), ("after", 0.0), ("both", 0.0)):
            for kind in QUESTION_TYPES:
                for i in range(4):
                    rows.append(
                        {
                            "method": method,
                            "method_label": method,
                            "budget": budget,
                            "compress": "prompt",
                            "question_position": position,
                            "status": "ok",
                            "score": float(i / 4 >= penalty),
                            "sample_id": f"s{kind}{i}-q{position}",
                            "meta.question_type": kind,
                            "meta.num_paragraphs": 8,
                        }
                    )
    rows.append({**rows[0], "status": "error", "score": None})
    paths = position_figure(pd.DataFrame(rows), tmp_path)
    assert [p.name for p in paths] == ["ielts_position.png", "ielts_position.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert task_figures("ielts", pd.DataFrame(columns=["status"]), tmp_path / "empty") == []
