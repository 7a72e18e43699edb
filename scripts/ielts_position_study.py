"""Question-position study on the IELTS-style task: accuracy by question position x method x budget.

Runs `python -m kvbench` programmatically (same config, results store, resume and figures) with defaults
that fit a small CPU: SmolLM2-135M, SnapKV at budgets 64 and 128 plus the full cache, compress=prompt, every
passage, one question of each type per passage, question before / after / both, 8 new tokens, one torch
thread. Then prints accuracy per
position (all types and per type) and writes `position_table.csv` next to the run's samples.jsonl.

    python scripts/ielts_position_study.py                                # defaults above
    python scripts/ielts_position_study.py task.questions_per_type=2 budget=[32,64,128]
    python scripts/ielts_position_study.py method=streamingllm run_name=ielts_position_streamingllm

Any kvbench override is accepted; the run resumes if interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvbench.app import run  # noqa: E402
from kvbench.config import CONF_DIR  # noqa: E402
from kvbench.report import rows_frame  # noqa: E402
from kvbench.results import ResultsStore  # noqa: E402

DEFAULTS = [
    "model=smollm2_135m",
    "task=ielts",
    "method=snapkv",
    "budget=[64,128]",
    "compress=prompt",
    "task.questions_per_type=1",
    "task.max_new_tokens=8",  # answers are one or two words; decoding dominates the cost on a CPU
    "threads=1",  # on a busy shared CPU one torch thread was 3x faster than two
    "progress=false",
    "run_name=ielts_position_study",
]


def merge(defaults: list[str], overrides: list[str]) -> list[str]:
    """Command-line overrides replace the defaults with the same key."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [d for d in defaults if d.split("=", 1)[0] not in keys] + overrides


def position_tables(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(all types, per type): mean exact match per method x budget (rows) and question position (columns)."""
    ok = frame[frame["status"] == "ok"].copy()
    ok["setting"] = ok["method_label"] + " @ " + ok["budget_label"]
    overall = ok.pivot_table(index="setting", columns="question_position", values="score", aggfunc="mean")
    overall["n"] = ok.groupby("setting")["sample_id"].nunique()
    per_type = ok.pivot_table(
        index=["meta.question_type", "setting"], columns="question_position", values="score", aggfunc="mean"
    )
    order = [p for p in ("before", "after", "both") if p in overall.columns]
    return overall[[*order, "n"]], per_type[order]


def main(argv: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=merge(DEFAULTS, argv))
    result = run(cfg)
    frame = rows_frame(ResultsStore(Path(result["run_dir"])).latest_rows())
    overall, per_type = position_tables(frame)
    pd.set_option("display.width", 160)
    print("\nAccuracy by question position (all types):")
    print(overall.to_string(float_format=lambda x: f"{x:.3f}"))
    print("\nAccuracy by question position and type:")
    print(per_type.to_string(float_format=lambda x: f"{x:.3f}"))
    table = Path(result["run_dir"]) / "position_table.csv"
    pd.concat({"all": overall.drop(columns="n")}, names=["meta.question_type"]).pipe(
        lambda all_types: pd.concat([all_types, per_type])
    ).to_csv(table)
    print(f"\nfigures: {', '.join(str(p) for p in result['figures'])}\ntable: {table}")


if __name__ == "__main__":
    main(sys.argv[1:])
