"""Samples stream through a run: the app builds a sample only when its turn comes and never holds the list."""

from __future__ import annotations

import gc
import weakref

from hydra import compose, initialize_config_dir

import kvbench.api as api
import kvbench.app as app
from kvbench.config import CONF_DIR
from kvbench.results import ResultsStore
from kvbench.tasks.niah import NIAH

OVERRIDES = [
    "model=tiny_random",
    "model.device=cpu",
    "progress=false",
    "task.lengths=[128]",
    "task.depths=[10,50,90]",
    "task.samples_per_cell=2",
    "task.max_new_tokens=2",
    "method=snapkv",
    "budgets=[32,64]",
]


def composed(tmp_path, *extra: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*OVERRIDES, f"results_dir={tmp_path}", *extra])


def test_run_never_builds_more_than_one_sample_ahead(tmp_path, monkeypatch):
    built: list = []  # weak references to every sample the task produced, in order
    original = NIAH.samples

    def counting(self, tokenizer, max_context):
        for sample in original(self, tokenizer, max_context):
            built.append(weakref.ref(sample))
            yield sample

    consumed = []
    real_run_sample = api.run_sample

    def spy(lm, sample, *args, **kwargs):
        consumed.append(sample.sample_id)
        # The sample being run is the newest one built: nothing was materialised ahead of it ...
        assert len(built) == len(consumed) and built[-1]() is sample
        gc.collect()
        # ... and the samples already run are not held by the app any more.
        assert all(ref() is None for ref in built[:-1])
        yield from real_run_sample(lm, sample, *args, **kwargs)

    monkeypatch.setattr(NIAH, "samples", counting)
    monkeypatch.setattr(api, "run_sample", spy)
    result = app.run(composed(tmp_path))
    assert len(consumed) == 6 and result["rows_run"] == 18  # snapkv x 2 budgets + full
    assert len(ResultsStore(result["run_dir"]).rows()) == 18

    # max_samples stops the stream: the samples after it are never built.
    built.clear()
    consumed.clear()
    app.run(composed(tmp_path / "limited", "max_samples=2"))
    assert len(built) == 2 and len(consumed) == 2

    # Resume: every row is done, so no sample is run again.
    consumed.clear()
    assert app.run(composed(tmp_path))["rows_run"] == 0 and consumed == []
