"""Samples stream through a run: the app builds a sample only when its turn comes, never holds the list, and a
resumed run skips generated samples whose rows are all done without building them."""

from __future__ import annotations

import gc
import weakref

import pytest
from hydra import compose, initialize_config_dir

import kvbench.api as api
import kvbench.app as app
from kvbench.config import CONF_DIR
from kvbench.harness.results import ResultsStore
from kvbench.tasks.base import PlannedSample
from kvbench.tasks.niah import NIAH
from kvbench.tasks.synthetic_length import SyntheticLength

OVERRIDES = [
    "model=tiny_random",
    "model.device=cpu",
    "progress=false",
    "task.lengths=[128]",
    "task.depths=[10,50,90]",
    "task.samples_per_cell=2",
    "task.max_new_tokens=2",
    "method=snapkv",
]


def composed(tmp_path, *extra: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*OVERRIDES, f"results_dir={tmp_path}", *extra])


@pytest.fixture
def tracked(monkeypatch):
    """Weak references to every sample NIAH builds, and the ids of the samples the app runs, in order."""
    built: list = []
    consumed: list = []
    build, real_run_sample = NIAH._sample, api.run_sample

    def counting_build(self, *args):
        sample = build(self, *args)
        built.append(weakref.ref(sample))
        return sample

    def spy(lm, sample, *args, **kwargs):
        consumed.append(sample.sample_id)
        # The sample being run is the newest one built: nothing was materialised ahead of it ...
        assert len(built) == len(consumed) and built[-1]() is sample
        gc.collect()
        # ... and the samples already run are not held by the app any more.
        assert all(ref() is None for ref in built[:-1])
        yield from real_run_sample(lm, sample, *args, **kwargs)

    monkeypatch.setattr(NIAH, "_sample", counting_build)
    monkeypatch.setattr(api, "run_sample", spy)
    return built, consumed


def test_run_never_builds_more_than_one_sample_ahead(tmp_path, tracked):
    built, consumed = tracked
    result = app.run(composed(tmp_path, "budgets=[32,64]"))
    assert len(consumed) == 6 and result["rows_run"] == 18  # snapkv x 2 budgets + full
    assert len(ResultsStore(result["run_dir"]).rows()) == 18

    # max_samples stops the stream: the samples after it are never built.
    built.clear()
    consumed.clear()
    app.run(composed(tmp_path / "limited", "budgets=[32,64]", "max_samples=2"))
    assert len(built) == 2 and len(consumed) == 2


def test_resume_skips_done_generated_samples_without_building_them(tmp_path, tracked):
    built, consumed = tracked
    first = app.run(composed(tmp_path, "budgets=[32,64]"))
    assert len(built) == 6
    built.clear()
    consumed.clear()
    # Every row is done: no sample is generated, none runs.
    assert app.run(composed(tmp_path, "budgets=[32,64]"))["rows_run"] == 0
    assert built == [] and consumed == []
    # A new budget needs new rows: every sample is built again (and only its new rows run).
    again = app.run(composed(tmp_path, "budgets=[32,64,96]"))
    assert len(built) == 6 and again["rows_run"] == 6
    rows = ResultsStore(first["run_dir"]).rows()
    assert len(rows) == 24 and len({row["key"] for row in rows}) == 24


def test_generated_tasks_plan_the_samples_they_build(tiny_lm):
    for task in (
        NIAH(lengths=[128], depths=[0, 100], question_position=["before", "after"]),
        SyntheticLength(lengths=[64, 96], max_new_tokens=4),
    ):
        planned = list(task.planned_samples(tiny_lm.tokenizer, tiny_lm.max_context))
        assert all(isinstance(item, PlannedSample) for item in planned)
        built = [item.build() for item in planned]
        assert [s.sample_id for s in built] == [item.sample_id for item in planned]
        assert [s.fingerprint() for s in built] == [s.fingerprint() for s in task.samples(tiny_lm.tokenizer, 4096)]
        assert len({item.recipe for item in planned}) == len(planned)  # a recipe names one sample
