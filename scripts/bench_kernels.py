"""Time kvbench's kernels against their torch references and print one table.

    python scripts/bench_kernels.py            # CUDA: window scores at T = 4K/32K/128K, decode at 4K/32K/128K,
                                               # decode over KIVI-2/4 packed codes at 4K/32K/128K
    python scripts/bench_kernels.py --smoke    # CPU (Triton interpreted): small sizes, checks that all runs
    python scripts/bench_kernels.py --sweep    # CUDA: also try block sizes / warps / splits for the kernels

Every Triton result is checked against the reference first (`err` = |out - ref| / |ref|). Times are medians
over repeats after warmup (CUDA events); inputs rotate among several copies when one copy would sit in L2.
`GB/s` counts the fewest bytes each kernel must move (inputs read once, outputs written once); `%copy` relates
it to the measured device-to-device copy bandwidth; `extra MB` is peak memory beyond inputs and outputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small sizes (CPU: Triton in its interpreter)")
    parser.add_argument("--sweep", action="store_true", help="also sweep kernel launch parameters (CUDA)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows here")
    return parser.parse_args()


ARGS = parse_args()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    # Must precede the first import of triton (kvbench's torch references import transformers, which imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvbench.engine.kernels import triton_available  # noqa: E402
from kvbench.engine.kernels.decode_attention import decode_attention_torch, decode_attention_triton  # noqa: E402
from kvbench.engine.kernels.packed_decode import packed_decode_attention_torch, packed_decode_attention_triton  # noqa: E402
from kvbench.engine.kernels.window_scores import window_scores_torch, window_scores_triton  # noqa: E402
from kvbench.engine.quant.segments import UniformSegment  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KIB = 1024


def tokens(n: int) -> str:
    return f"{n // KIB}K" if n % KIB == 0 else str(n)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_ms(step: Callable[[int], object], warmup: int, repeats: int) -> float:
    """Median milliseconds of `step(i)` (i = repeat index, used to rotate inputs)."""
    for i in range(warmup):
        step(i)
    sync()
    times = []
    for i in range(repeats):
        if DEVICE.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def rotating(fn: Callable, sets: list[tuple], **kwargs) -> Callable[[int], object]:
    """`step(i)`: `fn` on input copy i mod len(sets)."""
    return lambda i: fn(*sets[i % len(sets)], **kwargs)


def graph_replay(step: Callable[[int], object]) -> Callable[[int], object] | None:
    """`step(0)` captured in a CUDA graph: replays time the kernels without the host's launch gaps."""
    if DEVICE.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(0)
    except RuntimeError as error:
        print(f"  (no CUDA graph: {str(error).splitlines()[0]})")
        return None
    return lambda i: graph.replay()


def extra_memory_mb(step: Callable[[int], object]) -> float | None:
    """Peak CUDA memory of `step(0)` beyond what was allocated before and what it returns."""
    if DEVICE.type != "cuda":
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = step(0)
    sync()
    outputs = result if isinstance(result, tuple) else (result,)
    returned = sum(t.numel() * t.element_size() for t in outputs)
    return (torch.cuda.max_memory_allocated() - before - returned) / KIB**2


def copies_needed(nbytes: int) -> int:
    """Input copies to rotate so that repeats do not re-read one copy from L2 (at most 8)."""
    if DEVICE.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(DEVICE), "L2_cache_size", 50 * KIB**2)
    return max(1, min(8, -(-4 * l2 // max(nbytes, 1))))


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy (bytes read + bytes written) of a buffer far larger than L2."""
    nbytes = (256 if DEVICE.type == "cpu" else 1024) * KIB**2
    src = torch.randn(nbytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    ms = median_ms(lambda i: dst.copy_(src), ARGS.warmup, ARGS.repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


class Table:
    COLUMNS = ("kernel", "shape", "impl", "ms", "speedup", "GB/s", "%copy", "extra MB", "err")

    def __init__(self, copy_gbs: float) -> None:
        self.copy_gbs = copy_gbs
        self.rows: list[tuple[str, ...]] = []

    def add(self, kernel, shape, impl, ms, base_ms, nbytes, extra_mb, err=None) -> None:
        gbs = nbytes / (ms * 1e-3) / 1e9
        self.rows.append(
            (
                kernel,
                shape,
                impl,
                f"{ms:.3f}",
                f"{base_ms / ms:.2f}x",
                f"{gbs:.0f}" if gbs >= 100 else f"{gbs:.2g}",
                f"{100 * gbs / self.copy_gbs:.0f}%",
                "-" if extra_mb is None else f"{extra_mb:.1f}",
                "-" if err is None else f"{err:.1e}",
            )
        )
        print("  " + "  ".join(self.rows[-1]), flush=True)

    def print(self) -> None:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) for i, c in enumerate(self.COLUMNS)]
        line = "  ".join(c.ljust(w) for c, w in zip(self.COLUMNS, widths, strict=True))
        print("\n" + line + "\n" + "-" * len(line))
        for row in self.rows:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))

    def write_csv(self, path: Path) -> None:
        lines = [",".join(self.COLUMNS)] + [",".join(row) for row in self.rows]
        path.write_text("\n".join(lines) + "\n")


def bench_window_scores(table: Table, dtype: torch.dtype, lengths: list[int]) -> None:
    heads, kv_heads, dim, window = ARGS.heads, ARGS.kv_heads, ARGS.head_dim, ARGS.window
    for length in lengths:
        per_copy = kv_heads * length * dim * dtype.itemsize
        sets = []
        for _ in range(copies_needed(per_copy)):
            keys = torch.randn(kv_heads, length, dim, device=DEVICE, dtype=dtype)
            queries = torch.randn(heads, window, dim, device=DEVICE, dtype=dtype)
            key_positions = torch.arange(length, device=DEVICE).expand(kv_heads, -1).contiguous()
            query_positions = torch.arange(length - window, length, device=DEVICE)
            sets.append((queries, keys, query_positions, key_positions, dim**-0.5))
        nbytes = per_copy + heads * window * dim * dtype.itemsize + kv_heads * length * 4
        shape = f"H{heads}/{kv_heads} w{window} T{tokens(length)} d{dim}"
        ref_step = rotating(window_scores_torch, sets)
        ref_ms = median_ms(ref_step, ARGS.warmup, ARGS.repeats)
        table.add("window_scores", shape, "torch", ref_ms, ref_ms, nbytes, extra_memory_mb(ref_step))
        if not triton_available():
            continue
        step = rotating(window_scores_triton, sets)
        err = relative_error(step(0), ref_step(0))
        ms = median_ms(step, ARGS.warmup, ARGS.repeats)
        table.add("window_scores", shape, "triton", ms, ref_ms, nbytes, extra_memory_mb(step), err)
        replay = graph_replay(step)
        if replay is not None:
            table.add("window_scores", shape, "triton graph", median_ms(replay, 2, ARGS.repeats), ref_ms, nbytes, None)
        if ARGS.sweep and DEVICE.type == "cuda":
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    ms = median_ms(
                        rotating(window_scores_triton, sets, block_n=block_n, num_warps=warps), 2, ARGS.repeats
                    )
                    table.add("window_scores", shape, f"triton n{block_n} w{warps}", ms, ref_ms, nbytes, None)


def sdpa_decode(query, keys, values, scaling, lengths=None):
    """What kvbench's attention function runs today for one decode token: PyTorch SDPA with GQA, and for
    ragged heads a boolean mask built per call (as `KVLayer.attention_mask` + `attend` do)."""
    heads, kv_heads, slots = query.shape[0], keys.shape[0], keys.shape[1]
    mask = None
    if lengths is not None:
        mask = torch.arange(slots, device=keys.device)[None, :] < lengths[:, None]
        mask = mask.repeat_interleave(heads // kv_heads, dim=0)[None, :, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        query[None, :, None], keys[None], values[None], attn_mask=mask, scale=scaling, enable_gqa=heads != kv_heads
    )
    return out[0, :, 0]


def decode_sets(slots: int, lengths: torch.Tensor | None, dtype: torch.dtype):
    heads, kv_heads, dim = ARGS.heads, ARGS.kv_heads, ARGS.head_dim
    per_copy = 2 * kv_heads * slots * dim * dtype.itemsize
    sets = []
    for _ in range(copies_needed(per_copy)):
        query = torch.randn(heads, dim, device=DEVICE, dtype=dtype)
        keys = torch.randn(kv_heads, slots, dim, device=DEVICE, dtype=dtype)
        values = torch.randn(kv_heads, slots, dim, device=DEVICE, dtype=dtype)
        sets.append((query, keys, values, dim**-0.5, lengths))
    return sets


def decode_bytes(slots_read: int, with_probs: bool, dtype: torch.dtype) -> int:
    heads, kv_heads, dim = ARGS.heads, ARGS.kv_heads, ARGS.head_dim
    kv = 2 * kv_heads * slots_read * dim * dtype.itemsize
    return kv + 2 * heads * dim * dtype.itemsize + (heads * slots_read * 4 if with_probs else 0)


def bench_decode(table: Table, dtype: torch.dtype, kept: list[int], full: list[int], summary: list[str]) -> None:
    heads, kv_heads, dim = ARGS.heads, ARGS.kv_heads, ARGS.head_dim

    functions = {"torch": decode_attention_torch, "sdpa": sdpa_decode, "triton": decode_attention_triton}

    def time_all(label: str, sets, slots_read: int) -> dict[str, float]:
        impls = ["torch", "sdpa"] + (["triton", "triton+probs"] if triton_available() else [])
        times = {}
        ref_out, ref_probs = decode_attention_torch(*sets[0], return_probs=True)
        for impl in impls:
            kw = {"return_probs": True} if impl.endswith("probs") else {}
            step = rotating(functions[impl.split("+")[0]], sets, **kw)
            times[impl] = median_ms(step, ARGS.warmup, ARGS.repeats)
            err = None
            if impl.startswith("triton"):
                got = step(0)
                err = relative_error(got[0], ref_out) if kw else relative_error(got, ref_out)
                if kw:
                    err = max(err, relative_error(got[1], ref_probs))
            nbytes = decode_bytes(slots_read, bool(kw), sets[0][1].dtype)
            extra = extra_memory_mb(step)
            table.add("decode", label, impl, times[impl], times["torch"], nbytes, extra, err)
            replay = graph_replay(step) if impl.startswith("triton") else None
            if replay is not None:
                times[impl + " graph"] = median_ms(replay, 2, ARGS.repeats)
                table.add("decode", label, impl + " graph", times[impl + " graph"], times["torch"], nbytes, None)
        return times

    measured = {}
    for slots in kept:
        measured[slots] = time_all(
            f"H{heads}/{kv_heads} L{tokens(slots)} d{dim}", decode_sets(slots, None, dtype), slots
        )
    if not triton_available():
        return
    for slots in full:
        full_times = measured[slots]
        eighth = slots // 8
        kept_times = time_all(f"1/8 of {tokens(slots)}", decode_sets(eighth, None, dtype), eighth)
        # Ragged heads averaging 1/8 (per-head budgets): the buffer is as long as the longest head.
        lengths = torch.linspace(eighth // 2, 3 * eighth // 2, kv_heads, device=DEVICE).long()
        ragged = decode_sets(int(lengths.max()), lengths, dtype)
        ragged_times = time_all(f"ragged 1/8 of {tokens(slots)}", ragged, int(lengths.sum()) // kv_heads)
        for name, times in (("uniform", kept_times), ("ragged", ragged_times)):
            for impl in ("triton", "triton graph"):
                if impl in times:
                    summary.append(
                        f"kept 1/8 of {tokens(slots)} ({name}): {impl} {full_times[impl] / times[impl]:.1f}x faster "
                        f"than {impl} over the full cache, {full_times['sdpa'] / times[impl]:.1f}x than SDPA over it"
                    )
        if ARGS.sweep and DEVICE.type == "cuda":
            sets = decode_sets(slots, None, dtype)
            for block_n in (32, 64, 128):
                for warps in (2, 4, 8):
                    for splits in (None, 2 * kv_heads, 8 * kv_heads):
                        kw = dict(block_n=block_n, num_warps=warps, num_splits=splits)
                        ms = median_ms(rotating(decode_attention_triton, sets, **kw), 2, ARGS.repeats)
                        label = f"triton n{block_n} w{warps} s{splits or 'auto'}"
                        table.add(
                            "decode",
                            f"L{tokens(slots)}",
                            label,
                            ms,
                            full_times["torch"],
                            decode_bytes(slots, False, dtype),
                            None,
                        )


def packed_sets(slots: int, bits: int, dtype: torch.dtype):
    """KIVI-style operands: keys per channel / values per token in groups of 32, fp tails of 64 keys, 128 values."""
    heads, kv_heads, dim = ARGS.heads, ARGS.kv_heads, ARGS.head_dim
    k_tail, v_tail = 64, 128
    sets = []
    for _ in range(copies_needed(2 * kv_heads * slots * dim * bits // 8)):
        keys = torch.randn(kv_heads, slots, dim, device=DEVICE, dtype=dtype)
        values = torch.randn(kv_heads, slots, dim, device=DEVICE, dtype=dtype)
        kq = UniformSegment.encode(keys[:, : slots - k_tail], bits, 32, "token")
        vq = UniformSegment.encode(values[:, : slots - v_tail], bits, 32, "channel")
        operands = (kq, keys[:, slots - k_tail :].clone(), vq, values[:, slots - v_tail :].clone())
        sets.append((torch.randn(heads, dim, device=DEVICE, dtype=dtype), operands, dim**-0.5))
    return sets


def packed_bytes(operands, query: torch.Tensor) -> int:
    """Codes + scales + zeros + fp tails read, query read and output written once."""
    kq, kf, vq, vf = operands
    held = kq.nbytes() + vq.nbytes() + kf.numel() * kf.element_size() + vf.numel() * vf.element_size()
    return held + 2 * query.numel() * query.element_size()


def bench_packed_decode(table: Table, dtype: torch.dtype, lengths: list[int]) -> None:
    """Decode over KIVI-packed codes: the Triton kernel dequantises in registers (bytes moved = the packed cache);
    the torch reference dequantises to fp32 first. `speedup` is relative to the fp decode kernel (triton, or the
    torch reference without Triton) over the same slots stored in `dtype`."""
    heads, kv_heads, dim = ARGS.heads, ARGS.kv_heads, ARGS.head_dim
    for slots in lengths:
        dense = decode_sets(slots, None, dtype)
        fp_impl = decode_attention_triton if triton_available() else decode_attention_torch
        fp_ms = median_ms(rotating(fp_impl, dense), ARGS.warmup, ARGS.repeats)
        for bits in (2, 4):
            sets = packed_sets(slots, bits, dtype)
            shape = f"H{heads}/{kv_heads} L{tokens(slots)} d{dim} kivi-{bits}"
            nbytes = packed_bytes(sets[0][1], sets[0][0])
            ref_step = rotating(packed_decode_attention_torch, sets)
            ref = ref_step(0)
            ref_ms = median_ms(ref_step, ARGS.warmup, ARGS.repeats)
            table.add("packed_decode", shape, "torch", ref_ms, fp_ms, nbytes, extra_memory_mb(ref_step))
            if not triton_available():
                continue
            step = rotating(packed_decode_attention_triton, sets)
            err = relative_error(step(0), ref)
            ms = median_ms(step, ARGS.warmup, ARGS.repeats)
            table.add("packed_decode", shape, "triton", ms, fp_ms, nbytes, extra_memory_mb(step), err)


def main() -> None:
    dtype = DTYPES[ARGS.dtype] if ARGS.dtype else (torch.bfloat16 if DEVICE.type == "cuda" else torch.float32)
    if ARGS.smoke:
        ARGS.heads, ARGS.kv_heads, ARGS.head_dim, ARGS.window = 8, 2, 64, 16
        ARGS.warmup, ARGS.repeats = 1, 3
        window_lengths, kept, full = [KIB // 4, KIB], [KIB // 4, KIB], [KIB]
    else:
        window_lengths, kept, full = (
            [4 * KIB, 32 * KIB, 128 * KIB],
            [4 * KIB, 32 * KIB, 128 * KIB],
            [32 * KIB, 128 * KIB],
        )
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"
    if DEVICE.type == "cpu" and triton_available():
        name += " (Triton interpreted: its times are not kernel times)"
    copy_gbs = copy_bandwidth_gbs()
    print(f"device: {name}\ndtype: {dtype}\ncopy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    print(f"torch {torch.__version__}, triton {'yes' if triton_available() else 'not installed'}\n")
    table = Table(copy_gbs)
    bench_window_scores(table, dtype, window_lengths)
    summary: list[str] = []
    bench_decode(table, dtype, kept, full, summary)
    bench_packed_decode(table, dtype, kept)
    table.print()
    print("\n" + "\n".join(summary))
    if ARGS.csv:
        table.write_csv(ARGS.csv)


if __name__ == "__main__":
    main()
