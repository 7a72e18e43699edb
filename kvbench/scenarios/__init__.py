"""Scenarios: samples whose rows come from their own loop over the cache instead of the single-prompt runner.

A multi-turn conversation appends turn after turn to one cache, a segment-reuse prompt is assembled from
separately encoded pieces, an edited context patches a cached prompt. Such a task marks its samples with
`sample.meta["scenario"] = <name>`; the API (`kvbench.api.iter_rows`) hands them to the runner registered here
under that name (`SCENARIO_MODULES` says which module registers it). Everything else (planning, row identity,
the results store, resume, summaries) is shared.

A scenario runner is called as `runner(lm, sample, jobs, options)` (the run's `RunOptions`, kernels resolved) and
yields `(job, row)` pairs like `kvbench.harness.runner.run_sample`, built from the runner's public pieces
(`shared_prefill`, `compress_copy`, `run_job`, `error_fields`). It may yield SEVERAL rows per job (one per turn, per
mode, ...): each such row carries a `part` (a short string, unique within the job), its key becomes `<job
key>/<part>`, and the job's LAST row carries `"job_complete": True`, which marks the job done for resume (a job
interrupted half-way is re-run whole; its rows already written are not duplicated, see
`ResultsStore.append(once=True)`). A row may set `subtask` to report its part separately in summaries (e.g.
`segments/reuse`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any

from kvbench.engine.models import LoadedModel
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job
from kvbench.harness.sample import Sample

SCENARIO_KEY = "scenario"
# Scenario name -> the module that registers its runner, imported on first use (a run of plain samples never
# loads a scenario).
SCENARIO_MODULES = {
    "conversation": "kvbench.scenarios.conversation",
    "segments": "kvbench.scenarios.segments",
    "edit": "kvbench.scenarios.edit",
}

ScenarioRunner = Callable[[LoadedModel, Sample, list[Job], RunOptions], Iterator[tuple[Job, dict]]]
SCENARIOS: dict[str, ScenarioRunner] = {}


def register_scenario(name: str) -> Callable[[ScenarioRunner], ScenarioRunner]:
    """Function decorator: run samples with `meta["scenario"] == name` with the decorated runner."""

    def decorator(runner: ScenarioRunner) -> ScenarioRunner:
        if name in SCENARIOS and SCENARIOS[name] is not runner:
            raise ValueError(f"scenario '{name}' is registered twice")
        SCENARIOS[name] = runner
        return runner

    return decorator


def scenario_of(sample: Sample) -> str | None:
    """The scenario `sample` belongs to, or None for a plain single-prompt sample."""
    return sample.meta.get(SCENARIO_KEY)


def scenario_runner(name: str) -> ScenarioRunner:
    if name not in SCENARIOS and name in SCENARIO_MODULES:
        importlib.import_module(SCENARIO_MODULES[name])
    if name not in SCENARIOS:
        valid = ", ".join(sorted(set(SCENARIO_MODULES) | set(SCENARIOS)))
        raise ValueError(f"unknown scenario '{name}'. Registered scenarios: {valid}.")
    return SCENARIOS[name]


def part_key(job_key: str, row: dict[str, Any]) -> str:
    """The key of a scenario row: the job's key, extended by the row's `part` when a job yields several rows."""
    part = row.get("part")
    return f"{job_key}/{part}" if part is not None else job_key
