"""The cross-run paper report as a function (`python -m kvbench.report` and the notebook call it): runs ->
table.md, table.tex, table.csv, accuracy_vs_budget and accuracy_vs_kv_mib figures, task figures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from kvbench.plots import method_colors
from kvbench.report.figures import accuracy_figure, task_figures
from kvbench.report.runs import Run, load_runs
from kvbench.report.summary import X_AXES
from kvbench.report.tables import paper_table, to_latex, to_markdown

log = logging.getLogger("kvbench")


def run_tasks(runs: list[Run]) -> dict[str, Any]:
    """A task object per task name (for its figures), built from the first run's config that has it."""
    from kvbench.tasks import build_task

    tasks: dict[str, Any] = {}
    for run in runs:
        cfg = run.config.get("task")
        if not cfg or cfg.get("name") in tasks:
            continue
        try:
            tasks[cfg["name"]] = build_task(OmegaConf.create(cfg))
        except (ValueError, FileNotFoundError) as err:  # e.g. its data moved: the table still gets written
            log.warning("no %s figures: %s", cfg.get("name"), err)
    return tasks


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
    files += task_figures(frame, run_tasks(loaded), out)
    return {"table": table, "markdown": markdown, "files": files, "frame": frame}
