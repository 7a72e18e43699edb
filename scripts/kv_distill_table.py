"""The table of docs/results/kv-distill.md from runs: per task, method label and budget, accuracy, fidelity to the full
cache (token_match, kl_full), the attention-output errors before/after the correction (kv_distill's method_record)
and the solve time. Means over samples, the solve time a median.

    python scripts/kv_distill_table.py results/kv_distill/niah_smollm2_135m results/kv_distill/ielts_smollm2_135m
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from kvbench.harness.results import ResultsStore

ERRORS = ("heldout_err_before", "heldout_err_after", "fit_err_before", "fit_err_after")


def fmt(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.fmean(values):.{digits}f}" if values else "-"


def table(run_dirs: list[Path]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run_dir in run_dirs:
        for row in ResultsStore(run_dir).rows():
            if row.get("status") == "ok" and row.get("budget") is not None:
                groups[(row["task"], row["budget"], row["method_label"])].append(row)
    lines = [
        "| task | budget | method | n | accuracy | token_match | kl_full | held-out err before -> after | "
        "fit err before -> after | solve s (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, budget, label), rows in sorted(groups.items()):
        records = [row.get("method_record") or {} for row in rows]
        err = {name: fmt([r.get(f"kv_distill_{name}") for r in records]) for name in ERRORS}
        solve = [r["kv_distill_solve_s"] for r in records if "kv_distill_solve_s" in r]
        lines.append(
            f"| {task} | {budget} | {label} | {len(rows)} | {fmt([r['score'] for r in rows], 2)} | "
            f"{fmt([r.get('token_match') for r in rows], 2)} | {fmt([r.get('kl_full') for r in rows])} | "
            f"{err['heldout_err_before']} -> {err['heldout_err_after']} | {err['fit_err_before']} -> "
            f"{err['fit_err_after']} | {f'{statistics.median(solve):.2f}' if solve else '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="result run directories (results/<run>)")
    print(table(parser.parse_args().runs))


if __name__ == "__main__":
    main()
