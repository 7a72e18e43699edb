"""One kvbench run: model x method x task x budgets -> rows in results/<run>/, a summary table and figures."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from kvbench import api
from kvbench import config as run_config
from kvbench.engine.models import LoadedModel, load_model
from kvbench.harness.batched import check_batch
from kvbench.harness.chunked import check_chunked_methods
from kvbench.harness.options import RunOptions
from kvbench.harness.results import ResultsStore, manifest
from kvbench.harness.runner import Job
from kvbench.harness.serving import check_memory, check_serving_batches, run_serving, weight_bytes
from kvbench.methods import build_method
from kvbench.methods.base import Method
from kvbench.report import format_table, rows_frame, summarize
from kvbench.report.figures import accuracy_vs_budget
from kvbench.report.serving import serving_report
from kvbench.report.task_figures import task_figures
from kvbench.scenarios import conversation, edit, scenario_of, segments
from kvbench.scenarios.dialogue import Turn, dialogue_pieces
from kvbench.scenarios.modes import check_compress_setting
from kvbench.tasks import Sample, build_task
from kvbench.tasks.base import PlannedSample, check_prefill_chunk

log = logging.getLogger("kvbench")
SUMMARY_LOCK = ".summary.lock"
# Scenarios whose caches are assembled from pieces or patched: compressed after the question only.
ASSEMBLED_SCENARIOS = (segments.SCENARIO, edit.SCENARIO)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def summary_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on the run's summary (`.summary.lock`, an flock: released when its holder dies)."""
    fd = os.open(run_dir / SUMMARY_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def built_fingerprints(rows: list[dict]) -> dict[str, set[str]]:
    """recipe -> the fingerprints its samples were built into, from rows written by earlier runs."""
    built: dict[str, set[str]] = {}
    for row in rows:
        if row.get("sample_recipe") and row.get("sample_fingerprint"):
            built.setdefault(row["sample_recipe"], set()).add(row["sample_fingerprint"])
    return built


@dataclass
class PreparedRun:
    """A run whose inputs are all checked (config, model, method x model, the first sample, scenario settings) and
    whose model is loaded; nothing of it is written yet."""

    settings: run_config.RunSettings
    method: Method
    task: Any
    store: ResultsStore
    config: dict[str, Any]
    lm: LoadedModel
    methods: list[Method]
    options: RunOptions
    samples: Iterator[Sample | PlannedSample]


def check_scenario(lm: LoadedModel, sample: Sample, jobs: list[Job], options: RunOptions) -> None:
    """The refusals a scenario would otherwise make per row, after model work (`kvbench.scenarios`): the
    conversation's budget / method / compress_older_than checks and its context fit, the compress mode of
    assembled (segments) and patched (edit) caches. Checked on the run's first sample."""
    scenario = scenario_of(sample)
    if scenario == conversation.SCENARIO:
        older = sample.meta.get("compress_older_than")
        for job in jobs:
            conversation.check_job(job, older)
        turns = [Turn.from_dict(turn) for turn in sample.meta["turns"]]
        pieces = dialogue_pieces(lm.tokenizer, turns, sample.use_chat_template)
        conversation.check_dialogue_fits(sample.sample_id, pieces, turns, lm.max_context)
    elif scenario in ASSEMBLED_SCENARIOS:
        check_compress_setting(options, jobs, scenario)


def prepare(cfg: Any) -> PreparedRun:
    """Every input check of a run, before anything is written (a refused run leaves its run name free): values,
    the results directory and its config, the model and the method's model checks, the task's first sample
    (built: its prompt-template and length checks) and the scenario settings every row would be refused for."""
    settings = run_config.validate(cfg)
    run_config.check_model_fields(cfg.get("model"))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    seed_everything(settings.options.seed)
    method = build_method(cfg.method)
    check_chunked_methods(settings.options.prefill_chunk, [method])
    task = build_task(cfg.task)
    check_prefill_chunk(task.scenario, settings.options.prefill_chunk)
    check_batch(api.with_full([method], settings.include_full), settings.options, scenario=task.scenario)
    if settings.serving is not None:
        check_serving_batches(
            api.with_full([method], settings.include_full), settings.options, settings.serving, None, task.scenario
        )
    store = ResultsStore(settings.run_dir)
    store.check_writable()
    config = OmegaConf.to_container(cfg, resolve=True)
    store.check_config(config)
    lm = load_model(cfg.model)
    if settings.serving is not None:  # a memory budget below the weights: refused before any forward
        check_memory(settings.serving, weight_bytes(lm.model))
    api.check_model(lm, [method], settings.options.layers)
    check_batch([method], settings.options, lm)  # the architecture: known once loaded, before any forward
    if settings.serving is not None:
        check_serving_batches([method], settings.options, settings.serving, lm)
    if hasattr(task, "check_model"):  # model-dependent task checks (scenarios that re-rotate cached keys)
        task.check_model(lm)
    methods = api.with_full([method], settings.include_full)
    options = settings.options.resolved(lm.device)
    for each in methods:
        if hasattr(each, "check_ready"):  # artefacts a method reads (prefixkv's calibration)
            each.check_ready(lm, options.cache_dir)

    # Samples stream: each is built when its turn comes and dropped after its rows (RULER 128K x 500 x 13 never
    # holds its prompts at once), so the number of rows to run is only known at the end. The first is built
    # now: a task that checks its input (task=jsonl, lengths, prompt templates) fails here, in one line.
    samples = iter(task.planned_samples(lm.tokenizer, lm.max_context))
    first = next(samples, None)
    if first is None:
        raise run_config.ConfigError(f"task {task.name} yields no samples with this config; nothing to run")
    done = store.done_keys()
    built = built_fingerprints(store.rows()) if done else {}
    recipe = first.recipe if isinstance(first, PlannedSample) else None
    # A generated sample whose rows are all done was checked by the run that wrote them: a resume builds nothing.
    if recipe is None or finished_fingerprint(recipe, built, done, lm, methods, options) is None:
        sample = first.build() if isinstance(first, PlannedSample) else first
        check_scenario(lm, sample, api.plan(lm, sample, methods, options), options)
        if isinstance(first, PlannedSample):
            first = dataclasses.replace(first, build=lambda: sample)
    samples = first_then(first, samples)
    if settings.max_samples is not None:
        samples = itertools.islice(samples, settings.max_samples)
    return PreparedRun(settings, method, task, store, config, lm, methods, options, samples)


def finished_fingerprint(
    recipe: str | None, built: dict[str, set[str]], done: set[str], lm: LoadedModel, methods: list, options: RunOptions
) -> tuple[str, int] | None:
    """For a generated sample's `recipe`: a fingerprint it was built into before whose rows are all `done`, and
    how many rows that is (None: the sample must be built and run)."""
    for fingerprint in sorted(built.get(recipe, ())):
        jobs = api.plan_fingerprint(lm, fingerprint, methods, options)
        if all(job.key in done for job in jobs):
            return fingerprint, len(jobs)
    return None


def first_then(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    """`first`, then `rest`, holding no reference to `first` once it is handed out (itertools.chain keeps its
    arguments until the end: the first sample would stay in memory for the whole run)."""
    holder = [first]
    del first
    yield holder.pop()
    yield from rest


def serving_samples(prepared: PreparedRun) -> list[Sample]:
    """The task's samples again (the row loop consumed the stream); the serving phase picks the first of each
    context length."""
    planned = prepared.task.planned_samples(prepared.lm.tokenizer, prepared.lm.max_context)
    if prepared.settings.max_samples is not None:
        planned = itertools.islice(planned, prepared.settings.max_samples)
    return [item.build() if isinstance(item, PlannedSample) else item for item in planned]


def serving_phase(prepared: PreparedRun) -> tuple[list[Path], str]:
    """`experiment=serving`: the serving rows (`kvbench.harness.serving`) appended to the run's store, then the
    serving tables and figures from every serving row of the run (the jobs of a sweep share it)."""
    settings, store, lm = prepared.settings, prepared.store, prepared.lm
    rows = run_serving(
        lm,
        serving_samples(prepared),
        lambda sample: api.plan(lm, sample, prepared.methods, prepared.options),
        prepared.options,
        settings.serving,
        store.done_keys(),
    )
    for row in tqdm(rows, desc="serving", disable=not settings.progress, unit="row"):
        # the resume checks and the run's summary read these fields; the fingerprint names no sample
        row.update(status="ok", sample_fingerprint=f"serving:{row['context']}", compress=prepared.options.compress)
        store.append(row, once=True)
    with summary_lock(settings.run_dir):
        return serving_report(store.latest_rows(), settings.run_dir)


def run(cfg: Any) -> dict[str, Any]:
    """Run the composed config; returns paths and the summary (also printed)."""
    return execute(prepare(cfg))


def execute(prepared: PreparedRun) -> dict[str, Any]:
    """Run a prepared run: its config and manifest are written, its rows appended, its summary written."""
    settings, method, task, store, config = (
        prepared.settings, prepared.method, prepared.task, prepared.store, prepared.config,
    )  # fmt: skip
    lm, methods, options, samples = prepared.lm, prepared.methods, prepared.options, prepared.samples
    store.save_config(config)
    store.write_text(
        "manifest.json",
        json.dumps(
            manifest(
                lm,
                options.seed,
                {"kernels": {"requested": settings.options.kernels, "resolved": options.kernels}},
            ),
            indent=2,
        ),
    )
    done = store.done_keys()
    built = built_fingerprints(store.rows()) if done else {}
    fingerprints: set[str] = set()  # this invocation's samples: the summary covers their rows only
    claimed_elsewhere: list[str] = []  # keys another process sharing the run had claimed
    if done:
        log.info("resuming: %d rows already in %s; their jobs are skipped", len(done), store.samples_path)
    skipped = 0
    recipes: dict[str, Any] = {}  # the recipe of each sample being run (by fingerprint), recorded in its rows
    pending: dict[str, tuple[contextlib.ExitStack, set[str]]] = {}  # batch_size > 1: claims and rows not appended

    def work() -> Iterator[tuple[Sample, list[Job]]]:
        nonlocal skipped, claimed_elsewhere
        for item in samples:
            planned_recipe = item.recipe if isinstance(item, PlannedSample) else None
            # A generated sample whose recipe was built before into a fingerprint whose rows are all done is
            # skipped without generating its prompt.
            finished = finished_fingerprint(planned_recipe, built, done, lm, methods, options)
            if finished is not None:
                skipped += finished[1]
                fingerprints.add(finished[0])
                continue
            sample = item.build() if isinstance(item, PlannedSample) else item
            fingerprints.add(sample.fingerprint())
            planned = api.plan(lm, sample, methods, options)
            jobs = [job for job in planned if job.key not in done]
            skipped += len(planned) - len(jobs)
            if not jobs:
                continue
            # Claim the rows: those another process is computing (or finished meanwhile) are left to it; the
            # claim is held until this sample's rows are appended: the generator resumes after them, or, when
            # batch_size > 1 pulls the next samples first, the row loop releases it (`pending`).
            claim = contextlib.ExitStack()
            mine = claim.enter_context(store.claim([job.key for job in jobs]))
            claimed_elsewhere += [job.key for job in jobs if job.key not in set(mine)]
            if not mine:
                claim.close()
                continue
            recipes[sample.fingerprint()] = planned_recipe
            if options.batch_size > 1:
                pending[sample.fingerprint()] = (claim, set(mine))
                yield sample, [job for job in jobs if job.key in set(mine)]
            else:
                with claim:
                    yield sample, [job for job in jobs if job.key in set(mine)]

    total = 0
    with (
        tqdm(desc=f"{task.name} x {method.label()}", disable=not settings.progress, unit="row") as bar,
        contextlib.ExitStack() as on_exit,
    ):
        on_exit.callback(lambda: [claim.close() for claim, _ in pending.values()])  # a failed run frees its claims
        for row in api.iter_rows(lm, work(), options):
            # once: a concurrent job of the same sweep may have written this row (its full-cache reference) already
            store.append({**row, "sample_recipe": recipes.get(row["sample_fingerprint"])}, once=True)
            total += 1
            bar.update(1)
            claim, keys = pending.get(row["sample_fingerprint"], (None, set()))
            keys.discard(row["key"])
            if claim is not None and not keys:  # every row of the sample is appended: its claim can go
                pending.pop(row["sample_fingerprint"])[0].close()
    if skipped:
        log.info("resumed: %d rows were already done, %d ran", skipped, total)
    unfinished = sorted(set(claimed_elsewhere) - store.done_keys())
    if claimed_elsewhere:
        done_elsewhere = len(set(claimed_elsewhere)) - len(unfinished)
        log.info("%d rows were computed by another process sharing %s", done_elsewhere, settings.run_dir)

    # The summary and figures cover this invocation's samples only: rows of other sample sets in the same run
    # (e.g. an earlier run with more samples) are left out, so n matches the config. Jobs of a sweep share the
    # run: each reads the rows and writes the summary under one lock, so the last to finish writes it from every
    # row appended before it (rows still computed by another job come with that job's summary, written later).
    with summary_lock(settings.run_dir):
        rows = [row for row in store.latest_rows() if row.get("sample_fingerprint") in fingerprints]
        summary = summarize(rows, settings.x_axis)
        store.write_text("summary.csv", summary.to_csv(index=False))
        frame = rows_frame(rows)
        figures = accuracy_vs_budget(frame, settings.run_dir, settings.x_axis) + task_figures(
            task.name, frame, settings.run_dir
        )
    table = format_table(summary)
    if settings.serving is not None:
        serving_files, serving_text = serving_phase(prepared)
        figures += serving_files
        table += f"\n\nserving ({settings.run_dir / 'serving.md'}):\n{serving_text}"
    if unfinished:  # the other process is still computing them (or was stopped): say the summary lacks them
        table += (
            f"\nnote: {len(unfinished)} rows claimed by another process sharing this run are not stored yet (still "
            "running, or stopped); this summary leaves them out: rerun the same command once it ends"
        )
        log.warning("%d rows claimed by another process are not in %s yet", len(unfinished), store.samples_path)
    print(f"\nkvbench results: {settings.run_dir}\n{table}\n")
    own = [row for row in rows if row.get("method_label") == method.label()]
    failed = own[0].get("error") if own and all(row.get("status") != "ok" for row in own) else None
    return {
        "run_dir": settings.run_dir,
        "summary": summary,
        "figures": figures,
        "rows_run": total,
        "all_failed": failed,  # the first error when every row of the method failed, else None
    }
