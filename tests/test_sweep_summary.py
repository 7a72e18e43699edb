"""Jobs of a parallel sweep share one run directory: the summary.csv left after they all finish covers every row
of the run, whichever job finishes last.

The race, made deterministic with two threads running two jobs of one sweep (snapkv and window): job A reads the
rows for its summary, job B appends its rows and writes its summary, then A writes its own. Without the summary
lock A's summary, from rows read before B's landed, replaces B's complete one."""

from __future__ import annotations

import threading
import time

import pandas as pd

from kvbench import app
from kvbench.harness.results import ResultsStore
from tests.helpers import composed

B_GRACE_S = 5.0  # how long A waits for B's summary after B's rows landed (B cannot write while A holds the lock)


def test_the_last_summary_of_a_sweep_covers_every_row(tmp_path, monkeypatch):
    summarize = app.summarize
    a_read = threading.Event()
    b_wrote = threading.Event()
    run_dir = tmp_path / "niah_tiny_random"

    def window_rows_landed() -> bool:
        return any(row["method"] == "window" for row in ResultsStore(run_dir).rows())

    def racing_summarize(rows, *args, **kwargs):
        if threading.current_thread().name == "A":
            a_read.set()
            deadline = time.monotonic() + 120
            while not window_rows_landed() and time.monotonic() < deadline:
                time.sleep(0.05)
            b_wrote.wait(B_GRACE_S)
        return summarize(rows, *args, **kwargs)

    monkeypatch.setattr(app, "summarize", racing_summarize)
    errors: list[BaseException] = []

    def job(config) -> None:
        try:
            app.run(config)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    config_a = composed(tmp_path, "method=snapkv")
    config_b = composed(tmp_path, "method=window")
    a = threading.Thread(target=job, args=(config_a,), name="A")
    a.start()
    assert a_read.wait(120)
    b = threading.Thread(target=job, args=(config_b,), name="B")
    b.start()
    b.join(180)
    b_wrote.set()
    a.join(180)
    assert not errors, errors

    rows = ResultsStore(run_dir).latest_rows()
    assert sorted(row["method"] for row in rows) == ["full", "snapkv", "window"]
    summary = pd.read_csv(run_dir / "summary.csv")
    assert sorted(summary["method"]) == ["full", "snapkv", "window"]
    assert list(summary["n"]) == [1, 1, 1]
