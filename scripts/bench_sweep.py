"""How much a budget sweep costs compared with one budget (prefill reused across the sweep).

    python scripts/bench_sweep.py                     # SmolLM2, NIAH 2K, 4 samples, snapkv
    python scripts/bench_sweep.py model=tiny_random    # any extra Hydra overrides

Runs the same samples twice in one process (the model is loaded once, before timing): once with
budgets=[128] and once with budgets=[64,128,256,512], each into a fresh results directory, and prints
wall-clock seconds, the per-phase sums from the rows, and the ratio. Without prefill reuse the ratio would be
about 4 (four prefills + four decodes).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from kvbench.app import run
from kvbench.config import CONF_DIR
from kvbench.models import load_model
from kvbench.results import ResultsStore

BASE = [
    "task.lengths=[2048]",
    "task.depths=[20,40,60,80]",
    "task.max_new_tokens=16",
    "method=snapkv",
    "include_full=false",
    "progress=false",
]


def timed_run(overrides: list[str], budgets: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*BASE, *overrides, f"budgets={budgets}", f"results_dir={tmp}"])
        load_model(cfg.model)  # load outside the clock (cached per process)
        start = time.perf_counter()
        result = run(cfg)
        wall = time.perf_counter() - start
        rows = ResultsStore(Path(result["run_dir"])).rows()
    prefill = sum({row["sample_id"]: row["prefill_s"] for row in rows}.values())
    per_budget = sum(row["compress_s"] + row["tail_s"] + row["decode_s"] for row in rows)
    return {"wall_s": wall, "prefill_s": prefill, "compress_decode_s": per_budget, "rows": len(rows)}


def main() -> None:
    overrides = sys.argv[1:]
    one = timed_run(overrides, "[128]")
    four = timed_run(overrides, "[64,128,256,512]")
    print(f"{'setting':<22}{'rows':>6}{'wall s':>10}{'prefill s':>12}{'compress+decode s':>20}")
    for name, numbers in (("1 budget", one), ("4 budgets (sweep)", four)):
        print(
            f"{name:<22}{numbers['rows']:>6}{numbers['wall_s']:>10.2f}{numbers['prefill_s']:>12.2f}"
            f"{numbers['compress_decode_s']:>20.2f}"
        )
    print(f"\nsweep of 4 budgets / 1 budget, wall clock: {four['wall_s'] / one['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
