"""task=conversation: deterministic dialogues, one growing cache per job, one row per turn (tiny model)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hydra import compose, initialize_config_dir

from kvbench import api
from kvbench.app import run
from kvbench.config import CONF_DIR
from kvbench.engine.cache import PAD_POSITION
from kvbench.engine.measure import Stopwatch
from kvbench.harness.options import RunOptions
from kvbench.harness.prompt import Prompt
from kvbench.harness.results import ResultsStore
from kvbench.harness.runner import run_sample, shared_prefill
from kvbench.report import summarize
from kvbench.report.plots import memory_vs_turn
from kvbench.scenarios import conversation
from kvbench.scenarios.conversation import run_dialogue_job
from kvbench.scenarios.dialogue import Turn, dialogue_pieces

SMALL = {"dialogues": 1, "turns": 5, "facts": 2, "questions": 2, "user_tokens": 16, "reply_tokens": 6}
SMALL_CLI = [
    "task=conversation",
    "task.dialogues=1",
    "task.turns=4",
    "task.facts=1",
    "task.questions=2",
    "task.user_tokens=16",
    "task.reply_tokens=4",
    "task.answer_tokens=4",
]


def dialogue(lm, **fields):
    task = api.load_task("conversation", **{**SMALL, **fields})
    return next(iter(task.samples(lm.tokenizer, lm.max_context)))


def positions(layer) -> list[set[int]]:
    """Per KV head, the original positions a layer holds (padding excluded)."""
    return [{int(p) for p in head if int(p) != PAD_POSITION} for head in layer.positions]


def run_turns(lm, sample, method, budget, policy="over_budget", older=None):
    """Rows and, per turn, the positions every layer holds at its end (and the turns' start positions)."""
    turns = [Turn.from_dict(t) for t in sample.meta["turns"]]
    pieces = dialogue_pieces(lm.tokenizer, turns)
    options = api.RunOptions(budgets=(budget,))
    (job,) = api.plan(lm, sample, [api.build_method(method) if isinstance(method, str) else method], options)
    pre, observers = shared_prefill(lm, pieces.user[0], [job.method], Stopwatch(lm.device))
    held, starts = [], []

    def on_turn_end(index, cache, state):
        held.append([positions(layer) for layer in cache.layers])
        starts[:] = state.starts
        assert cache.seen_tokens == len(state.ids)

    settings = RunOptions(compress="prompt", seed=0, kernels="torch")
    rows = list(
        run_dialogue_job(
            lm, turns, pieces, pre, observers.get(id(job.method)), job, settings, policy, older, on_turn_end
        )
    )
    return rows, held, starts, pieces


def test_dialogues_are_deterministic_and_state_facts_before_asking_about_them(tiny_lm):
    task = api.load_task("conversation", dialogues=2)
    first = list(task.samples(tiny_lm.tokenizer, tiny_lm.max_context))
    again = list(api.load_task("conversation", dialogues=2).samples(tiny_lm.tokenizer, tiny_lm.max_context))
    other = list(api.load_task("conversation", dialogues=2, seed=7).samples(tiny_lm.tokenizer, tiny_lm.max_context))
    assert [s.fingerprint() for s in first] == [s.fingerprint() for s in again]
    assert [s.meta["turns"] for s in first] == [s.meta["turns"] for s in again]
    assert first[0].fingerprint() != first[1].fingerprint() != other[1].fingerprint()
    for sample in first:
        turns = sample.meta["turns"]
        assert len(turns) == 20 and [t["index"] for t in turns] == list(range(1, 21))
        assert [t["kind"] for t in turns[:2]] == ["fact"] * 2 and turns[2]["kind"] != "fact"
        questions = [t for t in turns if t["answers"]]
        assert len(questions) == 8 and turns[-1]["answers"] and all(t["kind"] == "question" for t in questions)
        facts_text = " ".join(t["user"] for t in turns[:2])
        assert all(t["answers"][0] in facts_text for t in questions)  # asked only about stated facts
        lengths = [len(tiny_lm.tokenizer(t["user"], add_special_tokens=False)["input_ids"]) for t in turns]
        assert min(lengths) >= 48  # padded to user_tokens in the model's tokens


def test_full_cache_holds_every_token_of_every_turn(tiny_lm):
    sample = dialogue(tiny_lm)
    rows, held, _, pieces = run_turns(tiny_lm, sample, "full", None)
    assert [r["part"] for r in rows] == [f"turn{i:02d}" for i in range(1, 6)]
    assert [r.get("job_complete", False) for r in rows] == [False] * 4 + [True]
    seen = 0
    for row, layers in zip(rows, held, strict=True):
        seen = row["conversation_tokens"] - 1  # the answer's last token joins the cache at the next turn
        assert all(heads == [set(range(seen))] * len(heads) for heads in layers)
        assert row["kv_bytes"] == row["kv_bytes_full"]
    expected = sum(len(p) for p in pieces.user) + sum(r["output_tokens"] for r in rows) - 1
    expected += sum(len(pieces.appended_end(r["output_ids"][-1])) for r in rows[:-1])
    assert seen == expected


def test_streamingllm_holds_the_sinks_and_the_most_recent_window_after_every_turn(tiny_lm):
    budget, sinks = 40, 4
    config = tiny_lm.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * tiny_lm.dtype.itemsize
    rows, held, _, _ = run_turns(tiny_lm, dialogue(tiny_lm), "streamingllm", budget)
    assert rows[0]["prompt_tokens"] > budget  # turn 1 is compressed before its peak is measured
    for row, layers in zip(rows, held, strict=True):
        seen = row["conversation_tokens"] - 1
        expected = set(range(sinks)) | set(range(seen - (budget - sinks), seen))
        assert all(heads == [expected] * len(heads) for heads in layers)
        assert row["kept_entries"] == budget * len(layers) * len(layers[0])
        # Before a forward of n tokens the cache is cut to budget - n slots (never below the sinks), then the n
        # tokens are appended: a turn peaks at max(budget, sinks + n) slots, n = the message that opens it.
        appended = row["prompt_tokens"] if row["turn"] > 1 else 0
        assert row["kv_bytes_peak"] == max(budget, sinks + appended) * per_token
    assert any(row["kv_bytes_peak"] > row["kv_bytes"] for row in rows)  # a message longer than budget - sinks


def test_h2o_stays_within_budget_and_keeps_its_recent_slots(tiny_lm):
    budget = 32
    rows, held, _, _ = run_turns(tiny_lm, dialogue(tiny_lm), "h2o", budget)
    for row, layers in zip(rows, held, strict=True):
        seen = row["conversation_tokens"] - 1
        recent = set(range(seen - budget // 2, seen))
        assert all(len(head) == budget and recent <= head for heads in layers for head in heads)
    # the peak counts the user message a forward appends before h2o evicts inside it
    assert rows[1]["kv_bytes_peak"] > rows[1]["kv_bytes"]


@pytest.mark.parametrize("older", [1, 2])
def test_compress_older_than_keeps_the_last_k_turns_intact_and_the_older_part_within_budget(tiny_lm, older):
    budget = 24
    rows, held, starts, _ = run_turns(tiny_lm, dialogue(tiny_lm), "snapkv", budget, older=older)
    assert rows[-1]["compressed"] and not rows[0]["compressed"]
    assert all(r["compress_overlapped"] is False for r in rows)  # CPU: compressed before decoding, not overlapped
    for index, (row, layers) in enumerate(zip(rows, held, strict=True)):
        seen = row["conversation_tokens"] - 1
        first_recent = index - older + 1
        boundary = starts[first_recent] if first_recent > 0 else 0
        for heads in layers:
            for head in heads:
                assert set(range(boundary, seen)) <= head  # the last k turns, every token
                assert len({p for p in head if p < boundary}) <= budget
        if boundary > budget:  # the older part really was compressed
            assert any(len({p for p in head if p < boundary}) <= budget for heads in layers for head in heads)
            assert row["kept_entries"] < seen * len(layers) * len(layers[0])


def test_turn_one_generates_what_the_single_prompt_runner_generates(tiny_lm):
    sample = dialogue(tiny_lm)
    turns = [Turn.from_dict(t) for t in sample.meta["turns"]]
    first = dialogue_pieces(tiny_lm.tokenizer, turns).user[0]
    single = dataclasses.replace(sample, meta={}, max_new_tokens=turns[0].max_new_tokens)
    methods = [api.build_method("full"), api.build_method("snapkv", window=8), api.build_method("streamingllm")]
    for method in methods:
        budget = None if method.name == "full" else 24
        rows, *_ = run_turns(tiny_lm, sample, method, budget)
        jobs = api.plan(tiny_lm, single, [method], api.RunOptions(budgets=(budget,)))
        prompt = Prompt(first, len(first), 0)
        ((_, reference),) = list(
            run_sample(tiny_lm, single, jobs, RunOptions(compress="prompt", seed=0, fail_fast=True), prompt=prompt)
        )
        assert rows[0]["output_ids"] == reference["output_ids"]
        assert rows[0]["kv_bytes"] == reference["kv_bytes"]
        assert rows[0]["compressed"] == reference["compressed"] == (budget is not None)


def test_turns_without_a_question_score_null_and_summaries_skip_them(tiny_lm):
    sample = dialogue(tiny_lm)
    rows = api.evaluate(tiny_lm, [sample], ["streamingllm"], budgets=[32], include_full=True)
    assert len(rows) == 2 * 5
    asked = [r for r in rows if r["has_question"]]
    assert [r["score"] is None for r in rows] == [not r["has_question"] for r in rows]
    assert all(r["score"] in (0.0, 1.0) for r in asked)
    summary = summarize(rows)
    for method, group in summary.groupby("method"):
        scores = [r["score"] for r in asked if r["method"] == method]
        assert group["accuracy"].iloc[0] == pytest.approx(sum(scores) / len(scores))


def test_refusals_are_one_line_error_rows(tiny_lm):
    sample = dialogue(tiny_lm, compress_older_than=1)
    rows = api.evaluate(tiny_lm, [sample], ["streamingllm"], budgets=[0.5, 32])
    assert [r["status"] for r in rows] == ["error", "error"]
    assert "int budgets" in rows[0]["error"] and "decode_evict=false" in rows[1]["error"]
    assert all("\n" not in r["error"] and r["job_complete"] for r in rows)


@pytest.mark.parametrize("name", ["dapq", "kvzip"])
def test_methods_that_need_a_fresh_prefill_are_refused_before_any_model_work(tiny_lm, name, monkeypatch):
    def no_prefill(*args, **kwargs):
        raise AssertionError("the refusal must come before the first prefill")

    monkeypatch.setattr(conversation, "shared_prefill", no_prefill)  # the name the scenario calls
    (row,) = api.evaluate(tiny_lm, [dialogue(tiny_lm)], [name], budgets=[32])
    assert row["status"] == "error" and row["turn"] == 1 and "\n" not in row["error"]
    assert f"{name} compresses only a freshly prefilled full prompt cache" in row["error"]


def test_a_conversation_longer_than_the_context_says_at_which_turn(tiny_lm):
    task = api.load_task("conversation", **{**SMALL, "turns": 12, "questions": 4})
    sample = next(iter(task.samples(tiny_lm.tokenizer, 10_000)))
    ends = sample.meta["max_conversation_tokens"]
    limit = 500
    turns = [Turn.from_dict(t) for t in sample.meta["turns"]]
    by_turn = dialogue_pieces(tiny_lm.tokenizer, turns).tokens_by_turn(turns)
    assert by_turn[-1] == ends
    overflow = next(i for i, total in enumerate(by_turn, start=1) if total > limit)
    with pytest.raises(ValueError, match=f"overflows the model's context of {limit} tokens at turn {overflow} ") as err:
        next(iter(task.samples(tiny_lm.tokenizer, limit)))
    assert "\n" not in str(err.value)


def composed(tmp_path, *overrides):
    tiny = ["model=tiny_random", "model.device=cpu", "progress=false", "threads=1"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*tiny, *SMALL_CLI, f"results_dir={tmp_path}", *overrides])


def test_cli_run_resumes_by_job_and_draws_memory_vs_turn(tmp_path):
    result = run(composed(tmp_path, "method=streamingllm", "budget=[16,32]"))
    assert result["rows_run"] == 3 * 4  # full + two budgets, 4 turns each
    assert {p.name for p in result["figures"]} >= {"memory_vs_turn.png", "memory_vs_turn.pdf"}
    store = ResultsStore(result["run_dir"])
    rows = store.rows()
    assert len({r["job_key"] for r in rows}) == 3 and sum(bool(r.get("job_complete")) for r in rows) == 3
    assert run(composed(tmp_path, "method=streamingllm", "budget=[16,32]"))["rows_run"] == 0  # all jobs done
    # A job cut after its second turn is run again whole; the rows already written are not duplicated.
    kept = [r for r in rows if not (r["budget"] == 32 and r["turn"] > 2)]
    store.samples_path.write_text("".join(__import__("json").dumps(r) + "\n" for r in kept))
    assert run(composed(tmp_path, "method=streamingllm", "budget=[16,32]"))["rows_run"] == 4
    assert len(ResultsStore(result["run_dir"]).rows()) == len(rows)


def test_cli_bad_conversation_input_fails_before_any_row(tmp_path):
    with pytest.raises(ValueError, match="at turn"):
        run(composed(tmp_path, "method=full", "task.turns=40", "task.questions=10", "task.user_tokens=200"))
    assert not (tmp_path / "conversation_tiny_random" / "samples.jsonl").exists()


def test_memory_vs_turn_draws_one_line_per_method_and_budget(tmp_path, tiny_lm):
    rows = api.evaluate(tiny_lm, [dialogue(tiny_lm)], ["streamingllm"], budgets=[16, 32], include_full=True)
    paths = memory_vs_turn(api.to_frame(rows), tmp_path)
    assert [p.name for p in paths] == ["memory_vs_turn.png", "memory_vs_turn.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert torch.tensor([r["kv_bytes"] for r in rows if r["budget"] is None]).diff().gt(0).all()  # full grows


def test_a_budget_sweep_prefills_the_first_turn_once_per_dialogue(tiny_lm, monkeypatch):
    calls = []
    original = conversation.shared_prefill

    def counting(lm, token_ids, methods, stopwatch):
        calls.append(len(methods))
        return original(lm, token_ids, methods, stopwatch)

    monkeypatch.setattr(conversation, "shared_prefill", counting)
    rows = api.evaluate(
        tiny_lm, [dialogue(tiny_lm, turns=3, questions=1)], ["h2o"], budgets=[16, 32], include_full=True
    )
    assert len(rows) == 3 * 3 and all(r["status"] == "ok" for r in rows)
    assert calls == [3]  # one prefill of turn 1 for the three jobs


def test_after_turn_policy_compresses_once_the_answer_is_in_the_cache(tiny_lm):
    budget = 24
    rows, held, _, _ = run_turns(tiny_lm, dialogue(tiny_lm), "snapkv", budget, policy="after_turn")
    per_token = rows[0]["kv_bytes_full"] // (rows[0]["conversation_tokens"] - 1)
    for row, layers in zip(rows, held, strict=True):
        seen = row["conversation_tokens"] - 1
        assert row["compressed"] and all(len(head) == budget for heads in layers for head in heads)
        assert set(range(seen - 8, seen)) <= layers[0][0]  # snapkv's window (the answer's last tokens) is kept
        # the user message and the answer were held uncompressed on top of the previous turn's budget
        previous = budget if row["turn"] > 1 else 0
        assert row["kv_bytes_peak"] == (previous + row["prompt_tokens"] + row["output_tokens"] - 1) * per_token
