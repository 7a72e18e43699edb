"""`RunOptions`: how samples are run, one object from the CLI / Python API / lm-eval adapter down to the
runner and the scenarios (nothing re-packs it into positional arguments on the way)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from kvbench.engine.architecture import LAYER_POLICIES
from kvbench.engine.kernels.dispatch import resolve_kernels
from kvbench.registry import closest_hint

COMPRESS_MODES = ("prompt", "context")
RESOLVED_KERNELS = ("torch", "triton")  # what `kernels=auto|torch|triton` resolves to


@dataclass(frozen=True)
class RunOptions:
    """How samples are run; the CLI fills this from the validated Hydra config (`kvbench.config`).

    `kernels` is what was asked (`auto`, `triton`, `torch`) until `resolved(device)` turns it into what runs
    (`triton` or `torch`): the API resolves it once per run, and the runner hands the resolved value to every
    job's cache and compression context.
    """

    budgets: tuple[int | float | None, ...] = (None,)
    compress: str = "prompt"
    seed: int = 0
    fail_fast: bool = False
    kernels: str = "auto"
    prefill_chunk: int | None = None
    # Which layers methods compress (`kvbench.engine.architecture.compressible_layers`): global | all.
    layers: str = "global"
    cache_dir: Path | None = None  # per-model artefacts (razor head profiles); None: $KVBENCH_CACHE/<model>
    # Samples whose compressed caches decode together (`kvbench.harness.batched`); 1: one sample at a time.
    batch_size: int = 1
    run_name: str = "api"
    task_name: str = "custom"

    def __post_init__(self) -> None:
        check_compress(self.compress)
        if self.layers not in LAYER_POLICIES:
            raise ValueError(f"unknown layers '{self.layers}'. Valid layers: {', '.join(LAYER_POLICIES)}.")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")

    def resolved(self, device: torch.device | str) -> RunOptions:
        """These options with `kernels` resolved for `device` (one-line error when triton cannot run there); options
        already resolved are returned as they are, so a runner may call this on whatever it is handed."""
        if self.kernels in RESOLVED_KERNELS:
            return self
        return dataclasses.replace(self, kernels=resolve_kernels(self.kernels, device))


def check_compress(compress: str) -> None:
    """One-line error for a compress mode that does not exist (the CLI, the API and the lm-eval adapter)."""
    if compress not in COMPRESS_MODES:
        valid = ", ".join(COMPRESS_MODES)
        raise ValueError(
            f"unknown compress '{compress}'. Valid compress modes: {valid}.{closest_hint(compress, COMPRESS_MODES)}"
        )
