"""Reports: one run's summary table (`summary`, printed by every run) and the cross-run paper report
(`runs`: load and label runs, `tables`: Markdown/LaTeX tables with bootstrap CIs, `figures`, `paper`;
`python -m kvbench.report results/<run> [...] --out <dir>`)."""

from kvbench.report.summary import MB, X_AXES, budget_label, check_x_axis, format_table, rows_frame, summarize

__all__ = ["MB", "X_AXES", "budget_label", "check_x_axis", "format_table", "rows_frame", "summarize"]
