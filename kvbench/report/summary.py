"""One run's rows -> summary table (method x budget -> accuracy, fidelity vs full, kept fraction, KV MB, latency)."""

from __future__ import annotations

from typing import Any

import pandas as pd

MB = 2**20
# What the summary is ordered by within a method, and the accuracy figure's x axis: the nominal budget, or the
# bytes the cache really holds (KV MiB or bits per cached element), so eviction and quantisation compare at
# equal bytes.
X_AXES = {"budget": "budget_sort", "kv_mib": "kv_mb", "bits_per_element": "bits_per_element"}


def check_x_axis(x_axis: str) -> str:
    if x_axis not in X_AXES:
        raise ValueError(f"unknown x_axis '{x_axis}'. Valid x axes: {', '.join(X_AXES)}.")
    return x_axis


def rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per sample x method x budget; the sample's meta flattened as `meta.<key>`."""
    frame = pd.json_normalize(rows, sep=".") if rows else pd.DataFrame()
    if frame.empty:
        return frame
    frame["budget_label"] = frame["budget"].map(budget_label)
    frame["budget_sort"] = frame["budget"].map(lambda b: float("inf") if b is None or pd.isna(b) else float(b))
    return frame


def budget_label(budget: Any) -> str:
    if budget is None or (isinstance(budget, float) and pd.isna(budget)):
        return "full"
    if isinstance(budget, float) and budget.is_integer():
        return str(int(budget))
    return str(budget)


def entries_label(values: pd.Series) -> str:
    """The integer entries per KV head per layer of a group: one number, or min-max when prompts differ."""
    known = values.dropna()
    if known.empty:
        return "all"
    low, high = int(known.min()), int(known.max())
    return str(low) if low == high else f"{low}-{high}"


def summarize(rows: list[dict[str, Any]], x_axis: str = "budget") -> pd.DataFrame:
    """Mean metrics per (task, method, compress, budget); within a method ordered by `x_axis` (`X_AXES`)."""
    check_x_axis(x_axis)
    frame = rows_frame(rows)
    if frame.empty:
        return frame
    frame["ok"] = frame["status"] == "ok"
    keys = ["task", "method_label", "compress", "budget_label", "budget_sort"]
    # Benchmarks with subtasks are reported per subtask (LongBench/RULER convention: the mean per subtask).
    for column in ("question_position", "subtask", "prefill_mode"):
        if column in frame and frame[column].nunique() > 1:
            keys.insert(1, column)
    ok = frame[frame["ok"]]
    # Rows from before a column existed (older runs) lack it; the summary then leaves it out.
    optional = {
        "token_match": ("token_match", "mean"),
        "kl_full": ("kl_full", "mean"),
        "bits_per_element": ("bits_per_element", "mean"),
    }
    # kept_fraction and kv_mb: what the cache holds at the END of each row (decode-time eviction included);
    # kv_mb_peak: the most it held after compression; entries: the integer KV entries per KV head per layer the
    # budget resolved to (a float budget b is max(1, round(b * T)) of each prompt).
    held = {
        "entries": ("budget_entries", entries_label),
        "kept_fraction": ("kept_fraction", "mean"),
        "kv_mb": ("kv_bytes", lambda s: s.mean() / MB),
        "kv_mb_peak": ("kv_bytes_peak", lambda s: s.mean() / MB),
    }
    summary = ok.groupby(keys, dropna=False).agg(
        n=("score", "size"),
        accuracy=("score", "mean"),
        **{name: spec for name, spec in optional.items() if spec[0] in ok},
        compressed=("compressed", "mean"),
        **{name: spec for name, spec in held.items() if spec[0] in ok},
        kv_mb_full=("kv_bytes_full", lambda s: s.mean() / MB),
        prompt_tokens=("prompt_tokens", "mean"),
        ttft_s=("ttft_s", "mean"),
        compress_s=("compress_s", "mean"),
        tpot_ms=("tpot_s", lambda s: s.mean() * 1000),
    )
    errors = frame[~frame["ok"]].groupby(keys, dropna=False).size().rename("errors")
    summary = summary.join(errors, how="outer").fillna({"errors": 0, "n": 0}).reset_index()
    summary["errors"] = summary["errors"].astype(int)
    summary["n"] = summary["n"].astype(int)
    groups = ("task", "subtask", "method_label", "compress", "question_position", "prefill_mode")
    sort_by = X_AXES[x_axis] if X_AXES[x_axis] in summary else "budget_sort"
    order = [k for k in groups if k in keys] + [sort_by]
    summary = summary.sort_values(order).drop(columns="budget_sort")
    return summary.rename(columns={"budget_label": "budget", "method_label": "method"}).reset_index(drop=True)


def format_table(summary: pd.DataFrame) -> str:
    if summary.empty:
        return "(no rows)"
    columns = [
        c
        for c in (
            "task",
            "subtask",
            "method",
            "compress",
            "question_position",
            "prefill_mode",
            "budget",
            "n",
            "accuracy",
            "token_match",
            "kl_full",
            "entries",
            "kept_fraction",
            "kv_mb",
            "kv_mb_peak",
            "bits_per_element",
            "kv_mb_full",
            "ttft_s",
            "tpot_ms",
            "errors",
        )
        if c in summary
    ]
    return summary[columns].to_string(index=False, float_format=lambda x: f"{x:.3f}")
