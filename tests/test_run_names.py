"""Run names: model=hf runs are named after the model path's last component; experiments name their own runs; a
sweep whose jobs cannot share their run directory is refused in one line before Hydra launches any job."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kvbench.config import CONF_DIR, ConfigError, check_command_line, name_part
from kvbench.harness.results import ResultsError, ResultsStore
from tests.helpers import cli


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("/models/Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct"),
        ("meta-llama/Llama-3.1-8B/", "Llama-3.1-8B"),
        ("/data/my model/config.json", "my_model"),
        ("conf/model_configs/llama31_8b.json", "llama31_8b"),
        ("smollm2_135m", "smollm2_135m"),
        ("C:\\models\\qwen", "qwen"),
        ("a:b*c", "a_b_c"),
        ("..", "model"),
    ],
)
def test_a_model_name_becomes_one_directory_name_component(name, part):
    assert name_part(name) == part


def composed_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_model_hf_runs_are_named_after_the_model_paths_last_component():
    cfg = composed_with_hydra("model=hf", "model.name_or_path=/models/Llama-3.1-8B-Instruct", "task=ruler")
    assert cfg.run_name == "ruler_Llama-3.1-8B-Instruct"
    assert cfg.hydra.run.dir.startswith("results/ruler_Llama-3.1-8B-Instruct/logs/")
    assert cfg.model.name == "/models/Llama-3.1-8B-Instruct"  # rows keep the full path
    assert composed_with_hydra().run_name == "niah_smollm2_135m"
    assert composed_with_hydra("model=llama31_8b_random").run_name == "niah_llama31_8b_random"


def test_experiments_name_their_runs_apart_from_the_default_job():
    assert composed_with_hydra("experiment=niah_sweep").run_name == "niah_sweep_smollm2_135m"
    assert composed_with_hydra("experiment=efficiency", "model=tiny_random").run_name == "efficiency_tiny_random"
    path = "model.name_or_path=/m/Qwen2.5-7B"
    assert composed_with_hydra("experiment=efficiency", "model=hf", path).run_name == "efficiency_Qwen2.5-7B"


def write_run(results, *overrides: str) -> None:
    """A run directory holding the config.yaml that `python -m kvbench *overrides` would have written."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"results_dir={results}"])
    store = ResultsStore(results / cfg.run_name)
    store.save_config(OmegaConf.to_container(cfg, resolve=True))


def test_a_sweep_into_a_run_of_another_config_is_refused_before_launch(tmp_path):
    write_run(tmp_path, "model=tiny_random")
    sweep = ["method=snapkv,window", "budget=16,32", "model=tiny_random", "task.haystack=essay"]
    with pytest.raises(ResultsError, match=r"niah_tiny_random holds a run with a different config \(task.haystack"):
        check_command_line([*sweep, f"results_dir={tmp_path}"], multirun=True)
    check_command_line([*sweep, f"results_dir={tmp_path}", "run_name=essay"], multirun=True)  # its own run


def test_sweep_jobs_that_would_share_a_run_with_different_configs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^jobs of this sweep would write .*niah_tiny_random with different config"):
        check_command_line(["model=tiny_random", "task.lengths=[256],[512]", f"results_dir={tmp_path}"], multirun=True)
    with pytest.raises(ValueError, match=r"method.window must be >= 0, got -1"):  # every job's values
        check_command_line(["model=tiny_random", "method.window=8,-1", f"results_dir={tmp_path}"], multirun=True)
    assert not tmp_path.joinpath("niah_tiny_random").exists()


def test_the_cluster_sweep_after_the_default_job_is_one_line_without_submitit_traceback(tmp_path):
    """The refusal comes before Hydra launches: no submitit traceback, no logs/multirun_* left."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    write_run(tmp_path, "model=tiny_random")
    result = cli(
        tmp_path,
        "-m",
        "hydra/launcher=submitit_local",
        "method=snapkv,pyramidkv",
        "model=tiny_random",
        "task.haystack=essay",
        f"results_dir={tmp_path}",
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("kvbench: error: ")
    assert "holds a run with a different config (task.haystack: 'noise' != 'essay')" in result.stderr
    assert not list(tmp_path.rglob("multirun_*"))
