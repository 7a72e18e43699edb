"""Accuracy figures, for one run (`accuracy_vs_budget`, drawn by every run) and across runs (`accuracy_figure`,
the report): accuracy vs budget, vs KV MiB held or vs bits per element, one panel per task titled with the task
and the model, one line per method (colour fixed per method across every figure, `plots.method_colors`),
setting (line style) and compress mode; each point the mean over samples with its bootstrap 95% confidence
interval as an error bar; the full cache as a dashed line with its interval as a band (budget axis) or a star
(bytes axes). Budget and byte axes are logarithmic with plain tick labels (64, 128); the legend sits below the
panels, where it hides no point, and says what the compress mode means. Plus each task's own figures
(`kvbench.report.task_figures`) on the rows of that task."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench.report.plots import BYTE_AXES, FULL_COLOR, legend_below, method_colors, plain_log_axis, plt, save
from kvbench.report.summary import check_x_axis, method_order, rows_frame
from kvbench.report.tables import bootstrap_ci
from kvbench.report.task_figures import task_figures

log = logging.getLogger("kvbench")
LINESTYLES = ("-", "--", ":", "-.")
X_COLUMN = {"budget": "budget_sort", "kv_mib": "kv_mib", "bits_per_element": "bits_per_element"}
# What `compress` means, in a legend.
COMPRESS_MEANING = {
    "prompt": "question compressed with the context",
    "context": "context compressed, question appended after",
}


def compress_meaning(mode: Any) -> str:
    return COMPRESS_MEANING.get(str(mode), f"compress={mode}")


def run_title(frame: pd.DataFrame) -> str:
    """`<task(s)>, <model(s)>` of a frame of rows: what a figure or table title names."""
    tasks = sorted(frame["task"].dropna().astype(str).unique()) if "task" in frame else []
    models = sorted(frame["model"].dropna().astype(str).unique()) if "model" in frame else []
    return ", ".join(part for part in (" + ".join(tasks), " + ".join(models)) if part)


def _scored(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "score" not in frame:
        return frame.iloc[0:0]
    return frame[(frame["status"] == "ok") & frame["score"].notna()]


def _series_keys(frame: pd.DataFrame) -> list[str]:
    keys = ["method_label"]
    if frame["compress"].nunique() > 1:
        keys.append("compress")
    if "setting" in frame and frame["setting"].nunique() > 1:
        keys.append("setting")
    return keys


def _series_label(series: dict[str, Any]) -> str:
    label = str(series["method_label"])
    if "compress" in series:
        label += f" ({compress_meaning(series['compress'])})"
    if series.get("setting"):
        label += f" [{series['setting']}]"
    return label


def _points(group: pd.DataFrame) -> pd.DataFrame:
    """Per budget: x (mean), score mean and its bootstrap 95% interval, ordered by budget."""
    points = []
    for budget, rows in group.groupby("budget_sort"):
        low, high = bootstrap_ci(rows["score"])
        points.append({"budget": budget, "x": rows["x"].mean(), "score": rows["score"].mean(), "lo": low, "hi": high})
    return pd.DataFrame(points).sort_values("budget") if points else pd.DataFrame()


def _errorbar(ax: Any, points: pd.DataFrame, x: Any, **style: Any) -> None:
    yerr = [(points["score"] - points["lo"]).clip(lower=0), (points["hi"] - points["score"]).clip(lower=0)]
    ax.errorbar(x, points["score"], yerr=yerr, capsize=3, elinewidth=0.8, **style)


def accuracy_figure(frame: pd.DataFrame, out_dir: Path, x: str, colors: dict[str, Any] | None = None) -> list[Path]:
    """x: the figure's axis (`kvbench.report.X_AXES`): "budget" (KV entries per head per layer, or kept
    fraction), "kv_mib" (KV MiB held after compression) or "bits_per_element" (quantised storage)."""
    check_x_axis(x)
    scored = _scored(frame)
    if x == "bits_per_element":
        if "bits_per_element" not in scored:
            return []
        scored = scored[scored["bits_per_element"].notna()]
    if scored.empty:
        return []
    colors = colors or method_colors(scored["method_label"])
    tasks = sorted(scored["task"].unique())
    keys = _series_keys(scored)
    styles = {
        value: LINESTYLES[i % len(LINESTYLES)]
        for i, value in enumerate(sorted(scored.get("setting", pd.Series([""])).unique()))
    }
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = scored[scored["task"] == task]
        groups = sorted(rows.groupby(keys, sort=True), key=lambda item: method_order(item[1]["method_label"].iloc[0]))
        for values, group in groups:
            series = dict(zip(keys, values if isinstance(values, tuple) else (values,), strict=True))
            label = _series_label(series)
            style = dict(
                color=colors.get(series["method_label"], FULL_COLOR),
                linestyle=styles.get(series.get("setting", ""), "-"),
            )
            full = group["budget"].isna()
            group = group.assign(x=group[X_COLUMN[x]])
            points = _points(group[~full])
            if x == "budget":
                if full.all():
                    mean, (low, high) = group["score"].mean(), bootstrap_ci(group["score"])
                    ax.axhline(mean, linestyle="--", color=style["color"], label=f"{label} (full cache)")
                    ax.axhspan(low, high, color=style["color"], alpha=0.12, linewidth=0)
                    continue
                _errorbar(ax, points, points["budget"], marker="o", label=label, **style)
            else:
                if full.any():
                    whole = _points(group[full].assign(budget_sort=0.0))
                    _errorbar(ax, whole, whole["x"], marker="*", markersize=11, color=style["color"],
                              linestyle="none", label=f"{label} (full cache)")  # fmt: skip
                if not points.empty:
                    _errorbar(ax, points, points["x"], marker="o", label=label, **style)
        budgets = sorted(rows[rows["budget"].notna()]["budget_sort"].unique())
        if x == "budget":
            whole_entries = bool(budgets) and all(b >= 1 for b in budgets)
            if whole_entries:
                plain_log_axis(ax.xaxis, budgets)
            ax.set_xlabel("budget (KV entries per head per layer)" if whole_entries else "budget (kept fraction)")
        else:
            plain_log_axis(ax.xaxis)
            ax.set_xlabel(BYTE_AXES[x])
        ax.set_ylabel("accuracy (95% CI)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(run_title(rows), fontsize=10)
        ax.grid(alpha=0.3)
    modes = scored["compress"].dropna().unique()
    legend_below(fig, axes[0], title=f"compress: {compress_meaning(modes[0])}" if len(modes) == 1 else None)
    return save(fig, out_dir, f"accuracy_vs_{x}")  # the single-run figure's names


def accuracy_vs_budget(rows: Any, out_dir: Path, x_axis: str = "budget") -> list[Path]:
    """One run's accuracy figure (`accuracy_vs_<x_axis>`, as `accuracy_figure`); unscored rows draw none."""
    frame = rows if isinstance(rows, pd.DataFrame) else rows_frame(rows)
    return accuracy_figure(frame, Path(out_dir), x_axis) if not frame.empty else []


def every_task_figure(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Each task's own figures (e.g. the NIAH heatmap) from its rows, in `<out>/<task>/`."""
    paths: list[Path] = []
    for name in sorted(frame["task"].dropna().unique()) if "task" in frame else []:
        paths += task_figures(str(name), frame[frame["task"] == name], out_dir / str(name))
    return paths
