"""Popularity plot of the hierarchical policy: slots per level (0-3) over the tokens fed after compression.

Reads a run's samples.jsonl (rows of `method=hierarchical` carry `method_record.level_sizes` =
[[fed_tokens, n0, n1, n2, n3], ...], mean slots per level over layers and KV heads) and draws, per method
label and compress mode, one stacked-area panel per budget, averaged over samples (PNG + PDF).

Usage: python scripts/plot_popularity.py results/<run> [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing kvbench
from kvbench.harness.results import SAMPLES_FILE, read_jsonl  # noqa: E402
from kvbench.report.plots import save  # noqa: E402

LEVEL_COLOURS = ("#d9d9d9", "#9ecae1", "#4292c6", "#08306b")


def level_histories(rows: list[dict]) -> dict[tuple[str, str], dict[Any, list[list[list[float]]]]]:
    """{(method_label, compress): {budget: [one sample's level_sizes, ...]}} from the rows that have them."""
    grouped: dict[tuple[str, str], dict[Any, list]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        record = row.get("method_record") or {}
        history = record.get("level_sizes")
        if row.get("status") == "ok" and history:
            label = row.get("method_label") or row.get("method", "?")
            grouped[(label, str(row.get("compress", "")))][row.get("budget")].append(history)
    return grouped


def mean_curve(histories: list[list[list[float]]]) -> tuple[list[float], list[list[float]]]:
    """Mean level sizes per fed-token count over the samples that reached it; the pre-compression entry
    (the first, at 0 fed tokens) is replaced by the post-compression one when both exist."""
    sums: dict[float, list[float]] = {}
    counts: dict[float, int] = defaultdict(int)
    for history in histories:
        latest = {}
        for fed, *levels in history:
            latest[fed] = levels  # the last entry at a given count is the state after that step's eviction
        for fed, levels in latest.items():
            sums[fed] = [a + b for a, b in zip(sums.get(fed, [0.0] * len(levels)), levels, strict=True)]
            counts[fed] += 1
    steps = sorted(sums)
    return steps, [[v / counts[s] for v in sums[s]] for s in steps]


def popularity_figures(rows: list[dict], out_dir: Path) -> list[Path]:
    paths: list[Path] = []
    for (label, compress), by_budget in sorted(level_histories(rows).items()):
        budgets = sorted(by_budget, key=lambda b: (b is None, b if isinstance(b, (int, float)) else 0))
        fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.4), squeeze=False, sharey=False)
        for ax, budget in zip(axes[0], budgets, strict=True):
            steps, levels = mean_curve(by_budget[budget])
            stacks = list(zip(*levels, strict=True))
            ax.stackplot(steps, *stacks, labels=[f"level {i}" for i in range(len(stacks))], colors=LEVEL_COLOURS)
            ax.set_title(f"budget={budget} (n={len(by_budget[budget])})", fontsize=9)
            ax.set_xlabel("tokens fed after compression")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("slots per KV head (mean)")
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
        fig.suptitle(f"{label}, compress={compress}: slots per popularity level", fontsize=10)
        stem = "popularity_" + "".join(c if c.isalnum() else "_" for c in f"{label}_{compress}").strip("_")
        paths += save(fig, out_dir, stem)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory (results/<run>) or its samples.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the run directory)")
    args = parser.parse_args()
    path = args.run / SAMPLES_FILE if args.run.is_dir() else args.run
    rows = read_jsonl(path, allow_truncated_tail=True)
    paths = popularity_figures(rows, args.out or path.parent)
    if not paths:
        raise SystemExit(f"{path}: no row has method_record.level_sizes (run method=hierarchical first)")
    for written in paths:
        print(written)


if __name__ == "__main__":
    main()
