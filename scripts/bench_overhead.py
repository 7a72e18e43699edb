"""kvbench's own prefill + greedy decode loop against transformers' `generate` (SDPA, its default DynamicCache).

    python scripts/bench_overhead.py                                   # CPU: SmolLM2, 2K and 8K prompts
    python scripts/bench_overhead.py --model llama31_8b_random --lengths 8192,32768,131072 \
        --set model.tokenizer=.gpu/tokenizer                           # GPU: the 8B shape, random weights
    python scripts/bench_overhead.py --impls kvbench,kvbench_concat --lengths 1024,2048,4096,8192  # append change

Both sides get the same model object, the same random prompt and the same number of new tokens (EOS ignored).
Rounds are interleaved (A B, then B A, ...) and the table shows medians: TTFT (prompt in -> first token out)
and TPOT (mean time of the decode forwards after the first token), plus the ratios kvbench / transformers.
`--impls` picks the sides: `kvbench`, `transformers`, and `kvbench_concat`, the cache's pre-capacity behaviour
(no reservation, every append reallocates the layer to the exact new length, which is what `torch.cat` did),
to show what the append change saves; it decodes the kvbench prefill a second time (same TTFT).
`--lengths` may give per-length rounds as LENGTH:ROUNDS (e.g. 2048,8160:1).
On CUDA the table also gives the memory floor of one decode step: (weight bytes + KV bytes) / measured copy
bandwidth, and the KV-only part of it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from transformers import LogitsProcessor, LogitsProcessorList

from kvbench.config import CONF_DIR
from kvbench.engine.attention import ATTN_IMPLEMENTATION
from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.generation import greedy_decode, prefill
from kvbench.engine.kernels.dispatch import resolve_kernels
from kvbench.engine.measure import Stopwatch
from kvbench.engine.models import LoadedModel, load_model

IMPLS = ("kvbench", "transformers", "kvbench_concat")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def concatenating_growth():
    """The pre-capacity cache: no reservation, every append reallocates to the exact length (as torch.cat)."""
    saved = KVLayer.MIN_SLACK, KVLayer.GROWTH_FRACTION, KVCache.reserve
    KVLayer.MIN_SLACK, KVLayer.GROWTH_FRACTION = 0, 0.0
    KVCache.reserve = lambda self, num_tokens: None
    try:
        yield
    finally:
        KVLayer.MIN_SLACK, KVLayer.GROWTH_FRACTION, KVCache.reserve = saved


def run_kvbench(
    lm: LoadedModel, ids: list[int], new_tokens: int, concat: bool = False, kernels: str = "torch"
) -> dict[str, float]:
    """The runner's path for a full-cache job: prefill, reserve the decode slots, greedy decode. With `concat`,
    the same prefill is decoded a second time with the old growth (`tpot_concat_s`); the prefill cache is shared
    copy-on-write, so neither decode sees the other's appends."""
    stopwatch = Stopwatch(lm.device)
    start = time.perf_counter()
    pre = prefill(lm, ids, 0, stopwatch)
    first = int(torch.argmax(pre.last_logits))  # the first token is out (argmax syncs)
    result = {"ttft_s": time.perf_counter() - start, "kv_bytes": pre.cache.kv_bytes()}
    runs = [("tpot_s", False)] + ([("tpot_concat_s", True)] if concat else [])
    for field, old_growth in runs:
        cache = pre.cache.copy()
        cache.decode_kernels = kernels
        with concatenating_growth() if old_growth else contextlib.nullcontext():
            cache.reserve(new_tokens - 1)
            decoded = greedy_decode(lm, cache, pre.last_logits, new_tokens, lambda n: None, stopwatch, False)
        assert decoded.tokens[0] == first and decoded.steps == new_tokens - 1
        result[field] = decoded.seconds / decoded.steps
    return result


class StepClock(LogitsProcessor):
    """Called by `generate` once per new token, right after that token's forward: records the time."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def run_transformers(lm: LoadedModel, ids: list[int], new_tokens: int) -> tuple[float, float]:
    clock = StepClock(lm.device)
    lm.model.set_attn_implementation("sdpa")
    try:
        inputs = torch.tensor([ids], device=lm.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = lm.model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
                pad_token_id=lm.eos_token_ids[0] if lm.eos_token_ids else 0,
            )
    finally:
        lm.model.set_attn_implementation(ATTN_IMPLEMENTATION)
    assert out.shape[1] == len(ids) + new_tokens and len(clock.times) == new_tokens
    return clock.times[0] - start, (clock.times[-1] - clock.times[0]) / (new_tokens - 1)


def copy_bandwidth(device: torch.device, gib: float = 1.0) -> float | None:
    """Bytes moved per second by a device-to-device copy (read + write), the decode step's memory floor."""
    if device.type != "cuda":
        return None
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() / min(times)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model name")
    parser.add_argument("--set", action="append", default=[], help="model override, e.g. model.tokenizer=DIR")
    parser.add_argument("--lengths", default="2048,8192", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved A/B rounds per length")
    parser.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--impls", default="kvbench,transformers", help=f"comma-separated, from {', '.join(IMPLS)}")
    parser.add_argument("--csv", type=Path, default=None, help="write every measurement here")
    args = parser.parse_args(argv)
    args.impls = args.impls.split(",")
    if any(impl not in IMPLS for impl in args.impls):
        parser.error(f"--impls {args.impls}: valid ones are {', '.join(IMPLS)}")
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be >= 2 (TPOT needs a decode step), got {args.new_tokens}")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", *args.set])
    lm = load_model(cfg.model)
    kernels = resolve_kernels(args.kernels, lm.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    bandwidth = copy_bandwidth(lm.device)
    rounds = {int(x.split(":")[0]): int(x.split(":")[1]) if ":" in x else args.rounds for x in args.lengths.split(",")}
    lengths = list(rounds)
    too_long = [n for n in lengths if n + args.new_tokens > lm.max_context]
    if too_long:
        sys.exit(f"--lengths {too_long[0]} + {args.new_tokens} new tokens > the model's maximum {lm.max_context}")
    impls = args.impls
    records = []
    dtype = str(lm.dtype).removeprefix("torch.")
    print(f"model {cfg.model.name} on {lm.device} ({dtype}), threads {torch.get_num_threads()}, decode kernels "
          f"{kernels}, {args.new_tokens} new tokens")  # fmt: skip
    for length in lengths:
        ids = torch.randint(100, 20000, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        run_kvbench(lm, ids[:64], 4, kernels=kernels)  # warm-up (first calls compile / allocate)
        if "transformers" in impls:
            run_transformers(lm, ids[:64], 4)
        for round_ in range(rounds[length]):
            sides = [impl for impl in impls if impl != "kvbench_concat"]
            for impl in sides if round_ % 2 == 0 else reversed(sides):
                if impl == "transformers":
                    ttft, tpot = run_transformers(lm, ids, args.new_tokens)
                    measured = {"transformers": (ttft, tpot, None)}
                else:
                    out = run_kvbench(lm, ids, args.new_tokens, "kvbench_concat" in impls, kernels)
                    measured = {"kvbench": (out["ttft_s"], out["tpot_s"], out["kv_bytes"])}
                    if "tpot_concat_s" in out:
                        measured["kvbench_concat"] = (out["ttft_s"], out["tpot_concat_s"], out["kv_bytes"])
                for name, (ttft, tpot, kv_bytes) in measured.items():
                    records.append(dict(model=cfg.model.name, device=str(lm.device), prompt_tokens=length,
                                        new_tokens=args.new_tokens, impl=name, round=round_, ttft_s=ttft,
                                        tpot_s=tpot, kv_bytes=kv_bytes))  # fmt: skip
                    print(
                        f"  L={length} round {round_} {name:<15} ttft {ttft:8.3f} s  tpot {tpot * 1e3:8.2f} ms",
                        flush=True,
                    )
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    print_table(records, lengths, impls, weight_bytes, bandwidth)


def print_table(records, lengths, impls, weight_bytes: int, bandwidth: float | None) -> None:
    """Medians per prompt length; ratios are kvbench / transformers and old growth / kvbench."""

    def median(length, impl, field):
        return statistics.median(r[field] for r in records if r["prompt_tokens"] == length and r["impl"] == impl)

    columns = ["prompt", "kvbench TTFT s", "kvbench TPOT ms"]
    if "transformers" in impls:
        columns += ["HF TTFT s", "HF TPOT ms", "TTFT ratio", "TPOT ratio"]
    if "kvbench_concat" in impls:
        columns += ["old-growth TPOT ms", "old / new TPOT"]
    if bandwidth:
        columns += ["floor ms (weights+KV)", "KV-only floor ms", "TPOT / floor"]
    print("\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for length in lengths:
        ttft, tpot = median(length, "kvbench", "ttft_s"), median(length, "kvbench", "tpot_s")
        cells = [str(length), f"{ttft:.3f}", f"{tpot * 1e3:.2f}"]
        if "transformers" in impls:
            hf_ttft, hf_tpot = median(length, "transformers", "ttft_s"), median(length, "transformers", "tpot_s")
            cells += [f"{hf_ttft:.3f}", f"{hf_tpot * 1e3:.2f}", f"{ttft / hf_ttft:.2f}", f"{tpot / hf_tpot:.2f}"]
        if "kvbench_concat" in impls:
            old = median(length, "kvbench_concat", "tpot_s")
            cells += [f"{old * 1e3:.2f}", f"{old / tpot:.2f}"]
        if bandwidth:
            kv = median(length, "kvbench", "kv_bytes")
            floor, kv_floor = (weight_bytes + kv) / bandwidth, kv / bandwidth
            cells += [f"{floor * 1e3:.2f}", f"{kv_floor * 1e3:.2f}", f"{tpot / floor:.2f}"]
        print("| " + " | ".join(cells) + " |")
    if bandwidth:
        print(f"\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write), weights {weight_bytes / 1e9:.2f} GB")


if __name__ == "__main__":
    main(sys.argv[1:])
