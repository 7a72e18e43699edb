"""Compare the predictions of two kvbench runs row by row (same samples, methods and budgets).

    python scripts/compare_predictions.py results/niah_triton results/niah_torch --csv diff.csv

Rows are matched on (sample_id, method, budget, compress); a row differs when its generated token ids differ.
Exits 1 when any matched row differs or the two runs do not hold the same rows.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from kvbench.harness.results import ResultsStore


def rows_by_job(run_dir: Path) -> dict[tuple, dict]:
    rows = ResultsStore(run_dir).latest_rows()
    return {(r["sample_id"], r["method"], str(r["budget"]), r["compress"]): r for r in rows}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    a, b = rows_by_job(args.run_a), rows_by_job(args.run_b)
    records = []
    for key in sorted(set(a) | set(b)):
        row_a, row_b = a.get(key, {}), b.get(key, {})
        same = bool(row_a) and bool(row_b) and row_a.get("output_ids") == row_b.get("output_ids")
        records.append(
            {
                "sample_id": key[0],
                "method": key[1],
                "budget": key[2],
                "compress": key[3],
                "status_a": row_a.get("status", "missing"),
                "status_b": row_b.get("status", "missing"),
                "identical": same,
                "prediction_a": row_a.get("prediction"),
                "prediction_b": row_b.get("prediction"),
            }
        )
    if args.csv and records:
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    differing = [r for r in records if not r["identical"]]
    names = f"{args.run_a.name} vs {args.run_b.name}"
    print(f"{len(records) - len(differing)}/{len(records)} rows with identical predictions ({names})")
    for record in differing[:10]:
        print(f"  differs: {record}")
    return 1 if differing or not records else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
