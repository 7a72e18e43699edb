"""Shared by the table scripts (quant_equal_bytes.py, mixed_recompute_table.py): run every sample of every task
column through one prefill and all methods, writing each sample's rows to a JSONL file as soon as it finishes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kvbench.api as kv


def evaluate_columns(
    lm: Any, columns: list[tuple[str, Any]], methods: list, budgets: list, out_path: Path
) -> list[dict[str, Any]]:
    """Rows of every (column name, task) pair; `task` column of each row = the column name."""
    rows: list[dict[str, Any]] = []
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as out:
        for column, task in columns:
            for sample in task.samples(lm.tokenizer, lm.max_context):
                for row in kv.evaluate(lm, [sample], methods, budgets, include_full=True, task_name=column):
                    rows.append(row)
                    out.write(json.dumps(row, default=str) + "\n")
                    out.flush()
                    label = f"{row['method_label']} {row['budget']}"
                    print(f"{column} {row['sample_id']} {label} score={row['score']}", flush=True)
    return rows
