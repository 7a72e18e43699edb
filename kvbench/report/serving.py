"""Serving report (`experiment=serving`): what each method buys at a memory budget, from the run's serving rows
(`kvbench.harness.serving`) and its ordinary rows (output lengths).

- `serving_batches.{csv,md}`: per model x method x budget x context x batch size: tokens/s and relative to the
  full cache at the same batch size (`x_full_same_batch`), TPOT, the KV share of decode memory traffic, the stacked
  batch's padding share and the attention path.
- `serving.{csv,md}`: per model x method x budget x context x memory budget: bytes per sequence (after
  compression, and at the end of the timed decode: what capacity divides by), the prefill's KV peak, capacity,
  tokens/s at capacity and relative to the full cache at the same memory (`x_full_equal_memory`: the headline),
  prefill and compression seconds per sequence, and the mean output length with EOS honoured relative to the full
  cache on the same samples (`output_len_x_full`: longer answers eat the gain).
- figures `throughput_vs_memory` (tokens/s at capacity vs memory budget, a panel per context) and
  `capacity_vs_context` (at the largest memory budget), one colour per method, PNG + PDF.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench.harness.serving import ROW_TYPE
from kvbench.report.efficiency import markdown_table
from kvbench.report.plots import plain_log_axis, plt, save, series_colors

log = logging.getLogger("kvbench")
MIB = 2**20


def split_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(serving rows, ordinary rows)."""
    serving = [row for row in rows if row.get("row_type") == ROW_TYPE]
    return serving, [row for row in rows if row.get("row_type") != ROW_TYPE]


def budget_label(budget: Any) -> str:
    return "-" if budget is None or (isinstance(budget, float) and pd.isna(budget)) else f"{budget:g}"


def setting_label(method_label: str, budget: Any) -> str:
    return method_label if budget_label(budget) == "-" else f"{method_label} @ {budget_label(budget)}"


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["budget_label"] = frame["budget"].map(budget_label) if "budget" in frame else "-"
    frame["setting"] = [setting_label(m, b) for m, b in zip(frame["method_label"], frame["budget"], strict=True)]
    return frame


def output_lengths(ordinary: list[dict[str, Any]]) -> pd.DataFrame:
    """Mean generated tokens (EOS honoured) per model x method x budget x context, and relative to the full cache on
    the same samples."""
    ok = [row for row in ordinary if row.get("status") == "ok" and row.get("output_tokens") is not None]
    if not ok:
        return pd.DataFrame(columns=["model", "method_label", "budget_label", "context", "output_tokens_mean"])
    frame = pd.DataFrame(
        {
            "model": [row.get("model") for row in ok],
            "method_label": [row["method_label"] for row in ok],
            "budget_label": [budget_label(row.get("budget")) for row in ok],
            "context": [int((row.get("meta") or {}).get("length", 0)) for row in ok],
            "sample_id": [row["sample_id"] for row in ok],
            "output_tokens": [row["output_tokens"] for row in ok],
            "full": [not row.get("budget") and row["method"] == "full" for row in ok],
        }
    )
    full = frame[frame["full"]].set_index(["model", "context", "sample_id"])["output_tokens"]
    out = []
    for (model, method, budget, context), group in frame.groupby(
        ["model", "method_label", "budget_label", "context"], sort=True
    ):
        index = [(model, context, sample) for sample in group["sample_id"]]
        paired = [i for i in index if i in full.index]
        shift = None
        if paired:
            mine = group.set_index("sample_id").loc[[i[2] for i in paired], "output_tokens"].mean()
            shift = float(mine / full.loc[paired].mean()) if full.loc[paired].mean() else None
        out.append(
            {
                "model": model,
                "method_label": method,
                "budget_label": budget,
                "context": context,
                "output_tokens_mean": float(group["output_tokens"].mean()),
                "output_len_x_full": shift,
            }  # fmt: skip
        )
    return pd.DataFrame(out)


def batch_table(serving: pd.DataFrame) -> pd.DataFrame:
    """Throughput and TPOT per batch size (fixed batch rows)."""
    batches = serving[serving["kind"] == "batch"].copy()
    if batches.empty:
        return batches
    batches["tpot_ms"] = batches["tpot_s"] * 1000
    batches["kv_mib_per_seq"] = batches["kv_bytes_per_seq"] / MIB
    keys = ["model", "context", "batch_size"]
    full = batches[(batches["method"] == "full") & (batches["budget_label"] == "-")].set_index(keys)["tokens_per_s"]
    # the same batch size and context: what a smaller cache changes per step (the LMDeploy study's comparison)
    batches["x_full_same_batch"] = [
        row.tokens_per_s / full.loc[(row.model, row.context, row.batch_size)]
        if (row.model, row.context, row.batch_size) in full.index
        else None
        for row in batches.itertuples()
    ]
    columns = [
        "model", "context", "method_label", "budget_label", "batch_size", "tokens_per_s", "x_full_same_batch",
        "tpot_ms", "kv_share", "kv_mib_per_seq", "batch_padding_fraction", "batch_attention", "distinct_samples",
    ]  # fmt: skip
    return batches[columns].sort_values(["model", "context", "method_label", "budget_label", "batch_size"])


def capacity_table(serving: pd.DataFrame, ordinary: list[dict[str, Any]]) -> pd.DataFrame:
    """One line per memory budget: bytes, capacity, throughput at capacity and relative to the full cache."""
    cap = serving[serving["kind"] == "capacity"].copy()
    if cap.empty:
        return cap
    for column in ("tokens_per_s", "tpot_s", "kv_share", "capacity_validated", "note"):
        if column not in cap:
            cap[column] = None
    keys = ["model", "context", "memory_gib"]
    full = cap[(cap["method"] == "full") & (cap["budget_label"] == "-")].set_index(keys)["tokens_per_s"]
    cap["x_full_equal_memory"] = [
        row.tokens_per_s / full.loc[(row.model, row.context, row.memory_gib)]
        if (row.model, row.context, row.memory_gib) in full.index
        and pd.notna(row.tokens_per_s)
        and pd.notna(full.loc[(row.model, row.context, row.memory_gib)])
        else None
        for row in cap.itertuples()
    ]
    cap["kv_mib_compressed"] = cap["kv_bytes_compressed_per_seq"] / MIB
    cap["kv_mib_per_seq"] = cap["kv_bytes_per_seq"] / MIB
    cap["kv_mib_prefill_peak"] = cap["kv_bytes_prefill_peak"] / MIB
    cap["tpot_ms"] = cap["tpot_s"] * 1000
    lengths = output_lengths(ordinary)
    cap = cap.merge(lengths, on=["model", "method_label", "budget_label", "context"], how="left")
    columns = [
        "model", "context", "memory_gib", "method_label", "budget_label", "kv_mib_compressed", "kv_mib_per_seq",
        "kv_mib_prefill_peak", "capacity", "tokens_per_s", "tpot_ms", "x_full_equal_memory", "kv_share",
        "prefill_s_per_seq", "compress_s_per_seq", "output_tokens_mean", "output_len_x_full", "capacity_validated",
        "note",
    ]  # fmt: skip
    return cap[[c for c in columns if c in cap]].sort_values(["model", "context", "memory_gib", "method_label"])


def throughput_vs_memory(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Tokens/s at each memory budget's capacity, one line per method and budget, a panel per context."""
    contexts = sorted(frame["context"].unique())
    colors = series_colors(sorted(frame["setting"].unique()))
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.6 * len(contexts), 3.8), squeeze=False)
    for ax, context in zip(axes[0], contexts, strict=True):
        part = frame[(frame["context"] == context) & frame["tokens_per_s"].notna()]
        for setting, group in part.groupby("setting", sort=True):
            group = group.sort_values("memory_gib")
            ax.plot(group["memory_gib"], group["tokens_per_s"], marker="o", color=colors[setting], label=setting)
        ax.set_title(f"context {context} tokens", fontsize=9)
        ax.set_xlabel("memory budget (GiB)")
        ax.set_ylabel("decode tokens/s at capacity")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"throughput at equal memory: {', '.join(sorted(map(str, frame['model'].unique())))}", fontsize=10)
    return save(fig, out_dir, "throughput_vs_memory")


def capacity_vs_context(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Concurrent sequences that fit the largest memory budget vs context length, one line per method."""
    memory = frame["memory_gib"].max()
    part = frame[frame["memory_gib"] == memory]
    colors = series_colors(sorted(part["setting"].unique()))
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for setting, group in part.groupby("setting", sort=True):
        group = group.sort_values("context")
        ax.plot(group["context"], group["capacity"], marker="o", color=colors[setting], label=setting)
    contexts = sorted(part["context"].unique())
    plain_log_axis(ax.xaxis, contexts)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("sequences that fit")
    ax.set_title(f"capacity at {memory:g} GiB (weights and activation reserve subtracted)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return save(fig, out_dir, "capacity_vs_context")


def serving_report(rows: list[dict[str, Any]], out_dir: Path) -> tuple[list[Path], str]:
    """Write both tables (CSV + Markdown) and both figures into `out_dir`; returns the files and the capacity
    table as text ("" without serving rows)."""
    serving_rows, ordinary = split_rows(rows)
    if not serving_rows:
        return [], ""
    serving = _frame(serving_rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tables = {"serving_batches": batch_table(serving), "serving": capacity_table(serving, ordinary)}
    for stem, table in tables.items():
        if table.empty:
            continue
        table.to_csv(out_dir / f"{stem}.csv", index=False)
        (out_dir / f"{stem}.md").write_text(markdown_table(table) + "\n")
        written += [out_dir / f"{stem}.csv", out_dir / f"{stem}.md"]
    capacity_rows = serving[serving["kind"] == "capacity"]
    if not capacity_rows.empty:
        if "tokens_per_s" not in capacity_rows:
            capacity_rows = capacity_rows.assign(tokens_per_s=float("nan"))
        written += throughput_vs_memory(capacity_rows, out_dir) + capacity_vs_context(capacity_rows, out_dir)
    text = "\n\n".join(
        table.to_string(index=False, float_format=lambda x: f"{x:.3g}") for table in tables.values() if not table.empty
    )
    return written, text
