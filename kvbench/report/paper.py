"""The cross-run paper report as a function (`python -m kvbench.report` and the notebook call it): runs ->
table.md, table.tex, table.csv, accuracy_vs_budget and accuracy_vs_kv_mib figures, task figures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench.report.figures import accuracy_figure, every_task_figure, run_title
from kvbench.report.plots import method_colors
from kvbench.report.runs import ReportInputError, load_runs
from kvbench.report.serving import serving_report
from kvbench.report.summary import X_AXES
from kvbench.report.tables import paper_table, task_names, to_latex, to_markdown

log = logging.getLogger("kvbench")


def check_out(out: Path) -> None:
    """`--out` must be a directory or not exist yet (it is created only once the runs have loaded)."""
    if out.exists() and not out.is_dir():
        raise ReportInputError(f"--out {out} is a file, not a directory: pass a directory path")


def caption(table: pd.DataFrame, frame: pd.DataFrame, run_names: list[str]) -> str:
    """What the LaTeX table shows, in words: tasks, model(s), the numbers' meaning, the runs it comes from."""
    tasks = task_names(table)
    scores = (
        f"Mean score per task ({', '.join(tasks)}) over samples with its bootstrap 95% confidence interval; "
        if tasks
        else ""
    )
    return (
        f"{run_title(frame)}. {scores}kept fraction of the prompt's K/V entries, KV cache held after compression "
        f"relative to the full cache and in MiB, time to first token and per output token. "
        f"Runs: {', '.join(run_names)}."
    )


def build_report(runs: list[str | Path], out: str | Path, label_by_setting: bool = False) -> dict[str, Any]:
    """Everything `python -m kvbench.report` writes; returns the table (numbers), its Markdown and the files.
    Bad input (no rows, conflicting runs, `out` a file) fails before anything is written."""
    out = Path(out)
    check_out(out)
    frame, loaded = load_runs(runs, label_by_setting)
    table = paper_table(frame)
    markdown = to_markdown(table)
    names = [run.path.name for run in loaded]
    tasks = sorted(frame["task"].dropna().astype(str).unique()) if "task" in frame else []
    label = "tab:kvbench-" + "-".join(task.replace("_", "-") for task in tasks)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "table.md", out / "table.tex", out / "table.csv"]
    files[0].write_text(markdown)
    files[1].write_text(to_latex(table, caption(table, frame, names), label))
    table.to_csv(files[2], index=False)
    colors = method_colors(frame["method_label"])
    for x_axis in X_AXES:  # budget, kv_mib, bits_per_element (only when rows have it)
        files += accuracy_figure(frame, out, x_axis, colors)
    files += every_task_figure(frame, out)
    serving = [row for run in loaded for row in run.serving_rows]
    if serving:  # experiment=serving runs: their serving tables and figures beside the accuracy table
        files += serving_report([*serving, *(row for run in loaded for row in run.rows)], out)[0]
    return {"table": table, "markdown": markdown, "files": files, "frame": frame}
