"""Validation of the composed Hydra config into typed run settings (one-line errors for bad input)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path

from kvbench.budget import parse_budget
from kvbench.chunked import parse_prefill_chunk
from kvbench.kernels.dispatch import KERNEL_MODES
from kvbench.registry import UnknownNameError, unknown_name_message
from kvbench.report import check_x_axis
from kvbench.runner import COMPRESS_MODES
from kvbench.tasks.base import as_list  # noqa: I001

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SELECTABLE_GROUPS = ("model", "method", "task", "experiment")


class ConfigError(ValueError):
    """Bad user input; reported as one line."""


@dataclass(frozen=True)
class RunSettings:
    budgets: tuple[int | float | None, ...]
    compress: str
    include_full: bool
    seed: int
    fail_fast: bool
    max_samples: int | None
    run_dir: Path
    progress: bool
    kernels: str
    threads: int | None
    prefill_chunk: int | None = None  # tokens per prefill chunk, compressing between chunks (None: one shot)
    x_axis: str = "budget"  # summary order / accuracy figure x axis (kvbench.report.X_AXES)


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def check_group_choice(group: str, value: str, conf_dir: Path = CONF_DIR) -> None:
    """Raise a one-line error if `value` is not a config in conf/<group>/ (sweeps: every comma-separated item)."""
    if value.startswith(("glob(", "choice(", "range(", "sort(", "shuffle(")) or "${" in value:
        return
    valid = group_options(group, conf_dir)
    for item in value.split(","):
        item = item.strip()
        if item and item not in valid:
            raise UnknownNameError(unknown_name_message(group, item, valid))


def check_overrides(overrides: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Validate `group=choice` command-line overrides before Hydra composes (its own errors are multi-line)."""
    for override in overrides:
        name, sep, value = override.partition("=")
        name = name.lstrip("+~")
        if sep and name in SELECTABLE_GROUPS:
            check_group_choice(name, value, conf_dir)


def parse_budgets(cfg: Any) -> tuple[int | float | None, ...]:
    """`budgets` (a list, swept inside one run) wins over `budget` (a value or a list)."""
    raw = cfg.get("budgets")
    if raw is None:
        raw = cfg.get("budget")
        values = as_list(raw) if raw is not None else [None]
    else:
        values = as_list(raw)
        if not values:
            raise ConfigError("budgets must list at least one budget")
    parsed = tuple(parse_budget(v) for v in values)
    return tuple(dict.fromkeys(parsed))  # drop duplicates, keep order


def validate(cfg: Any) -> RunSettings:
    compress = str(cfg.compress)
    if compress not in COMPRESS_MODES:
        close = difflib.get_close_matches(compress, COMPRESS_MODES, n=1, cutoff=0.0)
        valid = ", ".join(COMPRESS_MODES)
        raise ConfigError(f"unknown compress '{compress}'. Valid compress modes: {valid}. Did you mean '{close[0]}'?")
    kernels = str(cfg.get("kernels", "auto"))
    if kernels not in KERNEL_MODES:
        raise ConfigError(f"unknown kernels '{kernels}'. Valid kernels: {', '.join(KERNEL_MODES)}.")
    max_samples = cfg.get("max_samples")
    if max_samples is not None and (isinstance(max_samples, bool) or int(max_samples) < 1):
        raise ConfigError(f"max_samples must be a positive int or null, got {max_samples!r}")
    threads = cfg.get("threads")
    try:
        x_axis = check_x_axis(str(cfg.get("x_axis", "budget")))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return RunSettings(
        budgets=parse_budgets(cfg),
        compress=compress,
        include_full=bool(cfg.get("include_full", True)),
        seed=int(cfg.seed),
        fail_fast=bool(cfg.get("fail_fast", False)),
        max_samples=None if max_samples is None else int(max_samples),
        run_dir=Path(to_absolute_path(str(cfg.results_dir))) / str(cfg.run_name),
        progress=bool(cfg.get("progress", True)),
        kernels=kernels,
        threads=None if threads is None else int(threads),
        prefill_chunk=parse_prefill_chunk(cfg.get("prefill_chunk")),
        x_axis=x_axis,
    )
