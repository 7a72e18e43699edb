"""kvbench's public Python API, the same path `python -m kvbench` takes.

    import kvbench.api as kv

    lm = kv.load_model("tiny_random", device="cpu")          # a config name (conf/model/) or a plain dict
    methods = [kv.build_method("snapkv"), kv.build_method("window")]
    samples = kv.load_task("niah", lengths=[256], depths=[50]).samples(lm.tokenizer, lm.max_context)
    rows = kv.evaluate(lm, samples, methods, budgets=[32, 64], include_full=True)
    kv.to_frame(rows)                                          # a pandas DataFrame, one row per sample x job

Each sample is prefilled once and every (method, budget) job runs on its own copy of that cache
(`kvbench.harness.runner.run_sample`; scenarios run their own loop, `kvbench.scenarios`). `iter_rows` yields
rows one at a time (the CLI appends each to its results store as it comes); `evaluate` collects them into a
list of dicts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from kvbench.engine.architecture import (
    HYBRID,
    compressible_layers,
    describe,
    layer_shape_configs,
    model_type,
    require_full_attention,
    rope_difference,
)
from kvbench.engine.models import LoadedModel
from kvbench.engine.models import load_model as _load_model
from kvbench.harness.batched import check_batch, run_batch
from kvbench.harness.budget import parse_budget
from kvbench.harness.chunked import check_chunked_methods
from kvbench.harness.options import RunOptions
from kvbench.harness.results import row_key
from kvbench.harness.runner import Job, run_sample
from kvbench.harness.sample import Sample
from kvbench.methods import build_method as _build_method
from kvbench.methods.base import Method
from kvbench.methods.full import Full
from kvbench.registry import UnknownNameError, unknown_name_message
from kvbench.report import rows_frame
from kvbench.scenarios import part_key, scenario_of, scenario_runner
from kvbench.tasks import Task, build_task
from kvbench.tasks.base import check_prefill_chunk

__all__ = [
    "LoadedModel",
    "Method",
    "Sample",
    "RunOptions",
    "load_model",
    "build_method",
    "load_task",
    "plan",
    "iter_rows",
    "evaluate",
    "to_frame",
]

log = logging.getLogger("kvbench")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# Short names accepted wherever a model config name is (the lm-eval adapter's `model=smollm2`).
MODEL_ALIASES = {"smollm2": "smollm2_135m"}


def _group_config(group: str, name: str) -> DictConfig:
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise UnknownNameError(unknown_name_message(group, name, valid))
    return OmegaConf.load(path)


def model_config(model: str | Mapping[str, Any], **overrides: Any) -> DictConfig:
    """The `model` config group entry for a config name, an alias, a local path / hub id (kind hf) or a dict.

    A dict is laid over the config its `kind` names when one exists (so `{"kind": "tiny_random",
    "num_layers": 2}` inherits the other fields), otherwise used as is.
    """
    if isinstance(model, str):
        name = MODEL_ALIASES.get(model, model)
        if (CONF_DIR / "model" / f"{name}.yaml").exists():
            cfg = _group_config("model", name)
        elif os.path.exists(model) or "/" in model:  # a local directory / config.json or a hub id
            cfg = OmegaConf.merge(_group_config("model", "hf"), {"name_or_path": model, "name": model})
        else:
            _group_config("model", name)  # raises the one-line unknown-model error
    else:
        given = OmegaConf.create(dict(model))
        kind = given.get("kind")
        base = CONF_DIR / "model" / f"{kind}.yaml"
        cfg = OmegaConf.merge(OmegaConf.load(base), given) if kind and base.exists() else given
    cfg = OmegaConf.merge(cfg, overrides)
    return _resolved(cfg, "model")


def _resolved(cfg: DictConfig, group: str) -> DictConfig:
    """Resolve `${oc.select:model.x,...}`-style interpolations that expect the config under its group key."""
    wrapped = OmegaConf.create({group: cfg})
    OmegaConf.resolve(wrapped)
    return wrapped[group]


def load_model(model: str | Mapping[str, Any] | LoadedModel, **overrides: Any) -> LoadedModel:
    """Load (or reuse, per process) a model: see `model_config` for what `model` may be."""
    if isinstance(model, LoadedModel):
        return model
    return _load_model(model if isinstance(model, DictConfig) else model_config(model, **overrides))


def build_method(method: str | Mapping[str, Any] | Method, **params: Any) -> Method:
    """A method from its name (defaults from conf/method/<name>.yaml) or a dict with `name`, plus overrides."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        cfg = _group_config("method", method)
    else:
        given = OmegaConf.create(dict(method))
        path = CONF_DIR / "method" / f"{given.get('name')}.yaml"
        cfg = OmegaConf.merge(OmegaConf.load(path), given) if path.exists() else given
    return _build_method(OmegaConf.merge(cfg, params))


def load_task(task: str | Mapping[str, Any] | Task, **fields: Any) -> Task:
    """A task from its config name (conf/task/<name>.yaml) or a dict with `name`, plus field overrides."""
    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        cfg = _group_config("task", task)
    else:
        given = OmegaConf.create(dict(task))
        path = CONF_DIR / "task" / f"{given.get('name')}.yaml"
        cfg = OmegaConf.merge(OmegaConf.load(path), given) if path.exists() else given
    return build_task(OmegaConf.merge(cfg, fields))


def plan(lm: LoadedModel, sample: Sample, methods: list[Method], options: RunOptions) -> list[Job]:
    """The (method, budget) jobs of one sample, each with the key of its results row."""
    return plan_fingerprint(lm, sample.fingerprint(), methods, options)


def plan_fingerprint(lm: LoadedModel, fingerprint: str, methods: list[Method], options: RunOptions) -> list[Job]:
    """`plan` for the sample with this `Sample.fingerprint()` (a resumed run plans samples it has not built)."""
    jobs = []
    for method in methods:
        params = method.params()
        if options.prefill_chunk is not None:  # a chunked prefill is another row (one-shot keys unchanged)
            params = {**params, "prefill_chunk": options.prefill_chunk}
        if options.layers != "global":  # another layer policy is another row (default keys unchanged)
            params = {**params, "layers": options.layers}
        for budget in options.budgets if method.compresses and method.takes_budget else (None,):
            key = row_key(lm.identity, method.name, params, budget, options.compress, fingerprint, options.seed)
            jobs.append(Job(method=method, budget=budget, key=key))
    return jobs


def row_identity(job: Job, sample: Sample, lm: LoadedModel, options: RunOptions) -> dict[str, Any]:
    """The fields that say what a row is (the runner adds what was measured)."""
    return {
        "key": job.key,
        "sample_fingerprint": sample.fingerprint(),  # with the CLI's sample_recipe: resume without building
        "run": options.run_name,
        "task": options.task_name,
        "subtask": sample.meta.get("subtask", options.task_name),
        "sample_id": sample.sample_id,
        "method": job.method.name,
        "method_label": job.method.label(),
        "method_params": job.method.params(),
        "budget": job.budget,
        "compress": options.compress,
        "question_position": sample.question_position,
        "seed": options.seed,
        "model": lm.name,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "metric": sample.metric,
        "answers": sample.answers,
        "max_new_tokens": sample.max_new_tokens,
        "meta": sample.meta,
    }


def check_model(lm: LoadedModel, methods: Iterable[Method], layers: str = "global") -> None:
    """Model-dependent parameter checks (e.g. quantisation groups must divide the head dim), before any forward.
    `layers`: the layer policy (`RunOptions.layers`) the methods will be handed layers by."""
    difference = None
    for method in methods:
        bounded = isinstance(lm, LoadedModel) and any(spec.bounded for spec in lm.layer_specs)
        if layers == "all" and bounded and method.compresses and not method.handles_bounded_layers():
            raise ValueError(
                f"method {method.name} assumes one slot per prompt token in every layer it compresses, but "
                f"architecture '{model_type(lm.config)}' has sliding / chunked layers and layers=all hands them to "
                "it: use layers=global (those layers keep their window)"
            )
        # MLA modules cache a latent and expand it to per-head K/V after the cache: a method that reads, scores or
        # re-encodes cached K/V would work on the latent, not on the keys the queries meet.
        latent = isinstance(lm, LoadedModel) and any(spec.latent for spec in lm.layer_specs)
        if latent and method.compresses and not method.position_only:
            spec = next(spec for spec in lm.layer_specs if spec.latent)
            raise ValueError(
                f"method {method.name} reads or re-encodes cached K/V, but architecture '{model_type(lm.config)}' "
                f"caches an MLA latent ({spec.head_dim} latent + {spec.value_head_dim} RoPE-key dims per token) that "
                "its attention expands to per-head K/V after the cache; only position-based methods (streamingllm, "
                "window, random) run on it"
            )
        if hasattr(method, "check_model"):
            # A loaded model is checked per attention layer shape (per-layer head dims, MHA, MLA's K/V widths).
            configs = layer_shape_configs(lm.config, lm.layer_specs) if isinstance(lm, LoadedModel) else [lm.config]
            for config in configs:
                method.check_model(config)
        # A layer type of the method's own (quantised storage, checkpoints) replaces the cache layer, and with it the
        # SSM state a hybrid layer (Falcon-H1) holds beside its K/V.
        hybrid = isinstance(lm, LoadedModel) and any(spec.kind == HYBRID for spec in lm.layer_specs)
        if hybrid and method.compresses and not method.plain_kv_layers:
            raise ValueError(
                f"method {method.name} stores the cache in its own layer type, which cannot keep the SSM state "
                f"that architecture '{model_type(lm.config)}' holds beside the K/V of its hybrid layers"
            )
        # The per-layer RoPE check reads the loaded model's layer specs (a bare config has none to read).
        if isinstance(lm, LoadedModel) and method.rope_dependent():
            difference = difference or rope_difference(lm.model, lm.layer_specs)
            if difference:
                raise ValueError(
                    f"method {method.name} re-rotates keys with one RoPE, but architecture "
                    f"'{model_type(lm.config)}' has {difference}"
                )


def with_full(methods: list[Method], include_full: bool) -> list[Method]:
    """The methods, plus a full-cache reference (sharing each sample's prefill) unless one is there already."""
    if include_full and any(m.compresses for m in methods) and not any(isinstance(m, Full) for m in methods):
        return [*methods, Full()]
    return list(methods)


def iter_rows(
    lm: LoadedModel,
    work: Iterable[tuple[Sample, list[Job]]],
    options: RunOptions,
) -> Iterator[dict[str, Any]]:
    """Run planned (sample, jobs) pairs lazily; yields one complete row (identity + measurements) per job.

    A plain sample goes through the single-prompt runner; a multi-turn / reuse / edit sample through the runner
    its scenario registers (`kvbench.scenarios`). The kernel mode is resolved here, once per run."""
    options = options.resolved(lm.device)
    truncated: set[str] = set()  # samples middle-truncated to fit the context: said once, then counted
    warned: set[tuple[str, str]] = set()  # (method, parameter) whose reserved slots exceeded a budget: said once
    said_no_layers = False  # the layer policy leaves no layer to compress: said once

    def with_identity(sample: Sample, job: Job, row: dict[str, Any]) -> dict[str, Any]:
        # The warnings said once per run, then the row with the fields that say what it is.
        if row.get("truncated_tokens") and sample.sample_id not in truncated:
            if not truncated:
                log.warning(
                    "sample %s is longer than the model's context (%d tokens): %d context tokens were cut from "
                    "its middle (said once per run; rows record truncated_tokens)",
                    sample.sample_id, lm.max_context, row["truncated_tokens"],
                )  # fmt: skip
            truncated.add(sample.sample_id)
        warn_reserved_above_budget(job.method, row.get("budget_entries"), warned)
        if row["status"] != "ok":
            label = job.method.label()
            log.warning("%s %s budget=%s failed: %s", sample.sample_id, label, job.budget, row["error"])
        identity = row_identity(job, sample, lm, options)
        if row.get("part") is not None:  # one of several rows of a scenario job (`kvbench.scenarios`)
            identity |= {"key": part_key(job.key, row), "job_key": job.key}
        return {**identity, **row}

    group: list[tuple[Sample, list[Job]]] = []  # batch_size > 1: samples whose caches decode together
    for sample, jobs in work:
        scenario = scenario_of(sample)
        if scenario is not None:
            require_full_attention(lm.layer_specs, model_type(lm.config), f"the {scenario} scenario")
        check_prefill_chunk(scenario, options.prefill_chunk)
        check_batch([job.method for job in jobs], options, lm, scenario)
        runner = run_sample if scenario is None else scenario_runner(scenario)
        compresses = any(job.method.compresses for job in jobs)
        if compresses and not (said_no_layers or compressible_layers(lm.layer_specs, options.layers)):
            said_no_layers = True
            log.warning(
                "layers=%s leaves no layer of architecture '%s' (%s) to compress: methods run on the uncompressed "
                "cache (rows: compressed_layers=none); layers=all compresses sliding / chunked layers too",
                options.layers, model_type(lm.config), describe(lm.layer_specs),
            )  # fmt: skip
        if options.batch_size > 1:
            group.append((sample, jobs))
            if len(group) == options.batch_size:
                for each, job, row in run_batch(lm, group, options):
                    yield with_identity(each, job, row)
                group = []
            continue
        for job, row in runner(lm, sample, jobs, options):
            yield with_identity(sample, job, row)
    if group:
        for each, job, row in run_batch(lm, group, options):
            yield with_identity(each, job, row)
    if len(truncated) > 1:
        log.warning(
            "%d samples were middle-truncated to fit the model's context of %d tokens", len(truncated), lm.max_context
        )


# Method parameters that reserve slots inside the budget (the observation window, the attention sinks).
RESERVED_SLOTS = ("window", "n_sink")


def warn_reserved_above_budget(method: Method, entries: int | None, warned: set[tuple[str, str]]) -> None:
    """Say once per run and method when a window / n_sink larger than the budget's entries leaves no room for
    what the method selects (the row still runs: the method clips them to the budget)."""
    if not entries:
        return
    for name in RESERVED_SLOTS:
        value = method.params().get(name)
        if isinstance(value, int) and value > entries and (method.label(), name) not in warned:
            warned.add((method.label(), name))
            log.warning(
                "%s: %s=%d exceeds the budget of %d entries per KV head (%s counts inside the budget): at that "
                "budget it keeps only part of the %s",
                method.label(), name, value, entries, name, "window" if name == "window" else "sinks",
            )  # fmt: skip


def evaluate(
    model: str | Mapping[str, Any] | LoadedModel,
    samples: Iterable[Sample],
    methods: Iterable[Method | str] | Method | str,
    budgets: Iterable[int | float | None] | int | float | None = None,
    *,
    include_full: bool = False,
    compress: str = "prompt",
    seed: int = 0,
    **options: Any,
) -> list[dict[str, Any]]:
    """Run every sample through one prefill and every method x budget; returns the rows as dicts.

    `budgets`: KV entries per KV head per layer (int), a kept fraction (float in (0, 1)) or None (no
    compression); several values sweep on copies of the same prefill. Other keyword arguments are
    `RunOptions` fields (kernels, prefill_chunk, batch_size, fail_fast, run_name, task_name, cache_dir).
    """
    lm = load_model(model)
    if isinstance(methods, (str, Method)):
        methods = [methods]
    built = with_full([build_method(m) for m in methods], include_full)
    values = list(budgets) if isinstance(budgets, (list, tuple)) else [budgets]
    if not values:
        raise ValueError("budgets must list at least one budget (None: no compression)")
    parsed = tuple(dict.fromkeys(parse_budget(b) for b in values))
    run_options = RunOptions(budgets=parsed, compress=compress, seed=seed, **options)
    check_model(lm, built, run_options.layers)
    check_chunked_methods(run_options.prefill_chunk, built)
    check_batch(built, run_options, lm)
    if run_options.batch_size > 1:  # refuse a scenario sample before any sample runs
        samples = list(samples)
        for scenario in {scenario_of(sample) for sample in samples} - {None}:
            check_batch(built, run_options, lm, scenario)
    work = ((sample, plan(lm, sample, built, run_options)) for sample in samples)
    return list(iter_rows(lm, work, run_options))


def to_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame (one row per sample x method x budget, the sample's meta as `meta.<key>`)."""
    return rows_frame(list(rows))
