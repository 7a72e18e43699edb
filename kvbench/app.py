"""One kvbench run: model x method x task x budgets -> rows in results/<run>/, a summary table and figures."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from kvbench import config as run_config
from kvbench.chunked import check_chunked_methods
from kvbench.kernels.dispatch import resolve_kernels
from kvbench.methods import build_method
from kvbench.methods.base import Method
from kvbench.methods.full import Full
from kvbench.models import LoadedModel, load_model
from kvbench.plots import accuracy_vs_budget
from kvbench.report import format_table, rows_frame, summarize
from kvbench.results import ResultsStore, manifest, row_key
from kvbench.runner import Job, run_sample
from kvbench.tasks import Sample, build_task

log = logging.getLogger("kvbench")


def default_cache_dir(lm: LoadedModel) -> Path:
    """Per-model artefacts (e.g. head profiles) live outside the repo."""
    root = Path(os.environ.get("KVBENCH_CACHE", Path.home() / ".cache" / "kvbench"))
    return root / lm.name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_jobs(
    methods: list[Method], budgets: tuple, lm: LoadedModel, sample: Sample, settings: run_config.RunSettings
) -> list[Job]:
    jobs = []
    for method in methods:
        params = method.params()
        if settings.prefill_chunk is not None:  # a chunked prefill is another row (one-shot keys unchanged)
            params = {**params, "prefill_chunk": settings.prefill_chunk}
        for budget in budgets if method.compresses else (None,):
            key = row_key(
                lm.identity,
                method.name,
                params,
                budget,
                settings.compress,
                sample.fingerprint(),
                settings.seed,
            )
            jobs.append(Job(method=method, budget=budget, key=key))
    return jobs


def row_identity(job: Job, sample: Sample, lm: LoadedModel, task: Any, settings: run_config.RunSettings) -> dict:
    return {
        "key": job.key,
        "run": settings.run_dir.name,
        "task": task.name,
        "subtask": sample.meta.get("subtask", task.name),
        "sample_id": sample.sample_id,
        "method": job.method.name,
        "method_label": job.method.label(),
        "method_params": job.method.params(),
        "budget": job.budget,
        "compress": settings.compress,
        "question_position": sample.question_position,
        "seed": settings.seed,
        "model": lm.name,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "metric": sample.metric,
        "answers": sample.answers,
        "max_new_tokens": sample.max_new_tokens,
        "meta": sample.meta,
    }


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
    kernels = resolve_kernels(settings.kernels, lm.device)
    methods = [method]
    if settings.include_full and method.compresses:
        methods.append(Full())

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
    planned = [(sample, build_jobs(methods, settings.budgets, lm, sample, settings)) for sample in samples]
    work = [(sample, [j for j in jobs if j.key not in done]) for sample, jobs in planned]
    work = [(sample, jobs) for sample, jobs in work if jobs]
    total = sum(len(jobs) for _, jobs in work)
    skipped = sum(len(jobs) for _, jobs in planned) - total
    if skipped:
        log.info("resuming: %d rows already in %s, %d to run", skipped, store.samples_path, total)
    cache_dir = default_cache_dir(lm)
    with tqdm(total=total, desc=f"{task.name} x {method.label()}", disable=not settings.progress, unit="row") as bar:
        for sample, jobs in work:
            chunk = settings.prefill_chunk
            for job, row in run_sample(
                lm, sample, jobs, settings.compress, settings.seed, settings.fail_fast, cache_dir, kernels, chunk
            ):
                store.append({**row_identity(job, sample, lm, task, settings), **row})
                bar.update(1)
                if row["status"] != "ok":
                    log.warning(
                        "%s %s budget=%s failed: %s", sample.sample_id, job.method.label(), job.budget, row["error"]
                    )

    rows = store.latest_rows()
    summary = summarize(rows)
    store.write_text("summary.csv", summary.to_csv(index=False))
    frame = rows_frame(rows)
    figures = accuracy_vs_budget(frame, settings.run_dir) + task.figures(frame, settings.run_dir)
    table = format_table(summary)
    print(f"\nkvbench results: {settings.run_dir}\n{table}\n")
    return {"run_dir": settings.run_dir, "summary": summary, "figures": figures, "rows_run": total}
