"""Validation of the composed Hydra config into typed run settings (one-line errors for bad input)."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import to_absolute_path
from omegaconf import OmegaConf

from kvbench.engine.kernels.dispatch import KERNEL_MODES
from kvbench.harness.batched import check_batch
from kvbench.harness.budget import parse_budget
from kvbench.harness.chunked import check_chunked_methods, parse_prefill_chunk
from kvbench.harness.options import RunOptions, check_compress
from kvbench.harness.results import ResultsStore, config_differences
from kvbench.harness.serving import ServingSettings, check_serving_batches
from kvbench.methods import METHODS, build_method
from kvbench.registry import UnknownNameError, check_field, unknown_name_message
from kvbench.report import check_x_axis
from kvbench.tasks import TASKS, build_task
from kvbench.tasks.base import as_list, check_prefill_chunk  # noqa: I001

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SELECTABLE_GROUPS = ("model", "method", "task", "experiment")
MISSING_HINTS = {
    "model.name_or_path": "a local model directory (or its config.json; a hub id only with network access)",
}
MAX_CHECKED_JOBS = 256  # larger sweeps: each job checks its own values when it runs
BOOL_KEYS = {"include_full": True, "fail_fast": False, "progress": True}


def name_part(name: Any) -> str:
    """A model name as one directory-name component: a path's or hub id's last component (for `<dir>/config.json`
    the directory, for another `.json` file its stem), characters other than letters, digits, `.`, `_` and `-`
    replaced by `_`."""
    parts = [part for part in re.split(r"[/\\\\]", str(name)) if part not in ("", ".", "..")]
    if len(parts) > 1 and parts[-1] == "config.json":
        parts.pop()
    last = parts[-1].removesuffix(".json") if parts else ""
    return re.sub(r"[^A-Za-z0-9._-]", "_", last).strip(".") or "model"


# conf/config.yaml: run_name: ${task.name}_${kvbench.name_part:${model.name}} (model=hf names a path or hub id).
OmegaConf.register_new_resolver("kvbench.name_part", name_part, replace=True)


class ConfigError(ValueError):
    """Bad user input; reported as one line."""


@dataclass(frozen=True)
class RunSettings:
    """A validated CLI run: how samples are run (`options`, handed whole to the API) and what only the CLI needs."""

    options: RunOptions
    include_full: bool
    max_samples: int | None
    run_dir: Path
    progress: bool
    threads: int | None
    x_axis: str = "budget"  # summary order / accuracy figure x axis (kvbench.report.X_AXES)
    results_root: Path | None = None  # results_dir, absolute
    serving: ServingSettings | None = None  # experiment=serving: the serving phase after the rows


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
        if not values:  # `budget=[]` would run only the full-cache rows
            raise ConfigError("budget must list at least one budget (or be null for no compression)")
    else:
        values = as_list(raw)
        if not values:
            raise ConfigError("budgets must list at least one budget")
    parsed = tuple(parse_budget(v) for v in values)
    return tuple(dict.fromkeys(parsed))  # drop duplicates, keep order


def run_dir_for(results_dir: str, run_name: str) -> Path:
    """results_dir/run_name, refusing a run name that leaves results_dir (`../x`, an absolute path)."""
    root = Path(to_absolute_path(results_dir)).resolve()
    run_dir = (root / run_name).resolve()
    if not run_name or run_dir == root or not run_dir.is_relative_to(root):
        raise ConfigError(
            f"run_name {run_name!r} must name a directory inside results_dir ({root}); "
            "use a plain name such as run_name=my_run"
        )
    return run_dir


def validate(cfg: Any) -> RunSettings:
    """Every top-level key checked (type and range, naming the key) before anything is loaded or written."""
    compress = str(cfg.compress)
    try:
        check_compress(compress)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    kernels = str(cfg.get("kernels", "auto"))
    if kernels not in KERNEL_MODES:
        raise ConfigError(f"unknown kernels '{kernels}'. Valid kernels: {', '.join(KERNEL_MODES)}.")
    max_samples = check_field("max_samples", cfg.get("max_samples"), int | None, minimum=1)
    threads = check_thread_count(check_field("threads", cfg.get("threads"), int | None, minimum=1))
    check_model_fields(cfg.get("model"))
    seed = check_field("seed", cfg.get("seed"), int, minimum=0)
    batch_size = check_field("batch_size", cfg.get("batch_size", 1), int, minimum=1)
    flags = {key: check_field(key, cfg.get(key, default), bool) for key, default in BOOL_KEYS.items()}
    results_dir = check_field("results_dir", cfg.get("results_dir"), str)
    run_name = check_field("run_name", cfg.get("run_name"), str)
    try:
        x_axis = check_x_axis(str(cfg.get("x_axis", "budget")))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_output_names(results_dir, run_name)
    run_dir = run_dir_for(results_dir, run_name)
    try:
        serving = ServingSettings.parse(cfg.serving) if cfg.get("serving") is not None else None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if serving is not None and options_device_is_cuda(cfg):
        check_memory_fits_device(serving)
    options = RunOptions(
        budgets=parse_budgets(cfg),
        compress=compress,
        seed=seed,
        fail_fast=flags["fail_fast"],
        kernels=kernels,
        prefill_chunk=parse_prefill_chunk(cfg.get("prefill_chunk")),
        batch_size=batch_size,
        layers=str(cfg.get("layers", "global")),
        run_name=run_dir.name,
        task_name=str(cfg.task.get("name", "custom")) if cfg.get("task") else "custom",
    )
    return RunSettings(
        options=options,
        include_full=flags["include_full"],
        max_samples=max_samples,
        run_dir=run_dir,
        progress=flags["progress"],
        threads=threads,
        x_axis=x_axis,
        results_root=Path(to_absolute_path(results_dir)).resolve(),
        serving=serving,
    )


def options_device_is_cuda(cfg: Any) -> bool:
    """Whether the model will run on CUDA (`model.device`: cuda, cuda:N, or auto with a GPU)."""
    device = str((cfg.get("model") or {}).get("device", "cpu"))
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def check_memory_fits_device(serving: ServingSettings) -> None:
    """On CUDA a memory budget is validated by allocating it: one larger than the device is refused up front."""
    total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
    for memory in serving.memory_gib:
        if memory * 2**30 > total:
            raise ConfigError(
                f"serving.memory_gib={memory:g} is more than the GPU holds ({total / 2**30:.1f} GiB); lower it"
            )


def _node_keys(cfg: Any, path: list[str]) -> list[str] | None:
    """Keys of the mapping at `path` in `cfg` (None if there is no mapping there)."""
    from omegaconf import DictConfig

    node = cfg
    for part in path:
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    return [str(k) for k in node] if isinstance(node, DictConfig) else None


def _registered_fields(cfg: Any, group: str) -> list[str] | None:
    """Field names of the method/task class that `cfg.<group>.name` selects, or those the model's kind reads
    (None if unknown)."""
    if group == "model":
        kind = cfg.model.get("kind") if "model" in cfg else None
        return sorted(MODEL_FIELDS[kind]) if kind in MODEL_FIELDS else None
    if group == "method":
        registry = METHODS
    elif group == "task":
        registry = TASKS
    else:
        return None
    name = cfg[group].get("name") if group in cfg else None
    if name not in registry:
        return None
    return sorted(f.name for f in dataclasses.fields(registry.get(name)) if f.init and f.name != "name")


def check_key(cfg: Any, path: str, add: bool) -> None:
    """One-line error for an override of a key the composed config does not have (plain `key=`), or for a
    `+key` that nothing reads (top-level keys and method/task parameters outside their dataclass)."""
    parts = path.split(".")
    parent, leaf = parts[:-1], parts[-1]
    siblings = _node_keys(cfg, parent)
    fields = _registered_fields(cfg, parent[0]) if len(parts) == 2 else None
    exists = siblings is not None and leaf in siblings
    if add and exists:
        raise ConfigError(f"'+{path}' adds a key that exists already; set it without '+': {path}=...")
    if not add and exists:
        return
    if fields is not None and leaf in fields:
        if not add:
            raise ConfigError(f"{path} is not in the {parent[0]}'s config file; add it with +{path}=...")
        return
    if add and len(parts) > 1 and fields is None:
        return  # model.* and deeper mappings (e.g. method.base_params.*) take free keys
    valid = fields if fields is not None else sorted(siblings or _node_keys(cfg, []) or [])
    where = f" for {parent[0]} {cfg[parent[0]].get('name')}" if fields is not None else ""
    prefix = ".".join(parent) + "." if parent and siblings is not None else ""
    hint = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.0)
    raise ConfigError(
        f"unknown key '{path}'{where}."
        + (f" Did you mean '{prefix}{hint[0]}'?" if hint else "")
        + f" Valid keys{' under ' + '.'.join(parent) if prefix else ''}: {', '.join(valid)}."
    )


def check_command_line(overrides: list[str], multirun: bool = False, conf_dir: Path = CONF_DIR) -> RunSettings | None:
    """Check a command line before Hydra composes it and creates any directory: unknown keys (`+key`
    included) with the closest valid one; for a single run, also every value (the checks `validate`, the
    method and the task builders make) and values left missing (`???`); returns the single run's settings."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # noqa: BLE001 - Hydra's grammar errors are multi-line
        raise ConfigError(parse_error_message(overrides, err)) from None
    groups: list[list[str]] = []  # per group override, every choice it sweeps
    keys = []
    for override in parsed:
        name = override.key_or_group
        if name.startswith("hydra") or override.package is not None or override.is_delete():
            continue
        if "/" in name or name in SELECTABLE_GROUPS:
            plus = "+" if override.is_add() else ""
            if override.is_sweep_override():
                choices = sweep_values(override, conf_dir) or []
            else:
                choices = [override.get_value_element_as_str()]
            if choices:
                groups.append([f"{plus}{name}={choice}" for choice in choices])
            continue
        keys.append(override)
    # A key must exist for at least one composed choice (`method=snapkv,streamingllm method.n_sink=2`); whether
    # every job of a sweep composes is `check_sweep`'s.
    variants = [[choices[0] for choices in groups]]
    for index, choices in enumerate(groups):
        variants += [[*variants[0][:index], choice, *variants[0][index + 1 :]] for choice in choices[1:]]
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        try:
            bases = [compose("config", overrides=variant) for variant in variants]
        except Exception as err:  # noqa: BLE001
            raise ConfigError(str(err).splitlines()[0]) from None
        for override in keys:
            errors = []
            for base in bases:
                try:
                    check_key(base, override.key_or_group, override.is_add() or override.is_force_add())
                    break
                except ConfigError as err:
                    errors.append(err)
            else:
                raise errors[0]
        if multirun or any(o.is_sweep_override() for o in parsed):
            check_sweep(parsed, conf_dir)
            return None
        try:
            cfg = compose("config", overrides=overrides)
        except Exception as err:  # noqa: BLE001
            raise ConfigError(str(err).splitlines()[0]) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        what = MISSING_HINTS.get(missing[0], "a value")
        raise ConfigError(f"{missing[0]} needs {what}: pass {missing[0]}=... on the command line")
    return check_values(cfg)


def sweep_values(override: Any, conf_dir: Path = CONF_DIR) -> list[str] | None:
    """The values a sweep override takes, as override strings; a glob() over a config group filtered against the
    group's files in conf_dir (Hydra's own expansion needs its config loader, which exists only once it runs);
    None where they cannot be listed here (interval sweeps, a glob over a plain key)."""
    from hydra.core.override_parser.types import Glob

    if not override.is_discrete_sweep():
        return None
    value = override.value()
    if isinstance(value, Glob):
        group = conf_dir / override.key_or_group
        if not group.is_dir():
            return None
        return value.filter(sorted(path.stem for path in group.glob("*.yaml")))
    return list(override.sweep_string_iterator())


def sweep_jobs(parsed: list[Any], conf_dir: Path = CONF_DIR) -> list[list[str]] | None:
    """The override list of every job of a sweep, in Hydra's basic-sweeper order (the cartesian product of the
    swept values); None for sweeps not enumerated here (interval sweeps) or above MAX_CHECKED_JOBS."""
    axes: list[list[str]] = []
    for override in parsed:
        if not override.is_sweep_override():
            axes.append([override.input_line])
            continue
        values = sweep_values(override, conf_dir)
        if values is None:
            return None
        axes.append([f"{override.get_key_element()}={value}" for value in values])
    if math.prod(len(axis) for axis in axes) > MAX_CHECKED_JOBS:
        return None
    return [list(job) for job in itertools.product(*axes)]


def check_sweep_outputs(parsed: list[Any], conf_dir: Path = CONF_DIR) -> None:
    """For a sweep whose jobs are not enumerated: each results_dir it names is a directory that can be written
    (Hydra creates its sweep directory there before any job runs, with a traceback if it cannot)."""
    from hydra import compose

    fixed = [override.input_line for override in parsed if not override.is_sweep_override()]
    roots = [str(compose("config", overrides=fixed).get("results_dir", "results"))]
    for override in parsed:
        if override.is_sweep_override() and override.key_or_group == "results_dir":
            roots = sweep_values(override, conf_dir) or []
    for root in roots:
        check_output_names(root, "")
        ResultsStore(Path(to_absolute_path(root))).check_writable()


def check_sweep(parsed: list[Any], conf_dir: Path = CONF_DIR) -> None:
    """Every job of a sweep checked before Hydra launches any (a launcher such as submitit would wrap a job's
    one-line error in its own traceback, after the other jobs started): each job's values, that each run
    directory can be written, and that jobs writing the same run directory agree with each other and with the
    config.yaml already there (the keys a run may vary, method and budgets among them, excepted)."""
    from hydra import compose
    from omegaconf import OmegaConf

    jobs = sweep_jobs(parsed, conf_dir)
    if jobs is None:
        check_sweep_outputs(parsed, conf_dir)
        return  # each job checks its own values when it runs
    first_of_run: dict[Path, dict] = {}
    swept = [index for index, override in enumerate(parsed) if override.is_sweep_override()]
    for job in jobs:
        try:
            cfg = compose("config", overrides=job)
        except Exception as err:  # noqa: BLE001 - Hydra's composition errors are multi-line
            which = " ".join(job[index] for index in swept)
            raise ConfigError(f"sweep job {which}: {str(err).splitlines()[0]}") from None
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            what = MISSING_HINTS.get(missing[0], "a value")
            raise ConfigError(f"{missing[0]} needs {what}: pass {missing[0]}=... on the command line")
        settings = check_values(cfg)
        config = OmegaConf.to_container(cfg, resolve=True)
        if settings.run_dir not in first_of_run:
            ResultsStore(settings.run_dir).check_writable()
        ResultsStore(settings.run_dir).check_config(config)
        first = first_of_run.setdefault(settings.run_dir, config)
        differences = config_differences(first, config)
        if differences:
            raise ConfigError(
                f"jobs of this sweep would write {settings.run_dir} with different configs ({differences[0]}); "
                "run them as separate commands, each with its own run_name=..."
            )


def check_values(cfg: Any) -> RunSettings:
    """Everything about a composed config that can be checked without loading a model or data."""
    settings = validate(cfg)
    check_model_fields(cfg.get("model"))
    method = build_method(cfg.method)
    check_chunked_methods(settings.options.prefill_chunk, [method])
    task = build_task(cfg.task)
    check_prefill_chunk(task.scenario, settings.options.prefill_chunk)
    check_batch([method], settings.options, scenario=task.scenario)
    if settings.serving is not None:
        check_serving_batches([method], settings.options, settings.serving, scenario=task.scenario)
    return settings


# The keys each model kind's loader reads (kvbench.engine.models), with their types and minimums: a `+model.<key>`
# outside these would be accepted and ignored, and a bad value would fail deep in transformers.
_COMMON_MODEL_FIELDS: dict[str, tuple[Any, float | None]] = {
    "kind": (str, None),
    "name": (str, None),
    "device": (str, None),
    "dtype": (str, None),
    "attn_backend": (str, None),
    "max_context": (int | None, 1),
    "seed": (int, 0),
    "tokenizer": (str | None, None),
}
MODEL_FIELDS: dict[str, dict[str, tuple[Any, float | None]]] = {
    "tiny_random": {
        **_COMMON_MODEL_FIELDS,
        "hidden_size": (int, 1),
        "intermediate_size": (int, 1),
        "num_layers": (int, 1),
        "num_heads": (int, 1),
        "num_kv_heads": (int, 1),
        "head_dim": (int, 1),
        "initializer_range": (float, 0),
    },
    "hf": {
        **_COMMON_MODEL_FIELDS,
        "name_or_path": (str, None),
        "config_only": (bool, None),
        "trust_remote_code": (bool, None),
        "device_map": (str | None, None),
    },
    "gguf_package": {
        **_COMMON_MODEL_FIELDS,
        "package": (str, None),
        "version": (str, None),
        "gguf_file": (str, None),
        "assemble": (bool, None),
    },
}
NAME_MAX = 255  # bytes in one path component on the common Linux file systems


def check_model_fields(model: Any) -> None:
    """Type and range of every model field its kind reads (`MODEL_FIELDS`), and a device this machine has."""
    if model is None or model.get("kind") not in MODEL_FIELDS:
        return  # a kind registered by the user reads its own fields
    for key, (annotation, minimum) in MODEL_FIELDS[model.kind].items():
        if key in model and model._get_node(key)._is_missing() is False:
            check_field(f"model.{key}", model.get(key), annotation, minimum=minimum)
    if model.kind == "tiny_random":  # grouped-query attention: each KV head serves a whole group of query heads
        heads, kv_heads = model.num_heads, model.num_kv_heads
        if heads % kv_heads:
            valid = ", ".join(str(k) for k in range(1, heads + 1) if heads % k == 0)
            raise ConfigError(
                f"model.num_kv_heads {kv_heads} does not divide model.num_heads {heads} (each KV head serves a whole "
                f"group of query heads). Valid num_kv_heads: {valid}."
            )
    check_device(str(model.get("device", "auto")))


def check_device(device: str, key: str = "model.device") -> None:
    """One line for a device torch cannot parse or this machine does not have (`model.device=cuda:7`); `key` is
    how the caller's user spells the setting."""
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:<index>, got {device!r}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}={device} needs CUDA, and torch sees no CUDA device here; use {key}=cpu")
        if parsed.index is not None and parsed.index >= count:
            valid = ", ".join(f"cuda:{i}" for i in range(count))
            raise ConfigError(f"{key}={device}, but torch sees {count} CUDA device(s) here: {valid}")
    elif parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:<index>, got {device!r}")


def check_thread_count(threads: int | None) -> int | None:
    """More torch threads than CPU cores only slows a run; 100000 of them exhausts memory."""
    cores = os.cpu_count() or 1
    if threads is not None and threads > cores:
        raise ConfigError(f"threads must be <= {cores} (the CPU cores here), got {threads}")
    return threads


def check_output_names(results_dir: str, run_name: str) -> None:
    """results_dir must name a directory (not empty: that would write into the working directory; not a file)
    and run_name must fit in one file name."""
    if not results_dir.strip():
        raise ConfigError("results_dir is empty; pass a directory, e.g. results_dir=results")
    if len(run_name.encode()) > NAME_MAX:
        raise ConfigError(
            f"run_name is {len(run_name.encode())} bytes long; a file name holds at most {NAME_MAX}: "
            "choose a shorter run_name=..."
        )
    existing = Path(to_absolute_path(results_dir))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"results_dir {results_dir} is not a directory ({existing} is a file); choose another")


def parse_error_message(overrides: list[str], err: BaseException) -> str:
    """Hydra's grammar error in one line, naming the override; unquoted characters outside ASCII (which the
    grammar refuses) get the quoting that works."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and not value.isascii() and not value.startswith(("'", '"')):
            return f"cannot parse {override!r}: quote a value with characters outside ASCII, e.g. {key}='{value}'"
    return f"cannot parse the command line: {str(err).splitlines()[0]}"
