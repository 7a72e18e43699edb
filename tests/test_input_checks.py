"""Bad input is refused up front, in one line naming what is wrong, before the run writes anything:

- settings every row would be refused for (a conversation with a kept fraction, kvzip in a conversation,
  compress_older_than with decode eviction, segments with compress=context, an even snapkv kernel, prefixkv
  without its calibration, a tiny model without layers or with KV heads that do not divide the query heads) fail
  before any forward instead of as error rows of a run that exits 0;
- a refused run leaves no config.yaml / manifest.json behind, so the corrected command may use its run name;
- fail_fast=true keeps input errors one line (it is for sample errors);
- messages blame the value that was set (kivi group_size, gear streaming_gap, model.max_context, a directory as
  task.path);
- a run whose every method row fails exits non-zero."""

from __future__ import annotations

import sys

import pytest

from kvbench import __main__ as entry
from kvbench import app
from kvbench.app import run
from kvbench.config import check_command_line
from kvbench.methods.snapkv import SnapKV
from tests.helpers import SMALL_NIAH, TINY, cli, composed

CONVERSATION = ["task=conversation", "task.dialogues=1", "task.turns=4", "task.facts=1", "task.questions=1"]


@pytest.fixture
def no_forward(monkeypatch, tiny_lm):
    """Fails the test if a run gets as far as a forward of the tiny model (the instance the runs reuse)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a forward ran before the input was refused")

    monkeypatch.setattr(tiny_lm.model, "forward", refuse)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [*CONVERSATION, "budget=0.5"],
            r"^task=conversation takes int budgets .* got 0.5$",
        ),
        (
            [*CONVERSATION, "method=kvzip", "budget=64"],
            r"^kvzip compresses only a freshly prefilled full prompt cache; task=conversation re-compresses",
        ),
        (
            [*CONVERSATION, "method=streamingllm", "budget=64", "task.compress_older_than=2"],
            r"^compress_older_than=2 keeps the last 2 turns intact, but streamingllm evicts while decoding; "
            r"set method.decode_evict=false$",
        ),
        (
            ["task=segments", "task.num_samples=1", "compress=context", "budget=32"],
            r"^task=segments compresses the assembled cache after the question: compress='context' is not supported",
        ),
        (
            [*CONVERSATION, "task.turns=40", "task.questions=2", "task.user_tokens=200", "budget=64"],
            r"overflows the model's context of 4096 tokens at turn \d+",
        ),
        (["task.lengths=[10]", "task.depths=[50]"], r"^niah length 10 is too short for the prompt template"),
        (["method=prefixkv", *SMALL_NIAH], r"^prefixkv has no calibration for model 'tiny_random'"),
    ],
)
def test_settings_every_row_would_refuse_fail_before_any_forward_and_write(
    tmp_path, monkeypatch, no_forward, overrides, message
):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(composed(results, *overrides, task=[]))
    assert not results.exists() or not any(results.rglob("*.yaml")) and not any(results.rglob("*.json*"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["method.kernel=4"],
            "kernel must be odd (pooling keeps the token count), got 4. Valid kernels: 1, 3, 5, 7, ... (or pool=none)",
        ),
        (["model=tiny_random", "model.num_layers=0"], "model.num_layers must be >= 1, got 0"),
        (
            ["model=tiny_random", "model.num_kv_heads=3"],
            "model.num_kv_heads 3 does not divide model.num_heads 4 (each KV head serves a whole group of query "
            "heads). Valid num_kv_heads: 1, 2, 4.",
        ),
        (
            ["method=kivi", "method.group_size=7"],
            "group_size 7 does not divide residual_length 128 (the fp tail is quantised in whole groups of slots). "
            "Valid group sizes: 1, 2, 4, 8, 16, 32, 64, 128.",
        ),
        (
            ["method=kivi", "method.residual_length=100"],
            "residual_length 100 is not a positive multiple of group_size 32. Valid residual_lengths: 32, 64, 96, ...",
        ),
        (
            ["method=gear", "method.streaming_gap=65"],
            "streaming_gap 65 is not a positive multiple of group_size 64. Valid streaming_gaps: 64, 128, 192, ...",
        ),
        (["model.max_context=-1"], "model.max_context must be >= 1, got -1"),
        (["task=jsonl", "task.path=/"], "task.path '/' is a directory; name a JSONL file, one prompt per line"),
    ],
)
def test_messages_name_the_value_that_was_set(overrides, message):
    with pytest.raises(ValueError) as caught:
        check_command_line(overrides)
    assert str(caught.value) == message


def test_the_hint_of_a_group_size_error_leads_to_a_run(tmp_path):
    """kivi group_size=7's valid values work: 8 on the tiny model (head dim 16)."""
    result = run(composed(tmp_path, "method=kivi", "method.group_size=8", "max_samples=1"))
    assert result["summary"]["errors"].sum() == 0


def test_a_refused_run_leaves_its_run_name_free(tmp_path):
    with pytest.raises(ValueError, match="niah length 10 is too short"):
        run(composed(tmp_path, "task.lengths=[10]", "run_name=mine", task=["task.depths=[50]", "budget=[16]"]))
    assert not (tmp_path / "mine").exists()
    result = run(composed(tmp_path, "run_name=mine"))  # the corrected command
    assert result["summary"]["errors"].sum() == 0


def test_fail_fast_keeps_input_errors_one_line(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"context": "a", "question": "b", "answers": ["c"]}\n{not json\n')
    for args in (
        ["task.lengths=[10]", "task.depths=[50]"],
        ["task=jsonl", f"task.path={jsonl}"],
    ):
        result = cli(tmp_path, *TINY, "fail_fast=true", *args, f"results_dir={tmp_path / 'results'}")
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith("kvbench: error: ")
    assert not (tmp_path / "results").exists()


def test_a_run_whose_every_method_row_fails_exits_non_zero(tmp_path, monkeypatch, capsys):
    def broken(self, *args, **kwargs):
        raise RuntimeError("scores unavailable")

    monkeypatch.setattr(SnapKV, "layer_scores", broken)
    args = [*TINY, *SMALL_NIAH, f"results_dir={tmp_path}", "hydra.run.dir=" + str(tmp_path / "logs")]
    monkeypatch.setattr(sys, "argv", ["kvbench", *args])
    with pytest.raises(SystemExit) as exited:
        entry.main()
    assert exited.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("kvbench: error: every snapkv row failed (first: RuntimeError: scores unavailable)")
    rows = app.ResultsStore(tmp_path / "niah_tiny_random").rows()
    assert sorted((row["method"], row["status"]) for row in rows) == [("full", "ok"), ("snapkv", "error")]
