"""`python -m kvbench.report results/<run> [results/<run2> ...] --out <dir>`: the cross-run paper report.

Writes to <dir>: table.md and table.tex (method x budget -> score per task with bootstrap 95% CIs, kept
fraction, KV held relative to the full cache and in MiB, bits per element, TTFT, TPOT, failed rows; a unique
best per column in bold), table.csv (the same numbers, unformatted),
accuracy_vs_budget.{png,pdf}, accuracy_vs_kv_mib.{png,pdf} and each task's figures in <dir>/<task>/.
Bad input (a directory without rows, runs whose configs conflict, --out a file) fails in one line before
anything is written.
"""

from __future__ import annotations

import argparse
import sys

from kvbench.report.paper import build_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvbench.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="results/<run> directories")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--label-by-setting",
        action="store_true",
        help="report runs whose configs differ side by side, labelled by the differing keys",
    )
    args = parser.parse_args(argv)
    try:
        report = build_report(args.runs, args.out, args.label_by_setting)
    except (ValueError, OSError) as err:  # bad input, and paths that cannot be read or written (one line)
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"kvbench: error: {message}", file=sys.stderr)
        sys.exit(2)
    print(report["markdown"])
    print(f"wrote {len(report['files'])} files to {args.out}")


if __name__ == "__main__":
    main()
