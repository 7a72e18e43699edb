"""Several results directories -> one frame of rows, each labelled with the settings that tell runs apart.

A run's *setting* is what determines its rows apart from the method and budget: the model as its manifest
records it (identity, dtype), the task config, compress, seed and prefill mode. Runs with the same setting are
merged (e.g. one run per method of a SLURM sweep). Runs whose settings differ are a conflict: the report
names the differing keys and stops, unless asked to label them (`label_by_setting`), in which case every row
carries a `setting` label built from exactly those keys, so no table cell or curve mixes them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from kvbench.harness.results import SAMPLES_FILE, ResultsStore
from kvbench.report.serving import split_rows
from kvbench.report.summary import rows_frame

# Top-level config keys that choose what is run inside a setting (methods, budgets) or how (progress, paths).
NOT_SETTING = {"method", "budget", "budgets", "include_full", "run_name", "results_dir", "progress", "threads",
               "fail_fast", "kernels", "max_samples", "experiment", "hydra"}  # fmt: skip
# Model keys that say where a model ran, not what it computes.
MODEL_NOT_SETTING = {"device", "attn_backend"}


class ReportInputError(ValueError):
    """Bad report input (no rows, conflicting runs); one line."""


@dataclass
class Run:
    path: Path
    rows: list[dict[str, Any]]
    setting: dict[str, Any]  # flattened "model.name" -> value
    manifest: dict[str, Any]
    config: dict[str, Any]  # the run's config.yaml ({} for adapter rows)
    serving_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # experiment=serving's own rows


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = json.dumps(value, sort_keys=True, default=str) if isinstance(value, list) else value


def run_setting(manifest: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The keys that must agree for two runs' rows to share a table cell (see the module docstring)."""
    setting: dict[str, Any] = {}
    model = {
        k: v for k, v in (manifest.get("model") or config.get("model") or {}).items() if k not in MODEL_NOT_SETTING
    }
    _flatten("model", model, setting)
    if manifest.get("dtype"):
        setting["model.dtype"] = manifest["dtype"]
    _flatten("", {k: v for k, v in config.items() if k not in NOT_SETTING and k != "model"}, setting)
    if "lm_eval" in manifest:  # adapter rows (rows_path): compress is an adapter arg
        setting.setdefault("compress", manifest["lm_eval"].get("compress"))
    return setting


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not (path / SAMPLES_FILE).exists():
        raise ReportInputError(f"no rows in {path}: {SAMPLES_FILE} is missing (pass a results/<run> directory)")
    serving, rows = split_rows(ResultsStore(path).latest_rows())
    if not rows:
        raise ReportInputError(f"no rows in {path}: {path / SAMPLES_FILE} is empty")
    manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").exists() else {}
    config_path = path / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(config_path)) if config_path.exists() else {}
    return Run(path, rows, run_setting(manifest, config), manifest, config, serving)


def differing_keys(runs: list[Run]) -> list[str]:
    keys = sorted(set().union(*(run.setting for run in runs)))
    return [key for key in keys if len({repr(run.setting.get(key)) for run in runs}) > 1]


def conflict_message(runs: list[Run], keys: list[str]) -> str:
    shown = []
    for key in keys[:4]:
        values = " vs ".join(f"{run.setting.get(key)!r} ({run.path.name})" for run in runs)
        shown.append(f"{key}: {values}")
    more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
    return (
        f"runs have conflicting configs, differing in {', '.join(keys)}{more} ({'; '.join(shown)}); "
        "report them separately, or pass --label-by-setting to keep them apart labelled by these keys"
    )


def load_runs(paths: list[str | Path], label_by_setting: bool = False) -> tuple[pd.DataFrame, list[Run]]:
    """Every run's latest rows in one frame (`rows_frame` columns plus `run` and `setting`).

    Identical rows (same key) in several runs are kept once. Runs whose settings differ fail in one line
    naming the keys, unless `label_by_setting`: then `setting` is "key=value, ..." over the differing keys.
    Returns the frame and the loaded runs.
    """
    if not paths:
        raise ReportInputError("no runs given: pass one or more results/<run> directories")
    runs = [load_run(p) for p in paths]
    keys = differing_keys(runs)
    if keys and not label_by_setting:
        raise ReportInputError(conflict_message(runs, keys))
    rows, seen = [], set()
    for run in runs:
        label = ", ".join(f"{key.removeprefix('task.')}={run.setting.get(key)}" for key in keys)
        for row in run.rows:
            if row["key"] in seen:
                continue
            seen.add(row["key"])
            rows.append({**row, "run": run.path.name, "setting": label})
    return rows_frame(rows), runs
