"""Shared fixtures: the tiny random Llama (fast) and the real embedded SmolLM2 (loaded once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kvbench.models import LoadedModel, load_model

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def model_config(name: str, **overrides):
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    cfg.device = "cpu"
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.fixture(scope="session")
def tiny_lm() -> LoadedModel:
    return load_model(model_config("tiny_random"))


@pytest.fixture(scope="session")
def smollm2_lm() -> LoadedModel:
    return load_model(model_config("smollm2_135m"))
