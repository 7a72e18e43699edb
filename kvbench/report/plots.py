"""Paper-ready figures (PNG + PDF) drawn from a run's rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kvbench.report import MB, check_x_axis, rows_frame  # noqa: E402

BYTE_AXES = {"kv_mib": "KV cache (MiB, what the cache holds)", "bits_per_element": "bits per cached K/V element"}


def save(fig: Any, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", dpi=150)
    plt.close(fig)
    return paths


def _ok(rows: Any) -> pd.DataFrame:
    frame = rows if isinstance(rows, pd.DataFrame) else rows_frame(rows)
    return frame[frame["status"] == "ok"] if not frame.empty else frame


def accuracy_vs_budget(rows: Any, out_dir: Path, x_axis: str = "budget") -> list[Path]:
    """Accuracy vs budget, one line per method (and compress mode); full-cache rows as dashed lines.

    `x_axis="kv_mib"` or `"bits_per_element"` plots accuracy against the bytes the cache really holds instead
    (`accuracy_vs_<x_axis>.png`), full-cache rows as points, so eviction and quantisation compare at equal bytes.
    """
    check_x_axis(x_axis)
    frame = _ok(rows)
    if not frame.empty:
        frame = frame[frame["score"].notna()]  # unscored rows (efficiency runs) have no accuracy
    if frame.empty:
        return []
    if x_axis != "budget":
        return accuracy_vs_bytes(frame, out_dir, x_axis)
    fig, ax = plt.subplots(figsize=(6, 4))
    compressed = frame[frame["budget"].notna()]
    series = list(compressed.groupby(["method_label", "compress"])) if not compressed.empty else []
    for (label, compress), group in series:
        curve = group.groupby("budget_sort")["score"].mean().sort_index()
        ax.plot(curve.index, curve.values, marker="o", label=f"{label} ({compress})")
    for (label, compress), group in frame[frame["budget"].isna()].groupby(["method_label", "compress"]):
        ax.axhline(group["score"].mean(), linestyle="--", color="gray", label=f"{label} ({compress}, full cache)")
    int_budgets = [b for b in compressed["budget_sort"].unique() if b >= 1]
    if int_budgets and len(int_budgets) == compressed["budget_sort"].nunique():
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (KV entries per head per layer)")
    else:
        ax.set_xlabel("budget")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(", ".join(sorted(frame["task"].unique())))
    return save(fig, out_dir, "accuracy_vs_budget")


def accuracy_vs_bytes(frame: pd.DataFrame, out_dir: Path, x_axis: str) -> list[Path]:
    """One point per (method, compress, budget) at its mean bytes and accuracy, a line per method."""
    frame = frame.copy()
    frame["x"] = frame["kv_bytes"] / MB if x_axis == "kv_mib" else frame.get("bits_per_element", float("nan"))
    frame = frame[frame["x"].notna()]  # rows written before bits_per_element existed
    if frame.empty:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, compress), group in frame.groupby(["method_label", "compress"]):
        points = group.groupby("budget_label").agg(x=("x", "mean"), y=("score", "mean")).sort_values("x")
        full = group["budget"].isna().all()
        style = {"marker": "s", "linestyle": "none"} if full else {"marker": "o"}
        ax.plot(points["x"], points["y"], label=f"{label} ({compress})", **style)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(BYTE_AXES[x_axis])
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(", ".join(sorted(frame["task"].unique())))
    return save(fig, out_dir, f"accuracy_vs_{x_axis}")


def niah_heatmap(rows: Any, out_dir: Path) -> list[Path]:
    """Depth (y) x context length (x) accuracy, red-yellow-green in [0, 1], one panel per method x budget."""
    frame = _ok(rows)
    if frame.empty or "meta.depth" not in frame:
        return []
    panels = list(frame.groupby(["method_label", "compress", "budget_label"], sort=False))
    panels.sort(key=lambda item: (item[0][0], item[0][1], item[1]["budget_sort"].iloc[0]))
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
    image = None
    for index, (ax, ((label, compress, budget), group)) in enumerate(zip(axes.flat, panels, strict=False)):
        grid = group.pivot_table(index="meta.depth", columns="meta.length", values="score", aggfunc="mean")
        image = ax.imshow(grid.values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
        ax.set_xticks(range(len(grid.columns)), [f"{int(c)}" for c in grid.columns], fontsize=7)
        ax.set_yticks(range(len(grid.index)), [f"{d:g}%" for d in grid.index], fontsize=7)
        ax.set_title(f"{label} ({compress}) @ {budget}", fontsize=8)
        if index // cols == nrows - 1 or index + cols >= len(panels):  # bottom panel of its column
            ax.set_xlabel("context length (tokens)", fontsize=7)
        if index % cols == 0:
            ax.set_ylabel("needle depth", fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    return save(fig, out_dir, "niah_heatmap")


FULL_COLOR = "0.35"


def method_colors(methods: Any) -> dict[str, Any]:
    """One colour per method, the same in every figure of a report: sorted method labels over tab10/tab20,
    the full cache in gray."""
    names = sorted({str(m) for m in methods} - {"full"})
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colors: dict[str, Any] = {name: cmap(index % cmap.N) for index, name in enumerate(names)}
    colors["full"] = FULL_COLOR
    return colors


def memory_vs_turn(rows: Any, out_dir: Path) -> list[Path]:
    """Multi-turn conversations (`task=conversation`): KV cache held at the end of each turn (MiB, solid) and its
    peak during the turn (dotted) on the left, accuracy of the question turns on the right, by turn, means over
    the dialogues; one line per method x budget (the counterpart of KV-Direct's 20-turn memory curve)."""
    frame = _ok(rows)
    if frame.empty or "turn" not in frame:
        return []
    frame = frame[frame["turn"].notna()].copy()
    frame["kv_mib"] = frame["kv_bytes"] / MB
    frame["kv_mib_peak"] = frame["kv_bytes_peak"] / MB
    colors = method_colors(frame["method_label"])
    fig, (mem, acc) = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted(
        frame.groupby(["method_label", "budget_label"]), key=lambda item: (item[0][0], item[1]["budget_sort"].iloc[0])
    )
    styles = ["-", "--", "-.", ":"]
    for (label, budget), group in series:
        per_turn = group.groupby("turn").agg(kv=("kv_mib", "mean"), peak=("kv_mib_peak", "mean"))
        budgets = sorted(frame[frame["method_label"] == label]["budget_sort"].unique())
        style = styles[budgets.index(group["budget_sort"].iloc[0]) % len(styles)]
        name = label if budget == "full" else f"{label} @ {budget}"
        color = colors.get(label)
        mem.plot(per_turn.index, per_turn["kv"], linestyle=style, marker="o", markersize=3, color=color, label=name)
        mem.plot(per_turn.index, per_turn["peak"], linestyle=":", linewidth=0.8, color=color)
        scored = group[group["score"].notna()]
        if not scored.empty:
            curve = scored.groupby("turn")["score"].mean()
            acc.plot(curve.index, curve.values, linestyle=style, marker="o", markersize=4, color=color, label=name)
    for ax in (mem, acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    mem.set_xlabel("turn")
    mem.set_ylabel("KV cache (MiB; dotted: peak in the turn)")
    mem.grid(alpha=0.3)
    mem.legend(fontsize=7, loc="upper left")
    acc.set_xlabel("turn (question turns)")
    acc.set_ylabel("accuracy")
    acc.set_ylim(-0.02, 1.02)
    acc.grid(alpha=0.3)
    fig.suptitle("conversation: memory and accuracy per turn", fontsize=10)
    return save(fig, out_dir, "memory_vs_turn")
