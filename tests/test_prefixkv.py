"""PrefixKV's allocator: budgets sum to L * B exactly, calibration is deterministic and cached, a missing
calibration fails in one line with the command that creates it, and the base scorer keeps what it is given."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.methods import build_method
from kvbench.methods.prefixkv import allocate, calibration_path, importance_cdf, keep_fraction, write_calibration
from tests.helpers import needle_sample

TEXT = " ".join(f"Line {i}: the quick brown fox number {i * 7 % 13} jumps over the lazy dog." for i in range(60))


def test_importance_cdf_by_hand():
    cdf = importance_cdf(torch.tensor([1.0, 3.0, 0.0, 4.0]), grid=4)  # sorted 4, 3, 1, 0 of 8
    assert cdf.tolist() == [0.0, 0.5, 0.875, 1.0, 1.0]
    # threshold 0.5 is reached at a quarter of the tokens; 0.6875 halfway between 1/4 and 2/4
    assert keep_fraction(cdf[None], 0.5).tolist() == [0.25]
    assert keep_fraction(cdf[None], 0.6875).tolist() == [0.375]


@pytest.mark.parametrize(("budget", "prompt_len", "floor"), [(32, 500, 8), (7, 40, 4), (100, 120, 32), (5, 1000, 1)])
def test_allocations_sum_to_the_total_exactly(budget, prompt_len, floor):
    generator = torch.Generator().manual_seed(budget)
    curves = []
    for layer in range(12):  # layers from flat (uniform importance) to peaked
        importance = torch.rand(300, generator=generator) ** (1 + layer)
        curves.append(importance_cdf(importance))
    budgets = allocate(torch.stack(curves), budget, prompt_len, floor)
    assert sum(budgets) == 12 * budget
    assert all(min(floor, budget) <= b <= prompt_len for b in budgets)
    if budget * 3 < prompt_len:  # peaked layers need fewer tokens for the same share of importance
        assert budgets[-1] < budgets[0]


def test_calibration_is_deterministic_cached_and_used(tiny_lm, tmp_path):
    method = build_method({"name": "prefixkv", "calibration_samples": 2, "calibration_tokens": 64})
    sample = needle_sample(max_new_tokens=6)
    job = Job(method, 40, "prefixkv")
    with pytest.raises(
        FileNotFoundError, match=r"python -m kvbench.calibrate prefixkv --model tiny_random --samples 2"
    ):
        list(
            run_sample(
                tiny_lm, sample, [job], RunOptions(compress="prompt", seed=0, fail_fast=True, cache_dir=tmp_path)
            )
        )
    path = write_calibration(tiny_lm, tmp_path, TEXT, "test text", 2, 64)
    first = path.read_text()
    assert path == calibration_path(tiny_lm, tmp_path, 2, 64)
    assert write_calibration(tiny_lm, tmp_path, TEXT, "test text", 2, 64).read_text() == first
    curves = json.loads(first)["cdf"]
    assert len(curves) == tiny_lm.config.num_hidden_layers and all(c[0] == 0 and abs(c[-1] - 1) < 1e-9 for c in curves)
    [(_, row)] = list(
        run_sample(tiny_lm, sample, [job], RunOptions(compress="prompt", seed=0, fail_fast=True, cache_dir=tmp_path))
    )
    budgets = row["method_record"]["prefixkv_layer_budgets"]
    assert sum(budgets) == 40 * tiny_lm.config.num_hidden_layers
    assert row["kept_per_layer_compressed"] == budgets


def test_calibration_command_writes_the_file(tmp_path, tiny_lm):
    """The documented command, run as a new process (as a user runs it): `python -m` of the method module
    itself would register the method twice."""
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    args = ["--model", "tiny_random", "--text", str(text_file), "--samples", "2", "--tokens", "64"]
    command = [sys.executable, "-m", "kvbench.calibrate", "prefixkv", *args, "--cache-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    path = calibration_path(tiny_lm, tmp_path, 2, 64)
    assert done.stdout.strip().endswith(str(path)) and path.exists()


def test_prefixkv_refuses_a_non_scorer():
    with pytest.raises(ValueError, match=r"^prefixkv cannot wrap 'tova' \(not a scoring method\)"):
        build_method({"name": "prefixkv", "base": "tova"})
