"""Paper-ready figures (PNG + PDF) drawn from a run's rows, and what every figure shares: `save` (TrueType fonts
in PDF and PS, as submission systems require), the method colours (Okabe-Ito, colour-blind safe), plain tick
labels on logarithmic axes and a legend below the panels."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator  # noqa: E402

from kvbench.report.summary import method_order, rows_frame  # noqa: E402

BYTE_AXES = {"kv_mib": "KV cache held after compression (MiB)", "bits_per_element": "bits per cached K/V element"}
# Embedded TrueType (42) instead of Type 3 fonts: several submission systems reject Type 3.
PAPER_RC = {"pdf.fonttype": 42, "ps.fonttype": 42}
# Okabe & Ito's colour-blind-safe palette (black left for text, yellow last: faint on white).
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")
# Sequential, perceptually uniform and colour-blind safe (no red-green): heatmaps of accuracy in [0, 1].
HEATMAP_CMAP = "viridis"
FULL_COLOR = "0.35"
# Embedding TrueType subsets the fonts with fontTools, which logs every table it prunes at INFO (a run's log
# level): dozens of lines per PDF.
logging.getLogger("fontTools").setLevel(logging.WARNING)


def save(fig: Any, out_dir: Path, stem: str) -> list[Path]:
    """`<stem>.png` and `<stem>.pdf` in `out_dir` (TrueType fonts in the PDF); closes the figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    with plt.rc_context(PAPER_RC):
        for path in paths:
            fig.savefig(path, bbox_inches="tight", dpi=150)
    plt.close(fig)
    return paths


def plain_log_axis(axis: Any, ticks: Any = None) -> None:
    """A base-2 logarithmic axis labelled in plain numbers (64, 128, 0.5; never 2^6): at `ticks` when given
    (e.g. the budgets), else at powers of two; no minor ticks."""
    axis.axes.set_xscale("log", base=2) if axis.axis_name == "x" else axis.axes.set_yscale("log", base=2)
    if ticks is not None:
        axis.set_major_locator(matplotlib.ticker.FixedLocator([float(t) for t in ticks]))
    else:
        axis.set_major_locator(LogLocator(base=2, numticks=6))  # at most ~6 labels: they stay apart
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
    axis.set_minor_locator(NullLocator())


def legend_below(fig: Any, axes: Any, title: str | None = None) -> Any:
    """One legend for every panel, below them (outside every axes, so it hides no point)."""
    handles, labels = {}, []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in handles and not label.startswith("_"):
                handles[label] = handle
                labels.append(label)
    if not labels:
        return None
    fig.tight_layout()
    return fig.legend([handles[label] for label in labels], labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                      ncol=min(3, len(labels)), fontsize=7, title=title, title_fontsize=7, frameon=False)  # fmt: skip


def _ok(rows: Any) -> pd.DataFrame:
    frame = rows if isinstance(rows, pd.DataFrame) else rows_frame(rows)
    return frame[frame["status"] == "ok"] if not frame.empty else frame


def niah_heatmap(rows: Any, out_dir: Path) -> list[Path]:
    """Depth (y) x context length (x) accuracy in [0, 1] (viridis: colour-blind safe, readable in grey), one
    panel per method x budget (x compress mode when the rows have several), titled with the task and model."""
    frame = _ok(rows)
    if frame.empty or "meta.depth" not in frame:
        return []
    several_modes = frame["compress"].nunique() > 1
    panels = list(frame.groupby(["method_label", "compress", "budget_label"], sort=False))
    panels.sort(key=lambda item: (method_order(item[0][0]), item[0][1], item[1]["budget_sort"].iloc[0]))
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
    image = None
    for index, (ax, ((label, compress, budget), group)) in enumerate(zip(axes.flat, panels, strict=False)):
        grid = group.pivot_table(index="meta.depth", columns="meta.length", values="score", aggfunc="mean")
        image = ax.imshow(grid.values, cmap=HEATMAP_CMAP, vmin=0, vmax=1, aspect="auto", origin="upper")
        ax.set_xticks(range(len(grid.columns)), [f"{int(c)}" for c in grid.columns], fontsize=7)
        ax.set_yticks(range(len(grid.index)), [f"{d:g}%" for d in grid.index], fontsize=7)
        name = label if budget == "full" else f"{label} @ {budget}"
        ax.set_title(f"{name} (compress={compress})" if several_modes else name, fontsize=8)
        if index // cols == nrows - 1 or index + cols >= len(panels):  # bottom panel of its column
            ax.set_xlabel("context length (tokens)", fontsize=7)
        if index % cols == 0:
            ax.set_ylabel("needle depth", fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    models = ", ".join(sorted(frame["model"].dropna().astype(str).unique())) if "model" in frame else ""
    title = f"needle in a haystack: accuracy by depth and length{f', {models}' if models else ''}"
    fig.suptitle(title, fontsize=9, y=1.03)  # above the panel titles
    return save(fig, out_dir, "niah_heatmap")


def method_colors(methods: Any) -> dict[str, Any]:
    """One colour per method, the same in every figure of a report: sorted method labels over the Okabe-Ito
    palette (tab20 beyond seven methods), the full cache in gray."""
    names = sorted({str(m) for m in methods} - {"full"}, key=method_order)
    if len(names) <= len(OKABE_ITO):
        colors: dict[str, Any] = dict(zip(names, OKABE_ITO, strict=False))
    else:
        cmap = plt.get_cmap("tab20")
        colors = {name: cmap(index % cmap.N) for index, name in enumerate(names)}
    colors["full"] = FULL_COLOR
    return colors


def series_colors(labels: list[str]) -> dict[str, Any]:
    """A distinct colour per series (e.g. each method x budget), in order; `full...` series in gray."""
    palette = list(OKABE_ITO) if len(labels) <= len(OKABE_ITO) + 1 else list(plt.get_cmap("tab20").colors)
    others = [label for label in labels if not label.startswith("full")]
    colors = {label: palette[index % len(palette)] for index, label in enumerate(others)}
    return {label: colors.get(label, FULL_COLOR) for label in labels}


def memory_vs_turn(rows: Any, out_dir: Path) -> list[Path]:
    """Multi-turn conversations (`task=conversation`): KV cache held at the end of each turn (MiB, solid) and its
    peak during the turn (dotted) on the left, accuracy of the question turns on the right, by turn, means over
    the dialogues; one line per method x budget, each its own colour (line style per budget within a method);
    the counterpart of KV-Direct's 20-turn memory curve."""
    frame = _ok(rows)
    if frame.empty or "turn" not in frame:
        return []
    frame = frame[frame["turn"].notna()].copy()
    series = sorted(
        frame.groupby(["method_label", "budget_label"]),
        key=lambda item: (method_order(item[0][0]), item[1]["budget_sort"].iloc[0]),
    )
    names = [label if budget == "full" else f"{label} @ {budget}" for (label, budget), _ in series]
    colors = series_colors(names)
    fig, (mem, acc) = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["-", "--", "-.", ":"]
    for ((label, _), group), name in zip(series, names, strict=True):
        per_turn = group.groupby("turn").agg(kv=("kv_bytes", "mean"), peak=("kv_bytes_peak", "mean")) / 2**20
        budgets = sorted(frame[frame["method_label"] == label]["budget_sort"].unique())
        style = styles[budgets.index(group["budget_sort"].iloc[0]) % len(styles)]
        color = colors[name]
        mem.plot(per_turn.index, per_turn["kv"], linestyle=style, marker="o", markersize=3, color=color, label=name)
        mem.plot(per_turn.index, per_turn["peak"], linestyle=":", linewidth=0.8, color=color)
        scored = group[group["score"].notna()]
        if not scored.empty:
            curve = scored.groupby("turn")["score"].mean()
            acc.plot(curve.index, curve.values, linestyle=style, marker="o", markersize=4, color=color, label=name)
    for ax in (mem, acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    mem.set_xlabel("turn")
    mem.set_ylabel("KV cache (MiB; dotted: peak in the turn)")
    acc.set_xlabel("turn (question turns)")
    acc.set_ylabel("accuracy")
    acc.set_ylim(-0.02, 1.02)
    models = ", ".join(sorted(frame["model"].dropna().astype(str).unique())) if "model" in frame else ""
    fig.suptitle(f"conversation{f', {models}' if models else ''}: memory and accuracy per turn", fontsize=10)
    legend_below(fig, [mem])
    return save(fig, out_dir, "memory_vs_turn")
