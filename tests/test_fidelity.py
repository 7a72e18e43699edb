"""Fidelity metrics (kvbench.harness.fidelity): hand-checked token match / first divergence / KL, and on the tiny model:
the full row and an uncompressed row match the reference exactly, a compressing row has KL > 0, the reference is
the same whether or not the sweep has a full job, chunked prefill and reference failures."""

from __future__ import annotations

import math

import pytest
import torch

from kvbench.harness import fidelity
from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.methods.full import Full
from kvbench.methods.snapkv import SnapKV
from tests.helpers import needle_sample


@pytest.mark.parametrize(
    ("tokens", "match", "diverge"),
    [
        ([1, 2, 3, 4], 1.0, None),
        ([1, 2, 9, 4], 0.75, 2),
        ([1, 2], 0.5, 2),  # stopped early: the missing tokens are mismatches
        ([1, 2, 3, 4, 5, 6], 4 / 6, 4),  # ran on: counted over the longer output
        ([7, 2, 3, 4], 0.75, 0),
        ([], 0.0, 0),
    ],
)
def test_token_match_and_first_divergence_by_hand(tokens, match, diverge):
    reference = [1, 2, 3, 4]
    assert fidelity.token_match(reference, tokens) == pytest.approx(match)
    assert fidelity.first_divergence(reference, tokens) == diverge


def test_kl_by_hand_and_nonnegative():
    p = torch.tensor([[0.5, 0.5], [0.25, 0.75]]).log()
    q = torch.tensor([[0.9, 0.1], [0.25, 0.75]]).log()
    expected = (0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1) + 0.0) / 2
    assert fidelity.mean_kl(p, q) == pytest.approx(expected, rel=1e-6)
    assert fidelity.mean_kl(p, p) == 0.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.log_softmax(torch.randn(3, 50, generator=generator), -1)
        b = torch.log_softmax(torch.randn(3, 50, generator=generator), -1)
        assert fidelity.mean_kl(a, b) > 0


def rows_by_key(tiny_lm, jobs, **kwargs):
    sample = needle_sample(max_new_tokens=8)
    return {
        job.key: row for job, row in run_sample(tiny_lm, sample, jobs, RunOptions(compress="prompt", seed=0, **kwargs))
    }


def sweep_jobs():
    snapkv = SnapKV()
    return [Job(snapkv, 16, "snapkv@16"), Job(snapkv, 100000, "snapkv@all"), Job(Full(), None, "full")]


def test_full_row_and_uncompressed_row_match_the_reference_exactly_and_compression_has_kl(tiny_lm):
    rows = rows_by_key(tiny_lm, sweep_jobs())
    assert all(row["status"] == "ok" for row in rows.values())
    full, same, small = rows["full"], rows["snapkv@all"], rows["snapkv@16"]
    assert full["fidelity_reference"] == "full_row"
    assert (full["token_match"], full["first_divergence"], full["kl_full"]) == (1.0, None, 0.0)
    # A cache that was not compressed goes through the row's own probe and still gets exactly the reference.
    assert not same["compressed"]
    assert (same["token_match"], same["first_divergence"], same["kl_full"]) == (1.0, None, 0.0)
    assert small["compressed"] and small["kl_full"] > 0
    expected = fidelity.token_match(full["output_ids"], small["output_ids"])
    assert small["token_match"] == expected
    assert small["first_divergence"] == fidelity.first_divergence(full["output_ids"], small["output_ids"])


def test_without_a_full_job_the_reference_is_decoded_once_with_the_same_numbers(tiny_lm):
    with_full = rows_by_key(tiny_lm, sweep_jobs())
    without = rows_by_key(tiny_lm, sweep_jobs()[:2])
    assert set(without) == {"snapkv@16", "snapkv@all"}
    for key, row in without.items():
        assert row["fidelity_reference"] == "decoded"
        for field in ("token_match", "first_divergence", "kl_full"):
            assert row[field] == with_full[key][field], (key, field)


def test_chunked_prefill_rows_get_fidelity(tiny_lm):
    rows = rows_by_key(tiny_lm, sweep_jobs(), prefill_chunk=32)
    full, small = rows["full"], rows["snapkv@16"]
    assert (full["token_match"], full["first_divergence"], full["kl_full"]) == (1.0, None, 0.0)
    assert small["prefill_mode"] == "chunked:32" and small["kl_full"] > 0
    assert rows["snapkv@all"]["kl_full"] == 0.0  # never compressed: the same chunked forwards as the full job
    without = rows_by_key(tiny_lm, sweep_jobs()[:1], prefill_chunk=32)
    assert without["snapkv@16"]["kl_full"] == small["kl_full"]


def test_a_reference_that_cannot_be_built_leaves_null_fields_not_error_rows(tiny_lm, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no reference")

    monkeypatch.setattr(fidelity, "build_reference", broken)
    rows = rows_by_key(tiny_lm, sweep_jobs())
    assert all(row["status"] == "ok" for row in rows.values())
    for row in rows.values():
        assert all(row[field] is None for field in fidelity.FIELDS)
    with pytest.raises(RuntimeError, match="no reference"):
        rows_by_key(tiny_lm, sweep_jobs(), fail_fast=True)


def composed(tmp_path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from kvbench.config import CONF_DIR

    base = ["model=tiny_random", "model.device=cpu", "progress=false", "task.lengths=[256]", "task.depths=[50]"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*base, "task.max_new_tokens=4", f"results_dir={tmp_path}", *overrides])


def test_summary_and_figure_on_a_bytes_axis(tmp_path):
    from kvbench.app import run

    result = run(composed(tmp_path, "budget=[64,16,32]", "x_axis=kv_mib"))
    summary = result["summary"]
    assert {"token_match", "kl_full"} <= set(summary.columns)
    full = summary[summary["budget"] == "full"].iloc[0]
    assert (full["token_match"], full["kl_full"]) == (1.0, 0.0)
    snapkv = summary[summary["budget"] != "full"]
    assert list(snapkv["kv_mib"]) == sorted(snapkv["kv_mib"])  # ordered by bytes within the method
    assert list(snapkv["budget"]) == ["16", "32", "64"]
    assert (result["run_dir"] / "accuracy_vs_kv_mib.png").exists()


def test_bad_x_axis_is_one_line_before_model_work(tmp_path):
    from kvbench.config import ConfigError, validate

    with pytest.raises(ConfigError, match="unknown x_axis 'bytes'. Valid x axes: budget, kv_mib, bits_per_element"):
        validate(composed(tmp_path, "x_axis=bytes"))
