"""The cross-run paper report as a function (`python -m kvbench.report` and the notebook call it): runs ->
table.md, table.tex, table.csv, accuracy_vs_budget and accuracy_vs_kv_mib figures, task figures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kvbench.report.figures import accuracy_figure, every_task_figure
from kvbench.report.plots import method_colors
from kvbench.report.runs import load_runs
from kvbench.report.summary import X_AXES
from kvbench.report.tables import paper_table, to_latex, to_markdown

log = logging.getLogger("kvbench")


def build_report(runs: list[str | Path], out: str | Path, label_by_setting: bool = False) -> dict[str, Any]:
    """Everything `python -m kvbench.report` writes; returns the table (numbers), its Markdown and the files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame, loaded = load_runs(runs, label_by_setting)
    table = paper_table(frame)
    markdown = to_markdown(table)
    caption = "Runs: " + ", ".join(run.path.name for run in loaded)
    files = [out / "table.md", out / "table.tex", out / "table.csv"]
    files[0].write_text(markdown)
    files[1].write_text(to_latex(table, caption))
    table.to_csv(files[2], index=False)
    colors = method_colors(frame["method_label"])
    for x_axis in X_AXES:  # budget, kv_mib, bits_per_element (only when rows have it)
        files += accuracy_figure(frame, out, x_axis, colors)
    files += every_task_figure(frame, out)
    return {"table": table, "markdown": markdown, "files": files, "frame": frame}
