"""One run's rows -> summary table (method x budget -> accuracy, fidelity vs full, cache size, latency), with a
legend of its columns (`COLUMN_LEGEND`, printed under the table and listed in docs/rows.md)."""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

MIB = 2**20
MB = MIB  # the name older callers import
# What the summary is ordered by within a method, and the accuracy figure's x axis: the nominal budget, or the
# bytes the cache really holds (KV MiB or bits per cached element), so eviction and quantisation compare at
# equal bytes.
X_AXES = {"budget": "budget_sort", "kv_mib": "kv_mib", "bits_per_element": "bits_per_element"}
FULL = "full"

# What each summary column means (printed under the table for the columns it shows; docs/rows.md lists them).
COLUMN_LEGEND = {
    "layers": "the layers the method compressed (`layers=global|all`; shown on models with sliding, chunked or "
    "state layers, whose others keep their window or state)",
    "n": "rows averaged (samples; conversation: every turn)",
    "n_scored": "rows with a score, which accuracy averages (conversation: the question turns)",
    "accuracy": "mean task score of the scored rows",
    "token_match": "share of generated tokens equal to the full cache's greedy output",
    "kl_full": "mean next-token KL(full || method) along the full cache's output",
    "entries": "KV entries per KV head per layer the budget resolved to (min-max over prompts)",
    "compressed": "share of rows the method compressed (a prompt within the budget is left whole)",
    "kept_frac": "share of the prompt's K/V entries still held as K/V slots after compression (methods that "
    "keep other state, e.g. kv_direct's hidden states or mikv's low-bit slots, hold more: see kv_frac)",
    "kv_frac": "KV bytes held / full cache bytes of the same tokens (kv_mib / kv_mib_full; above 1: more than full)",
    "kv_mib": "KV cache held right after compression, MiB (the prompt's tokens; conversation: end of the turn)",
    "kv_mib_peak": "most the KV cache held after compression, MiB (question tail and decoding included)",
    "kv_mib_full": "a full KV cache of the same tokens as kv_mib, MiB",
    "bits_per_element": "bits held per K/V element of the prompt right after compression (full fp32: 32, fp16: 16)",
    "ttft_s": "time to first token, s (prefill + compression + question tail)",
    "tpot_ms": "time per output token while decoding, ms",
    "errors": "rows that failed (their error is in samples.jsonl)",
}

# Quantisers labelled their rows `name(base=X,...)` before every composed method used `name[X](...)`.
_LEGACY_COMPOSED = re.compile(r"^(?P<name>[\w.-]+)\((?P<params>[^(){}\[\]]*)\)$")


def check_x_axis(x_axis: str) -> str:
    if x_axis not in X_AXES:
        raise ValueError(f"unknown x_axis '{x_axis}'. Valid x axes: {', '.join(X_AXES)}.")
    return x_axis


def composed_label(label: Any) -> Any:
    """A method label in the one composed style, `name[base](key=value,...)`: older quantiser rows' labels
    `name(base=X,key=value)` are rewritten; every other label is returned as it is."""
    match = _LEGACY_COMPOSED.match(label) if isinstance(label, str) else None
    if match is None:
        return label
    params = match["params"].split(",")
    base = [p for p in params if p.startswith("base=")]
    if len(base) != 1:
        return label
    rest = [p for p in params if p != base[0]]
    return f"{match['name']}[{base[0].removeprefix('base=')}]" + (f"({','.join(rest)})" if rest else "")


def method_order(label: Any) -> str:
    """Sort key of method labels: the full cache first, then the methods alphabetically (case-insensitive)."""
    return "0" if label == FULL else "1" + str(label).lower()


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame else pd.Series(float("nan"), index=frame.index)


def rows_frame(rows: Any) -> pd.DataFrame:
    """One row per sample x method x budget; the sample's meta flattened as `meta.<key>`, plus the summary's
    per-row cache measures (`COLUMN_LEGEND`): `kept_frac`, `kv_mib`, `kv_mib_peak`, `kv_mib_full`, `kv_frac`.

    `kv_mib` and `kv_mib_full` count the same tokens: a single-prompt row's cache right after compression (its
    end-of-row `kv_bytes` also holds the decoded tokens, which `kv_bytes_full` does not), a conversation turn's
    at the end of the turn (its `kv_bytes_full` counts every token seen)."""
    rows = list(rows)
    frame = pd.json_normalize(rows, sep=".") if rows else pd.DataFrame()
    if frame.empty:
        return frame
    if "method_label" not in frame:
        frame["method_label"] = _column(frame, "method")
    frame["method_label"] = frame["method_label"].map(composed_label)
    frame["budget_label"] = frame["budget"].map(budget_label)
    frame["budget_sort"] = frame["budget"].map(lambda b: float("inf") if b is None or pd.isna(b) else float(b))
    held = _column(frame, "kv_bytes_compressed").fillna(_column(frame, "kv_bytes"))
    frame["kept_frac"] = _column(frame, "kept_fraction_compressed").fillna(_column(frame, "kept_fraction"))
    frame["kv_mib"] = held / MIB
    frame["kv_mib_peak"] = _column(frame, "kv_bytes_peak") / MIB
    frame["kv_mib_full"] = _column(frame, "kv_bytes_full") / MIB
    frame["kv_frac"] = frame["kv_mib"] / frame["kv_mib_full"]
    return frame


def budget_label(budget: Any) -> str:
    if budget is None or (isinstance(budget, float) and pd.isna(budget)):
        return FULL
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


def summarize(rows: Any, x_axis: str = "budget") -> pd.DataFrame:
    """Mean metrics per (task, method, compress, budget), columns as `COLUMN_LEGEND` says; the full cache first,
    then methods alphabetically, within a method ordered by `x_axis` (`X_AXES`)."""
    check_x_axis(x_axis)
    frame = rows_frame(rows)
    if frame.empty:
        return frame
    frame["ok"] = frame["status"] == "ok"
    if "score" not in frame:
        frame["score"] = float("nan")
    keys = ["task", "method_label", "compress", "budget_label", "budget_sort"]
    # Benchmarks with subtasks are reported per subtask (LongBench/RULER convention: the mean per subtask).
    for column in ("question_position", "subtask", "prefill_mode"):
        if column in frame and frame[column].nunique() > 1:
            keys.insert(1, column)
    if "compressed_layers" in frame and any(
        column.startswith("kv_bytes_by_type.") and column != "kv_bytes_by_type.full" and frame[column].notna().any()
        for column in frame
    ):
        frame["layers"] = frame["compressed_layers"].fillna("")
        keys.insert(keys.index("compress"), "layers")
    ok = frame[frame["ok"]]
    # Rows from before a column existed (older runs) lack it; the summary then leaves it out.
    optional = {
        "token_match": ("token_match", "mean"),
        "kl_full": ("kl_full", "mean"),
        "entries": ("budget_entries", entries_label),
        "compressed": ("compressed", "mean"),
    }
    summary = ok.groupby(keys, dropna=False).agg(
        n=("score", "size"),
        n_scored=("score", "count"),
        accuracy=("score", "mean"),
        **{name: spec for name, spec in optional.items() if spec[0] in ok},
        kept_frac=("kept_frac", "mean"),
        kv_frac=("kv_frac", "mean"),
        kv_mib=("kv_mib", "mean"),
        kv_mib_peak=("kv_mib_peak", "mean"),
        kv_mib_full=("kv_mib_full", "mean"),
        **({"bits_per_element": ("bits_per_element", "mean")} if "bits_per_element" in ok else {}),
        prompt_tokens=("prompt_tokens", "mean"),
        ttft_s=("ttft_s", "mean"),
        compress_s=("compress_s", "mean"),
        tpot_ms=("tpot_s", lambda s: s.mean() * 1000),
    )
    errors = frame[~frame["ok"]].groupby(keys, dropna=False).size().rename("errors")
    summary = summary.join(errors, how="outer").fillna({"errors": 0, "n": 0, "n_scored": 0}).reset_index()
    for column in ("errors", "n", "n_scored"):
        summary[column] = summary[column].astype(int)
    summary["method_order"] = summary["method_label"].map(method_order)
    sort_by = X_AXES[x_axis] if X_AXES[x_axis] in summary else "budget_sort"
    order = [k for k in ("task", "subtask") if k in keys] + ["method_order"]
    order += [k for k in ("compress", "question_position", "prefill_mode") if k in keys] + [sort_by]
    summary = summary.sort_values(order, kind="stable").drop(columns=["budget_sort", "method_order"])
    return summary.rename(columns={"budget_label": "budget", "method_label": "method"}).reset_index(drop=True)


TABLE_COLUMNS = (
    "task", "subtask", "method", "layers", "compress", "question_position", "prefill_mode", "budget", "n", "n_scored",
    "accuracy", "token_match", "kl_full", "entries", "compressed", "kept_frac", "kv_frac", "kv_mib",
    "kv_mib_peak", "kv_mib_full", "bits_per_element", "ttft_s", "tpot_ms", "errors",
)  # fmt: skip


def format_table(summary: pd.DataFrame, legend: bool = True) -> str:
    """The summary as printed by a run: the columns a reader needs (`n_scored` only where it differs from
    `n`), then, with `legend`, one line per shown column saying what it counts (`COLUMN_LEGEND`)."""
    if summary.empty:
        return "(no rows)"
    columns = [c for c in TABLE_COLUMNS if c in summary]
    if "n_scored" in summary and (summary["n_scored"] == summary["n"]).all():
        columns.remove("n_scored")
    text = summary[columns].to_string(index=False, float_format=lambda x: f"{x:.3f}")
    if not legend:
        return text
    lines = [f"  {column}: {COLUMN_LEGEND[column]}" for column in columns if column in COLUMN_LEGEND]
    return text + "\ncolumns:\n" + "\n".join(lines)
