"""The scenario hook: samples marked with meta["scenario"] run their own loop and may yield several rows per job."""

from __future__ import annotations

import dataclasses

import pytest

from kvbench import api
from kvbench.harness.results import ResultsStore
from kvbench.scenarios import register_scenario, scenario_runner
from tests.helpers import needle_sample

CALLS: list[tuple[str, str]] = []


@register_scenario("two_parts_for_tests")
def two_parts(lm, sample, jobs, settings):
    """Two rows per job, the second one completing it (what a two-turn conversation yields)."""
    for job in jobs:
        CALLS.append((sample.sample_id, job.key))
        for index, part in enumerate(("turn00", "turn01")):
            last = index == 1
            yield (
                job,
                {"status": "ok", "part": part, "score": float(index), "compress": settings.compress}
                | ({"job_complete": True} if last else {}),
            )


def scenario_sample(scenario: str = "two_parts_for_tests"):
    sample = needle_sample()
    return dataclasses.replace(sample, meta={**sample.meta, "scenario": scenario})


def test_a_scenario_job_yields_one_row_per_part_keyed_by_job_and_part(tiny_lm):
    options = api.RunOptions(budgets=(None, 8), compress="context")
    sample = scenario_sample()
    jobs = api.plan(tiny_lm, sample, api.with_full([api.build_method("snapkv")], True), options)
    rows = list(api.iter_rows(tiny_lm, [(sample, jobs)], options))
    assert [row["key"] for row in rows] == [f"{job.key}/{part}" for job in jobs for part in ("turn00", "turn01")]
    assert [row["job_key"] for row in rows] == [job.key for job in jobs for _ in range(2)]
    assert all(row["compress"] == "context" for row in rows)  # the runner got the run's settings
    assert rows[1]["method"] == jobs[0].method.name and rows[1]["sample_id"] == sample.sample_id


def test_a_scenario_job_is_done_only_after_its_complete_row(tmp_path, tiny_lm):
    options = api.RunOptions(budgets=(None,))
    sample = scenario_sample()
    (job,) = api.plan(tiny_lm, sample, [api.build_method("full")], options)
    first, last = api.iter_rows(tiny_lm, [(sample, [job])], options)
    store = ResultsStore(tmp_path / "run")
    store.append(first)
    assert job.key not in store.done_keys()  # interrupted after turn 0: the job is run again on resume
    assert first["key"] in store.done_keys()
    store.append(last)
    assert job.key in store.done_keys()


def test_an_unknown_scenario_is_one_line_naming_the_registered_ones():
    with pytest.raises(ValueError, match="unknown scenario 'nope'.*two_parts_for_tests"):
        scenario_runner("nope")
