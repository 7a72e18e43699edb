"""Each task's own figures, keyed by task name: the NIAH depth x length heatmap, IELTS accuracy by question
position, conversation memory by turn, the efficiency report of `task=synthetic_length`. The run's summary
and the cross-run report draw them on the rows of that task (`task_figures`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench.report.efficiency import efficiency_report
from kvbench.report.plots import memory_vs_turn, niah_heatmap, plt, save
from kvbench.report.summary import budget_label, rows_frame
from kvbench.tasks.base import QUESTION_POSITIONS
from kvbench.tasks.ielts import CHANCE, QUESTION_TYPES


def _series_label(method_label: str, budget_label: str, compress: str | None) -> str:
    label = method_label if budget_label == "full" else f"{method_label} @ {budget_label}"
    return f"{label} ({compress})" if compress else label


def position_figure(rows: Any, out_dir: Path, stem: str = "ielts_position") -> list[Path]:
    """Accuracy by question position (x), one line per method x budget (full cache dashed); the first panel
    pools all question types, the others show one type each with its chance level (dotted)."""
    frame = rows if isinstance(rows, pd.DataFrame) else rows_frame(rows)
    needed = {"status", "score", "question_position", "meta.question_type", "method"}
    if frame.empty or not needed <= set(frame.columns):
        return []
    frame = frame[frame["status"] == "ok"].copy()
    if frame.empty:
        return []
    methods = frame["method_label"] if "method_label" in frame else frame["method"]
    budgets = frame["budget"].map(budget_label)
    several_modes = "compress" in frame and frame["compress"].nunique() > 1
    frame["series"] = [
        _series_label(m, b, c if several_modes else None)
        for m, b, c in zip(methods, budgets, frame["compress"] if several_modes else [None] * len(frame), strict=True)
    ]
    frame["is_full"] = budgets == "full"
    frame["method_order"] = list(methods)
    frame["budget_order"] = frame["budget"].map(lambda b: float("inf") if b is None or pd.isna(b) else float(b))
    order = frame.sort_values(["is_full", "method_order", "budget_order"], ascending=[False, True, True])
    series = list(dict.fromkeys(order["series"]))
    positions = [p for p in QUESTION_POSITIONS if p in set(frame["question_position"])]
    types = [t for t in QUESTION_TYPES if t in set(frame["meta.question_type"])]
    panels = [("all types", frame)] + [(t, frame[frame["meta.question_type"] == t]) for t in types]

    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.2), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, panel) in zip(axes[0], panels, strict=True):
        accuracy = panel.groupby(["series", "question_position"])["score"].mean()
        for index, name in enumerate(series):
            if name not in accuracy.index.get_level_values(0):
                continue
            curve = accuracy[name].reindex(positions)
            full = bool(frame.loc[frame["series"] == name, "is_full"].iloc[0])
            ax.plot(
                range(len(positions)),
                curve.values,
                marker="s" if full else "o",
                linestyle="--" if full else "-",
                color="black" if full else colors[index % len(colors)],
                zorder=4 if full else 2,  # the reference stays visible when a method matches it
                label=name,
            )
        chance = CHANCE.get(title)
        if title == "matching" and "meta.num_paragraphs" in panel:
            chance = float((1 / panel["meta.num_paragraphs"].astype(float)).mean())
        if chance is not None:
            ax.axhline(chance, color="gray", linestyle=":", linewidth=1, label="_chance")
        questions = panel["sample_id"].nunique() // max(1, len(positions)) if "sample_id" in panel else len(panel)
        ax.set_title(f"{title} (n={questions})", fontsize=9)
        ax.set_xticks(range(len(positions)), positions, fontsize=8)
        ax.set_xlabel("question position", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (exact match)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle("IELTS-style reading: accuracy by question position (dotted: chance)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    return save(fig, Path(out_dir), stem)


TASK_FIGURES: dict[str, Callable[[Any, Path], list[Path]]] = {
    "niah": niah_heatmap,
    "ielts": position_figure,
    "conversation": memory_vs_turn,
    "synthetic_length": efficiency_report,
}


def task_figures(task: str, rows: Any, out_dir: Path) -> list[Path]:
    """Task `task`'s own figures (PNG + PDF) from its rows (a DataFrame of the run's rows, the sample's meta
    as `meta.<key>`); a task without figures of its own draws none."""
    draw = TASK_FIGURES.get(task)
    return draw(rows, out_dir) if draw is not None else []
