"""Issue 8: every bad input in one line, no silent row loss, rows that say what the cache held.

One test (or parametrised group) per numbered case of the issue; each reproduces the failure it fixes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from kvbench.app import run
from kvbench.config import CONF_DIR, ConfigError, check_command_line, check_values
from kvbench.engine.generation import forward_tokens
from kvbench.harness.budget import entries_for
from kvbench.harness.jsonl import read_jsonl
from kvbench.harness.options import RunOptions
from kvbench.harness.results import MalformedRowError, ResultsError, ResultsStore
from kvbench.harness.runner import Job, run_sample
from kvbench.harness.sample import Sample
from kvbench.methods import METHODS, build_method
from kvbench.registry import FieldValueError
from kvbench.report import format_table, summarize

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_random", "model.device=cpu", "progress=false", "threads=1"]
SMALL_NIAH = ["task.lengths=[256]", "task.depths=[50]", "task.max_new_tokens=4", "budget=[16]"]


def composed(tmp_path: Path, *overrides: str, task: list[str] = SMALL_NIAH):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*TINY, *task, f"results_dir={tmp_path}", *overrides])


def cli(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "kvbench", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


# -- Results store and runs ----------------------------------------------------------------------------------


def test_case1_complete_last_row_without_newline_is_kept_and_a_torn_one_rerun(tmp_path):
    store = ResultsStore(tmp_path)
    store.append({"key": "a", "status": "ok"})
    with open(store.samples_path, "a") as handle:
        handle.write('{"key": "b", "status": "ok"}')  # complete, but the newline never made it to disk
    assert store.done_keys() == {"a", "b"}
    store.append({"key": "c", "status": "ok"})
    assert [r["key"] for r in read_jsonl(store.samples_path)] == ["a", "b", "c"]
    with open(store.samples_path, "a") as handle:
        handle.write('{"key": "d", "sta')  # torn: not counted as done, dropped by the next append
    assert "d" not in ResultsStore(tmp_path).done_keys()
    store.append({"key": "d", "status": "ok"})
    assert [r["key"] for r in read_jsonl(store.samples_path)] == ["a", "b", "c", "d"]


def test_case2_row_without_key_names_file_line_and_field(tmp_path):
    store = ResultsStore(tmp_path)
    store.samples_path.write_text('{"key": "a", "status": "ok"}\n{"status": "ok"}\n')
    with pytest.raises(MalformedRowError, match=r"samples.jsonl:2: row has no 'key' field"):
        store.latest_rows()
    with pytest.raises(MalformedRowError, match=r"samples.jsonl:2: row has no 'key' field"):
        ResultsStore(tmp_path).done_keys()


def test_case3_a_claimed_row_is_left_to_its_claimer_and_a_finished_one_is_not_recomputed(tmp_path):
    first, second = ResultsStore(tmp_path), ResultsStore(tmp_path)  # two processes sharing one run
    with first.claim(["a", "b"]) as mine:
        assert mine == ["a", "b"]
        with second.claim(["a", "b", "c"]) as theirs:
            assert theirs == ["c"]  # a and b are being computed by the first
            second.append({"key": "c", "status": "ok"})
        first.append({"key": "a", "status": "ok"})
        first.append({"key": "b", "status": "error"})
    with second.claim(["a", "b", "c"]) as theirs:
        assert theirs == ["b"]  # a and c are done; the error row is retried
    assert not list((tmp_path / ".claims").iterdir())  # claims are released


def test_case3_two_identical_concurrent_runs_compute_every_row_once(tmp_path):
    args = [
        *TINY,
        "task.lengths=[256]",
        "task.depths=[0,20,40,60,80,100]",
        "task.max_new_tokens=4",
        "budget=[16,32]",
        f"results_dir={tmp_path}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "kvbench", *args]
    processes = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err[-2000:] for _, err in outputs]
    keys = [row["key"] for row in read_jsonl(tmp_path / "niah_tiny_random" / "samples.jsonl")]
    assert len(keys) == len(set(keys)) == 6 * 3  # 6 samples x (2 budgets + full), none twice


def test_case3_runs_of_different_methods_share_one_run_directory(tmp_path):
    """A SLURM array / local multirun over methods writes one run; the summary covers both methods."""
    run(composed(tmp_path, "method=snapkv"))
    result = run(composed(tmp_path, "method=streamingllm"))
    assert set(result["summary"]["method"]) == {"snapkv", "streamingllm", "full"}
    assert result["rows_run"] == 1  # the full-cache row of the shared sample was not recomputed
    assert len(list((result["run_dir"] / "configs").glob("*.yaml"))) == 1  # the second config, kept aside


def test_case4_read_only_results_directory_is_one_line(tmp_path):
    run_dir = tmp_path / "niah_tiny_random"
    run_dir.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: make the directory immutable instead
        if subprocess.run(["chattr", "+i", str(run_dir)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr: cannot make a read-only directory")
    else:
        run_dir.chmod(0o555)
    try:
        with pytest.raises(ResultsError, match=rf"cannot write in {run_dir}: .*choose another results_dir"):
            run(composed(tmp_path))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(run_dir)])
        run_dir.chmod(0o755)


def test_case4_unwritable_samples_file_is_one_line(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    real_open = os.open

    def refuse(path, flags, *args):
        if str(path) == str(store.samples_path) and flags & os.O_APPEND:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ResultsError, match=r"cannot write .*samples.jsonl: Permission denied"):
        store.append({"key": "a"})


def test_case5_failed_validation_leaves_a_finished_run_untouched_and_a_different_config_is_refused(tmp_path):
    result = run(composed(tmp_path))
    run_dir = result["run_dir"]
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "manifest.json")}
    with pytest.raises(ValueError, match="9000"):
        run(composed(tmp_path, "task.lengths=[9000]"))  # impossible length: found after the model loads
    with pytest.raises(ResultsError, match=r"different config \(task.depths: \[50\] != \[25\]\).*run_name="):
        run(composed(tmp_path, "task.depths=[25]"))
    after = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "manifest.json")}
    assert after == before
    assert not (run_dir / "configs").exists()
    other = run(composed(tmp_path, "task.depths=[25]", "run_name=other"))  # a new run name works
    assert other["rows_run"] == 2


def test_case6_summary_covers_only_this_invocations_samples(tmp_path):
    run(composed(tmp_path, "task.depths=[25,50,75]"))
    result = run(composed(tmp_path, "task.depths=[25,50,75]", "max_samples=1"))
    assert result["rows_run"] == 0  # resumed
    assert set(result["summary"]["n"]) == {1}  # not 3: the summary matches the config


def test_case7_leftover_temporary_files_of_dead_writers_are_removed(tmp_path):
    run_dir = tmp_path / "niah_tiny_random"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    leftovers = [run_dir / f"summary.csv.tmp{dead.pid}", run_dir / f"config.yaml.tmp-{host}-{dead.pid}"]
    alive = run_dir / f"summary.csv.tmp-{host}-{os.getppid()}"  # a live writer's file stays
    old_remote = run_dir / "summary.csv.tmp-otherhost-123"
    for path in [*leftovers, alive, old_remote]:
        path.write_text("partial")
    os.utime(old_remote, (time.time() - 7200, time.time() - 7200))
    run(composed(tmp_path))
    assert not any(path.exists() for path in [*leftovers, old_remote])
    assert alive.exists()


def test_case8_run_name_outside_results_dir_is_refused(tmp_path):
    results = tmp_path / "results"
    for name in ("../../x", "/tmp/elsewhere", "..", ""):
        with pytest.raises(ConfigError, match="must name a directory inside results_dir"):
            check_values(composed(results, f"run_name={name}"))
    assert not (tmp_path / "x").exists() and not results.exists()


# -- Config and inputs ---------------------------------------------------------------------------------------


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
def test_case9_every_field_is_type_and_range_checked_naming_the_key(tmp_path, override, message):
    with pytest.raises(FieldValueError, match=message):
        check_values(composed(tmp_path, *override.split()))


def test_case9_integral_floats_are_ints_and_fractions_are_refused():
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
        (["model.name_or_pth=x"], "unknown key 'model.name_or_pth'. Did you mean 'model.name'?"),
        (["+seed=3"], "'\\+seed' adds a key that exists already"),
    ],
)
def test_case10_unknown_keys_fail_in_one_line_with_the_closest_valid_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_command_line(overrides)


def test_case10_valid_additions_and_sweeps_pass_the_key_check():
    check_command_line(["method=adakv", "+method.base_params.window=16", "model=tiny_random"])
    check_command_line(["method=snapkv,streamingllm", "budget=16,32", "method.n_sink=2"], multirun=True)


def test_case11_model_hf_without_path_and_with_a_missing_path(tmp_path):
    with pytest.raises(ConfigError, match=r"model.name_or_path needs a local model directory.*model.name_or_path="):
        check_command_line(["model=hf"])
    from kvbench.engine.models import load_model

    cfg = composed(tmp_path, "model=hf", "model.name_or_path=/nonexistent/model").model
    with pytest.raises(FileNotFoundError, match="'/nonexistent/model' does not exist; pass a local model directory"):
        load_model(cfg)


def test_case11_hub_id_without_network_fails_fast_with_how_to_pass_a_local_path(tmp_path, monkeypatch):
    from kvbench.engine import hub
    from kvbench.engine.models import load_model

    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    cfg = composed(tmp_path, "model=hf", "model.name_or_path=some-org/some-model-kvbench-test").model
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*model.name_or_path=/path/to"):
        load_model(cfg)
    assert time.perf_counter() - start < 20  # no download retries (they took about a minute)


def test_case11_hub_dataset_without_network_fails_fast(tmp_path, monkeypatch):
    from kvbench.engine import hub
    from kvbench.tasks.benchmark_data import DataUnavailableError, hub_dataset_file

    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataUnavailableError, match="hub cannot be reached; pass task.data_dir="):
        hub_dataset_file("org/kvbench-missing", "data.zip", "longbench", "narrativeqa.jsonl")


def test_case12_non_utf8_data_names_file_and_line(tmp_path):
    path = tmp_path / "passages.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"passages.jsonl:2: not UTF-8 text \(byte 0xe9 at column 11\)"):
        run(composed(tmp_path, "task=ielts", f"task.data_path={path}", task=[]))
    from kvbench.tasks.benchmark_data import read_jsonl as read_benchmark_jsonl

    with pytest.raises(ValueError, match=r"passages.jsonl:2: not UTF-8 text"):
        read_benchmark_jsonl(path)
    squad = tmp_path / "squad.json"
    squad.write_bytes(b'{"data": [\n"\xff"]}')
    from kvbench.tasks.ruler_qa import read_file

    with pytest.raises(ValueError, match=r"squad.json:2: not UTF-8 text"):
        list(read_file("squad", squad))


def test_case12_empty_data_file_and_negative_counts_are_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no passages"):
        run(composed(tmp_path, "task=ielts", f"task.data_path={empty}", task=[]))
    from kvbench.tasks.benchmark_data import read_jsonl as read_benchmark_jsonl

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
def test_case13_bad_input_exits_in_one_line_and_leaves_no_directory(tmp_path, bad):
    results = tmp_path / "results"
    finished = cli(tmp_path, *TINY, *SMALL_NIAH, f"results_dir={results}", *bad)
    assert finished.returncode == 2
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvbench: error:"), finished.stderr[-2000:]
    assert "Traceback" not in finished.stderr
    assert not results.exists()
    assert not (tmp_path.parent / "x").exists()


def test_case13_a_failed_rerun_keeps_the_runs_earlier_logs_and_files(tmp_path):
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


# -- Measurement honesty -------------------------------------------------------------------------------------


def needle(max_new_tokens: int = 12) -> Sample:
    context = "The grass is green and the sky is blue. " * 12 + "The magic number is 4242. " + "Filler. " * 20
    return Sample("s", context, "What is the magic number?", "Answer:", ["4242"], "string_match_all", max_new_tokens)


def slot_bytes(lm) -> int:
    return 2 * lm.config.head_dim * 4  # K + V, fp32


@pytest.mark.parametrize("name", ["streamingllm", "tova", "h2o"])
def test_case14_rows_report_the_cache_at_the_end_of_the_row_and_its_peak(tiny_lm, name):
    """compress=context: the question tail and decoding keep evicting; the row says what is held at the end."""
    budget = 40
    jobs = [Job(build_method({"name": name}), budget, name)]
    ((_, row),) = list(run_sample(tiny_lm, needle(), jobs, RunOptions(compress="context", seed=0, fail_fast=True)))
    layers, heads = tiny_lm.config.num_hidden_layers, tiny_lm.config.num_key_value_heads
    per_token = layers * heads * slot_bytes(tiny_lm)
    split = row["compressed_tokens"]
    assert row["compressed"] and row["prompt_tokens"] > split
    assert row["kept_entries_compressed"] == budget * layers * heads
    assert math.isclose(row["kept_fraction_compressed"], budget / split)
    # The end of the row: still at the budget, but part of it is now question and generated tokens.
    assert row["kept_entries"] == budget * layers * heads
    assert row["kv_bytes"] == budget * per_token
    assert row["kept_fraction"] < row["kept_fraction_compressed"]
    # Peak: every forward appends its tokens before those evictions (tova/h2o evict inside the forward).
    tail = row["prompt_tokens"] - split
    expected_peak = (budget + tail if name != "streamingllm" else budget) * per_token
    assert row["kv_bytes_peak"] == expected_peak
    assert row["kept_entries_tail"] == budget * layers * heads


@pytest.mark.parametrize("name", ["streamingllm", "tova", "h2o"])
def test_case15_prefill_only_switch_appends_later_tokens(tiny_lm, name):
    budget = 40
    jobs = [Job(build_method({"name": name, "decode_evict": False}), budget, name)]
    ((_, row),) = list(run_sample(tiny_lm, needle(), jobs, RunOptions(compress="context", seed=0, fail_fast=True)))
    layers, heads = tiny_lm.config.num_hidden_layers, tiny_lm.config.num_key_value_heads
    appended = row["prompt_tokens"] - row["compressed_tokens"] + row["output_tokens"] - 1  # tail + decoded
    assert row["kept_entries_compressed"] == budget * layers * heads
    assert row["kept_entries"] == (budget + appended) * layers * heads
    assert row["kept_fraction"] == row["kept_fraction_compressed"]  # the context is never evicted again
    assert row["kv_bytes_peak"] == row["kv_bytes"]  # the cache only grows after compression


def text_units(markdown: str) -> list[str]:
    """Table rows one by one, every other paragraph with its wrapped lines joined."""
    units: list[str] = []
    paragraph: list[str] = []
    for line in [*markdown.splitlines(), ""]:
        if line.strip() and not line.startswith("|"):
            paragraph.append(line.strip())
            continue
        if paragraph:
            units.append(" ".join(paragraph))
            paragraph = []
        if line.startswith("|"):
            units.append(line)
    return units


def test_case15_docs_call_compress_context_the_kvpress_setting_only_with_the_decode_evicting_methods_named():
    # The methods that keep evicting after the prefill compression, from the code: a `decode_evict` field on by
    # default. The README's `compress` row (and any docs page repeating it) must name exactly these.
    evicting = sorted(
        name
        for name in METHODS.names()
        if any(f.name == "decode_evict" and f.default is True for f in dataclasses.fields(METHODS.get(name)))
    )
    assert evicting == ["h2o", "hierarchical", "streamingllm", "tova"]
    readme = ROOT / "README.md"
    pages = [readme, *sorted((ROOT / "docs").rglob("*.md"))]
    lines = [(p, unit) for p in pages for unit in text_units(p.read_text()) if "kvpress setting" in unit]
    assert any(p == readme and line.startswith("| `compress` |") for p, line in lines), "README compress row"
    for page, line in lines:
        claim = re.search(r"`?context`?[^|]*the kvpress setting only for methods that compress once: (.+?) keep", line)
        assert claim, f"{page.name}: {line}"
        named = sorted(re.split(r",\s*|\s+and\s+", claim.group(1).strip()))
        assert named == evicting, f"{page.name}: {line}"
        assert "decode_evict=false" in line, f"{page.name}: {line}"


def test_case16_float_budget_rounding_rule_and_integer_entries_in_the_summary():
    assert entries_for(0.1, 1005) == 100  # round half to even: 100.5 -> 100
    assert entries_for(0.1, 1006) == 101  # 100.6 -> 101 where int(T * ratio) truncates to 100
    assert entries_for(0.001, 10) == 1  # at least one entry
    rows = [
        {
            "key": str(t),
            "task": "t",
            "method_label": "snapkv",
            "compress": "prompt",
            "budget": 0.1,
            "status": "ok",
            "score": 1.0,
            "compressed": True,
            "budget_entries": entries_for(0.1, t),
            "kept_fraction": 0.1,
            "kv_bytes": 1,
            "kv_bytes_peak": 2,
            "kv_bytes_full": 10,
            "prompt_tokens": t,
            "ttft_s": 0.0,
            "compress_s": 0.0,
            "tpot_s": 0.0,
        }
        for t in (1000, 1006)
    ]
    summary = summarize(rows)
    assert list(summary["entries"]) == ["100-101"]
    assert "entries" in format_table(summary)


def test_case17_forward_does_not_use_the_deprecated_past_key_values_argument(tiny_lm):
    from kvbench.engine.cache import KVCache

    cache = KVCache(tiny_lm.config.num_hidden_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        logits = forward_tokens(tiny_lm, cache, [1, 2, 3])
    assert cache.layers[0].get_seq_length() == 3 and torch.isfinite(logits).all()


def test_case17_the_cache_keyword_follows_the_model_signature():
    from kvbench.engine.generation import cache_argument

    class Recent:
        def forward(self, input_ids=None, cache=None, use_cache=None): ...

    class Older:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...

    assert cache_argument(Recent) == "cache" and cache_argument(Older) == "past_key_values"
