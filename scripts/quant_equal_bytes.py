"""Quantised storage vs eviction at equal KV bytes on NIAH or IELTS (SmolLM2 on CPU by default).

One prefill per sample serves every row (kvbench.api.evaluate): full, the quantisers (all tokens kept, budget
null: KIVI-2, KIVI-4, GEAR, RotateKV, OCTOPUS-reconstructed) and the eviction rows (SnapKV, SnapKV+KIVI-4) at the
kept fractions given by --budgets. Prints accuracy per haystack (NIAH) or for IELTS, the mean `bits_per_element`
(bits held per element of the uncompressed prompt cache; 32 = SmolLM2's fp32 cache on CPU) and KV MiB, both right
after compression, and greedy token match and KL against the full cache of each row, so rows compare at equal
bytes. Rows go to --out as JSONL.

    python scripts/quant_equal_bytes.py                                   # NIAH 1K/2K x depths 10/50/90, noise + essay
    python scripts/quant_equal_bytes.py --methods gear rotatekv octopus  # only these rows (full is always run)
    python scripts/quant_equal_bytes.py --task ielts --limit 3 --questions-per-type 1
    python scripts/quant_equal_bytes.py --depths 0 25 50 75 100 --budgets 0.125 0.25 0.5
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

# The rows of the comparison: name -> method spec (KIVI's residual length filled in from --residual).
PRESETS = {
    "kivi2": lambda kivi: kivi,
    "kivi4": lambda kivi: {**kivi, "k_bits": 4, "v_bits": 4},
    "gear": lambda kivi: "gear",
    "rotatekv": lambda kivi: "rotatekv",
    "octopus": lambda kivi: "octopus",
    "snapkv": lambda kivi: "snapkv",
    "snapkv_kivi4": lambda kivi: {**kivi, "k_bits": 4, "v_bits": 4, "base": "snapkv"},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--task", choices=["niah", "ielts"], default="niah")
    parser.add_argument("--methods", nargs="+", choices=sorted(PRESETS), default=list(PRESETS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--depths", type=float, nargs="+", default=[10, 50, 90])
    parser.add_argument("--haystacks", nargs="+", default=["noise", "essay"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5], help="kept fractions (snapkv)")
    parser.add_argument("--residual", type=int, default=128, help="KIVI residual_length R")
    parser.add_argument("--limit", type=int, default=3, help="IELTS: passages")
    parser.add_argument("--questions-per-type", type=int, default=1, help="IELTS: questions of each type per passage")
    parser.add_argument("--positions", nargs="+", default=["after"], help="IELTS: question positions")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="the 7-digit needle needs about 10")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "quant_equal_bytes.jsonl")
    return parser.parse_args()


def build_methods(names: list[str], residual: int) -> list:
    kivi = {"name": "kivi", "residual_length": residual}
    specs = {name: spec(kivi) for name, spec in PRESETS.items()}
    return [kv.build_method(specs[name]) for name in names]


def tasks(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(column name, task) pairs: one per NIAH haystack, or the IELTS subset."""
    if args.task == "ielts":
        fields = dict(limit=args.limit, questions_per_type=args.questions_per_type, question_position=args.positions)
        return [("ielts", kv.load_task("ielts", **fields))]
    grid = dict(lengths=args.lengths, depths=args.depths, max_new_tokens=args.max_new_tokens)
    return [(haystack, kv.load_task("niah", **grid, haystack=haystack)) for haystack in args.haystacks]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    lm = kv.load_model(args.model)
    methods = build_methods(args.methods, args.residual)
    rows = evaluate_columns(lm, tasks(args), methods, args.budgets, args.out)
    frame = kv.to_frame(rows)
    frame["budget"] = frame["budget"].astype(object).where(frame["budget"].notna(), "all")
    frame["kv_mib"] = frame["kv_bytes_compressed"] / 2**20  # right after compression, as bits_per_element
    keys = ["method_label", "budget"]
    table = frame.pivot_table(index=keys, columns="task", values="score", aggfunc="mean")
    measured = ["bits_per_element", "kv_mib", "token_match", "kl_full", "prompt_tokens"]
    sizes = frame.groupby(keys)[[c for c in measured if c in frame]].mean()
    counts = frame.groupby(keys)["score"].count().rename("rows")
    print("\n" + table.join(sizes).join(counts).sort_values("bits_per_element").round(3).to_string())


if __name__ == "__main__":
    main()
