"""Mixed precision, recompute and smarter selection next to their bases (SmolLM2 on CPU by default).

One prefill per sample serves every row (kvbench.api.evaluate): kv_direct (checkpoint=per_layer and =ids),
mikv over h2o and snapkv at lo_bits 2 and 4, kvcrush (over snapkv), prefixkv over snapkv, treekv, and the bases
h2o and snapkv, at every budget of --budgets (KV entries per head). Prints, per row and budget, accuracy per task
column, greedy token match and KL against the full cache, and the bytes held (K/V + checkpoints) at the end of
the row and their mean bits per element of the prompt's fp32 cache. Rows go to --out as JSONL.

    python -m kvbench.calibrate prefixkv --model smollm2_135m     # once: prefixkv's per-layer calibration
    python scripts/mixed_recompute_table.py                     # NIAH 1K/2K essay depth 50 + IELTS (4 questions)
    python scripts/mixed_recompute_table.py --methods mikv_h2o_2 h2o --budgets 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from table_rows import evaluate_columns  # noqa: E402  (scripts/ is on sys.path when a script runs)

import kvbench.api as kv  # noqa: E402

# The rows of the comparison: name -> method spec.
PRESETS: dict[str, object] = {
    "kv_direct": "kv_direct",
    "kv_direct_ids": {"name": "kv_direct", "checkpoint": "ids"},
    "mikv_h2o_2": {"name": "mikv", "base": "h2o", "lo_bits": 2},
    "mikv_h2o_4": {"name": "mikv", "base": "h2o", "lo_bits": 4},
    "mikv_snapkv_2": {"name": "mikv", "base": "snapkv", "lo_bits": 2},
    "mikv_snapkv_4": {"name": "mikv", "base": "snapkv", "lo_bits": 4},
    "kvcrush": "kvcrush",
    "prefixkv": "prefixkv",
    "treekv": "treekv",
    "h2o": "h2o",
    "snapkv": "snapkv",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--methods", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048], help="NIAH lengths (none: no NIAH)")
    parser.add_argument("--depths", type=float, nargs="+", default=[50], help="NIAH needle depths")
    parser.add_argument("--haystack", default="essay")
    parser.add_argument("--ielts-passages", type=int, default=1, help="IELTS passages (0: no IELTS column)")
    parser.add_argument("--ielts-types", nargs="+", default=["tfng", "fill_blank", "multiple_choice", "matching"])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "mixed_recompute_table.jsonl")
    return parser.parse_args()


def tasks(args: argparse.Namespace) -> list[tuple[str, object]]:
    grid = dict(lengths=args.lengths, depths=args.depths, haystack=args.haystack, max_new_tokens=args.max_new_tokens)
    columns = [("niah", kv.load_task("niah", **grid))] if args.lengths else []
    if args.ielts_passages:
        types = args.ielts_types
        ielts = dict(limit=args.ielts_passages, questions_per_type=1, question_position=["after"], question_types=types)
        columns.append(("ielts", kv.load_task("ielts", **ielts)))
    return columns


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    lm = kv.load_model(args.model)
    methods = [kv.build_method(PRESETS[name]) for name in args.methods]
    rows = evaluate_columns(lm, tasks(args), methods, args.budgets, args.out)
    frame = kv.to_frame(rows)
    frame = frame[frame["status"] == "ok"].copy()
    frame["budget"] = frame["budget"].astype(object).where(frame["budget"].notna(), "all")
    frame["kv_kib"] = frame["kv_bytes"] / 2**10
    keys = ["method_label", "budget"]
    table = frame.pivot_table(index=keys, columns="task", values="score", aggfunc="mean")
    measured = ["token_match", "kl_full", "kv_kib", "bits_per_element"]
    table = table.join(frame.groupby(keys)[[c for c in measured if c in frame]].mean())
    table = table.join(frame.groupby(keys)["score"].count().rename("rows"))
    print("\n" + table.round(3).to_string())


if __name__ == "__main__":
    main()
