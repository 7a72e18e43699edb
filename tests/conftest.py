"""Shared fixtures: the tiny random Llama (fast) and the real embedded SmolLM2 (loaded once per session)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

# Without a GPU the Triton kernels are tested in Triton's CPU interpreter. It must be on before triton is first
# imported (transformers imports it through torch._dynamo), or triton's own library functions are compiled-only.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvbench.engine.models import LoadedModel, load_model  # noqa: E402

# absl (imported by rouge-score) logs through a handler bound to whatever sys.stderr is at its import, and closes
# that stream when the handler is closed unless it is a process stream. Under pytest that is the capture file, and a
# Hydra run inside a test (logging.config clears every handler) would close pytest's own capture. Bind it to the
# process's stderr, which it never closes.
with contextlib.suppress(ImportError):
    import absl.logging  # noqa: E402

    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__

# The tiny model's matrices are too small to gain from threads: one thread runs its tests several times faster,
# and much faster still on a busy machine. Tests on the real model get every core through `smollm2_lm`.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def model_config(name: str, **overrides):
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    cfg.device = "cpu"
    if os.environ.get("KVBENCH_TOKENIZER") and "tokenizer" in cfg:  # a bare GPU image: exported tokenizer, no GGUF
        cfg.tokenizer = os.environ["KVBENCH_TOKENIZER"]
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.fixture(scope="session")
def tiny_lm() -> LoadedModel:
    return load_model(model_config("tiny_random"))


@pytest.fixture(scope="session")
def kernel_lm(tiny_lm) -> LoadedModel:
    """The tiny model where the Triton kernels run for real: on CUDA (fp32, like the CPU reference) when there is
    a GPU, else the CPU model (kernels in Triton's interpreter)."""
    if not torch.cuda.is_available():
        return tiny_lm
    return load_model(model_config("tiny_random", device="cuda", dtype="float32"))


@pytest.fixture(scope="session")
def _smollm2_session() -> LoadedModel:
    return load_model(model_config("smollm2_135m"))


@pytest.fixture
def smollm2_lm(_smollm2_session: LoadedModel):
    """The real SmolLM2 (loaded once per session), with all CPU cores for the duration of the test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield _smollm2_session
    torch.set_num_threads(previous)
