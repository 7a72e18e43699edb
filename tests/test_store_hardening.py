"""The results store under hostile conditions: a short write (a full disk) neither loses nor cuts a computed row and
stops the run in one line, rows that kvbench did not write (a list as key, a row cut down to its key and status)
are refused naming file and line, claims left by killed processes are removed, and a run sharing its directory
with a process still computing says its summary lacks those rows."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest

from kvbench.app import run
from kvbench.harness import results
from kvbench.harness.jsonl import read_jsonl
from kvbench.harness.results import CLAIMS_DIR, MalformedRowError, ResultsError, ResultsStore
from tests.helpers import ROOT, TINY, composed, store_row


def test_a_short_write_writes_the_rest_of_the_row(tmp_path, monkeypatch):
    """A write that stores only part of the row (what a nearly full disk does) is completed, not left cut."""
    store = ResultsStore(tmp_path)
    real_write = os.write
    calls = []

    def short_write(fd, data):
        calls.append(len(data))
        return real_write(fd, bytes(data[: max(1, len(data) // 3)]))  # a third of what is asked, at least 1 byte

    monkeypatch.setattr(os, "write", short_write)
    rows = [store_row(f"k{i}", extra={"prediction": "x" * 500}) for i in range(3)]
    for row in rows:
        assert store.append(row)
    monkeypatch.undo()
    assert read_jsonl(store.samples_path) == rows
    assert len(calls) > 3  # the writes really were short and were resumed
    assert ResultsStore(tmp_path).done_keys() == {"k0", "k1", "k2"}


def test_a_write_that_fails_midway_stops_in_one_line_and_keeps_every_earlier_row(tmp_path, monkeypatch):
    """Disk full after part of a row: the partial bytes are removed at once (the file ends at the last whole row)
    and the error names the file and the cause; the next append, with space again, starts on a clean line."""
    store = ResultsStore(tmp_path)
    first = store_row("a")
    store.append(first)
    size = store.samples_path.stat().st_size
    real_write = os.write
    state = {"writes": 0}

    def disk_fills(fd, data):
        state["writes"] += 1
        if state["writes"] == 1:
            return real_write(fd, bytes(data[:40]))  # 40 bytes fit, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", disk_fills)
    with pytest.raises(ResultsError) as caught:
        store.append(store_row("b", extra={"prediction": "y" * 300}))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot append a row to {store.samples_path}: No space left on device")
    assert store.samples_path.stat().st_size == size  # no partial row left behind
    monkeypatch.undo()
    second = store_row("c")
    store.append(second)
    assert read_jsonl(store.samples_path) == [first, second]


def test_a_write_that_makes_no_progress_is_an_error_not_a_loop(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    with pytest.raises(ResultsError, match="No space left on device"):
        store.append(store_row("a"))
    monkeypatch.undo()
    assert store.samples_path.read_bytes() == b""


def test_a_full_disk_stops_the_run_at_the_first_row_that_does_not_fit(tmp_path, monkeypatch):
    """The run stops at the failing row (not after computing the rest) and every row written before it stays."""
    real_write = os.write
    state = {"rows": 0, "cut": False}

    def write(fd, data):
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("samples.jsonl"):
            return real_write(fd, data)
        if state["rows"] < 2:  # two rows fit
            state["rows"] += 1
            return real_write(fd, data)
        if not state["cut"]:  # half of the third does, then nothing more
            state["cut"] = True
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(ResultsError, match=r"cannot append a row to .*samples.jsonl: No space left on device"):
        run(composed(tmp_path, "task.depths=[10,50,90]"))  # 3 samples x 2 rows
    monkeypatch.undo()
    rows = read_jsonl(tmp_path / "niah_tiny_random" / "samples.jsonl")
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows)
    result = run(composed(tmp_path, "task.depths=[10,50,90]"))  # the rerun resumes: only the missing rows run
    assert result["rows_run"] == 4
    assert len(read_jsonl(tmp_path / "niah_tiny_random" / "samples.jsonl")) == 6


@pytest.mark.skipif(
    shutil.which("mount") is None or os.geteuid() != 0, reason="a small tmpfs needs mount privileges (root)"
)
def test_a_real_full_tmpfs_stops_the_run_without_losing_a_stored_row(tmp_path):
    """The audit's case on a real file system: a tiny tmpfs fills up mid-run (skipped without root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        args = [*TINY, "task.lengths=[256]", "task.depths=[0,10,20,30,40,50,60,70,80,90,100]",
                "task.max_new_tokens=4", "budget=[16,32]", f"results_dir={mount}"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-m", "kvbench", *args], capture_output=True, text=True, env=env)
        assert done.returncode == 2, done.stderr[-2000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("kvbench: error:")]
        assert len(errors) == 1 and "No space left on device" in errors[0], done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        samples = mount / "niah_tiny_random" / "samples.jsonl"
        data = samples.read_bytes() if samples.exists() else b""
        assert data == b"" or data.endswith(b"\n")  # whole rows only
        rows = read_jsonl(samples) if data else []
        assert all(set(results.RESUMED_ROW_FIELDS) <= set(row) for row in rows)
    finally:
        subprocess.run(["umount", str(mount)])


def test_a_row_whose_key_is_not_a_string_is_named_by_file_and_line(tmp_path):
    store = ResultsStore(tmp_path)
    store.samples_path.write_text(json.dumps(store_row("a")) + "\n" + json.dumps({**store_row("b"), "key": [1]}) + "\n")
    expected = r"samples.jsonl:2: row 'key' must be a string, got list \[1\]"
    with pytest.raises(MalformedRowError, match=expected):
        store.latest_rows()
    with pytest.raises(MalformedRowError, match=expected):
        ResultsStore(tmp_path).done_keys()


def test_a_successful_row_without_kvbench_fields_is_not_counted_as_done(tmp_path):
    """`{key, status: ok}` (a row cut down by hand or by a tool) would mark its key done without any result."""
    store = ResultsStore(tmp_path)
    store.samples_path.write_text(json.dumps(store_row("a")) + "\n" + '{"key": "b", "status": "ok"}\n')
    with pytest.raises(MalformedRowError) as caught:
        store.done_keys()
    assert str(caught.value) == (
        f"{store.samples_path}:2: row b lacks sample_fingerprint, method, method_label, budget, compress (not a row "
        "kvbench wrote); delete that line to recompute it, or choose a new run_name=..."
    )


def test_a_cut_down_row_in_a_run_is_refused_before_any_model_work(tmp_path):
    run(composed(tmp_path))
    samples = tmp_path / "niah_tiny_random" / "samples.jsonl"
    rows = read_jsonl(samples)
    samples.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"key": rows[1]["key"], "status": "ok"}) + "\n")
    with pytest.raises(MalformedRowError, match=r"samples.jsonl:2: row .* lacks sample_fingerprint"):
        run(composed(tmp_path))


def test_claims_left_by_killed_processes_are_removed_and_held_ones_kept(tmp_path):
    claims = tmp_path / CLAIMS_DIR
    claims.mkdir()
    stale = [claims / name for name in ("k1", "k2", "k3")]
    for path in stale:
        path.write_text("")  # what a killed claimer leaves: the file, with no lock on it any more
    held = claims / "k4"
    fd = os.open(held, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live claimer (another open file description: flock conflicts)
    try:
        ResultsStore(tmp_path)
        assert sorted(p.name for p in claims.iterdir()) == ["k4"]
    finally:
        os.close(fd)
    ResultsStore(tmp_path)
    assert list(claims.iterdir()) == []


def test_claims_of_a_run_killed_with_sigkill_are_cleaned_by_the_next_run(tmp_path):
    """A process holding claims is killed (-9): its lock goes with it, its claim files stay until the next run."""
    claims = tmp_path / "niah_tiny_random" / CLAIMS_DIR
    script = (
        "import os, sys, time\n"
        "from kvbench.harness.results import ResultsStore\n"
        f"store = ResultsStore({str(claims.parent)!r})\n"
        "with store.claim(['x1', 'x2']) as mine:\n"
        "    print(len(mine), flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "2"
    with ResultsStore(claims.parent).claim(["x1", "x2"]) as mine:
        assert mine == []  # held by the live child: left to it, and its files are not removed
    assert sorted(p.name for p in claims.iterdir()) == ["x1", "x2"]
    child.kill()
    child.wait()
    run(composed(tmp_path))
    assert list(claims.iterdir()) == []


def test_a_claim_file_unlinked_while_being_locked_is_claimed_again(tmp_path, monkeypatch):
    """lock_claim must end up holding the file at the claim's path: a lock on an unlinked file (removed by its
    releaser or as stale between open and flock) would let a second process claim the same key."""
    path = tmp_path / "key"
    real_flock = fcntl.flock
    removed = []

    def flock_after_unlink(fd, operation):
        if not removed:
            removed.append(1)
            path.unlink()  # the previous holder released it between our open and our flock
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_unlink)
    fd = results.lock_claim(path)
    monkeypatch.undo()
    try:
        assert fd is not None and os.fstat(fd).st_ino == os.stat(path).st_ino
        other = os.open(path, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the claim at the path really is held
        os.close(other)
    finally:
        os.close(fd)


def test_a_run_notes_rows_another_process_is_still_computing(tmp_path, capsys):
    """Two identical runs started together: the one that finishes first prints a summary without the rows the
    other still computes; it says so instead of printing a smaller n as if complete."""
    reference = run(composed(tmp_path / "reference", "task.depths=[10,50,90]"))
    keys = [row["key"] for row in read_jsonl(reference["run_dir"] / "samples.jsonl")]
    busy = [row["key"] for row in read_jsonl(reference["run_dir"] / "samples.jsonl") if row["method"] == "snapkv"][:1]
    other = ResultsStore(tmp_path / "shared" / "niah_tiny_random")  # the other process, mid-row
    capsys.readouterr()
    with other.claim(busy) as mine:
        assert mine == busy
        result = run(composed(tmp_path / "shared", "task.depths=[10,50,90]"))
    printed = capsys.readouterr().out
    assert result["rows_run"] == len(keys) - 1
    snapkv = result["summary"][result["summary"]["method"] == "snapkv"]
    assert list(snapkv["n"]) == [2]  # the busy row is not there yet
    assert (
        "note: 1 rows claimed by another process sharing this run are not stored yet (still running, or stopped); "
        "this summary leaves them out: rerun the same command once it ends"
    ) in printed
    again = run(composed(tmp_path / "shared", "task.depths=[10,50,90]"))  # the other process gave up: rerun
    assert again["rows_run"] == 1 and "note:" not in capsys.readouterr().out
