"""Small hand-made inputs and helpers shared by several test modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from kvbench.config import CONF_DIR
from kvbench.engine.cache import PAD_POSITION, KVCache
from kvbench.engine.generation import prefill
from kvbench.engine.measure import Stopwatch
from kvbench.harness.sample import Sample
from kvbench.methods import build_method
from kvbench.methods.base import CompressionContext

ROOT = Path(__file__).resolve().parents[1]
# Command-line overrides of a small run on the tiny model: one NIAH sample, 4 new tokens, one budget.
TINY = ["model=tiny_random", "model.device=cpu", "progress=false", "threads=1"]
SMALL_NIAH = ["task.lengths=[256]", "task.depths=[50]", "task.max_new_tokens=4", "budget=[16]"]


def store_row(key: str, status: str = "ok", extra: dict | None = None) -> dict:
    """A results row with the fields every row kvbench writes carries (`RESUMED_ROW_FIELDS`), for store tests."""
    identity = {"sample_fingerprint": "f0", "method": "full", "method_label": "full", "budget": None}
    return {"key": key, "status": status, **identity, "compress": "prompt", **(extra or {})}


def sky_sample(
    repeats: int = 12, max_new_tokens: int = 4, text: str = "The grass is green. The sky is blue.", sample_id: str = "s"
) -> Sample:
    """A short repeated-sentence prompt (`text` repeated) whose answer ("blue") is in the context."""
    return Sample(
        sample_id=sample_id,
        context=" ".join([text] * repeats),
        question="What colour is the sky?",
        answer_prefix="The sky is",
        answers=["blue"],
        metric="string_match_all",
        max_new_tokens=max_new_tokens,
    )


def needle_sample(max_new_tokens: int = 10) -> Sample:
    """A short noise haystack with one magic number: enough tokens for budgets of 32-64 on the tiny model."""
    return Sample(
        sample_id="needle",
        context=" ".join(["The grass is green. The sky is blue."] * 20)
        + " The magic number is 4821937. "
        + " ".join(["The sun is yellow."] * 20),
        question="What is the magic number?",
        answer_prefix="The magic number is",
        answers=["4821937"],
        metric="string_match_all",
        max_new_tokens=max_new_tokens,
    )


def composed(results_dir: Path, *overrides: str, task: list[str] = SMALL_NIAH):
    """The Hydra config of a small tiny-model run writing under `results_dir`, with `overrides`."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*TINY, *task, f"results_dir={results_dir}", *overrides])


def cli(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m kvbench *args` in a subprocess (this checkout's kvbench), its output captured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "kvbench", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def prefilled(lm, budget: int, window: int, cache_dir=None) -> tuple[KVCache, CompressionContext]:
    """A short numbered-items prompt prefilled on `lm` (the last `window` queries recorded), and its context."""
    text = " ".join(f"Item {i} is {i * 7 % 13}." for i in range(40))
    ids = lm.tokenizer(text)["input_ids"]
    pre = prefill(lm, ids, window, Stopwatch(lm.device))
    ctx = CompressionContext.for_prompt(lm, budget, len(ids), pre, input_ids=ids, cache_dir=cache_dir)
    return pre.cache, ctx


def compressed_copy(lm, cfg: dict, budget: int, window: int = 8):
    """The tiny model's prefilled cache, and a copy compressed by the method `cfg` (its observer attached)."""
    method = build_method(cfg)
    cache, ctx = prefilled(lm, budget, max(window, method.window_queries_needed()))
    compressed = cache.copy()
    method.setup(compressed, ctx)
    method.compress(compressed, ctx)
    return method, cache, compressed, ctx


def assert_kept_slots_are_untouched(original: KVCache, compressed: KVCache, skip_biased: bool = False) -> None:
    """Every kept (non-padding) slot holds exactly the original K/V of its position."""
    for full, layer in zip(original.layers, compressed.layers, strict=True):
        for head in range(layer.num_heads):
            real = layer.positions[head] != PAD_POSITION
            if skip_biased and "logit_bias" in layer.extras:
                real &= layer.extras["logit_bias"][head] == 0
            positions = layer.positions[head, real]
            assert torch.equal(layer.keys[0, head, real], full.keys[0, head, positions])
            assert torch.equal(layer.values[0, head, real], full.values[0, head, positions])


def one_hot(index: int, dim: int) -> torch.Tensor:
    """e_index * 10: as a query against one-hot keys it puts (almost) all attention on one slot."""
    return torch.nn.functional.one_hot(torch.tensor(index), dim).float() * 10
