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

`--retention` adds a check that does not depend on how well the model answers: for SnapKV at each budget
(compress=prompt), the share of the evidence paragraph's tokens and of the question's tokens that survive
compression, with the question before vs after the passage, relative to the overall kept share (1.0 = kept
as often as an average token). It prefills and compresses each sample and decodes one token.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvbench.app import run  # noqa: E402
from kvbench.config import CONF_DIR  # noqa: E402
from kvbench.engine.cache import PAD_POSITION, KVCache  # noqa: E402
from kvbench.engine.models import load_model  # noqa: E402
from kvbench.harness.options import RunOptions  # noqa: E402
from kvbench.harness.prompt import build_prompt  # noqa: E402
from kvbench.harness.results import ResultsStore  # noqa: E402
from kvbench.harness.runner import Job, run_sample  # noqa: E402
from kvbench.methods.base import CompressionContext  # noqa: E402
from kvbench.methods.snapkv import SnapKV  # noqa: E402
from kvbench.report import rows_frame  # noqa: E402
from kvbench.tasks import build_task  # noqa: E402

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
    overall["questions"] = ok.groupby("setting")["meta.question_id"].count() // ok["question_position"].nunique()
    per_type = ok.pivot_table(
        index=["meta.question_type", "setting"], columns="question_position", values="score", aggfunc="mean"
    )
    order = [p for p in ("before", "after", "both") if p in overall.columns]
    return overall[[*order, "questions"]], per_type[order]


@dataclasses.dataclass
class KeptPositionsSnapKV(SnapKV):
    """SnapKV that also records, per layer, the original positions it kept (in ctx.record)."""

    def compress(self, cache: KVCache, ctx: CompressionContext) -> None:
        super().compress(cache, ctx)
        ctx.record["kept_positions"] = [layer.positions.tolist() for layer in cache.layers]


def token_span(pieces: list[str], text: str, start_char: int) -> set[int]:
    """Indices of the prompt tokens whose first character lies in [start_char, start_char + len(text))."""
    span, offset = set(), 0
    for index, piece in enumerate(pieces):
        if start_char <= offset < start_char + len(text):
            span.add(index)
        offset += len(piece)
    return span


def kept_share(kept_positions: list[list[list[int]]], span: set[int]) -> float:
    """Mean over layers and KV heads of the share of `span` that was kept."""
    shares = [
        len(span & {p for p in head if p != PAD_POSITION}) / len(span) for layer in kept_positions for head in layer
    ]
    return sum(shares) / len(shares)


def retention(cfg: DictConfig) -> pd.DataFrame:
    """Evidence/question retention of SnapKV per budget and question position (see the module docstring)."""
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    lm = load_model(cfg.model)
    task = build_task({**cfg.task, "question_position": ["before", "after"]})
    method = KeptPositionsSnapKV(**{k: v for k, v in cfg.method.items() if k != "name"})
    budgets = list(cfg.budget if not isinstance(cfg.budget, int) else [cfg.budget])
    jobs = [Job(method, int(b), f"snapkv{b}") for b in budgets]
    records = []
    for sample in task.samples(lm.tokenizer, lm.max_context):
        evidence = sample.meta["evidence_paragraph"]
        if evidence is None:  # NOT GIVEN: no supporting paragraph
            continue
        sample = dataclasses.replace(sample, max_new_tokens=1)
        ids = build_prompt(lm.tokenizer, sample).input_ids
        pieces = [lm.tokenizer.decode([i]) for i in ids]
        text = "".join(pieces)
        start = sample.context.index(f"Paragraph {evidence}: ")
        end = sample.context.find("\n\nParagraph ", start + 1)
        paragraph = sample.context[start : end if end != -1 else len(sample.context)]
        evidence_span = token_span(pieces, paragraph, text.index(paragraph))
        question_span = token_span(pieces, sample.question, text.index(sample.question))
        for job, row in run_sample(lm, sample, jobs, RunOptions(compress="prompt", seed=int(cfg.seed), fail_fast=True)):
            kept = row["method_record"]["kept_positions"]
            overall = row["kept_fraction_compressed"]  # the moment kept_positions are recorded
            records.append(
                {
                    "budget": job.budget,
                    "question_position": sample.question_position,
                    "question_type": sample.meta["question_type"],
                    "evidence_kept": kept_share(kept, evidence_span),
                    "question_kept": kept_share(kept, question_span),
                    "overall_kept": overall,
                    "evidence_ratio": kept_share(kept, evidence_span) / overall,
                    "question_ratio": kept_share(kept, question_span) / overall,
                }
            )
    return pd.DataFrame(records)


def main(argv: list[str]) -> None:
    with_retention = "--retention" in argv
    argv = [a for a in argv if a != "--retention"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=merge(DEFAULTS, argv))
    if with_retention:
        frame = retention(cfg)
        table = frame.groupby(["budget", "question_position"]).mean(numeric_only=True)
        print("\nSnapKV retention (shares of tokens kept; ratio = share / overall kept share):")
        print(table.to_string(float_format=lambda x: f"{x:.3f}"))
        out = Path(cfg.results_dir) / str(cfg.run_name)
        out.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out / "retention.csv", index=False)
        print(f"table: {out / 'retention.csv'}")
        return
    result = run(cfg)
    frame = rows_frame(ResultsStore(Path(result["run_dir"])).latest_rows())
    overall, per_type = position_tables(frame)
    pd.set_option("display.width", 160)
    print("\nAccuracy by question position (all types):")
    print(overall.to_string(float_format=lambda x: f"{x:.3f}"))
    print("\nAccuracy by question position and type:")
    print(per_type.to_string(float_format=lambda x: f"{x:.3f}"))
    table = Path(result["run_dir"]) / "position_table.csv"
    pd.concat({"all": overall.drop(columns="questions")}, names=["meta.question_type"]).pipe(
        lambda all_types: pd.concat([all_types, per_type])
    ).to_csv(table)
    print(f"\nfigures: {', '.join(str(p) for p in result['figures'])}\ntable: {table}")


if __name__ == "__main__":
    main(sys.argv[1:])
