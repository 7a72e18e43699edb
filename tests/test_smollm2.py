"""Integration on the real embedded SmolLM2-135M-Instruct (loaded once, ~20 s)."""

from __future__ import annotations

import pytest
import torch

from kvbench.harness.options import RunOptions
from kvbench.harness.runner import Job, run_sample
from kvbench.methods import build_method
from kvbench.tasks import build_task

pytestmark = pytest.mark.slow


def test_full_decoding_matches_model_generate_on_smollm2(smollm2_lm):
    from kvbench.engine.generation import greedy_decode, prefill
    from kvbench.engine.measure import Stopwatch
    from tests.test_cache_decode import reference_generate

    tokenizer = smollm2_lm.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "List three colours of the rainbow and explain why the sky is blue."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stopwatch = Stopwatch(smollm2_lm.device)
    pre = prefill(smollm2_lm, ids, 0, stopwatch)
    ours = greedy_decode(smollm2_lm, pre.cache.copy(), pre.last_logits, 40, lambda n: None, stopwatch).tokens
    assert ours == reference_generate(smollm2_lm, ids, 40)


def test_niah_1k_full_retrieves_snapkv_keeps_it_streamingllm_loses_the_middle(smollm2_lm):
    task = build_task(
        {
            "name": "niah",
            "lengths": [1024],
            "depths": [25, 50, 75],
            "samples_per_cell": 2,
            "haystack": "noise",
            "max_new_tokens": 16,
        }
    )
    jobs = [
        Job(build_method({"name": "full"}), None, "full"),
        Job(build_method({"name": "snapkv"}), 128, "snapkv"),
        Job(build_method({"name": "streamingllm"}), 128, "streamingllm"),
    ]
    scores: dict[str, list[float]] = {job.key: [] for job in jobs}
    for sample in task.samples(smollm2_lm.tokenizer, smollm2_lm.max_context):
        for job, row in run_sample(smollm2_lm, sample, jobs, RunOptions(compress="prompt", seed=42, fail_fast=True)):
            scores[job.key].append(row["score"])
            if job.key != "full":
                assert row["compressed"] and row["kept_entries_compressed"] == 128 * 30 * 3
    accuracy = {key: sum(values) / len(values) for key, values in scores.items()}
    assert accuracy["full"] >= 0.8, accuracy
    assert accuracy["snapkv"] >= accuracy["full"], accuracy
    assert accuracy["streamingllm"] <= 0.2, accuracy  # sinks + recent window cannot see a mid-depth needle
    assert torch.get_num_threads() >= 1
