"""The paper table: one line per (setting, method, compress, budget or bits), one score column per task
(mean over samples with a bootstrap 95% confidence interval), then kept fraction, KV MiB, TTFT and TPOT
averaged over every scored row of that line. Written as Markdown and as LaTeX (booktabs), the best value of
each column in bold (highest score; lowest KV MiB, TTFT, TPOT; kept fraction is not ranked)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from kvbench.report.summary import MB

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# Cost columns: name, source row column, scale, format, lower is better
COSTS = (
    ("kept fraction", "kept_fraction", 1.0, "{:.3f}", None),
    ("KV MiB", "kv_bytes", 1.0 / MB, "{:.2f}", True),
    ("TTFT s", "ttft_s", 1.0, "{:.3f}", True),
    ("TPOT ms", "tpot_s", 1000.0, "{:.1f}", True),
)


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
    """What identifies a table line: setting (if runs were labelled), method, compress (if several), budget
    and, for quantised storage, bits per element."""
    keys = ["setting"] if "setting" in frame and frame["setting"].nunique() > 1 else []
    keys.append("method_label")
    if frame["compress"].nunique() > 1:
        keys.append("compress")
    keys.append("budget_label")
    if "bits_per_element" in frame and frame["bits_per_element"].notna().any():
        keys.append("bits_per_element")
    return keys


def paper_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Numbers of the table (no formatting): per line, `<task>`, `<task> lo`, `<task> hi`, `<task> n` per task
    and the cost columns. Only successful, scored rows count."""
    ok = frame[(frame["status"] == "ok") & frame["score"].notna()].copy()
    if ok.empty:
        return pd.DataFrame()
    keys = line_keys(ok)
    ok["bits_per_element"] = ok.get("bits_per_element")
    lines = []
    for values, group in ok.groupby(keys, dropna=False, sort=False):
        line = dict(zip(keys, values if isinstance(values, tuple) else (values,), strict=True))
        line["budget_sort"] = group["budget_sort"].iloc[0]
        for task, rows in group.groupby("task"):
            line[task] = rows["score"].mean()
            line[f"{task} lo"], line[f"{task} hi"] = bootstrap_ci(rows["score"])
            line[f"{task} n"] = len(rows)
        for name, column, scale, _, _ in COSTS:
            line[name] = group[column].mean() * scale if column in group and group[column].notna().any() else math.nan
        lines.append(line)
    table = pd.DataFrame(lines)
    order = [k for k in keys if k != "budget_label"] + ["budget_sort"]
    return table.sort_values(order).drop(columns="budget_sort").reset_index(drop=True)


def task_names(table: pd.DataFrame) -> list[str]:
    return sorted(c[: -len(" n")] for c in table.columns if c.endswith(" n"))


def _best(table: pd.DataFrame, column: str, lower: bool) -> float | None:
    values = table[column].dropna()
    if values.empty:
        return None
    return values.min() if lower else values.max()


def _cells(table: pd.DataFrame, bold: Any, ci: Any, escape: Any = str) -> tuple[list[str], list[list[str]]]:
    keys = [c for c in ("setting", "method_label", "compress", "budget_label", "bits_per_element") if c in table]
    header_names = {"setting": "setting", "method_label": "method", "compress": "compress", "budget_label": "budget",
                    "bits_per_element": "bits"}  # fmt: skip
    tasks = task_names(table)
    header = [escape(header_names[k]) for k in keys] + [escape(t) for t in tasks] + [name for name, *_ in COSTS]
    best = {task: _best(table, task, lower=False) for task in tasks}
    best.update({name: _best(table, name, lower) for name, _, _, _, lower in COSTS if lower is not None})
    body = []
    for _, line in table.iterrows():
        cells = [escape(str(line[k])) for k in keys]
        for task in tasks:
            if pd.isna(line[task]):
                cells.append("-")
                continue
            text = f"{line[task]:.3f}"
            cells.append(
                (bold(text) if line[task] == best[task] else text) + ci(line[f"{task} lo"], line[f"{task} hi"])
            )
        for name, _, _, fmt, _ in COSTS:
            value = line[name]
            text = "-" if pd.isna(value) else fmt.format(value)
            cells.append(bold(text) if name in best and not pd.isna(value) and value == best[name] else text)
        body.append(cells)
    return header, body


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-Markdown table; scores as `mean [lo, hi]`, best per column in bold."""
    header, body = _cells(table, lambda t: f"**{t}**", lambda lo, hi: f" [{lo:.2f}, {hi:.2f}]")
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(char, escaped)
    return text


def to_latex(table: pd.DataFrame, caption: str = "") -> str:
    """A booktabs `table` environment; scores as `mean` with the CI in small type, best per column in bold."""
    header, body = _cells(
        table, lambda t: rf"\textbf{{{t}}}", lambda lo, hi: rf" {{\scriptsize[{lo:.2f}, {hi:.2f}]}}", _latex_escape
    )
    tasks = len(task_names(table))
    columns = "l" * (len(header) - tasks - len(COSTS)) + "c" * tasks + "r" * len(COSTS)
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
    if caption:
        lines.append(rf"\caption{{{_latex_escape(caption)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
