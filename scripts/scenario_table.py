"""Markdown table of a `task=segments` or `task=edit` run: one line per method, budget and mode.

    python scripts/scenario_table.py results/segments_smollm2_135m
    python scripts/scenario_table.py results/edit_smollm2_135m --by edit_kind

Columns: samples, accuracy (task metric), agreement with the reference mode (joint / recompute: exact match of
the greedy output, token match), median TTFT and cache-build time (re-encoding, re-rotation, splicing), mean
prompt and forwarded tokens, and for segments the store's hits / misses, the median TTFT of the prompts whose
pieces were all in the store (a warm store: only the question is forwarded) and the bytes reused per prompt.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbench.harness.jsonl import read_jsonl  # noqa: E402


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict], by: str | None) -> str:
    rows = [row for row in rows if row.get("status") == "ok" and row.get("mode")]
    segments = any("cache_hits" in row for row in rows)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["method_label"], row["budget"], *([row.get(by)] if by else []), row["mode"])
        groups.setdefault(key, []).append(row)
    head = ["method", "budget", *([by] if by else []), "mode", "n", "accuracy", "exact = ref", "token match"]
    head += ["TTFT s (median)", "build s (median)", "prompt tokens", "tokens forwarded"]
    head += ["hits / misses", "TTFT s, all hits (median)", "MiB reused / prompt"] if segments else ["tokens re-encoded"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, group in groups.items():
        cells = [str(k if k is not None else "-") for k in key]
        cells += [
            str(len(group)),
            fmt(mean([r["score"] for r in group])),
            fmt(mean([r["exact_match_ref"] for r in group])),
            fmt(mean([r["token_match_ref"] for r in group])),
            fmt(median([r["ttft_s"] for r in group])),
            fmt(median([r["build_s"] for r in group]), 3),
            fmt(mean([r["prompt_tokens"] for r in group]), 0),
            fmt(mean([r["prefill_tokens"] for r in group]), 0),
        ]
        if segments:
            hits, misses = sum(r["cache_hits"] for r in group), sum(r["cache_misses"] for r in group)
            warm = [r["ttft_s"] for r in group if r["cache_misses"] == 0 and r["mode"] != "joint"]
            cells += [f"{hits} / {misses}", fmt(median(warm)), fmt(mean([r["bytes_reused"] / 2**20 for r in group]), 1)]
        else:
            cells += [fmt(mean([r["tokens_reencoded"] for r in group]), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory (holding samples.jsonl)")
    parser.add_argument("--by", default=None, help="also group by this row field (e.g. edit_kind, question_kind)")
    args = parser.parse_args()
    path = args.run / "samples.jsonl"
    if not path.is_file():
        sys.exit(f"scenario_table: no samples.jsonl in {args.run}")
    rows = read_jsonl(path)
    if args.by == "question_kind":
        for row in rows:
            row["question_kind"] = (row.get("meta") or {}).get("question_kind")
    print(table(rows, args.by))


if __name__ == "__main__":
    main()
