"""LongBench v1 / LongBench-E: protocol, loaders (fixtures, hub archive), errors, prompts, end to end."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import pytest

from kvbench.harness.options import RunOptions
from kvbench.harness.prompt import build_prompt
from kvbench.harness.runner import Job, run_sample
from kvbench.methods.full import Full
from kvbench.tasks import build_task
from kvbench.tasks import longbench as longbench_module
from kvbench.tasks.benchmark_data import DataUnavailableError
from kvbench.tasks.longbench import E_SUBTASKS, PROTOCOL, SUBTASKS, length_bucket

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tasks" / "fixtures" / "longbench"
RAW_TASKS = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}


def task(**fields):
    return build_task({"name": "longbench", "data_dir": str(FIXTURES), **fields})


def test_protocol() -> None:
    assert len(SUBTASKS) == 21
    assert E_SUBTASKS == (
        "qasper",
        "multifieldqa_en",
        "hotpotqa",
        "2wikimqa",
        "gov_report",
        "multi_news",
        "trec",
        "triviaqa",
        "samsum",
        "passage_count",
        "passage_retrieval_en",
        "lcc",
        "repobench-p",
    )
    assert {name for name, spec in PROTOCOL.items() if not spec["chat_template"]} == RAW_TASKS
    assert {name for name, spec in PROTOCOL.items() if spec["first_line"]} == {"trec", "triviaqa", "samsum", "lsht"}
    lengths = {name: spec["max_new_tokens"] for name, spec in PROTOCOL.items()}
    assert (lengths["narrativeqa"], lengths["hotpotqa"], lengths["gov_report"], lengths["lcc"]) == (128, 32, 512, 64)
    for spec in PROTOCOL.values():
        assert spec["prompt"].count("{context}") == 1


def test_fixtures_load_every_subtask(tiny_lm) -> None:
    samples = list(task().samples(tiny_lm.tokenizer, tiny_lm.max_context))
    assert len(samples) == 42
    by_subtask = {}
    for sample in samples:
        by_subtask.setdefault(sample.meta["subtask"], []).append(sample)
    assert set(by_subtask) == set(SUBTASKS)
    assert all(len(items) == 2 for items in by_subtask.values())
    for sample in samples:
        spec = PROTOCOL[sample.meta["subtask"]]
        assert sample.max_new_tokens == spec["max_new_tokens"]
        assert sample.use_chat_template == spec["chat_template"]
        assert sample.answer_prefix == "" and sample.separator == "" and sample.question_position == "after"
    assert len({s.sample_id for s in samples}) == 42


def test_prompt_text_is_the_benchmark_template(tiny_lm) -> None:
    rows = [json.loads(line) for line in (FIXTURES / "narrativeqa.jsonl").read_text().splitlines()]
    sample = next(iter(task(subtasks=["narrativeqa"]).samples(tiny_lm.tokenizer, tiny_lm.max_context)))
    expected = PROTOCOL["narrativeqa"]["prompt"].format(context=rows[0]["context"], input=rows[0]["input"])
    assert sample.context + sample.question == expected
    assert sample.context.endswith(rows[0]["context"])
    assert sample.question.startswith("\n\nNow, answer the question")
    assert sample.answers == rows[0]["answers"]
    assert sample.metric == "qa_f1"


def test_raw_prompt_has_no_template_or_extra_separator(tiny_lm) -> None:
    rows = [json.loads(line) for line in (FIXTURES / "trec.jsonl").read_text().splitlines()]
    sample = next(iter(task(subtasks="trec").samples(tiny_lm.tokenizer, tiny_lm.max_context)))
    expected = PROTOCOL["trec"]["prompt"].format(context=rows[0]["context"], input=rows[0]["input"])
    prompt = build_prompt(tiny_lm.tokenizer, sample)
    assert tiny_lm.tokenizer.decode(prompt.input_ids, skip_special_tokens=True) == expected
    assert tiny_lm.tokenizer.decode(prompt.input_ids[: prompt.context_end]).endswith(rows[0]["context"])
    assert sample.metric.startswith("classification[all_classes=#") and sample.metric.endswith(",first_line=True]")


def test_chat_prompt_wraps_the_template(tiny_lm) -> None:
    sample = next(iter(task(subtasks=["hotpotqa"]).samples(tiny_lm.tokenizer, tiny_lm.max_context)))
    text = tiny_lm.tokenizer.decode(build_prompt(tiny_lm.tokenizer, sample).input_ids)
    assert "<|im_start|>user\n" + sample.context + sample.question + "<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_metric_binding_per_subtask(tiny_lm) -> None:
    samples = {s.meta["subtask"]: s for s in task().samples(tiny_lm.tokenizer, tiny_lm.max_context)}
    assert samples["triviaqa"].metric == "qa_f1[first_line=True]"
    assert samples["samsum"].metric == "rouge_l[first_line=True]"
    assert samples["lsht"].metric.startswith("classification[all_classes=#")
    assert samples["passage_retrieval_zh"].metric == "retrieval_zh"
    assert samples["repobench-p"].metric == "code_sim"


def test_longbench_e_buckets(tiny_lm) -> None:
    samples = list(task(variant="e").samples(tiny_lm.tokenizer, tiny_lm.max_context))
    assert len(samples) == 26
    assert {s.meta["subtask"] for s in samples} == set(E_SUBTASKS)
    assert {s.meta["length_bucket"] for s in samples} == {"0-4k", "8k+"}
    assert all(s.sample_id.startswith("longbench-e/") for s in samples)
    assert [length_bucket(n) for n in (0, 3999, 4000, 7999, 8000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+"]
    with pytest.raises(ValueError, match="unknown longbench \\(e\\) subtask 'narrativeqa'. Valid subtasks: qasper"):
        task(variant="e", subtasks=["narrativeqa"])


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="unknown longbench variant 'v2'. Valid variants: v1, e"):
        task(variant="v2")
    with pytest.raises(ValueError, match="unknown longbench \\(v1\\) subtask 'narativeqa'"):
        task(subtasks=["narativeqa"])


def test_limit_is_a_seeded_subset(tiny_lm) -> None:
    def ids(**fields):
        return [s.sample_id for s in task(limit=1, **fields).samples(tiny_lm.tokenizer, tiny_lm.max_context)]

    assert len(ids(seed=1)) == 21
    assert ids(seed=1) == ids(seed=1)
    assert ids(seed=1) != ids(seed=2)


def test_malformed_line_names_file_and_line(tmp_path, tiny_lm) -> None:
    lines = (FIXTURES / "narrativeqa.jsonl").read_text().splitlines()
    (tmp_path / "narrativeqa.jsonl").write_text(lines[0] + "\n" + lines[1][:-5] + "\n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'narrativeqa.jsonl'}:2: malformed JSONL"):
        list(task(data_dir=str(tmp_path), subtasks=["narrativeqa"]).samples(tiny_lm.tokenizer, 4096))
    row = json.loads(lines[0])
    del row["answers"]
    (tmp_path / "narrativeqa.jsonl").write_text("\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="narrativeqa.jsonl:2: missing field 'answers'"):
        list(task(data_dir=str(tmp_path), subtasks=["narrativeqa"]).samples(tiny_lm.tokenizer, 4096))


def test_missing_local_file(tmp_path, tiny_lm) -> None:
    with pytest.raises(DataUnavailableError) as err:
        list(task(data_dir=str(tmp_path), subtasks=["qmsum"]).samples(tiny_lm.tokenizer, 4096))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("longbench subtask 'qmsum': ") and "qmsum.jsonl not found" in message


def test_offline_without_data_is_one_clear_line(monkeypatch, tiny_lm) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = {"name": "longbench", "subtasks": ["narrativeqa"], "hub_id": "kvbench-tests/no-such-dataset"}
    with pytest.raises(DataUnavailableError) as err:
        list(build_task(config).samples(tiny_lm.tokenizer, 4096))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("longbench subtask 'narrativeqa': ")
    assert "pass task.data_dir=<dir with narrativeqa.jsonl> or unset HF_HUB_OFFLINE" in message
    with pytest.raises(DataUnavailableError, match="or set task.hub_id"):
        list(build_task({**config, "hub_id": None}).samples(tiny_lm.tokenizer, 4096))


def test_hub_archive_is_read(monkeypatch, tmp_path, tiny_lm) -> None:
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.write(FIXTURES / "musique.jsonl", "data/musique.jsonl")
    monkeypatch.setattr(longbench_module, "hub_dataset_file", lambda hub_id, filename, subject, name: archive)
    config = {"name": "longbench", "subtasks": ["musique", "qasper"]}
    samples = build_task(config | {"subtasks": ["musique"]}).samples(tiny_lm.tokenizer, 4096)
    assert [s.answers for s in samples] == [["Brannock"], ["crown", "the crown"]]
    with pytest.raises(DataUnavailableError, match="has no qasper.jsonl"):
        list(build_task(config).samples(tiny_lm.tokenizer, 4096))


def test_middle_truncation_keeps_instructions_and_question(tiny_lm) -> None:
    sample = next(iter(task(subtasks=["qmsum"]).samples(tiny_lm.tokenizer, tiny_lm.max_context)))
    long = dataclasses.replace(sample, context=sample.context + " Omar: more talk." * 200)
    prompt = build_prompt(tiny_lm.tokenizer, long, 300)
    assert len(prompt) <= 300 and prompt.truncated_tokens > 0
    text = tiny_lm.tokenizer.decode(prompt.input_ids)
    assert "You are given a meeting transcript" in text
    assert sample.question.strip() in text


def test_every_subtask_runs_end_to_end(tiny_lm) -> None:
    # Two samples per subtask through prefill -> full cache -> decode -> metric; generation is cut to 2 tokens
    # to keep the test fast (the protocol lengths are checked above).
    samples = list(task().samples(tiny_lm.tokenizer, tiny_lm.max_context))
    for sample in samples:
        short = dataclasses.replace(sample, max_new_tokens=2)
        [(_, row)] = list(
            run_sample(
                tiny_lm, short, [Job(Full(), None, "full")], RunOptions(compress="context", seed=0, fail_fast=True)
            )
        )
        assert row["status"] == "ok"
        assert 0.0 <= row["score"] <= 1.0
        assert row["truncated_tokens"] == 0 and row["output_tokens"] <= 2
