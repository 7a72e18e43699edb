"""Hostile input gets one line before Hydra or the model does anything: results_dir that is a file or on a read-only
file system, an over-long run_name, a device this machine lacks, a mistyped model field, a thread count no machine
has, characters the override grammar refuses; and input that used to be accepted silently (budget=[], free
`+model.*` keys, negative model seeds, an empty results_dir, prefill_chunk with a scenario task, empty jsonl
prompts, a negative max_new_tokens) is refused, and middle truncation is said once per run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from kvbench import __main__ as cli_main
from kvbench import api
from kvbench.app import run
from kvbench.config import ConfigError, check_command_line
from kvbench.harness.sample import Sample
from kvbench.tasks import ruler
from kvbench.tasks.jsonl import JsonlTaskError
from tests.helpers import SMALL_NIAH, TINY, composed, needle_sample


def main_error(monkeypatch, capsys, tmp_path, *args: str) -> str:
    """`python -m kvbench *args` run in this process: its one stderr line (it must exit 2 before Hydra starts)."""
    monkeypatch.chdir(tmp_path)
    flags = [arg for arg in args if arg.startswith("-")]  # before the overrides, as Hydra's parser wants them
    overrides = [arg for arg in args if not arg.startswith("-")]
    monkeypatch.setattr(sys, "argv", ["kvbench", *flags, *TINY, *SMALL_NIAH, *overrides])
    with pytest.raises(SystemExit) as exited:
        cli_main.main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvbench: error: "), err
    return err.removeprefix("kvbench: error: ").rstrip("\n")


@pytest.mark.parametrize("kind", ["file", "devnull", "below_file"])
def test_results_dir_that_is_not_a_directory(monkeypatch, capsys, tmp_path, kind):
    (tmp_path / "afile").write_text("x")
    path = {"file": tmp_path / "afile", "devnull": "/dev/null", "below_file": tmp_path / "afile" / "sub"}[kind]
    blocker = "/dev/null" if kind == "devnull" else tmp_path / "afile"
    message = main_error(monkeypatch, capsys, tmp_path, f"results_dir={path}")
    assert message == f"results_dir {path} is not a directory ({blocker} is a file); choose another"


@pytest.mark.parametrize(
    "sweep",
    [
        ["budget=64,128"],
        ["budget=range(1,300)"],  # more jobs than check_sweep enumerates
        ["method=glob(snap*)"],  # a glob over a config group
    ],
)
@pytest.mark.parametrize("kind", ["file", "devnull"])
def test_multirun_results_dir_that_is_not_a_directory(monkeypatch, capsys, tmp_path, kind, sweep):
    (tmp_path / "afile").write_text("x")
    path = "/dev/null" if kind == "devnull" else tmp_path / "afile"
    message = main_error(monkeypatch, capsys, tmp_path, "-m", f"results_dir={path}", *sweep)
    assert message == f"results_dir {path} is not a directory ({path} is a file); choose another"


def test_multirun_on_a_read_only_results_dir(monkeypatch, capsys, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    undo = read_only(results)
    try:
        for sweep in (["budget=64,128"], ["budget=range(1,300)"], ["method=glob(snap*)"]):
            message = main_error(monkeypatch, capsys, tmp_path, "-m", f"results_dir={results}", *sweep)
            assert message.startswith(f"cannot write in {results}: "), message
            assert message.endswith("(choose another results_dir)")
    finally:
        undo()
    assert not any(results.iterdir())


def read_only(path):
    """Make `path` unwritable even for root (immutable), or skip."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr: cannot make a read-only directory")
    return lambda: subprocess.run(["chattr", "-i", str(path)])


def test_read_only_results_dir_new_run_and_resume(monkeypatch, capsys, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    undo = read_only(results)
    try:
        message = main_error(monkeypatch, capsys, tmp_path, f"results_dir={results}")
        assert message.startswith(f"cannot write in {results}: ") and message.endswith("(choose another results_dir)")
    finally:
        undo()
    run_dir = run(composed(results))["run_dir"]  # a finished run, then its file system goes read-only
    undo = read_only(run_dir)
    try:
        message = main_error(monkeypatch, capsys, tmp_path, f"results_dir={results}")
        assert message.startswith(f"cannot write in {run_dir}: ")
    finally:
        undo()
    assert not (run_dir / "logs").exists() or len(list((run_dir / "logs").iterdir())) == 1  # no new log directory


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "run_name=" + "a" * 300,
            "run_name is 300 bytes long; a file name holds at most 255: choose a shorter run_name=...",
        ),
        ("model.device=cuda:7", None),  # the message depends on the machine: see the test below
        ("model.device=gpu", "model.device must be auto, cpu, cuda or cuda:<index>, got 'gpu'"),
        ("model.head_dim=abc", "model.head_dim must be an int, got 'abc'"),
        ("model.num_layers=1.5", "model.num_layers must be an int, got 1.5"),
        ("model.seed=-1", "model.seed must be >= 0, got -1"),
        ("threads=100000", f"threads must be <= {os.cpu_count()} (the CPU cores here), got 100000"),
        ("results_dir=", "results_dir is empty; pass a directory, e.g. results_dir=results"),
        ("budget=[]", "budget must list at least one budget (or be null for no compression)"),
        (
            "task.haystack=é",
            "cannot parse 'task.haystack=é': quote a value with characters outside ASCII, e.g. task.haystack='é'",
        ),  # fmt: skip
        ("+model.anything=1", "unknown key 'model.anything' for model tiny_random."),
    ],
)
def test_one_line_before_hydra(monkeypatch, capsys, tmp_path, override, message):
    got = main_error(monkeypatch, capsys, tmp_path, override)
    if message is not None:
        assert got.startswith(message)
    assert not any(tmp_path.iterdir())  # Hydra created nothing


def test_a_cuda_device_this_machine_lacks(monkeypatch, capsys, tmp_path):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    message = main_error(monkeypatch, capsys, tmp_path, f"model.device=cuda:{count + 7}")
    if count == 0:
        assert (
            message
            == f"model.device=cuda:{count + 7} needs CUDA, and torch sees no CUDA device here; use model.device=cpu"
        )
    else:
        assert message.startswith(f"model.device=cuda:{count + 7}, but torch sees {count} CUDA device(s) here: cuda:0")


def test_quoted_non_ascii_values_parse():
    with pytest.raises(ValueError, match="unknown haystack .é."):
        check_command_line([*TINY, "task.haystack='é'"])  # parsed: the value itself is what is refused


def test_plus_model_keys_are_those_of_the_models_kind():
    with pytest.raises(ConfigError, match=r"unknown key 'model.head_dim' for model hf\..* Valid keys under model:"):
        check_command_line(["model=hf", "model.name_or_path=/x", "+model.head_dim=3"])


def test_prefill_chunk_with_a_scenario_task_is_refused_up_front(tmp_path):
    for task in ("conversation", "segments", "edit"):
        with pytest.raises(ValueError, match=f"prefill_chunk=64 applies to single-prompt tasks; the {task}"):
            check_command_line([*TINY, f"task={task}", "prefill_chunk=64", f"results_dir={tmp_path}"])


def test_prefill_chunk_with_a_scenario_sample_is_refused_by_the_api():
    lm = api.load_model("tiny_random", device="cpu")
    sample = next(iter(api.load_task("conversation").samples(lm.tokenizer, lm.max_context)))
    with pytest.raises(ValueError, match="prefill_chunk=64 applies to single-prompt tasks; the conversation"):
        api.evaluate(lm, [sample], "window", budgets=[64], prefill_chunk=64)


def test_api_refuses_an_empty_budget_list_and_a_negative_max_new_tokens():
    with pytest.raises(ValueError, match=r"budgets must list at least one budget \(None: no compression\)"):
        api.evaluate("tiny_random", [needle_sample()], "snapkv", budgets=[])
    with pytest.raises(ValueError, match="Sample max_new_tokens must be an int >= 0, got -1"):
        needle_sample(max_new_tokens=-1)
    with pytest.raises(ValueError, match="unknown question_position 'middle'"):
        Sample("s", "c", "q", "", ["a"], "string_match_all", 4, question_position="middle")


def test_jsonl_rows_with_empty_context_and_question_are_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        json.dumps({"context": "some text", "question": "", "answers": "x"})  # a context alone is a prompt
        + "\n"
        + json.dumps({"context": " ", "question": "", "answers": "x"})
        + "\n"
    )
    task = api.load_task("jsonl", path=str(path))
    with pytest.raises(JsonlTaskError, match=r"rows.jsonl:2: fields 'context' and 'question' are both empty"):
        list(task.samples(None, 4096))


def test_middle_truncation_is_said_once_per_run_with_the_count(caplog):
    lm = api.load_model("tiny_random", device="cpu", max_context=256)
    long = [
        Sample(f"long{i}", "The sky is blue. " * 200, "What colour?", "", ["blue"], "string_match_all", 2)
        for i in range(3)
    ]
    with caplog.at_level(logging.WARNING, logger="kvbench"):
        rows = api.evaluate(lm, long, "window", budgets=[32], include_full=True)
    truncated = [r for r in rows if r["truncated_tokens"]]
    assert len(truncated) == 6  # 3 samples x (window, full)
    messages = [r.getMessage() for r in caplog.records if "middle" in r.getMessage() or "cut from" in r.getMessage()]
    assert len(messages) == 2, messages
    assert messages[0].startswith("sample long0 is longer than the model's context (256 tokens): ")
    assert f"{truncated[0]['truncated_tokens']} context tokens were cut from its middle" in messages[0]
    assert messages[1] == "3 samples were middle-truncated to fit the model's context of 256 tokens"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokens", "0"], "--tokens must be >= 2, got 0"),
        (["--samples", "-1"], "--samples must be >= 1, got -1"),
        (["--text", "{tmp}/missing.txt"], "cannot read --text {tmp}/missing.txt: No such file or directory"),
        (["--text", "{tmp}"], "cannot read --text {tmp}: Is a directory"),
        (["--text", "{tmp}/latin1.txt"], "{tmp}/latin1.txt:2: not UTF-8 text (byte 0xe9 at column 2); re-encode"),
        (["--device", "cuda:99"], "--device=cuda:99"),
        (["--tokens", "5000"], "--tokens 5000 exceeds the context of model tiny_random (4096 tokens)"),
        (["--text", "{tmp}/short.txt", "--tokens", "64"], "prefixkv calibration text has "),
        (["--model", "tiny_randm"], "unknown model 'tiny_randm'. Valid models: "),
    ],
)
def test_calibrate_errors_are_one_line(capsys, monkeypatch, tmp_path, args, message):
    from kvbench import calibrate

    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "latin1.txt").write_bytes("first line\nd\xe9j\xe0 vu\n".encode("latin-1"))
    (tmp_path / "short.txt").write_text("too short")
    argv = ["prefixkv", "--model", "tiny_random", *[a.format(tmp=tmp_path) for a in args]]
    with pytest.raises(SystemExit) as exited:
        calibrate.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvbench.calibrate: error: " + message.format(tmp=tmp_path)), err
    assert not (tmp_path / "cache").exists()  # nothing written


def files_under(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_head_profiles_and_calibrations_of_a_local_model_stay_in_the_cache_dir(monkeypatch, tmp_path):
    """A local model's name is its (absolute) path: it must not steer cache files next to the model."""
    from kvbench.engine.hub import cache_name
    from kvbench.methods.prefixkv import write_calibration

    model_dir = tmp_path / "models" / "My Model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    cache = tmp_path / "cache"
    monkeypatch.setenv("KVBENCH_CACHE", str(cache))
    for name in (str(model_dir), str(model_dir / "config.json")):
        lm = api.load_model("tiny_random", device="cpu", name=name)
        rows = api.evaluate(lm, [needle_sample(2)], "razor", budgets=[32])  # default cache dir
        assert rows[0]["status"] == "ok", rows[0].get("error")
        api.evaluate(lm, [needle_sample(2)], "razor", budgets=[32], cache_dir=tmp_path / "given")
        write_calibration(lm, None, "The sky is blue. " * 100, "test", 1, 32)
    assert files_under(tmp_path / "models") == [model_dir / "config.json"]  # nothing written beside the model
    names = {p.relative_to(cache).parts[0] for p in files_under(cache)}
    assert names == {cache_name(str(model_dir)), cache_name(str(model_dir / "config.json"))}
    assert cache_name(str(model_dir)).startswith("My_Model-") and cache_name("tiny_random") == "tiny_random"
    given = files_under(tmp_path / "given")
    assert len(given) == 2 and all(p.parent == tmp_path / "given" / "razor" for p in given)


def test_ruler_defaults_do_not_reach_for_the_network(monkeypatch, caplog):
    """Without squad_path / hotpotqa_path the qa subtasks are skipped with their notice; no hub lookup happens."""
    import socket

    from kvbench.tasks import ruler_qa

    def no_network(*args, **kwargs):
        raise AssertionError("the RULER defaults reached for the network")

    monkeypatch.setattr(ruler_qa, "read_hub", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    ruler_qa._CACHE.clear()
    task = api.load_task("ruler")
    assert (task.squad_path, task.hotpotqa_path) == (None, None)
    with caplog.at_level(logging.WARNING, logger="kvbench"):
        assert task.load_qa_data() == {}
    notices = [r.getMessage() for r in caplog.records if "RULER: skipping" in r.getMessage()]
    assert notices == [
        "RULER: skipping qa_1, qa_2 (data not available: qa_1: no file or hub id given; qa_2: no file or hub id "
        "given). To run them, pass " + " ".join(ruler.QA_HINTS[name] for name in ("qa_1", "qa_2"))
    ]


def test_a_window_or_sinks_above_the_budget_is_said_once_per_method(caplog):
    samples = [needle_sample(2), needle_sample(3)]
    methods = [api.build_method("snapkv"), api.build_method("streamingllm", n_sink=40)]  # window 32, n_sink 40
    with caplog.at_level(logging.WARNING, logger="kvbench"):
        api.evaluate("tiny_random", samples, methods, budgets=[16, 64], include_full=True)
    said = [r.getMessage() for r in caplog.records if "exceeds the budget" in r.getMessage()]
    assert said == [
        "snapkv: window=32 exceeds the budget of 16 entries per KV head (window counts inside the budget): at that "
        "budget it keeps only part of the window",
        "streamingllm(n_sink=40): n_sink=40 exceeds the budget of 16 entries per KV head (n_sink counts inside the "
        "budget): at that budget it keeps only part of the sinks",
    ]
