"""The cluster sweep of docs/cluster.md through hydra-submitit-launcher's local executor (the SLURM path without a
cluster): several jobs in parallel processes, one results directory, no duplicate rows, then the report."""

from __future__ import annotations

from collections import Counter

import pytest
from test_app import cli

from kvbench.harness.results import ResultsStore
from kvbench.report.paper import build_report

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def test_submitit_local_sweep_writes_one_results_dir_without_duplicates(tmp_path):
    result = cli(
        tmp_path,
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "experiment=niah_sweep",
        "method=snapkv,window",
        "budgets=[16,32]",
        "model=tiny_random",
        "model.device=cpu",
        "task.lengths=[256]",
        "task.depths=[25,75]",
        "task.haystack=noise",
        "task.max_new_tokens=4",
        "threads=1",
        "progress=false",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = [p for p in tmp_path.iterdir() if (p / "samples.jsonl").exists()]
    assert [p.name for p in run_dirs] == ["niah_sweep_tiny_random"]  # the experiment names its run
    assert len(list((run_dirs[0] / "logs").glob("multirun_*/.submitit"))) == 1  # the jobs ran through submitit
    rows = ResultsStore(run_dirs[0]).rows()
    keys = Counter(row["key"] for row in rows)
    assert max(keys.values()) == 1  # both jobs computed the full-cache reference; it was written once
    jobs = Counter((row["method"], row["budget"]) for row in rows)
    assert jobs == {("snapkv", 16): 2, ("snapkv", 32): 2, ("window", 16): 2, ("window", 32): 2, ("full", None): 2}
    assert all(row["status"] == "ok" for row in rows)

    table = build_report(run_dirs, tmp_path / "report")["table"]
    assert list(zip(table["method_label"], table["budget_label"], strict=True)) == [
        ("full", "full"),
        ("snapkv", "16"),
        ("snapkv", "32"),
        ("window", "16"),
        ("window", "32"),
    ]
    assert list(table["niah n"]) == [2] * 5
    assert (tmp_path / "report" / "niah" / "niah_heatmap.png").exists()
