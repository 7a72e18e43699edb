"""Efficiency report of a run (`experiment=efficiency`): a table of TTFT, TPOT, prefill / decode peak memory
and KV bytes per context length x method x budget x prefill mode, and the figures `memory_vs_context` and
`tpot_vs_context` (PNG + PDF), one line per method / budget / prefill mode.

Memory columns are what the rows' `peak_mem_kind` says: on CUDA `max_memory_allocated` reset per phase; on
CPU the process's peak RSS during the phase (model weights and everything else resident included).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench.report import rows_frame
from kvbench.report.plots import plt, save

log = logging.getLogger("kvbench")
MIB = 2**20
# (column of the table, source column of the rows, scale)
TABLE_COLUMNS = (
    ("prompt_tokens", "prompt_tokens", 1),
    ("ttft_s", "ttft_s", 1),
    ("tpot_ms", "tpot_s", 1000),
    ("peak_prefill_mib", "peak_mem_prefill_bytes", 1 / MIB),
    ("peak_decode_mib", "peak_mem_decode_bytes", 1 / MIB),
    ("kv_mib", "kv_bytes", 1 / MIB),  # held at the end of the row
    ("kv_peak_mib", "kv_bytes_peak", 1 / MIB),  # the most held after compression (tail and decoding included)
    ("kv_full_mib", "kv_bytes_full", 1 / MIB),
    ("prefill_max_cache_len", "prefill_max_cache_len", 1),
)
KEYS = ["model", "method_label", "budget_label", "prefill_mode", "context"]


def efficiency_frame(rows: Any) -> pd.DataFrame:
    """The ok rows with `context` (the sample's nominal length) and `setting` (a line label)."""
    frame = rows if isinstance(rows, pd.DataFrame) else rows_frame(rows)
    if frame.empty or "status" not in frame:
        return pd.DataFrame()
    frame = frame[frame["status"] == "ok"].copy()
    if frame.empty:
        return frame
    if "prefill_mode" not in frame:  # rows written before chunked prefill existed were one-shot
        frame["prefill_mode"] = "oneshot"
    frame["prefill_mode"] = frame["prefill_mode"].fillna("oneshot")
    if "prefill_max_cache_len" not in frame:
        frame["prefill_max_cache_len"] = frame["compressed_tokens"]
    frame["context"] = frame["meta.length"] if "meta.length" in frame else frame["prompt_tokens"]
    several_models = frame["model"].nunique() > 1
    frame["setting"] = [
        (f"{model}: " if several_models else "") + f"{method} @ {budget}, {mode}"
        for model, method, budget, mode in zip(
            frame["model"], frame["method_label"], frame["budget_label"], frame["prefill_mode"], strict=True
        )
    ]
    return frame


def efficiency_table(rows: Any) -> pd.DataFrame:
    """Means per model x method x budget x prefill mode x context length (n = rows averaged)."""
    frame = efficiency_frame(rows)
    if frame.empty:
        return frame
    grouped = frame.groupby(KEYS, dropna=False)
    table = grouped.size().rename("n").to_frame()
    for name, source, scale in TABLE_COLUMNS:
        table[name] = grouped[source].mean() * scale
    table["mem_kind"] = grouped["peak_mem_kind"].first()
    table = table.reset_index().rename(columns={"method_label": "method", "budget_label": "budget"})
    budget_order = frame.groupby("budget_label")["budget_sort"].first()
    table["_budget"] = table["budget"].map(budget_order)
    table = table.sort_values(["model", "method", "_budget", "prefill_mode", "context"]).drop(columns="_budget")
    return table.reset_index(drop=True)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub markdown table (no extra dependency)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if pd.isna(value) else f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
        # a label such as kivi[snapkv](k_bits=4) is text, not a link; a | would end the cell
        return str(value).replace("[", "\\[").replace("]", "\\]").replace("|", "\\|")

    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _plot_lines(ax: Any, frame: pd.DataFrame, column: str, scale: float) -> None:
    """One line per setting: a colour per model / method / budget, solid for one-shot and dashed for chunked."""
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours: dict[str, str] = {}
    for setting, group in frame.groupby("setting", sort=True):
        base = setting.rsplit(", ", 1)[0]
        colour = colours.setdefault(base, palette[len(colours) % len(palette)])
        curve = group.groupby("context")[column].mean().sort_index() * scale
        oneshot = group["prefill_mode"].iloc[0] == "oneshot"
        ax.plot(
            curve.index,
            curve.values,
            color=colour,
            marker="o" if oneshot else "s",
            linestyle="-" if oneshot else "--",
            label=setting,
        )
    contexts = sorted(frame["context"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [f"{c / 1024:g}K" if c >= 1024 else str(c) for c in contexts])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.grid(alpha=0.3)


def _memory_unit(frame: pd.DataFrame, columns: list[str]) -> tuple[str, float]:
    largest = max(float(frame[c].max()) for c in columns)
    return ("GiB", 1 / 2**30) if largest >= 2**31 else ("MiB", 1 / MIB)


def memory_vs_context(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Prefill peak, decode peak and KV cache bytes vs context length."""
    kind = str(frame["peak_mem_kind"].iloc[0])
    panels = (
        ("peak_mem_prefill_bytes", "prefill peak ({unit}, " + kind + ")"),
        ("peak_mem_decode_bytes", "decode peak ({unit}, " + kind + ")"),
        ("kv_bytes_peak", "KV cache peak after compression ({unit})"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4))
    for ax, (column, title) in zip(axes, panels, strict=True):
        unit, scale = _memory_unit(frame, [column])
        _plot_lines(ax, frame, column, scale)
        ax.set_title(title.format(unit=unit), fontsize=9)
        ax.set_ylabel(unit)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"memory vs context: {', '.join(sorted(frame['model'].unique()))}", fontsize=10)
    return save(fig, out_dir, "memory_vs_context")


def tpot_vs_context(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """TPOT (ms per output token) and TTFT (s) vs context length."""
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4))
    _plot_lines(axes[0], frame, "tpot_s", 1000)
    axes[0].set_ylabel("TPOT (ms / token)")
    axes[0].set_title("time per output token", fontsize=9)
    _plot_lines(axes[1], frame, "ttft_s", 1)
    axes[1].set_ylabel("TTFT (s)")
    axes[1].set_title("time to first token (prefill + compression)", fontsize=9)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"latency vs context: {', '.join(sorted(frame['model'].unique()))}", fontsize=10)
    return save(fig, out_dir, "tpot_vs_context")


def efficiency_report(rows: Any, out_dir: Path) -> list[Path]:
    """Write `efficiency.csv`, `efficiency.md` and both figures; logs the table. Returns the files written."""
    frame = efficiency_frame(rows)
    if frame.empty:
        return []
    table = efficiency_table(frame)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "efficiency.csv", out_dir / "efficiency.md"
    table.to_csv(csv_path, index=False)
    md_path.write_text(markdown_table(table) + "\n")
    log.info("efficiency table (%s):\n%s", md_path, table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return [csv_path, md_path, *memory_vs_context(frame, out_dir), *tpot_vs_context(frame, out_dir)]
