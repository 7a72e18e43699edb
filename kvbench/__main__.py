"""`python -m kvbench [overrides]`: the Hydra entry point.

Before Hydra composes (its own errors are multi-line) and creates its output directory, the command line is
checked: group choices (model=, method=, task=, experiment=) against conf/, every other key against the
composed config (unknown keys, `+key` included, fail with the closest valid key), and, for a single run, every
value (types, ranges, run_name) through the same validation the run uses; for a sweep, every job's values and
whether the jobs can share their run directory. Bad input found later (missing data, a model path, a first
sample or scenario setting every row would refuse: `kvbench.app.prepare`) is reported the same way, before the
run writes anything, and the directories this invocation created are removed. `fail_fast=true` raises sample
errors with their traceback; input errors stay one line. A run whose every method row failed exits with status 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kvbench.app import execute, prepare
from kvbench.config import CONF_DIR, check_command_line, check_overrides
from kvbench.harness.results import ResultsStore

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, PermissionError)
# results_dir when this invocation is the one creating it (Hydra does, for its logs): removed again on failure.
_created_root: Path | None = None


def fail(message: str) -> None:
    print(f"kvbench: error: {message}", file=sys.stderr)
    sys.exit(2)


def one_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return text.splitlines()[0] if text.strip() else type(err).__name__


def remove_output_dir(results_dir: Path) -> None:
    """Remove Hydra's output directory of this failed job (logs/<timestamp>/) and the parents it leaves empty,
    up to (not including) results_dir."""
    from hydra.core.hydra_config import HydraConfig

    try:
        output = Path(HydraConfig.get().runtime.output_dir).resolve()
    except Exception:  # noqa: BLE001 - no Hydra context (called through the Python API): nothing to clean
        return
    shutil.rmtree(output, ignore_errors=True)
    root = results_dir.resolve()
    for parent in output.parents:
        if parent == root or not parent.is_relative_to(root):
            break
        try:
            os.rmdir(parent)  # only if empty: a run's earlier logs and rows stay
        except OSError:
            return
    if root == _created_root:
        with contextlib.suppress(OSError):
            os.rmdir(root)


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - no Hydra context
        return False


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    logging.getLogger("kvbench").setLevel(logging.INFO)
    results_dir = Path(str(cfg.get("results_dir", "results")))
    try:
        prepared = prepare(cfg)
    except USER_ERRORS as err:  # bad input stays one line, fail_fast or not (fail_fast is for sample errors)
        remove_output_dir(results_dir)
        fail(one_line(err))
    try:
        result = execute(prepared)
    except USER_ERRORS as err:
        if cfg.get("fail_fast"):
            raise
        remove_output_dir(results_dir)
        fail(one_line(err))
    if result["all_failed"]:
        message = f"every {prepared.method.label()} row failed (first: {one_line(ValueError(result['all_failed']))})"
        if in_multirun():  # the sweep's other jobs still run
            print(f"kvbench: error: {message}", file=sys.stderr)
        else:
            print(f"kvbench: error: {message}; rows in {prepared.store.samples_path}", file=sys.stderr)
            sys.exit(1)


def main() -> None:
    global _created_root
    args = sys.argv[1:]
    overrides = [arg for arg in args if not arg.startswith("-")]
    flags = [arg for arg in args if arg.startswith("-")]
    try:
        check_overrides(overrides)
        if all(flag in ("-m", "--multirun") for flag in flags):  # other flags (--cfg, -cn) take values
            settings = check_command_line(overrides, multirun=bool(flags))
            if settings is not None:  # before Hydra creates its log directory there (a traceback if it cannot)
                ResultsStore(settings.run_dir).check_writable()
            root = settings.results_root if settings is not None else None
            _created_root = root if root is not None and not root.exists() else None
    except USER_ERRORS as err:
        fail(one_line(err))
    hydra_main()


if __name__ == "__main__":
    main()
