"""The cross-run report on hand-made runs: hand-checked means and bootstrap intervals, the files it writes,
merging runs of one setting, labelling or rejecting runs whose configs differ, one-line bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvbench.report.paper import build_report
from kvbench.report.runs import ReportInputError, load_runs
from kvbench.report.tables import bootstrap_ci

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
MODEL = {"kind": "tiny_random", "name": "tiny_random", "num_layers": 4, "dtype": "float32", "device_type": "cpu"}


def make_run(path: Path, method: str, scores: list[float], budget: int | None, kv_mib: float, model=MODEL) -> Path:
    """A results directory as a run writes it: config.yaml, manifest.json, samples.jsonl (+ full-cache rows)."""
    path.mkdir(parents=True)
    config = {"model": model, "method": {"name": method}, "task": {"name": "niah", "lengths": [256], "depths": [0, 50]},
              "compress": "prompt", "seed": 42, "budget": budget, "run_name": path.name}  # fmt: skip
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "manifest.json").write_text(json.dumps({"model": model, "dtype": "float32"}))
    rows = []
    for jobs in ((method, budget, scores, kv_mib), ("full", None, [1.0] * len(scores), 4.0)):
        name, job_budget, job_scores, mib = jobs
        for index, score in enumerate(job_scores):
            rows.append({
                "key": f"{model['num_layers']}-{name}-{job_budget}-{index}", "status": "ok", "task": "niah",
                "subtask": "niah", "sample_id": f"s{index}", "method": name, "method_label": name,
                "budget": job_budget, "compress": "prompt", "score": score,
                "kept_fraction": 0.25 if job_budget else 1.0, "kv_bytes": mib * MIB, "ttft_s": 0.5, "tpot_s": 0.02,
                "compressed": bool(job_budget), "kv_bytes_full": 4.0 * MIB, "prompt_tokens": 256, "compress_s": 0.01,
                "meta": {"length": 256, "depth": [0, 50][index % 2]},
            })  # fmt: skip
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bootstrap_interval_of_a_hand_checked_sample():
    # Scores 1,0,1,1: a resample's mean is 1.0 with p = 0.75^4 = 0.32 (> 2.5%, so the upper bound is 1.0) and
    # <= 0.25 with p = 0.051 while 0.0 has p = 0.004 (so the lower bound is 0.25).
    assert bootstrap_ci([1, 0, 1, 1]) == (0.25, 1.0)
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)


def test_report_on_two_runs_numbers_and_files(tmp_path):
    a = make_run(tmp_path / "niah_snapkv", "snapkv", [1, 0, 1, 1], 32, 1.0)
    b = make_run(tmp_path / "niah_window", "window", [0, 0, 1, 0], 32, 1.0 + 1 / 1024)
    report = build_report([a, b], tmp_path / "report")
    table = report["table"]
    assert list(table["method_label"]) == ["full", "snapkv", "window"]
    assert list(table["niah"]) == [1.0, 0.75, 0.25]
    assert list(table["niah n"]) == [4, 4, 4]  # the full-cache rows of both runs are the same rows: kept once
    assert (table.loc[1, "niah lo"], table.loc[1, "niah hi"]) == (0.25, 1.0)
    assert table.loc[2, "niah lo"] <= 0.25 <= table.loc[2, "niah hi"]
    assert list(table["KV MiB"].round(4)) == [4.0, 1.0, round(1 + 1 / 1024, 4)]
    assert list(table["TPOT ms"]) == [20.0] * 3

    markdown = (tmp_path / "report" / "table.md").read_text()
    assert "| method | budget | niah | kept fraction | KV / full | KV MiB | TTFT s | TPOT ms |" in markdown
    assert "| full | full | **1.000** [1.00, 1.00] | 1.000 | 1.000 | 4.00 |" in markdown
    # 1.00 and 1.001 MiB both print as 1.00: a tie, so neither is bold
    assert "| snapkv | 32 | 0.750 [0.25, 1.00] | 0.250 | 0.250 | 1.00 |" in markdown
    latex = (tmp_path / "report" / "table.tex").read_text()
    for needle in (r"\toprule", r"\midrule", r"\bottomrule", r"\textbf{1.000} {\scriptsize[1.00, 1.00]}",
                   r"snapkv & 32 & 0.750 {\scriptsize[0.25, 1.00]}"):  # fmt: skip
        assert needle in latex
    for name in ("table.md", "table.tex", "table.csv", "accuracy_vs_budget.png", "accuracy_vs_budget.pdf",
                 "accuracy_vs_kv_mib.png", "accuracy_vs_kv_mib.pdf", "niah/niah_heatmap.png",
                 "niah/niah_heatmap.pdf"):  # fmt: skip
        assert (tmp_path / "report" / name).stat().st_size > 0, name


def test_conflicting_runs_fail_naming_the_keys_or_are_labelled(tmp_path):
    a = make_run(tmp_path / "a", "snapkv", [1, 0], 32, 1.0)
    b = make_run(tmp_path / "b", "snapkv", [0, 0], 32, 1.0, model={**MODEL, "num_layers": 2})
    with pytest.raises(ReportInputError) as err:
        load_runs([a, b])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("runs have conflicting configs, differing in model.num_layers (model.num_layers: 4 (a)")
    frame, _ = load_runs([a, b], label_by_setting=True)
    assert set(frame["setting"]) == {"model.num_layers=4", "model.num_layers=2"}
    table = build_report([a, b], tmp_path / "out", label_by_setting=True)["table"]
    snapkv = table[table["method_label"] == "snapkv"].set_index("setting")["niah"]
    assert snapkv.to_dict() == {"model.num_layers=2": 0.0, "model.num_layers=4": 0.5}


def test_report_bad_input_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportInputError, match=r"^no rows in .*empty: samples.jsonl is missing"):
        load_runs([tmp_path / "empty"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "kvbench.report", str(tmp_path / "empty"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"kvbench: error: no rows in {tmp_path / 'empty'}: samples.jsonl is missing (pass a results/<run> directory)"
    ]
