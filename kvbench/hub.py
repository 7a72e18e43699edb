"""The Hugging Face hub at run time: use it only when it answers, so an offline machine fails in a second.

Without this, `from_pretrained` / `hf_hub_download` retry for about a minute (dozens of warnings) before
giving up. One short TCP probe of the endpoint decides; the answer is kept for the process.
"""

from __future__ import annotations

import functools
import os
import socket
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
