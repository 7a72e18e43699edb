"""Quantised storage vs eviction at equal KV bytes on needle-in-a-haystack (SmolLM2 on CPU by default).

One prefill per sample serves every row (kvbench.api.evaluate): full, KIVI-2, KIVI-4 (all tokens kept, budget
null), SnapKV and SnapKV+KIVI-4 at the kept fractions given by --budgets. Prints accuracy per haystack and the
mean `bits_per_element` (bits held per element of the uncompressed prompt cache; 32 = SmolLM2's fp32 cache on
CPU) and KV MiB of each row, so rows compare at equal bytes. Rows go to --out as JSONL.

    python scripts/quant_equal_bytes.py                                   # 1K/2K x depths 10/50/90, noise + essay
    python scripts/quant_equal_bytes.py --depths 0 25 50 75 100 --budgets 0.125 0.25 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kvbench.api as kv  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--depths", type=float, nargs="+", default=[10, 50, 90])
    parser.add_argument("--haystacks", nargs="+", default=["noise", "essay"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5], help="kept fractions (snapkv)")
    parser.add_argument("--residual", type=int, default=128, help="KIVI residual_length R")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="the 7-digit needle needs about 10")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "quant_equal_bytes.jsonl")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    lm = kv.load_model(args.model)
    kivi = {"name": "kivi", "residual_length": args.residual}
    methods = [
        kv.build_method(kivi),
        kv.build_method({**kivi, "k_bits": 4, "v_bits": 4}),
        kv.build_method("snapkv"),
        kv.build_method({**kivi, "k_bits": 4, "v_bits": 4, "base": "snapkv"}),
    ]
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        for haystack in args.haystacks:
            grid = dict(lengths=args.lengths, depths=args.depths, haystack=haystack)
            task = kv.load_task("niah", **grid, max_new_tokens=args.max_new_tokens)
            samples = task.samples(lm.tokenizer, lm.max_context)
            for row in kv.evaluate(lm, samples, methods, args.budgets, include_full=True, task_name=haystack):
                rows.append(row)
                out.write(json.dumps(row, default=str) + "\n")
                out.flush()
                print(f"{haystack} {row['sample_id']} {row['method_label']} {row['budget']} score={row['score']}")
    frame = kv.to_frame(rows)
    frame["budget"] = frame["budget"].astype(object).where(frame["budget"].notna(), "all")
    frame["kv_mib"] = frame["kv_bytes"] / 2**20
    table = frame.pivot_table(index=["method_label", "budget"], columns="task", values="score", aggfunc="mean")
    sizes = frame.groupby(["method_label", "budget"])[["bits_per_element", "kv_mib"]].mean()
    counts = frame.groupby(["method_label", "budget"])["score"].count().rename("rows")
    print("\n" + table.join(sizes).join(counts).sort_values("bits_per_element").round(3).to_string())


if __name__ == "__main__":
    main()
