"""KV-Direct's headline comparison on SmolLM2: greedy token match vs the full cache over a long generation.

    python scripts/kv_direct_study.py [--tokens 256] [--budgets 16 64 256] [--context-tokens 512] [--threads 1]

One prompt (the NIAH noise haystack with a needle, --context-tokens long), EOS ignored so every method generates
--tokens tokens; kv_direct (per_layer, and ids with --ids) next to the eviction baselines window, streamingllm,
h2o, snapkv, tova at the same budgets, all from one prefill. Prints per row: token match (fraction of positions
equal to the full cache's tokens), first divergence, bytes held at the end, recompute seconds; then the max-abs
error of recomputing the prompt's K/V with other product shapes (one row at a time) instead of the original one.
"""

from __future__ import annotations

import argparse

import torch

import kvbench.api as kv
from kvbench.engine.generation import prefill
from kvbench.engine.layers.checkpoint import Recomputer
from kvbench.engine.measure import Stopwatch
from kvbench.harness.sample import Sample
from kvbench.methods.kv_direct import PrefillResiduals
from kvbench.tasks.haystack import haystack_text

BASELINES = ["window", "streamingllm", "h2o", "snapkv", "tova"]


def token_match(tokens: list[int], reference: list[int]) -> tuple[float, int | None]:
    same = [a == b for a, b in zip(tokens, reference, strict=False)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return sum(same) / max(1, len(reference)), first


def recompute_error(lm, ids: list[int]) -> float:
    """Max-abs difference over all layers between the prefill's K/V and K/V recomputed one row at a time."""
    observer = PrefillResiduals()
    observer.bind_model(lm)
    pre = prefill(lm, ids, 0, Stopwatch(lm.device), [observer])
    recomputer = Recomputer(lm.model)
    worst = 0.0
    for idx, layer in enumerate(pre.cache.layers):
        keys, values = recomputer.kv(idx, observer.residuals[idx], [1] * len(ids), len(ids))
        worst = max(worst, float((keys - layer.keys).abs().max()), float((values - layer.values).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--context-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ids", action="store_true", help="also run checkpoint=ids (replay=batched: one forward)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = kv.load_model("smollm2_135m", device="cpu")
    filler = haystack_text("noise", args.context_tokens * 8)
    words = lm.tokenizer.decode(lm.tokenizer(filler)["input_ids"][: args.context_tokens])
    middle = len(words) // 2
    context = words[:middle] + " The special magic number is 4821937. " + words[middle:]
    sample = Sample("kvd", context, "What is the special magic number? Then write a long story about it.",
                    "The special magic number is", ["4821937"], "string_match_all", args.tokens,
                    meta={"ignore_eos": True})  # fmt: skip
    methods = [kv.build_method("kv_direct")] + [kv.build_method(name) for name in BASELINES]
    if args.ids:
        methods.insert(1, kv.build_method({"name": "kv_direct", "checkpoint": "ids", "replay": "batched"}))
    rows = kv.evaluate(lm, [sample], methods, budgets=args.budgets, include_full=True)
    full = next(row for row in rows if row["method"] == "full")
    print(f"prompt {full['prompt_tokens']} tokens, {args.tokens} generated, full K/V {full['kv_bytes']} B")
    print("| method | budget | token match | first divergence | bytes held at end | recompute s | decode s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if row["method"] == "full":
            continue
        match, first = token_match(row["output_ids"], full["output_ids"])
        record = row.get("method_record") or {}
        recompute = record.get("kv_direct_recompute_s")
        print(
            f"| {row['method_label']} | {row['budget']} | {match:.3f} | {first if first is not None else '-'} | "
            f"{row['kv_bytes']} | {'' if recompute is None else f'{recompute:.1f}'} | {row['decode_s']:.1f} |"
        )
    ids = lm.tokenizer(context)["input_ids"][: args.context_tokens]
    print(f"max-abs K/V error, one-row vs {len(ids)}-row recomputation: {recompute_error(lm, ids):.3g}")


if __name__ == "__main__":
    main()
