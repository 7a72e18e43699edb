"""NIAH on a model with sliding-window layers, with the KV bytes split by layer type (docs/results/gemma3-270m-niah.md).

One prefill per sample serves every row (full, SnapKV and StreamingLLM at each budget, KIVI-2 and KIVI-4 keeping
every token); rows go to a JSONL file as each sample finishes, then one table per context length: accuracy, the
bytes of the full-attention and sliding-window layers at the end of the row, and the whole-cache ratio
(kv_bytes / kv_bytes_full), next to the share of the full layers alone that was kept.

    python scripts/niah_layer_types.py --model gemma3_270m --lengths 1024 2048 4096 8192 --budgets 128 512
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kvbench.api as kv  # noqa: E402

MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3_270m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--depths", type=float, nargs="+", default=[0, 50, 100])
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 512], help="KV entries per head (eviction)")
    parser.add_argument("--haystack", default="noise")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="the 7-digit needle needs about 10")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "niah_layer_types.jsonl")
    parser.add_argument("--table-only", action="store_true", help="print the tables of an existing --out file")
    return parser.parse_args()


def label(row: dict) -> str:
    name = row["method_label"]
    if row["method"] == "kivi":
        return f"KIVI-{row['method_params']['k_bits']}"
    return name if row.get("budget") is None else f"{name} {row['budget']}"


def tables(rows: list[dict]) -> str:
    """Markdown: per length, one line per row label (mean bytes over the samples)."""
    groups: dict[int, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        groups[row["meta"]["length"]][label(row)].append(row)
    out = []
    for length in sorted(groups):
        out += [
            f"\n**{length} tokens** (prompts of {mean(r['prompt_tokens'] for r in groups[length]['full']):.0f} on "
            "average; bytes at the end of the row, generated tokens included)\n",
            "| row | correct | full layers MiB | sliding layers MiB | KV MiB | whole-cache ratio | full-layer ratio |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        full_ref = None
        for name, group in groups[length].items():
            by_type = [r["kv_bytes_by_type"] for r in group]
            full_mib = mean(b.get("full", 0) for b in by_type) / MIB
            sliding_mib = mean(b.get("sliding", 0) for b in by_type) / MIB
            if name == "full":
                full_ref = full_mib
            ratio = mean(r["kv_bytes"] / r["kv_bytes_full"] for r in group)
            correct = sum(1 for r in group if r["score"] >= 1.0)
            full_ratio = f"{full_mib / full_ref:.3f}" if full_ref else "-"
            out.append(
                f"| {name} | {correct}/{len(group)} | {full_mib:.2f} | {sliding_mib:.2f} | "
                f"{full_mib + sliding_mib:.2f} | {ratio:.3f} | {full_ratio} |"
            )
    return "\n".join(out)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def main() -> None:
    args = parse_args()
    if args.table_only:
        print(tables([json.loads(line) for line in args.out.read_text().splitlines()]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = kv.load_model(args.model)
    methods = [
        kv.build_method("snapkv"),
        kv.build_method("streamingllm"),
        kv.build_method("kivi", k_bits=2, v_bits=2),
        kv.build_method("kivi", k_bits=4, v_bits=4),
    ]
    task = kv.load_task(
        "niah",
        lengths=args.lengths,
        depths=args.depths,
        haystack=args.haystack,
        max_new_tokens=args.max_new_tokens,
    )
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        for sample in task.samples(lm.tokenizer, lm.max_context):
            for row in kv.evaluate(lm, [sample], methods, args.budgets, include_full=True, task_name="niah"):
                row["row_label"] = label(row)
                rows.append(row)
                out.write(json.dumps(row, default=str) + "\n")
                out.flush()
                print(
                    f"{sample.meta.get('length')} {sample.meta.get('depth')} {row['row_label']}: score={row['score']} "
                    f"by_type={row.get('kv_bytes_by_type')} prefill_s={row.get('prefill_s')} "
                    f"status={row['status']} {row.get('error', '')}",
                    flush=True,
                )
    print(tables(rows))


if __name__ == "__main__":
    main()
