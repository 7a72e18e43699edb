"""The paper table: one line per (setting, method, compress, budget), one score column per task (mean over
the scored samples with a bootstrap 95% confidence interval), then the cost columns averaged over every
successful row of that line (scored or not: `task=synthetic_length` and lm-eval `rows_path` runs have no
score), and the count of failed rows when any failed. Bits per element is a cost column (a mean, as KV MiB),
never part of what a line is. Written as Markdown and as LaTeX (booktabs); a column's best value is bold only
when it is the only one showing that value (highest score; lowest KV MiB, TTFT, TPOT)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from kvbench.report.summary import method_order

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def significant(value: float) -> str:
    """Three significant digits, at least two decimals: 4.00, 0.0625, 0.0156 (a small cache is not 0.00)."""
    decimals = 2 if value == 0 or abs(value) >= 1 else max(2, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


# Cost columns: name, per-row source column (`rows_frame`), scale, format, lower is better (None: not ranked).
COSTS = (
    ("kept fraction", "kept_frac", 1.0, "{:.3f}".format, None),
    ("KV / full", "kv_frac", 1.0, "{:.3f}".format, None),
    ("KV MiB", "kv_mib", 1.0, significant, True),
    ("bits / element", "bits_per_element", 1.0, "{:.2f}".format, None),
    ("TTFT s", "ttft_s", 1.0, "{:.3f}".format, True),
    ("TPOT ms", "tpot_s", 1000.0, "{:.1f}".format, True),
)
KEY_HEADERS = {"setting": "setting", "method_label": "method", "compress": "compress", "budget_label": "budget"}


def bootstrap_ci(scores: Any, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean over samples (seeded: the same rows give the same CI)."""
    values = np.asarray(scores, dtype=float)
    if len(values) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def line_keys(frame: pd.DataFrame) -> list[str]:
    """What identifies a table line: setting (if runs were labelled), method, compress (if several), budget."""
    keys = ["setting"] if "setting" in frame and frame["setting"].nunique() > 1 else []
    keys.append("method_label")
    if frame["compress"].nunique() > 1:
        keys.append("compress")
    keys.append("budget_label")
    return keys


def _scored(rows: pd.DataFrame) -> pd.DataFrame:
    ok = rows[rows["status"] == "ok"]
    return ok[ok["score"].notna()] if "score" in ok else ok.iloc[0:0]


def paper_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Numbers of the table (no formatting): per line, `<task>`, `<task> lo`, `<task> hi`, `<task> n` per task
    with scored rows, the cost columns present in the rows (`COSTS`) and `errors` (failed rows). A line whose
    rows all failed is kept, its numbers NaN."""
    if frame.empty or "status" not in frame:
        return pd.DataFrame()
    keys = line_keys(frame)
    tasks = sorted(_scored(frame)["task"].dropna().unique())
    costs = [(name, column, scale) for name, column, scale, _, _ in COSTS if column in frame]
    lines = []
    for values, group in frame.groupby(keys, dropna=False, sort=False):
        line = dict(zip(keys, values if isinstance(values, tuple) else (values,), strict=True))
        line["budget_sort"] = group["budget_sort"].iloc[0]
        ok, scored = group[group["status"] == "ok"], _scored(group)
        for task in tasks:
            rows = scored[scored["task"] == task]["score"]
            line[task] = rows.mean() if len(rows) else math.nan
            line[f"{task} lo"], line[f"{task} hi"] = bootstrap_ci(rows)
            line[f"{task} n"] = len(rows)
        for name, column, scale in costs:
            line[name] = ok[column].mean() * scale if ok[column].notna().any() else math.nan
        line["errors"] = int((group["status"] != "ok").sum())
        lines.append(line)
    table = pd.DataFrame(lines)
    table["method_order"] = table["method_label"].map(method_order)
    order = [k for k in keys if k not in ("budget_label", "method_label")] + ["method_order", "budget_sort"]
    if "setting" in keys:  # settings side by side: each setting's lines together
        order.remove("setting")
        order.insert(0, "setting")
    return table.sort_values(order, kind="stable").drop(columns=["budget_sort", "method_order"]).reset_index(drop=True)


def task_names(table: pd.DataFrame) -> list[str]:
    return sorted(c[: -len(" n")] for c in table.columns if c.endswith(" n"))


def cost_names(table: pd.DataFrame) -> list[str]:
    """The cost columns the table has, in `COSTS` order."""
    return [name for name, *_ in COSTS if name in table]


def _unique_best(texts: list[str | None], values: list[float], lower: bool) -> int | None:
    """The index of the column's best value if no other line shows the same (formatted) value, else None (also
    with fewer than two values: nothing to compare)."""
    known = [(value, i) for i, value in enumerate(values) if texts[i] is not None]
    if len(known) < 2:
        return None
    best = min(known)[1] if lower else max(known)[1]
    return best if sum(text == texts[best] for text in texts) == 1 else None


def _cells(table: pd.DataFrame, bold: Any, ci: Any, escape: Any = str) -> tuple[list[str], list[list[str]]]:
    keys = [c for c in KEY_HEADERS if c in table]
    tasks, costs = task_names(table), cost_names(table)
    show_errors = "errors" in table and bool((table["errors"] > 0).any())
    header = [escape(KEY_HEADERS[k]) for k in keys] + [escape(t) for t in tasks] + [escape(c) for c in costs]
    header += ["errors"] if show_errors else []
    columns: list[list[str]] = [[escape(str(v)) for v in table[k]] for k in keys]
    for task in tasks:
        texts = [None if pd.isna(v) else f"{v:.3f}" for v in table[task]]
        best = _unique_best(texts, list(table[task]), lower=False)
        column = []
        for i, text in enumerate(texts):
            if text is None:
                column.append("-")
                continue
            line = table.iloc[i]
            column.append((bold(text) if i == best else text) + ci(line[f"{task} lo"], line[f"{task} hi"]))
        columns.append(column)
    formats = {name: (fmt, lower) for name, _, _, fmt, lower in COSTS}
    for name in costs:
        fmt, lower = formats[name]
        texts = [None if pd.isna(v) else fmt(v) for v in table[name]]
        best = _unique_best(texts, list(table[name]), lower) if lower is not None else None
        columns.append(["-" if t is None else bold(t) if i == best else t for i, t in enumerate(texts)])
    if show_errors:
        columns.append([str(int(v)) for v in table["errors"]])
    return header, [list(cells) for cells in zip(*columns, strict=True)]


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-Markdown table; scores as `mean [lo, hi]`, a unique best per column in bold."""
    if table.empty:
        return "(no rows)\n"
    header, body = _cells(table, lambda t: f"**{t}**", lambda lo, hi: f" [{lo:.2f}, {hi:.2f}]")
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(char, escaped)
    return text


def to_latex(table: pd.DataFrame, caption: str = "", label: str = "tab:kvbench") -> str:
    """A booktabs `table` environment; scores as `mean` with the CI in small type, a unique best per column in
    bold; the caption (if any) is followed by `\\label{label}` so the text can reference the table."""
    header, body = _cells(
        table, lambda t: rf"\textbf{{{t}}}", lambda lo, hi: rf" {{\scriptsize[{lo:.2f}, {hi:.2f}]}}", _latex_escape
    )
    keys = len([c for c in KEY_HEADERS if c in table])
    tasks = len(task_names(table))
    columns = "l" * keys + "c" * tasks + "r" * (len(header) - keys - tasks)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\begin{{tabular}}{{{columns}}}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
        *(" & ".join(cells) + r" \\" for cells in body),
        r"\bottomrule",
        r"\end{tabular}",
    ]
    lines.append((rf"\caption{{{_latex_escape(caption)}}}" if caption else "") + rf"\label{{{label}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
