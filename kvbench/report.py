"""Rows -> summary table (method x budget -> accuracy, kept fraction, KV MB, latency)."""

from __future__ import annotations

from typing import Any

import pandas as pd

MB = 2**20


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


def summarize(rows: list[dict[str, Any]]) -> pd.DataFrame:
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
    summary = ok.groupby(keys, dropna=False).agg(
        n=("score", "size"),
        accuracy=("score", "mean"),
        compressed=("compressed", "mean"),
        kept_fraction=("kept_fraction", "mean"),
        kv_mb=("kv_bytes", lambda s: s.mean() / MB),
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
    order = [
        k
        for k in ("task", "subtask", "method_label", "compress", "question_position", "prefill_mode", "budget_sort")
        if k in keys
    ]
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
            "kept_fraction",
            "kv_mb",
            "kv_mb_full",
            "ttft_s",
            "tpot_ms",
            "errors",
        )
        if c in summary
    ]
    return summary[columns].to_string(index=False, float_format=lambda x: f"{x:.3f}")
