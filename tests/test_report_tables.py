"""The paper table and the run summary on hand-made rows: what a line is (method x budget, never bits per
element), unscored and all-error runs, readable summary columns, LaTeX bolding and labels, and the report
command's handling of `--out`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kvbench.methods.base import build_method
from kvbench.report import COLUMN_LEGEND, format_table, rows_frame, summarize
from kvbench.report.paper import build_report
from kvbench.report.tables import paper_table, to_latex, to_markdown

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
MODEL = {"kind": "tiny_random", "name": "tiny_random", "num_layers": 4, "dtype": "float32", "device_type": "cpu"}


def row(method: str, budget, index: int, prompt: int = 1000, **fields) -> dict:
    """One ok row of a single-prompt task; `prompt` tokens, fp32 K/V of 1 KiB per token (full cache)."""
    full_bytes = prompt * 1024
    held = full_bytes if budget is None else budget * 1024
    base = {
        "key": f"{method}-{budget}-{index}-{prompt}", "status": "ok", "task": "niah", "subtask": "niah",
        "sample_id": f"s{index}-{prompt}", "method": method, "method_label": method, "budget": budget,
        "compress": "prompt", "model": "tiny_random", "score": 1.0, "compressed": budget is not None,
        "budget_entries": budget, "kept_fraction": 1.0 if budget is None else budget / prompt,
        "kept_fraction_compressed": 1.0 if budget is None else budget / prompt,
        # At the end of the row the cache also holds the 31 decoded tokens; kv_bytes_full is the prompt's.
        "kv_bytes": held + 31 * 1024, "kv_bytes_compressed": held, "kv_bytes_peak": held + 32 * 1024,
        "kv_bytes_full": full_bytes, "bits_per_element": 32.0 * held / full_bytes, "prompt_tokens": prompt,
        "compressed_tokens": prompt,
        "peak_mem_prefill_bytes": 2**30, "peak_mem_decode_bytes": 2**30, "peak_mem_kind": "cpu_peak_rss_per_phase",
        "ttft_s": 0.5, "compress_s": 0.01, "tpot_s": 0.02, "meta": {"length": prompt, "depth": 50},
    }  # fmt: skip
    return {**base, **fields}


def make_run(path: Path, rows: list[dict], task: str = "niah") -> Path:
    path.mkdir(parents=True)
    config = {"model": MODEL, "method": {"name": "snapkv"}, "task": {"name": task}, "compress": "prompt", "seed": 42}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "manifest.json").write_text(json.dumps({"model": MODEL, "dtype": "float32"}))
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def two_lengths(methods=(("full", None), ("snapkv", 64), ("snapkv", 128))) -> list[dict]:
    """Each method x budget on 5 samples of 1000 and 5 of 2000 tokens: bits per element differ by length."""
    return [row(m, b, i, prompt) for m, b in methods for prompt in (1000, 2000) for i in range(5)]


def test_a_line_is_method_by_budget_with_bits_a_rounded_mean(tmp_path):
    table = paper_table(rows_frame(two_lengths()))
    assert list(zip(table["method_label"], table["budget_label"], strict=True)) == [
        ("full", "full"), ("snapkv", "64"), ("snapkv", "128")
    ]  # fmt: skip
    assert list(table["niah n"]) == [10, 10, 10]
    # 64 entries of 1000 and of 2000 tokens: 2.048 and 1.024 bits, mean 1.536; 128 entries: twice as many
    assert table["bits / element"].tolist() == pytest.approx([32.0, 1.536, 3.072])
    markdown = to_markdown(table)
    assert "| snapkv | 64 | 1.000 [1.00, 1.00] | 0.048 | 0.048 | **0.0625** | 1.54 | 0.500 | 20.0 |" in markdown
    assert "1.536" not in markdown and "2.048" not in markdown


def test_summary_lines_and_the_notebook_table_agree_on_lines(tmp_path):
    run = make_run(tmp_path / "run", two_lengths())
    summary = summarize(json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines())
    report = build_report([run], tmp_path / "out")
    assert list(summary["budget"]) == list(report["table"]["budget_label"]) == ["full", "64", "128"]
    assert list(summary["n"]) == [10, 10, 10]


def test_unscored_run_gets_the_cost_columns(tmp_path):
    # task=synthetic_length and lm-eval rows_path runs: every row has score null.
    rows = [row(m, b, i, score=None) for m, b in (("full", None), ("snapkv", 64)) for i in range(3)]
    run = make_run(tmp_path / "synthetic", [{**r, "task": "synthetic_length"} for r in rows], "synthetic_length")
    report = build_report([run], tmp_path / "out")
    table = report["table"]
    assert list(table["method_label"]) == ["full", "snapkv"]
    assert table["KV MiB"].tolist() == pytest.approx([1000 / 1024, 64 / 1024])
    assert table["TPOT ms"].tolist() == pytest.approx([20.0, 20.0])
    assert report["markdown"].splitlines()[0] == (
        "| method | budget | kept fraction | KV / full | KV MiB | bits / element | TTFT s | TPOT ms |"
    )


def test_runs_whose_rows_all_fail_are_shown_with_error_counts(tmp_path):
    failed = [{**row("snapkv", 64, i), "status": "error", "error": "boom", "score": None} for i in range(3)]
    ok = [row("full", None, i) for i in range(3)] + [row("window", 64, i) for i in range(3)]
    ok[-1] = {**ok[-1], "status": "error", "error": "boom", "score": None}
    table = paper_table(rows_frame(ok + failed))
    assert list(table["method_label"]) == ["full", "snapkv", "window"]
    assert list(table["errors"]) == [0, 3, 1]
    assert list(table["niah n"].fillna(0)) == [3, 0, 2]
    markdown = to_markdown(table)
    assert markdown.splitlines()[0].endswith("| errors |")
    assert "| snapkv | 64 | - | - | - | - | - | - | - | 3 |" in markdown


def test_only_a_unique_best_is_bold_and_latex_has_a_label():
    rows = [row("full", None, i) for i in range(2)] + [row("snapkv", 64, i) for i in range(2)]
    rows += [row("window", 64, i, score=0.0, ttft_s=0.4) for i in range(2)]
    table = paper_table(rows_frame(rows))
    latex = to_latex(table, caption="Accuracy on niah", label="tab:niah")
    body = [line for line in latex.splitlines() if line.startswith(("full", "snapkv", "window"))]
    # niah: full and snapkv tie at 1.000 -> nobody bold; KV MiB: snapkv and window tie; TTFT: window alone.
    assert body[0].startswith(r"full & full & 1.000 {\scriptsize[1.00, 1.00]} & ")
    assert body[1].startswith(r"snapkv & 64 & 1.000 {\scriptsize[1.00, 1.00]} & ")
    assert latex.count(r"\textbf") == 1 and r"\textbf{0.400}" in body[2]
    assert r"\caption{Accuracy on niah}\label{tab:niah}" in latex
    # One line (e.g. one lm-eval rows_path run) has nothing to be best against; a small cache is not 0.00 MiB.
    alone = to_markdown(paper_table(rows_frame([row("window", 4, 0)])))
    assert "**" not in alone and "| window | 4 | 1.000 [1.00, 1.00] | 0.004 | 0.004 | 0.00391 |" in alone


def test_summary_columns_are_readable():
    rows = [row("full", None, i) for i in range(2)] + [row("snapkv", 64, i) for i in range(2)]
    # A wrapped method sorts after full; kv_direct-like rows keep few K/V slots but more bytes than the full cache.
    rows += [row("adakv", 64, i, method_label="adakv[snapkv]") for i in range(2)]
    rows += [row("kv_direct", 64, i, kv_bytes_compressed=1100 * 1024) for i in range(2)]
    summary = summarize(rows)
    assert list(summary["method"]) == ["full", "adakv[snapkv]", "kv_direct", "snapkv"]
    full = summary.iloc[0]
    assert full["kv_mib"] == full["kv_mib_full"] == pytest.approx(1000 / 1024)  # the same tokens in both
    assert full["kv_mib_peak"] == pytest.approx(1032 / 1024)  # decoding included
    kv_direct = summary.set_index("method").loc["kv_direct"]
    assert kv_direct["kept_frac"] == pytest.approx(0.064)
    assert kv_direct["kv_frac"] == pytest.approx(1.1)
    text = format_table(summary)
    header = text.splitlines()[0].split()
    assert header[:4] == ["task", "method", "compress", "budget"]
    assert {"compressed", "kv_mib", "kv_mib_full", "kv_frac", "tpot_ms", "ttft_s"} <= set(header)
    assert "kv_mb" not in header
    for column in ("kv_mib", "kv_frac", "kept_frac", "compressed", "n"):
        assert f"  {column}: {COLUMN_LEGEND[column]}" in text  # the legend under the table


def test_conversation_summary_counts_question_turns_apart():
    rows = [
        {**row("snapkv", 32, 0), "key": f"t{turn}", "turn": turn, "score": 1.0 if turn in (3, 5) else None}
        for turn in range(6)
    ]
    summary = summarize(rows)
    assert (summary.loc[0, "n"], summary.loc[0, "n_scored"], summary.loc[0, "accuracy"]) == (6, 2, 1.0)
    assert "n_scored" in format_table(summary).splitlines()[0]


def test_one_composed_label_style():
    assert build_method({"name": "kivi", "base": "snapkv", "group_size": 16}).label() == "kivi[snapkv](group_size=16)"
    assert build_method({"name": "kivi", "group_size": 16}).label() == "kivi(group_size=16)"
    assert build_method({"name": "mikv"}).label() == "mikv[h2o](lo_bits=2)"
    assert build_method({"name": "octopus", "base": "snapkv"}).label() == "octopus-reconstructed[snapkv]"
    # Rows written with the older quantiser style are read in the same style.
    legacy = [row("kivi", 64, 0, method_label="kivi(base=snapkv,group_size=16)")]
    assert list(rows_frame(legacy)["method_label"]) == ["kivi[snapkv](group_size=16)"]


def report_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "kvbench.report", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_report_out_is_checked_and_not_created_on_failure(tmp_path):
    (tmp_path / "empty").mkdir()
    result = report_cli(str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()

    run = make_run(tmp_path / "run", two_lengths())
    (tmp_path / "file").write_text("not a directory")
    result = report_cli(str(run), "--out", str(tmp_path / "file"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"kvbench: error: --out {tmp_path / 'file'} is a file, not a directory: pass a directory path"
    ]
    assert (tmp_path / "file").read_text() == "not a directory"


def test_table_csv_is_the_numbers(tmp_path):
    run = make_run(tmp_path / "run", two_lengths())
    build_report([run], tmp_path / "out")
    csv = pd.read_csv(tmp_path / "out" / "table.csv")
    assert list(csv["budget_label"]) == ["full", "64", "128"]
    assert list(csv["errors"]) == [0, 0, 0]


def test_docs_list_every_summary_column():
    docs = (ROOT / "docs" / "rows.md").read_text()
    for column, meaning in COLUMN_LEGEND.items():
        assert f"- `{column}`: {meaning}\n" in docs, column
