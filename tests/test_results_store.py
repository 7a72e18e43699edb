"""The results store and the run directory: rows written atomically and read back (a complete last row without its
newline kept, a torn one rerun), malformed rows named by file and line, claims that let concurrent runs compute
every row once, one-line errors for unwritable directories, a finished run left untouched by a failed or different
config, summaries of this invocation's samples only, and leftover temporary files of dead writers removed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from kvbench.app import run
from kvbench.harness.jsonl import read_jsonl
from kvbench.harness.results import MalformedRowError, ResultsError, ResultsStore
from tests.helpers import ROOT, TINY, composed, store_row


def test_complete_last_row_without_newline_is_kept_and_a_torn_one_is_rerun(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(store_row("a", "ok"))
    with open(store.samples_path, "a") as handle:
        handle.write(json.dumps(store_row("b")))  # complete, but the newline never made it to disk
    assert store.done_keys() == {"a", "b"}
    store.append(store_row("c", "ok"))
    assert [r["key"] for r in read_jsonl(store.samples_path)] == ["a", "b", "c"]
    with open(store.samples_path, "a") as handle:
        handle.write('{"key": "d", "sta')  # torn: not counted as done, dropped by the next append
    assert "d" not in ResultsStore(tmp_path).done_keys()
    store.append(store_row("d", "ok"))
    assert [r["key"] for r in read_jsonl(store.samples_path)] == ["a", "b", "c", "d"]


def test_row_without_key_names_file_line_and_field(tmp_path):
    store = ResultsStore(tmp_path)
    store.samples_path.write_text(json.dumps(store_row("a")) + '\n{"status": "ok"}\n')
    with pytest.raises(MalformedRowError, match=r"samples.jsonl:2: row has no 'key' field"):
        store.latest_rows()
    with pytest.raises(MalformedRowError, match=r"samples.jsonl:2: row has no 'key' field"):
        ResultsStore(tmp_path).done_keys()


def test_a_claimed_row_is_left_to_its_claimer_and_a_finished_one_is_not_recomputed(tmp_path):
    first, second = ResultsStore(tmp_path), ResultsStore(tmp_path)  # two processes sharing one run
    with first.claim(["a", "b"]) as mine:
        assert mine == ["a", "b"]
        with second.claim(["a", "b", "c"]) as theirs:
            assert theirs == ["c"]  # a and b are being computed by the first
            second.append(store_row("c", "ok"))
        first.append(store_row("a", "ok"))
        first.append(store_row("b", "error"))
    with second.claim(["a", "b", "c"]) as theirs:
        assert theirs == ["b"]  # a and c are done; the error row is retried
    assert not list((tmp_path / ".claims").iterdir())  # claims are released


def test_two_identical_concurrent_runs_compute_every_row_once(tmp_path):
    args = [
        *TINY,
        "task.lengths=[256]",
        "task.depths=[0,20,40,60,80,100]",
        "task.max_new_tokens=4",
        "budget=[16,32]",
        f"results_dir={tmp_path}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "kvbench", *args]
    processes = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err[-2000:] for _, err in outputs]
    keys = [row["key"] for row in read_jsonl(tmp_path / "niah_tiny_random" / "samples.jsonl")]
    assert len(keys) == len(set(keys)) == 6 * 3  # 6 samples x (2 budgets + full), none twice


def test_runs_of_different_methods_share_one_run_directory(tmp_path):
    """A SLURM array / local multirun over methods writes one run; the summary covers both methods."""
    run(composed(tmp_path, "method=snapkv"))
    result = run(composed(tmp_path, "method=streamingllm"))
    assert set(result["summary"]["method"]) == {"snapkv", "streamingllm", "full"}
    assert result["rows_run"] == 1  # the full-cache row of the shared sample was not recomputed
    assert len(list((result["run_dir"] / "configs").glob("*.yaml"))) == 1  # the second config, kept aside


def test_read_only_results_directory_is_one_line(tmp_path):
    run_dir = tmp_path / "niah_tiny_random"
    run_dir.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: make the directory immutable instead
        if subprocess.run(["chattr", "+i", str(run_dir)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr: cannot make a read-only directory")
    else:
        run_dir.chmod(0o555)
    try:
        with pytest.raises(ResultsError, match=rf"cannot write in {run_dir}: .*choose another results_dir"):
            run(composed(tmp_path))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(run_dir)])
        run_dir.chmod(0o755)


def test_unwritable_samples_file_is_one_line(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    real_open = os.open

    def refuse(path, flags, *args):
        if str(path) == str(store.samples_path) and flags & os.O_APPEND:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ResultsError, match=r"cannot write .*samples.jsonl: Permission denied"):
        store.append({"key": "a"})


def test_failed_validation_leaves_a_finished_run_untouched_and_a_different_config_is_refused(tmp_path):
    result = run(composed(tmp_path))
    run_dir = result["run_dir"]
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "manifest.json")}
    with pytest.raises(ValueError, match="9000"):
        run(composed(tmp_path, "task.lengths=[9000]"))  # impossible length: found after the model loads
    with pytest.raises(ResultsError, match=r"different config \(task.depths: \[50\] != \[25\]\).*run_name="):
        run(composed(tmp_path, "task.depths=[25]"))
    after = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "manifest.json")}
    assert after == before
    assert not (run_dir / "configs").exists()
    other = run(composed(tmp_path, "task.depths=[25]", "run_name=other"))  # a new run name works
    assert other["rows_run"] == 2


def test_summary_covers_only_this_invocations_samples(tmp_path):
    run(composed(tmp_path, "task.depths=[25,50,75]"))
    result = run(composed(tmp_path, "task.depths=[25,50,75]", "max_samples=1"))
    assert result["rows_run"] == 0  # resumed
    assert set(result["summary"]["n"]) == {1}  # not 3: the summary matches the config


def test_leftover_temporary_files_of_dead_writers_are_removed(tmp_path):
    run_dir = tmp_path / "niah_tiny_random"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    leftovers = [run_dir / f"summary.csv.tmp{dead.pid}", run_dir / f"config.yaml.tmp-{host}-{dead.pid}"]
    alive = run_dir / f"summary.csv.tmp-{host}-{os.getppid()}"  # a live writer's file stays
    old_remote = run_dir / "summary.csv.tmp-otherhost-123"
    for path in [*leftovers, alive, old_remote]:
        path.write_text("partial")
    os.utime(old_remote, (time.time() - 7200, time.time() - 7200))
    run(composed(tmp_path))
    assert not any(path.exists() for path in [*leftovers, old_remote])
    assert alive.exists()
