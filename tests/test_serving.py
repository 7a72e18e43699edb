"""experiment=serving: the capacity formula, the serving settings' one-line refusals, and a run on the tiny model
that writes its rows, tables and figures, resumes without recomputing, and measures the same compressed bytes as
the ordinary rows of the same samples."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest

from kvbench import api, app
from kvbench.api import build_method
from kvbench.harness.options import RunOptions
from kvbench.harness.sample import Sample
from kvbench.harness.serving import (
    GIB,
    ServingSettings,
    capacity,
    check_batches_fit,
    check_memory,
    check_serving_batches,
    kv_share,
    prefill_samples,
    samples_by_context,
    time_batch,
    weight_bytes,
)
from kvbench.report.__main__ import main as report_main
from tests.helpers import TINY, cli, composed

SERVING = [
    "experiment=serving",
    "task.lengths=[96,160]",
    "task.depths=[50]",
    "task.samples_per_cell=2",
    "task.max_new_tokens=6",
    "budget=[16]",
    "method.window=4",
    "serving.memory_gib=[0.015,0.02]",
    "serving.activation_reserve_gib=0.001",
    "serving.batch_sizes=[1,3]",
    "serving.samples_per_context=2",
    "serving.decode_tokens=4",
    "serving.max_batch=400",
]


def test_capacity_is_the_largest_batch_that_fits_on_random_shapes():
    rng = random.Random(0)
    for _ in range(200):
        layers, heads, dim, tokens = rng.randint(1, 80), rng.randint(1, 16), rng.choice([64, 128]), rng.randint(1, 9999)
        per_sequence = 2 * layers * heads * dim * tokens * rng.choice([1, 2, 4])  # K and V, element bytes
        weights, reserve = rng.randint(0, 10 * GIB), rng.randint(0, GIB)
        memory = weights + reserve + rng.randint(0, 40 * GIB)
        fits = capacity(memory, weights, reserve, per_sequence)
        assert weights + reserve + fits * per_sequence <= memory < weights + reserve + (fits + 1) * per_sequence
    assert capacity(GIB, 2 * GIB, 0, 10) == 0  # nothing left after the weights: no sequence


def test_kv_share_of_decode_traffic():
    assert kv_share(1, 1.0, 1) == 0.5
    assert kv_share(8, 3.0, 0) == 1.0
    assert kv_share(4, 250.0, 3000) == pytest.approx(1000 / 4000)


def test_weight_bytes_count_tied_tensors_once(tiny_lm):
    unique = {id(t): t.numel() * t.element_size() for t in [*tiny_lm.model.parameters(), *tiny_lm.model.buffers()]}
    assert weight_bytes(tiny_lm.model) == sum(unique.values())


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"memory_gib": [0]}, "serving.memory_gib must hold numbers > 0 (GiB), got 0"),
        ({"memory_gib": "a lot"}, "serving.memory_gib must hold numbers > 0 (GiB), got 'a lot'"),
        ({"activation_reserve_gib": -1}, "serving.activation_reserve_gib must be a number >= 0 (GiB), got -1"),
        ({"batch_sizes": [0]}, "serving.batch_sizes must be >= 1"),
        ({"batch_sizes": [2, 300]}, "serving.batch_sizes holds 300, above serving.max_batch=64"),
        ({"decode_tokens": 1}, "serving.decode_tokens must be >= 2"),
        ({"memory": 3}, "serving.memory is not a serving setting"),
        ({"samples_per_context": 80}, "serving.samples_per_context=80 is above serving.max_batch=64"),
    ],
)
def test_bad_serving_settings_are_one_line(node, message):
    with pytest.raises(ValueError) as err:
        ServingSettings.parse(node)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_memory_below_the_weights_and_batch_above_capacity_are_refused():
    settings = ServingSettings.parse({"memory_gib": [1.0, 0.5], "activation_reserve_gib": 0.25})
    with pytest.raises(ValueError, match=r"^serving.memory_gib=0.5 cannot hold the weights \(0.300 GiB\)"):
        check_memory(settings, int(0.3 * GIB))
    check_memory(settings, int(0.2 * GIB))
    with pytest.raises(ValueError, match=r"^batch size 32 is above the capacity of snapkv: 20 sequences"):
        check_batches_fit([1, 8, 32], 20, "snapkv")
    check_batches_fit([1, 8, 20], 20, "snapkv")


def test_samples_by_context_keeps_the_first_of_each_length():
    samples = [
        Sample(f"s{i}", "c", "q", "", [], "string_match_all", 4, meta={"length": 100 * (i % 2 + 1)}) for i in range(7)
    ]
    groups = samples_by_context(samples, 2)
    assert {length: [s.sample_id for s in group] for length, group in groups.items()} == {
        100: ["s0", "s2"],
        200: ["s1", "s3"],
    }


def test_cli_refuses_a_memory_budget_below_the_weights_before_any_row(tmp_path):
    result = cli(tmp_path, *TINY, *SERVING, "serving.memory_gib=[0.001]", "results_dir=out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: serving.memory_gib=0.001 cannot hold the weights")
    assert not (tmp_path / "out").exists()


def test_serving_refuses_what_batched_decode_refuses_in_one_line(tiny_lm):
    settings = ServingSettings.parse({"batch_sizes": [1, 4], "samples_per_context": 2})
    methods = [build_method("full")]
    with pytest.raises(ValueError) as err:
        check_serving_batches(methods, RunOptions(), settings, scenario="conversation")
    message = str(err.value)
    assert message.startswith("experiment=serving decodes in batches: batch_size=4 cannot run the conversation")
    assert "\n" not in message
    with pytest.raises(ValueError, match=r"^experiment=serving decodes in batches: batch_size=4 cannot run with pre"):
        check_serving_batches(methods, RunOptions(prefill_chunk=8), settings)
    check_serving_batches(methods, RunOptions(), settings, tiny_lm)


def test_serving_run_writes_rows_tables_and_figures_and_resumes(tmp_path, tiny_lm):
    cfg = composed(tmp_path, *SERVING, task=[])
    out = app.run(cfg)
    run_dir = out["run_dir"]
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    serving = [row for row in rows if row.get("row_type") == "serving"]
    ordinary = [row for row in rows if row.get("row_type") != "serving"]
    # 2 contexts x (full, snapkv@16) x (2 fixed batch sizes + 2 memory budgets)
    assert len(serving) == 16 and len(ordinary) == 8
    assert sorted({row["context"] for row in serving}) == [96, 160]
    for row in serving:
        assert row["distinct_samples"] == 2 and row["weights_bytes"] == weight_bytes(tiny_lm.model)
        if row["kind"] == "batch":
            assert row["tokens_per_s"] > 0 and row["decode_tokens"] == 4 and row["batch_attention"] == "stacked"
        else:
            reserve = int(0.001 * GIB)
            assert row["capacity"] == capacity(int(row["memory_gib"] * GIB), row["weights_bytes"], reserve,
                                               row["kv_bytes_per_seq"])  # fmt: skip
            assert row["timed"] and row["batch_size"] == row["capacity"] > 0
    # The serving phase prepares caches as the rows do: the same bytes right after compression for the same samples.
    for row in serving:
        same = [
            one["kv_bytes_compressed"]
            for one in ordinary
            if one["sample_id"] in row["sample_ids"] and one["method_label"] == row["method_label"]
        ]
        assert row["kv_bytes_compressed_per_seq"] == pytest.approx(sum(same) / len(same))
    snapkv = next(row for row in serving if row["method"] == "snapkv" and row["kind"] == "capacity")
    full = next(
        row for row in serving if row["method"] == "full" and row["kind"] == "capacity"
        and row["context"] == snapkv["context"] and row["memory_gib"] == snapkv["memory_gib"]
    )  # fmt: skip
    assert snapkv["kv_bytes_per_seq"] < full["kv_bytes_per_seq"] and snapkv["capacity"] > full["capacity"]
    for name in ("serving.csv", "serving.md", "serving_batches.csv", "serving_batches.md"):
        assert (run_dir / name).stat().st_size > 0
    for stem in ("throughput_vs_memory", "capacity_vs_context"):
        assert (run_dir / f"{stem}.png").exists() and (run_dir / f"{stem}.pdf").exists()
    batches = pd.read_csv(run_dir / "serving_batches.csv")
    assert (batches.loc[batches["method_label"] == "full", "x_full_same_batch"] == 1.0).all()
    table = (run_dir / "serving.csv").read_text().splitlines()
    assert table[0].startswith("model,context,memory_gib,method_label") and len(table) == 1 + 8
    # A rerun recomputes nothing: every serving row is stored.
    app.run(composed(tmp_path, *SERVING, task=[]))
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == len(rows)
    # The cross-run report reads the serving rows beside the accuracy rows.
    report_main([str(run_dir), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "serving.csv").read_text() == (run_dir / "serving.csv").read_text()


def test_timed_batches_of_a_decode_time_evictor_and_a_quantiser_attend_per_row(tiny_lm):
    sample = Sample("s", " ".join(["alpha beta gamma"] * 40), "Which word?", "Answer:", [], "string_match_all", 6)
    options = RunOptions(budgets=(16,))
    for config, expected_kept in (
        ({"name": "streamingllm"}, 16),
        ({"name": "kivi", "group_size": 8, "residual_length": 8}, None),
    ):
        method = build_method(config)
        jobs = [job for job in api.plan(tiny_lm, sample, [method], options) if job.method is method]
        prefilled = prefill_samples(tiny_lm, [sample], jobs, options)
        one = time_batch(tiny_lm, prefilled, jobs[0], options, batch=3, decode_tokens=5)
        assert one.attention == "per_row" and one.padding == 0.0 and one.steps == 4 and one.tokens_per_s > 0
        if expected_kept is not None:  # makes room before every forward: a sequence never holds more than its budget
            assert one.end_bytes == [tiny_lm.kv_bytes_per_token * expected_kept] * 3
        else:  # kivi quantises as it decodes: less than the full cache of the same tokens
            assert max(one.end_bytes) < tiny_lm.full_kv_bytes(prefilled[0].split + 5)
