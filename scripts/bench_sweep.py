"""How much a budget sweep costs compared with one budget (prefill reused across the sweep).

    python scripts/bench_sweep.py                     # SmolLM2, NIAH 2K, 4 samples, snapkv
    python scripts/bench_sweep.py model=tiny_random    # any extra Hydra overrides
    python scripts/bench_sweep.py --profile threads=1  # + where the sweep's extra time goes (cProfile)

Runs the same samples twice in one process (the model is loaded once, before timing): once with
budgets=[128] and once with budgets=[64,128,256,512], each into a fresh results directory, and prints
wall-clock seconds, the per-phase sums from the rows (prefill, compress, tail, decode, and "other": wall clock
minus the phases, i.e. prompt building, cache copies, scoring, writing rows, the summary and figures), and the
ratio. Without prefill reuse the ratio would be about 4 (four prefills + four decodes). `--profile` adds the
functions taking the most time in the 4-budget run.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from kvbench.app import run
from kvbench.config import CONF_DIR
from kvbench.engine.models import load_model
from kvbench.harness.results import ResultsStore

BASE = [
    "task.lengths=[2048]",
    "task.depths=[20,40,60,80]",
    "task.max_new_tokens=16",
    "method=snapkv",
    "include_full=false",
    "progress=false",
]


PHASES = ("prefill_s", "compress_s", "tail_s", "decode_s", "other_s")


def timed_run(overrides: list[str], budgets: str, profiler: cProfile.Profile | None = None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*BASE, *overrides, f"budgets={budgets}", f"results_dir={tmp}"])
        load_model(cfg.model)  # load outside the clock (cached per process)
        if profiler:
            profiler.enable()
        start = time.perf_counter()
        result = run(cfg)
        wall = time.perf_counter() - start
        if profiler:
            profiler.disable()
        rows = ResultsStore(Path(result["run_dir"])).rows()
    sums = {"wall_s": wall, "rows": len(rows)}
    sums["prefill_s"] = sum({row["sample_id"]: row["prefill_s"] for row in rows}.values())
    for phase in ("compress_s", "tail_s", "decode_s"):
        sums[phase] = sum(row[phase] for row in rows)
    sums["other_s"] = wall - sum(sums[phase] for phase in PHASES[:-1])
    return sums


def main() -> None:
    profile = "--profile" in sys.argv[1:]
    overrides = [arg for arg in sys.argv[1:] if arg != "--profile"]
    one = timed_run(overrides, "[128]")
    profiler = cProfile.Profile() if profile else None
    four = timed_run(overrides, "[64,128,256,512]", profiler)
    print(f"{'setting':<20}{'rows':>6}{'wall s':>9}" + "".join(f"{p.removesuffix('_s') + ' s':>11}" for p in PHASES))
    for name, numbers in (("1 budget", one), ("4 budgets (sweep)", four)):
        cells = "".join(f"{numbers[phase]:>11.2f}" for phase in PHASES)
        print(f"{name:<20}{numbers['rows']:>6}{numbers['wall_s']:>9.2f}{cells}")
    extra = four["wall_s"] - one["wall_s"]
    print(f"\nsweep of 4 budgets / 1 budget, wall clock: {four['wall_s'] / one['wall_s']:.2f}x")
    print(
        "the sweep's extra seconds by phase: "
        + ", ".join(f"{p.removesuffix('_s')} {four[p] - one[p]:+.2f}" for p in PHASES)
        + f" (total {extra:+.2f})"
    )
    if profiler:
        print("\nfunctions taking the most time in the 4-budget run (cumulative):")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
