"""Reports: one run's summary table (`summary`, printed by every run) and the cross-run paper report
(`runs`: load and label runs, `tables`: Markdown/LaTeX tables with bootstrap CIs, `figures`, `paper`;
`python -m kvbench.report results/<run> [...] --out <dir>`)."""

from kvbench.report.summary import (
    COLUMN_LEGEND,
    MB,
    MIB,
    X_AXES,
    budget_label,
    check_x_axis,
    composed_label,
    format_table,
    method_order,
    rows_frame,
    summarize,
)

__all__ = [
    "COLUMN_LEGEND",
    "MB",
    "MIB",
    "X_AXES",
    "budget_label",
    "check_x_axis",
    "composed_label",
    "format_table",
    "method_order",
    "rows_frame",
    "summarize",
]
