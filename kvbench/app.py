"""One kvbench run: model x method x task x budgets -> rows in results/<run>/, a summary table and figures."""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from kvbench import api
from kvbench import config as run_config
from kvbench.chunked import check_chunked_methods
from kvbench.kernels.dispatch import resolve_kernels
from kvbench.methods import build_method
from kvbench.models import load_model
from kvbench.plots import accuracy_vs_budget
from kvbench.report import format_table, rows_frame, summarize
from kvbench.results import ResultsStore, manifest
from kvbench.tasks import build_task

log = logging.getLogger("kvbench")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: Any) -> dict[str, Any]:
    """Run the composed config; returns paths and the summary (also printed)."""
    settings = run_config.validate(cfg)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    seed_everything(settings.seed)
    method = build_method(cfg.method)
    check_chunked_methods(settings.prefill_chunk, [method])
    task = build_task(cfg.task)
    lm = load_model(cfg.model)
    api.check_model(lm, [method])
    kernels = resolve_kernels(settings.kernels, lm.device)
    methods = api.with_full([method], settings.include_full)
    options = api.RunOptions(
        budgets=settings.budgets,
        compress=settings.compress,
        seed=settings.seed,
        fail_fast=settings.fail_fast,
        kernels=settings.kernels,
        prefill_chunk=settings.prefill_chunk,
        run_name=settings.run_dir.name,
        task_name=task.name,
    )

    store = ResultsStore(settings.run_dir)
    store.write_text("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    store.write_text(
        "manifest.json",
        json.dumps(
            manifest(
                lm,
                settings.seed,
                {"kernels": {"requested": settings.kernels, "resolved": kernels}},
            ),
            indent=2,
        ),
    )
    samples = list(task.samples(lm.tokenizer, lm.max_context))
    if settings.max_samples is not None:
        samples = samples[: settings.max_samples]
    done = store.done_keys()
    planned = [(sample, api.plan(lm, sample, methods, options)) for sample in samples]
    work = [(sample, [j for j in jobs if j.key not in done]) for sample, jobs in planned]
    work = [(sample, jobs) for sample, jobs in work if jobs]
    total = sum(len(jobs) for _, jobs in work)
    skipped = sum(len(jobs) for _, jobs in planned) - total
    if skipped:
        log.info("resuming: %d rows already in %s, %d to run", skipped, store.samples_path, total)
    with tqdm(total=total, desc=f"{task.name} x {method.label()}", disable=not settings.progress, unit="row") as bar:
        for row in api.iter_rows(lm, work, options):
            store.append(row)
            bar.update(1)

    rows = store.latest_rows()
    summary = summarize(rows, settings.x_axis)
    store.write_text("summary.csv", summary.to_csv(index=False))
    frame = rows_frame(rows)
    figures = accuracy_vs_budget(frame, settings.run_dir, settings.x_axis) + task.figures(frame, settings.run_dir)
    table = format_table(summary)
    print(f"\nkvbench results: {settings.run_dir}\n{table}\n")
    return {"run_dir": settings.run_dir, "summary": summary, "figures": figures, "rows_run": total}
