"""Cross-run figures: accuracy vs budget and accuracy vs KV bytes, one panel per task, one line per method
(colour fixed per method across every figure, `kvbench.report.plots.method_colors`), setting and compress mode
(line style); the full cache as a dashed line (budget axis) or a star (bytes axis). Plus each task's own
figures (`kvbench.report.task_figures`) on the rows of that task."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench.report.plots import BYTE_AXES, FULL_COLOR, method_colors, plt, save
from kvbench.report.summary import MB, check_x_axis
from kvbench.report.task_figures import task_figures

log = logging.getLogger("kvbench")
LINESTYLES = ("-", "--", ":", "-.")


def _scored(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[(frame["status"] == "ok") & frame["score"].notna()]


def _series_keys(frame: pd.DataFrame) -> list[str]:
    keys = ["method_label"]
    if frame["compress"].nunique() > 1:
        keys.append("compress")
    if "setting" in frame and frame["setting"].nunique() > 1:
        keys.append("setting")
    return keys


def accuracy_figure(frame: pd.DataFrame, out_dir: Path, x: str, colors: dict[str, Any] | None = None) -> list[Path]:
    """x: the single-run figure's axes (`kvbench.report.X_AXES`): "budget" (KV entries per head per layer, or
    kept fraction), "kv_mib" (KV bytes actually held) or "bits_per_element" (quantised storage)."""
    check_x_axis(x)
    scored = _scored(frame)
    if x == "bits_per_element":
        if "bits_per_element" not in scored:
            return []
        scored = scored[scored["bits_per_element"].notna()]
    if scored.empty:
        return []
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
        for values, group in rows.groupby(keys, sort=True):
            values = values if isinstance(values, tuple) else (values,)
            series = dict(zip(keys, values, strict=True))
            label = " / ".join(str(v) for v in values)
            style = dict(
                color=colors.get(series["method_label"], FULL_COLOR),
                linestyle=styles.get(series.get("setting", ""), "-"),
            )
            full = group["budget"].isna()
            measure = group["kv_bytes"] / MB if x != "bits_per_element" else group["bits_per_element"]
            group = group.assign(x=measure)
            points = group[~full].groupby("budget_sort").agg(score=("score", "mean"), x=("x", "mean"))
            if x == "budget":
                if full.all():
                    ax.axhline(
                        group["score"].mean(), linestyle="--", color=style["color"], label=f"{label} (full cache)"
                    )
                    continue
                ax.plot(points.index, points["score"], marker="o", label=label, **style)
            else:
                if full.any():
                    ax.plot(group[full]["x"].mean(), group[full]["score"].mean(), marker="*", markersize=11,
                            color=style["color"], linestyle="none", label=f"{label} (full cache)")  # fmt: skip
                if not points.empty:
                    ax.plot(points["x"], points["score"], marker="o", label=label, **style)
        budgets = rows[rows["budget"].notna()]["budget_sort"]
        if x == "budget":
            if len(budgets) and (budgets >= 1).all():
                ax.set_xscale("log", base=2)
            ax.set_xlabel(
                "budget (KV entries per head per layer)" if len(budgets) and (budgets >= 1).all() else "budget"
            )
        else:
            ax.set_xscale("log", base=2)
            ax.set_xlabel(BYTE_AXES[x])
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return save(fig, out_dir, f"accuracy_vs_{x}")  # the single-run figure's names


def every_task_figure(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Each task's own figures (e.g. the NIAH heatmap) from its rows, in `<out>/<task>/`."""
    paths: list[Path] = []
    for name in sorted(frame["task"].dropna().unique()) if "task" in frame else []:
        paths += task_figures(str(name), frame[frame["task"] == name], out_dir / str(name))
    return paths
