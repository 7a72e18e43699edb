"""Bad input fails in one line naming what is wrong, before any directory is written: type and range checks of every
field, unknown keys with the closest valid one, models and hub data that cannot be reached, unreadable or empty data
files, run names outside results_dir, and the command line's exit status and stderr."""

from __future__ import annotations

import time

import pytest

from kvbench.app import run
from kvbench.config import ConfigError, check_command_line, check_values
from kvbench.engine import hub
from kvbench.engine.models import load_model
from kvbench.methods import build_method
from kvbench.registry import FieldValueError
from kvbench.tasks.benchmark_data import DataUnavailableError, hub_dataset_file
from kvbench.tasks.benchmark_data import read_jsonl as read_benchmark_jsonl
from kvbench.tasks.ruler_qa import read_file
from tests.helpers import SMALL_NIAH, TINY, cli, composed


def test_run_name_outside_results_dir_is_refused(tmp_path):
    results = tmp_path / "results"
    for name in ("../../x", "/tmp/elsewhere", "..", ""):
        with pytest.raises(ConfigError, match="must name a directory inside results_dir"):
            check_values(composed(results, f"run_name={name}"))
    assert not (tmp_path / "x").exists() and not results.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("max_samples=1.5", "max_samples must be an int or null, got 1.5"),
        ("seed=abc", "seed must be an int, got 'abc'"),
        ("threads=abc", "threads must be an int or null, got 'abc'"),
        ("max_samples=abc", "max_samples must be an int or null, got 'abc'"),
        ("task.lengths=[abc]", r"task.lengths must be a list of ints, got \['abc'\]"),
        ("threads=-1", "threads must be >= 1, got -1"),
        ("include_full=maybe", "include_full must be true/false, got 'maybe'"),
        ("method.window=abc", "method.window must be an int, got 'abc'"),
        ("method=random method.window=-3", "method.window must be >= 0, got -3"),
        ("method=h2o method.decode_evict=3", "method.decode_evict must be true/false, got 3"),
        ("method=h2o method.recent_ratio=abc", "method.recent_ratio must be a number, got 'abc'"),
        ("task.depths=[-5]", "task.depths must be >= 0"),
    ],
)
def test_every_field_is_type_and_range_checked_naming_the_key(tmp_path, override, message):
    with pytest.raises(FieldValueError, match=message):
        check_values(composed(tmp_path, *override.split()))


def test_integral_floats_are_ints_and_fractions_are_refused():
    method = build_method({"name": "snapkv", "window": 16.0})
    assert method.window == 16 and isinstance(method.window, int)
    with pytest.raises(FieldValueError, match="method.window must be an int, got 1.5"):
        build_method({"name": "snapkv", "window": 1.5})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["buget=64"], "unknown key 'buget'. Did you mean 'budget'?"),
        (["method.windw=8"], "unknown key 'method.windw' for method snapkv. Did you mean 'method.window'?"),
        (["+buget=8"], "unknown key 'buget'. Did you mean 'budget'?"),
        (["+method.windw=8"], "unknown key 'method.windw' for method snapkv. Did you mean 'method.window'?"),
        (["task=ruler", "task.lenghts=[4096]"], "Did you mean 'task.lengths'?"),
        (["model.name_or_pth=x"], "unknown key 'model.name_or_pth' for model smollm2_135m. Did you mean 'model.name'?"),
        (["+seed=3"], "'\\+seed' adds a key that exists already"),
    ],
)
def test_unknown_keys_fail_in_one_line_with_the_closest_valid_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_command_line(overrides)


def test_valid_additions_and_sweeps_pass_the_key_check():
    check_command_line(["method=adakv", "+method.base_params.window=16", "model=tiny_random"])
    check_command_line(["method=snapkv,pyramidkv", "budget=16,32", "method.window=8"], multirun=True)
    # method.n_sink exists for streamingllm only: the snapkv jobs could not be composed (Hydra would fail them)
    with pytest.raises(ConfigError, match=r"^sweep job method=snapkv budget=16: Could not override 'method.n_sink'"):
        check_command_line(["method=snapkv,streamingllm", "budget=16,32", "method.n_sink=2"], multirun=True)


def test_model_hf_without_a_path_or_with_a_missing_one_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"model.name_or_path needs a local model directory.*model.name_or_path="):
        check_command_line(["model=hf"])
    cfg = composed(tmp_path, "model=hf", "model.name_or_path=/nonexistent/model").model
    with pytest.raises(FileNotFoundError, match="'/nonexistent/model' does not exist; pass a local model directory"):
        load_model(cfg)


def test_hub_model_without_network_fails_fast_with_how_to_pass_a_local_path(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    cfg = composed(tmp_path, "model=hf", "model.name_or_path=some-org/some-model-kvbench-test").model
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*model.name_or_path=/path/to"):
        load_model(cfg)
    assert time.perf_counter() - start < 20  # no download retries (they took about a minute)


def test_hub_dataset_without_network_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataUnavailableError, match="hub cannot be reached; pass task.data_dir="):
        hub_dataset_file("org/kvbench-missing", "data.zip", "longbench", "narrativeqa.jsonl")


def test_non_utf8_data_names_file_and_line(tmp_path):
    path = tmp_path / "passages.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"passages.jsonl:2: not UTF-8 text \(byte 0xe9 at column 11\)"):
        run(composed(tmp_path, "task=ielts", f"task.data_path={path}", task=[]))
    with pytest.raises(ValueError, match=r"passages.jsonl:2: not UTF-8 text"):
        read_benchmark_jsonl(path)
    squad = tmp_path / "squad.json"
    squad.write_bytes(b'{"data": [\n"\xff"]}')
    with pytest.raises(ValueError, match=r"squad.json:2: not UTF-8 text"):
        list(read_file("squad", squad))


def test_empty_data_file_and_negative_counts_are_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no passages"):
        run(composed(tmp_path, "task=ielts", f"task.data_path={empty}", task=[]))
    with pytest.raises(ValueError, match="empty.jsonl holds no rows"):
        read_benchmark_jsonl(empty)
    with pytest.raises(FieldValueError, match="task.samples_per_cell must be >= 1, got -1"):
        check_values(composed(tmp_path, "task.samples_per_cell=-1"))
    with pytest.raises(FieldValueError, match="task.max_new_tokens must be >= 1, got -1"):
        check_values(composed(tmp_path, "task.max_new_tokens=-1"))
    assert not (tmp_path / "ielts_tiny_random").exists()


@pytest.mark.parametrize(
    "bad",
    [
        ["buget=64"],  # before Hydra
        ["max_samples=1.5"],  # before Hydra (value check)
        ["run_name=../../x"],
        ["task.lengths=[9000]"],  # after the model loads: Hydra's logs/<timestamp>/ exists by then
    ],
)
def test_cli_bad_input_exits_in_one_line_and_leaves_no_directory(tmp_path, bad):
    results = tmp_path / "results"
    finished = cli(tmp_path, *TINY, *SMALL_NIAH, f"results_dir={results}", *bad)
    assert finished.returncode == 2
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvbench: error:"), finished.stderr[-2000:]
    assert "Traceback" not in finished.stderr
    assert not results.exists()
    assert not (tmp_path.parent / "x").exists()


def test_cli_failed_rerun_keeps_the_runs_earlier_logs_and_files(tmp_path):
    results = tmp_path / "results"
    ok = cli(tmp_path, *TINY, *SMALL_NIAH, f"results_dir={results}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    run_dir = results / "niah_tiny_random"
    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    files = sorted(p.name for p in run_dir.iterdir())
    time.sleep(1.1)  # a new logs/<timestamp>/ name
    failed = cli(tmp_path, *TINY, *SMALL_NIAH, f"results_dir={results}", "task.lengths=[9000]")
    assert failed.returncode == 2
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == logs
    assert sorted(p.name for p in run_dir.iterdir()) == files
