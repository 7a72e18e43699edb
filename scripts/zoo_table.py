"""Method zoo 2 side by side: accuracy, fidelity to the full cache and KV bytes (SmolLM2 on CPU by default).

One prefill per sample serves every row (kvbench.api.evaluate through `table_rows.evaluate_columns`): the zoo-2
methods (scorers, the wrappers over SnapKV, merging, channel pruning, quantisation), next to full, snapkv and kivi,
at every budget of --budgets (KV entries per KV head). Quantisers are run twice: alone, keeping every token
(budget null, as in quant-equal-bytes.md), and storing SnapKV's kept slots (`method.base=snapkv`) at every budget;
the table is ordered by KV bytes within each budget so rows compare at equal bytes.

Columns: accuracy per task column (NIAH 1K, NIAH 2K, IELTS), greedy token match and KL(full || row) of the first
generated token's distribution against the full cache (`kvbench.harness.fidelity`), KV MiB right after compression,
bits per element of the prompt's cache and rows. Rows go to --out as JSONL; --table writes the
Markdown table.

    python scripts/zoo_table.py                                  # every registered zoo-2 method + baselines
    python scripts/zoo_table.py --methods keydiff lagkv cam      # these (full, snapkv, kivi always added)
    python scripts/zoo_table.py --methods cam --baselines       # cam alone (+ full), rows to merge with a run
    python scripts/zoo_table.py --list                           # the zoo-2 names and which are registered
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from table_rows import evaluate_columns  # noqa: E402  (scripts/ is on sys.path when a script runs)

import kvbench.api as kv  # noqa: E402
from kvbench.methods.base import METHODS  # noqa: E402

# The zoo-2 methods of issue 19, in table order. Missing ones (not merged yet) are skipped by the default list.
ZOO2 = [
    "keydiff", "lagkv", "leverage", "noncausal", "compactor", "cur", "cap", "criticalkv", "criticaladakv",
    "chunkkv", "scissorhands", "nacl", "simlayerkv", "finch", "lukv", "kvcompose", "headkv",
    "chunk", "per_layer", "threshold", "key_rerotation", "compression_ratio_decoding",
    "cam", "merging", "minicache", "think", "quest", "fp8", "turboquant", "kvquant",
]  # fmt: skip
BASELINES = ["snapkv", "kivi"]
# Storage-only methods: run alone (every token, budget null) and over SnapKV's kept slots at the budgets.
QUANTISERS = {"fp8", "turboquant", "kvquant", "kivi"}
# Methods whose yaml default has no eviction base but which compose with one: given SnapKV as base here so that
# they take the budget (think alone only prunes channels).
SNAPKV_BASED = {"think"}


def registered_zoo() -> list[str]:
    """The zoo-2 names registered in this checkout, in table order."""
    return [name for name in ZOO2 if name in METHODS.names()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--methods", nargs="+", default=None, help="method names (default: every registered zoo-2)")
    parser.add_argument("--list", action="store_true", help="print the zoo-2 names and whether each is registered")
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048], help="NIAH lengths (none: no NIAH)")
    parser.add_argument("--depths", type=float, nargs="+", default=[25, 75], help="NIAH needle depths")
    parser.add_argument("--haystack", default="noise", help="noise (the default run's) | essay")
    parser.add_argument("--ielts-passages", type=int, default=1, help="IELTS passages (0: no IELTS column)")
    parser.add_argument("--ielts-types", nargs="+", default=["tfng", "multiple_choice"])
    parser.add_argument("--max-new-tokens", type=int, default=12, help="the 7-digit needle needs about 10")
    parser.add_argument("--no-quant-base", action="store_true", help="quantisers alone only (no SnapKV base)")
    parser.add_argument("--baselines", nargs="*", default=BASELINES, help="always added (full is added anyway)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "zoo_table.jsonl")
    parser.add_argument("--table", type=Path, default=None, help="write the Markdown table here")
    parser.add_argument("--from-rows", type=Path, nargs="+", default=None, help="summarise these JSONL files (no run)")
    return parser.parse_args()


def method_specs(names: list[str], quant_base: bool, baselines: list[str] = BASELINES) -> list[Any]:
    """Method specs for `kv.build_method`: each name with its yaml defaults, quantisers also over SnapKV."""
    specs: list[Any] = []
    for name in dict.fromkeys([*names, *baselines]):
        if name not in METHODS.names():
            raise SystemExit(f"zoo_table: method '{name}' is not registered (registered zoo-2: {registered_zoo()})")
        if name in SNAPKV_BASED:
            specs.append({"name": name, "base": "snapkv"})
            continue
        specs.append(name)
        if name in QUANTISERS and quant_base:
            specs.append({"name": name, "base": "snapkv"})
    return specs


def tasks(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(column name, task) pairs: one NIAH column per length, then IELTS."""
    columns = []
    for length in args.lengths:
        grid = dict(lengths=[length], depths=args.depths, haystack=args.haystack, max_new_tokens=args.max_new_tokens)
        columns.append((f"niah_{length // 1024}k", kv.load_task("niah", **grid)))
    if args.ielts_passages:
        ielts = dict(
            limit=args.ielts_passages,
            questions_per_type=1,
            question_position=["after"],
            question_types=args.ielts_types,
            max_new_tokens=args.max_new_tokens,
        )
        columns.append(("ielts", kv.load_task("ielts", **ielts)))
    return columns


def merged_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """Rows of several runs on the same samples: a later file's rows replace an earlier file's rows of the same
    method label (so a rerun of one method replaces its old rows; the full rows of every run are the same)."""
    by_file = [[json.loads(line) for line in path.read_text().splitlines() if line.strip()] for path in paths]
    rows: list[dict[str, Any]] = []
    for index, file_rows in enumerate(by_file):
        later = {row["method_label"] for rows_after in by_file[index + 1 :] for row in rows_after}
        rows += [row for row in file_rows if row["method_label"] not in later]
    return rows


def summary(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One line per (method, budget): accuracy per column, fidelity, bytes; errors counted apart."""
    frame = kv.to_frame(rows)
    frame["failed"] = frame["status"] != "ok"
    ok = frame[~frame["failed"]].copy()
    ok["budget"] = [("all" if pd.isna(b) else int(b)) for b in ok["budget"]]
    ok["kv_mib"] = ok["kv_bytes_compressed"].fillna(ok["kv_bytes"]) / 2**20
    keys = ["method_label", "budget"]
    table = ok.pivot_table(index=keys, columns="task", values="score", aggfunc="mean")
    measured = ["token_match", "kl_full", "kv_mib", "bits_per_element"]
    table = table.join(ok.groupby(keys)[[c for c in measured if c in ok]].mean())
    table = table.join(ok.groupby(keys)["score"].count().rename("rows"))
    if frame["failed"].any():
        failed = frame[frame["failed"]].groupby("method_label")["error"].first()
        print("\nfailed rows (first error per method):\n" + failed.to_string())
    return table


def markdown(table: pd.DataFrame) -> str:
    """The summary as a Markdown table, budgets in order and rows by KV bytes within a budget."""
    table = table.reset_index()
    table["order"] = table["budget"].map(lambda b: -1 if b == "all" else int(b))
    table = table.sort_values(["order", "kv_mib", "method_label"]).drop(columns="order")
    columns = [c for c in table.columns if c not in ("method_label", "budget")]
    lines = ["| method | budget | " + " | ".join(columns) + " |", "| --- " * (len(columns) + 2) + "|"]
    for _, row in table.iterrows():
        cells = [f"`{row['method_label']}`", str(row["budget"])]
        for column in columns:
            value = row[column]
            if pd.isna(value):
                cells.append("-")
            elif column == "rows":
                cells.append(f"{value:.0f}")
            elif column == "kl_full":
                cells.append(f"{value:.3f}")
            else:
                cells.append(f"{value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.list:
        for name in ZOO2:
            print(f"{name}: {'registered' if name in METHODS.names() else 'missing'}")
        return
    if args.from_rows is not None:
        rows = merged_rows(args.from_rows)
    else:
        torch.set_num_threads(args.threads)
        lm = kv.load_model(args.model)
        names = args.methods if args.methods is not None else registered_zoo()
        methods = [kv.build_method(spec) for spec in method_specs(names, not args.no_quant_base, args.baselines)]
        rows = evaluate_columns(lm, tasks(args), methods, args.budgets, args.out)
    table = summary(rows)
    print("\n" + table.round(3).to_string())
    if args.table is not None:
        args.table.write_text(markdown(table))


if __name__ == "__main__":
    main()
