"""InfiniteBench: protocol, loaders (fixtures), errors, offline synthetic generators, end to end."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
import uuid
from pathlib import Path

import pytest

from kvbench.harness.options import RunOptions
from kvbench.harness.prompt import build_prompt
from kvbench.harness.runner import Job, run_sample
from kvbench.methods.full import Full
from kvbench.tasks import build_task
from kvbench.tasks.benchmark_data import DataUnavailableError
from kvbench.tasks.infinitebench import PROTOCOL, SUBTASKS, record_builder
from kvbench.tasks.infinitebench_synthetic import NOISE, number_string_key
from kvbench.tasks.sizing import largest_fitting

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tasks" / "fixtures" / "infinitebench"
SYNTHETIC = ("passkey", "number_string", "kv_retrieval")
DATA_TASKS = tuple(name for name in SUBTASKS if name not in SYNTHETIC)


def task(**fields):
    return build_task({"name": "infinitebench", "data_dir": str(FIXTURES), **fields})


def by_id(samples):
    return {s.sample_id: s for s in samples}


def test_protocol() -> None:
    assert len(SUBTASKS) == 12
    assert tuple(n for n, spec in PROTOCOL.items() if spec["synthetic"]) == SYNTHETIC
    lengths = {name: spec["max_new_tokens"] for name, spec in PROTOCOL.items()}
    assert (lengths["passkey"], lengths["kv_retrieval"], lengths["longbook_sum_eng"], lengths["math_calc"]) == (
        6,
        50,
        1200,
        30000,
    )
    for spec in PROTOCOL.values():
        assert spec["prompt"].count("{context}") == 1


def test_fixtures_load_every_data_task(tiny_lm) -> None:
    samples = list(task(subtasks=list(DATA_TASKS)).samples(tiny_lm.tokenizer, tiny_lm.max_context))
    assert len(samples) == 2 * len(DATA_TASKS)
    assert {s.meta["subtask"] for s in samples} == set(DATA_TASKS)
    for sample in samples:
        spec = PROTOCOL[sample.meta["subtask"]]
        assert sample.metric == spec["metric"]
        assert sample.separator == "" and sample.use_chat_template and sample.answer_prefix
    samples = by_id(samples)
    assert samples["infinitebench/longbook_choice_eng/0"].answers == ["Herding the goats", "B"]
    assert samples["infinitebench/longbook_choice_eng/1"].answers == ["Blue fish", "D"]
    assert samples["infinitebench/code_debug/1"].answers == ["Box.grow", "C"]
    assert samples["infinitebench/math_calc/0"].answers == ["[8, 6, 16]"]
    assert samples["infinitebench/math_calc/1"].answers == ["[16, 10]"]
    assert samples["infinitebench/math_find/1"].answers == ["5.5"]
    assert samples["infinitebench/code_run/1"].answers == ["-2"]


def test_raw_prompt_is_the_benchmark_template(tiny_lm) -> None:
    tok = tiny_lm.tokenizer
    samples = by_id(task(subtasks=list(DATA_TASKS), use_chat_template=False).samples(tok, tiny_lm.max_context))
    row = json.loads((FIXTURES / "longbook_choice_eng.jsonl").read_text().splitlines()[0])
    sample = samples["infinitebench/longbook_choice_eng/0"]
    options = {f"OPTION_{letter}": option for letter, option in zip("ABCD", row["options"], strict=True)}
    expected = PROTOCOL["longbook_choice_eng"]["prompt"].format(
        context=row["context"], question=row["input"], **options
    )
    assert sample.context + sample.question == expected and sample.answer_prefix == ""
    assert sample.context.endswith(row["context"])
    assert tok.decode(build_prompt(tok, sample).input_ids, skip_special_tokens=True) == expected
    find = samples["infinitebench/math_find/0"]
    assert find.context.startswith("What is the largest number in the following list?\n\n[12, 7, 41")
    run = samples["infinitebench/code_run/0"]
    assert run.context.startswith("There is a function called func_3 in the following Python code.")
    assert run.question.endswith("Please compute the exact value of func_3(4). The value of func_3(4) is")


def test_chat_prompt_moves_the_answer_lead_in(tiny_lm) -> None:
    tok = tiny_lm.tokenizer
    raw = by_id(task(subtasks=list(DATA_TASKS), use_chat_template=False).samples(tok, tiny_lm.max_context))
    chat = by_id(task(subtasks=list(DATA_TASKS)).samples(tok, tiny_lm.max_context))
    leads = {
        "infinitebench/longbook_choice_eng/0": "The letter of the correct answer is",
        "infinitebench/longbook_qa_chn/0": "答案：",
        "infinitebench/longbook_sum_eng/0": "Summary:",
        "infinitebench/math_find/1": "The median number of the list is:",
        "infinitebench/code_run/0": "The value of func_3(4) is",
        "infinitebench/code_debug/0": "The correct option is:",
    }
    for sample_id, lead in leads.items():
        sample, verbatim = chat[sample_id], raw[sample_id]
        assert sample.answer_prefix == lead
        assert sample.context == verbatim.context
        assert verbatim.question.startswith(sample.question)
        assert verbatim.question.rstrip().endswith(lead) and not sample.question.endswith((" ", "\n"))
        text = tok.decode(build_prompt(tok, sample).input_ids)
        assert text.endswith("<|im_start|>assistant\n" + lead)
    assert chat["infinitebench/longbook_sum_eng/0"].question == ""
    assert chat["infinitebench/math_find/1"].question.endswith("no other words.")


def test_math_calc_generation_is_capped(tiny_lm) -> None:
    sample = next(iter(task(subtasks=["math_calc"]).samples(tiny_lm.tokenizer, 4096)))
    assert sample.max_new_tokens == 2048
    assert sample.meta["max_new_tokens_protocol"] == 30000


def test_malformed_line_names_file_and_line(tmp_path, tiny_lm) -> None:
    lines = (FIXTURES / "longbook_qa_eng.jsonl").read_text().splitlines()
    (tmp_path / "longbook_qa_eng.jsonl").write_text(lines[0] + "\n" + "{not json\n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'longbook_qa_eng.jsonl'}:2: malformed JSONL"):
        list(task(data_dir=str(tmp_path), subtasks=["longbook_qa_eng"]).samples(tiny_lm.tokenizer, 4096))
    row = json.loads((FIXTURES / "code_debug.jsonl").read_text().splitlines()[0])
    row["options"] = row["options"][:3]
    (tmp_path / "code_debug.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="code_debug.jsonl:1: bad infinitebench row .*needs 4 options, got 3"):
        list(task(data_dir=str(tmp_path), subtasks=["code_debug"]).samples(tiny_lm.tokenizer, 4096))


def test_offline_without_data_is_one_clear_line(monkeypatch, tmp_path, tiny_lm) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = {"name": "infinitebench", "subtasks": ["longbook_qa_eng"], "hub_id": "kvbench-tests/no-such-dataset"}
    with pytest.raises(DataUnavailableError) as err:
        list(build_task(config).samples(tiny_lm.tokenizer, 4096))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("infinitebench subtask 'longbook_qa_eng': ")
    assert "pass task.data_dir=<dir with longbook_qa_eng.jsonl> or unset HF_HUB_OFFLINE" in message
    with pytest.raises(DataUnavailableError, match="math_find.jsonl not found"):
        list(task(data_dir=str(tmp_path), subtasks=["math_find"]).samples(tiny_lm.tokenizer, 4096))
    # the synthetic tasks need no data at all
    offline = build_task({**config, "subtasks": ["passkey"], "synthetic_lengths": [300], "synthetic_samples": 1})
    assert len(list(offline.samples(tiny_lm.tokenizer, 4096))) == 1


def synthetic(tiny_lm, **fields):
    config = {"subtasks": list(SYNTHETIC), "synthetic_lengths": [400, 900], "synthetic_samples": 3, **fields}
    return list(task(**config).samples(tiny_lm.tokenizer, tiny_lm.max_context))


def test_synthetic_is_deterministic(tiny_lm) -> None:
    first, again = synthetic(tiny_lm), synthetic(tiny_lm)
    assert len(first) == 3 * 2 * 3
    dump = [json.dumps(dataclasses.asdict(s), sort_keys=True).encode() for s in first]
    assert dump == [json.dumps(dataclasses.asdict(s), sort_keys=True).encode() for s in again]
    other = synthetic(tiny_lm, seed=7)
    assert [s.answers for s in first] != [s.answers for s in other]


def test_synthetic_fills_the_target_length(tiny_lm) -> None:
    tok = tiny_lm.tokenizer
    t = task(subtasks=list(SYNTHETIC), synthetic_lengths=[400, 900], synthetic_samples=3)
    for sample in t.samples(tok, tiny_lm.max_context):
        length, units, index = sample.meta["length"], sample.meta["units"], sample.meta["index"]
        used = len(build_prompt(tok, sample)) + sample.max_new_tokens
        assert used == sample.meta["prompt_tokens"] + sample.max_new_tokens <= length
        # one more noise line / pair would not fit: the context is as long as the length allows
        subtask = sample.meta["subtask"]
        depth = 100 * index / 2
        rng = random.Random(f"infinitebench-{subtask}-{t.seed}-{length}-{index}")
        build = record_builder(subtask, rng, depth)
        make = functools.partial(t._synthetic_sample, subtask, build, tok, length, index, tiny_lm.max_context)
        rebuilt = make(units)
        assert (rebuilt.context, rebuilt.question, rebuilt.answers) == (sample.context, sample.question, sample.answers)
        assert len(build_prompt(tok, make(units + 1))) + sample.max_new_tokens > length
        assert used > length - (60 if subtask == "kv_retrieval" else 30)


def test_passkey_and_number_string_records(tiny_lm) -> None:
    samples = synthetic(tiny_lm, subtasks=["passkey", "number_string"], synthetic_lengths=[600])
    for sample in samples:
        key = sample.answers[0]
        body = sample.context.split("\n\n", 1)[1]
        if sample.meta["subtask"] == "passkey":
            assert re.fullmatch(r"\d{5}", key)
            needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
            assert (sample.question, sample.answer_prefix) == ("\n\nWhat is the pass key?", "The pass key is")
        else:
            assert re.fullmatch(r"\d{10}", key)
            needle = f"The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n"
            assert sample.question == "\n\nWhat is the sequence of digits?"
            assert sample.answer_prefix == "The sequence of digits is"
        before, after = body.split(needle)
        assert set(before.splitlines(keepends=True)) <= {NOISE} and set(after.splitlines(keepends=True)) <= {NOISE}
        lines = sample.meta["units"]
        assert before.count(NOISE) == round(lines * sample.meta["index"] / 2)
        assert before.count(NOISE) + after.count(NOISE) == lines
    depths = [s.meta["depth"] for s in samples if s.meta["subtask"] == "passkey"]
    assert depths[0] == 0 and depths[-1] == 100


def test_number_string_key_repeats_digits() -> None:
    # 5 random digits, then 5 times one digit doubled in place: at most 5 distinct runs, 10 digits.
    for seed in range(20):
        key = number_string_key(random.Random(seed))
        assert len(key) == 10 and len(re.findall(r"(\d)\1*", key)) <= 5


def test_kv_retrieval_records(tiny_lm) -> None:
    samples = synthetic(tiny_lm, subtasks=["kv_retrieval"], synthetic_lengths=[900])
    for sample in samples:
        body = sample.context.split("\n\n", 1)[1]
        assert body.startswith("JSON data:\n")
        pairs = json.loads(body.removeprefix("JSON data:\n"))
        assert len(pairs) == sample.meta["units"]
        key = re.search(r'Key: "([0-9a-f-]+)"', sample.question).group(1)
        assert pairs[key] == sample.answers[0]
        assert all(uuid.UUID(k).version == 4 and uuid.UUID(v).version == 4 for k, v in pairs.items())
        assert sample.question.endswith(f'\nKey: "{key}"')
        assert sample.answer_prefix == "The value associated with the specified key is:"
        assert list(pairs).index(key) == min(len(pairs) - 1, int(len(pairs) * sample.meta["index"] / 2))


def test_largest_fitting() -> None:
    for limit in (1, 2, 7, 100, 1000):
        for guess in (1, 3, 50, 5000):
            assert largest_fitting(lambda n, limit=limit: n <= limit, guess) == limit
    with pytest.raises(ValueError):
        largest_fitting(lambda n: False, 10)


def test_synthetic_length_errors(tiny_lm) -> None:
    with pytest.raises(ValueError, match="synthetic_lengths contains 5000 > the model's maximum context 4096"):
        list(task(subtasks=["passkey"], synthetic_lengths=[5000]).samples(tiny_lm.tokenizer, 4096))
    with pytest.raises(ValueError, match="length 60 is too short"):
        list(task(subtasks=["kv_retrieval"], synthetic_lengths=[60]).samples(tiny_lm.tokenizer, 4096))
    with pytest.raises(ValueError, match="unknown infinitebench subtask 'pass_key'"):
        task(subtasks=["pass_key"])


def test_every_task_runs_end_to_end(tiny_lm) -> None:
    # Two samples per task through prefill -> full cache -> decode -> metric; generation is cut to 2 tokens
    # to keep the test fast (the protocol lengths are checked above).
    t = task(synthetic_lengths=[512], synthetic_samples=2)
    samples = list(t.samples(tiny_lm.tokenizer, tiny_lm.max_context))
    assert len(samples) == 24 and {s.meta["subtask"] for s in samples} == set(SUBTASKS)
    for sample in samples:
        short = dataclasses.replace(sample, max_new_tokens=min(2, sample.max_new_tokens))
        [(_, row)] = list(
            run_sample(
                tiny_lm, short, [Job(Full(), None, "full")], RunOptions(compress="prompt", seed=0, fail_fast=True)
            )
        )
        assert row["status"] == "ok"
        assert 0.0 <= row["score"] <= 1.0
        assert row["truncated_tokens"] == 0
