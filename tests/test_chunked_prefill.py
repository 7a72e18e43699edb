"""Chunked prefill with compression (`prefill_chunk`) and the efficiency benchmark (`experiment=efficiency`):
equality with the one-shot prefill when nothing is evicted, the budget + chunk bound at every attention call of
the prefill, the exact slots StreamingLLM keeps, rows and resume keys, one-line errors, the synthetic task's
exact lengths, random-weight models from real configs, and the report files."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoConfig, AutoModelForCausalLM

from kvbench.app import run
from kvbench.config import CONF_DIR
from kvbench.engine.generation import prefill
from kvbench.engine.measure import Stopwatch
from kvbench.engine.models import load_model
from kvbench.harness.chunked import check_chunked_methods, chunked_methods, chunked_prefill
from kvbench.harness.options import RunOptions
from kvbench.harness.results import ResultsStore
from kvbench.harness.runner import Job, run_sample
from kvbench.harness.sample import Sample
from kvbench.methods import build_method
from kvbench.methods.scoring import pyramid_layer_budgets
from kvbench.report.efficiency import efficiency_table
from kvbench.tasks.synthetic_length import SyntheticLength
from tests.helpers import sky_sample

CHUNKED = ["streamingllm", "window", "snapkv", "pyramidkv", "h2o"]
TINY = ["model=tiny_random", "model.device=cpu", "progress=false"]


def noise_sample(repeats: int = 40, max_new_tokens: int = 6) -> Sample:
    return sky_sample(repeats, max_new_tokens, "The grass is green. The sky is blue. The sun is yellow.", "noise")


def prompt_ids(lm, sample: Sample) -> list[int]:
    from kvbench.harness.prompt import build_prompt

    return build_prompt(lm.tokenizer, sample).input_ids


class LengthProbe:
    """Wraps a method's chunked-prefill observer and records every layer's length at each attention call (the
    moment a chunk's keys have just been appended, i.e. the largest the cache gets)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.lengths: list[tuple[int, int]] = []

    def on_attention(self, layer_idx, query, layer, query_positions, scaling) -> None:
        self.lengths.append((layer_idx, int(layer.get_seq_length())))
        if self.inner is not None:
            self.inner.on_attention(layer_idx, query, layer, query_positions, scaling)


def composed(tmp_path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*TINY, f"results_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("name", ["full", "streamingllm", "snapkv", "h2o"])
def test_chunked_prefill_with_budget_at_least_prompt_equals_oneshot_full_prefill(tiny_lm, name):
    sample = noise_sample()
    method = build_method({"name": name})
    budget = None if name == "full" else 100_000  # h2o/streamingllm cap decoding too: leave room for it
    job = Job(method, budget, name)
    full = Job(build_method({"name": "full"}), None, "full")
    ((_, oneshot),) = [
        r for r in run_sample(tiny_lm, sample, [full], RunOptions(compress="prompt", seed=0, fail_fast=True))
    ]
    ((_, chunked),) = list(
        run_sample(tiny_lm, sample, [job], RunOptions(compress="prompt", seed=0, fail_fast=True, prefill_chunk=37))
    )
    assert chunked["prefill_mode"] == "chunked:37" and chunked["prefill_compressions"] == 0
    assert chunked["compressed"] is False
    assert chunked["output_ids"] == oneshot["output_ids"]  # token for token
    assert chunked["kv_bytes_compressed"] == oneshot["kv_bytes_full"] == chunked["kv_bytes_full"]
    assert chunked["prefill_max_cache_len"] == chunked["prompt_tokens"]


def test_chunked_full_prefill_matches_oneshot_cache_and_logits(tiny_lm):
    ids = prompt_ids(tiny_lm, noise_sample())
    stopwatch = Stopwatch(tiny_lm.device)
    oneshot = prefill(tiny_lm, ids, 0, stopwatch)
    chunked = chunked_prefill(tiny_lm, ids, 50, build_method({"name": "full"}), None, stopwatch)
    assert torch.allclose(chunked.last_logits, oneshot.last_logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(chunked.cache.layers, oneshot.cache.layers, strict=True):
        assert torch.equal(a.positions, b.positions)
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    assert chunked.kv_bytes_full == oneshot.cache.kv_bytes()


@pytest.mark.parametrize("name", CHUNKED)
def test_cache_never_exceeds_budget_plus_chunk_during_the_prefill(tiny_lm, name):
    budget, chunk = 64, 40
    method = build_method({"name": name})
    probe = LengthProbe(method.chunked_prefill_observer())
    method.chunked_prefill_observer = lambda: probe  # the instance attribute wins over the class method
    ids = prompt_ids(tiny_lm, noise_sample())
    assert len(ids) > 5 * (budget + chunk)
    pre = chunked_prefill(tiny_lm, ids, chunk, method, budget, Stopwatch(tiny_lm.device))
    layers = tiny_lm.config.num_hidden_layers
    assert len(probe.lengths) == layers * -(-len(ids) // chunk)  # every chunk of every layer was observed
    if name == "pyramidkv":
        # per layer: its current PyramidKV budget + chunk; on average over layers: budget + chunk
        most = max(max(pyramid_layer_budgets(budget, 32, seen, layers, 20.0)) for seen in range(1, len(ids) + 1))
        assert max(length for _, length in probe.lengths) <= most + chunk
        for step in range(len(probe.lengths) // layers):
            lengths = [length for _, length in probe.lengths[step * layers : (step + 1) * layers]]
            assert sum(lengths) <= layers * (budget + chunk)
        final = pyramid_layer_budgets(budget, 32, len(ids), layers, 20.0)
        assert [layer.get_seq_length() for layer in pre.cache.layers] == final
    else:
        assert max(length for _, length in probe.lengths) == budget + chunk  # the bound, reached
        assert all(layer.get_seq_length() == budget for layer in pre.cache.layers)
    assert pre.max_cache_len <= max(length for _, length in probe.lengths)
    assert pre.compressions >= len(ids) // chunk - 2
    assert pre.cache.seen_tokens == len(ids)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "h2o", "streamingllm"])
def test_one_chunk_covering_the_prompt_keeps_what_the_oneshot_prefill_keeps(tiny_lm, name):
    sample, budget = noise_sample(repeats=20), 48
    jobs = [Job(build_method({"name": name}), budget, name)]
    ((_, oneshot),) = list(run_sample(tiny_lm, sample, jobs, RunOptions(compress="prompt", seed=0, fail_fast=True)))
    ((_, chunked),) = list(
        run_sample(tiny_lm, sample, jobs, RunOptions(compress="prompt", seed=0, fail_fast=True, prefill_chunk=10_000))
    )
    assert chunked["prefill_compressions"] == 1
    assert chunked["kept_per_layer_compressed"] == oneshot["kept_per_layer_compressed"]
    assert chunked["output_ids"] == oneshot["output_ids"]


def test_streamingllm_chunked_keeps_exactly_the_sinks_and_the_most_recent_slots(tiny_lm):
    budget, chunk, sinks = 40, 24, 4
    ids = prompt_ids(tiny_lm, noise_sample())
    method = build_method({"name": "streamingllm", "n_sink": sinks})
    pre = chunked_prefill(tiny_lm, ids, chunk, method, budget, Stopwatch(tiny_lm.device))
    total = len(ids)
    expected = list(range(sinks)) + list(range(total - (budget - sinks), total))
    for layer in pre.cache.layers:
        assert (layer.positions == torch.tensor(expected)).all()
    window = chunked_prefill(tiny_lm, ids, chunk, build_method({"name": "window"}), budget, Stopwatch(tiny_lm.device))
    assert window.cache.layers[0].positions[0].tolist() == list(range(total - budget, total))


def test_rows_record_the_prefill_mode_and_chunked_rows_do_not_resume_oneshot_ones(tiny_lm, tmp_path):
    small = ["task.lengths=[512]", "task.depths=[50]", "task.max_new_tokens=4", "method=snapkv", "budget=[64]"]
    oneshot = run(composed(tmp_path, *small))
    chunked = run(composed(tmp_path, *small, "prefill_chunk=96"))
    assert chunked["rows_run"] == oneshot["rows_run"] == 2  # snapkv + full, not skipped as already done
    rows = ResultsStore(chunked["run_dir"]).rows()
    modes = {(row["method"], row["prefill_mode"]) for row in rows}
    assert modes == {("snapkv", "oneshot"), ("full", "oneshot"), ("snapkv", "chunked:96"), ("full", "chunked:96")}
    for row in rows:
        if row["prefill_mode"] == "chunked:96" and row["method"] == "snapkv":
            assert row["prefill_max_cache_len"] <= 64 + 96 and row["prefill_compressions"] >= 4
            assert row["kept_entries_compressed"] == 64 * 4 * 2
        if row["prefill_mode"] == "oneshot":
            assert row["prefill_max_cache_len"] == row["compressed_tokens"]
    summary = chunked["summary"]
    assert set(summary["prefill_mode"]) == {"oneshot", "chunked:96"}  # not averaged together


def test_methods_without_chunked_support_fail_in_one_line(tmp_path):
    assert chunked_methods() == sorted(CHUNKED)
    with pytest.raises(ValueError) as info:
        check_chunked_methods(64, [build_method({"name": "tova"})])
    message = str(info.value)
    assert "\n" not in message and "method tova does not support chunked prefill" in message
    assert "h2o, pyramidkv, snapkv, streamingllm, window" in message
    check_chunked_methods(64, [build_method({"name": "full"}), build_method({"name": "snapkv"})])
    with pytest.raises(ValueError, match="method dapq does not support"):  # a SnapKV subclass does not inherit it
        run(composed(tmp_path, "method=dapq", "prefill_chunk=64"))
    with pytest.raises(ValueError, match="prefill_chunk must be a positive int"):
        run(composed(tmp_path, "prefill_chunk=0"))


@pytest.mark.parametrize("content", ["noise", "random"])
def test_synthetic_length_prompts_have_exact_lengths(tiny_lm, content):
    task = SyntheticLength(lengths=[300, 1000], max_new_tokens=8, content=content)
    samples = list(task.samples(tiny_lm.tokenizer, tiny_lm.max_context))
    assert [len(prompt_ids(tiny_lm, s)) for s in samples] == [292, 992]
    assert all(s.meta["ignore_eos"] and s.metric == "none" for s in samples)
    with pytest.raises(ValueError, match="unknown content 'words'"):
        SyntheticLength(content="words")


def test_efficiency_experiment_runs_end_to_end_on_the_tiny_model(tmp_path):
    overrides = ["experiment=efficiency", "task.lengths=[160,320]", "task.max_new_tokens=5", "budget=[48]"]
    result = run(composed(tmp_path, *overrides, "method=h2o", "prefill_chunk=32"))
    run_dir = result["run_dir"]
    assert run_dir.name == "efficiency_tiny_random"
    for name in ("efficiency.csv", "efficiency.md", "memory_vs_context.png", "memory_vs_context.pdf"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "tpot_vs_context.png").exists() and (run_dir / "tpot_vs_context.pdf").exists()
    rows = ResultsStore(run_dir).rows()
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows)
    assert all(row["output_tokens"] == 5 and row["score"] is None for row in rows)  # EOS ignored, unscored
    assert sorted(row["prompt_tokens"] for row in rows) == [155, 155, 315, 315]
    table = efficiency_table(rows)
    assert set(table["context"]) == {160, 320} and set(table["prefill_mode"]) == {"chunked:32"}
    h2o = table[table["method"] == "h2o"]
    assert (h2o["prefill_max_cache_len"] <= 48 + 32).all()
    assert (h2o["kv_mib"] < h2o["kv_full_mib"]).all()
    assert "| model | method | budget | prefill_mode | context |" in (run_dir / "efficiency.md").read_text()


def test_random_weight_model_from_a_config_json(tmp_path):
    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": 60_000,  # larger than the SmolLM2 tokenizer used with config_only: ids still decode
        "max_position_embeddings": 2048,
        "rope_theta": 10_000.0,
    }
    path = tmp_path / "tiny_config.json"
    path.write_text(json.dumps(config))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=hf", f"model.name_or_path={path}", "model.config_only=true"])
    cfg.model.device = "cpu"
    lm = load_model(cfg.model)
    assert lm.config.vocab_size == 60_000 and lm.config.num_key_value_heads == 2
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in lm.model.parameters())
    task = SyntheticLength(lengths=[200], max_new_tokens=4)
    jobs = [Job(build_method({"name": "snapkv"}), 32, "snapkv")]
    (sample,) = task.samples(lm.tokenizer, lm.max_context)
    ((_, row),) = list(
        run_sample(lm, sample, jobs, RunOptions(compress="prompt", seed=0, fail_fast=True, prefill_chunk=64))
    )
    assert (
        row["output_tokens"] == 4
        and row["kept_entries_compressed"] == 32 * 2 * 2
        and row["prefill_max_cache_len"] <= 96
    )


@pytest.mark.parametrize(
    ("name", "params", "kv_bytes_per_token"),
    [("llama31_8b", 8_030_261_248, 32 * 8 * 128 * 2 * 2), ("qwen25_7b", 7_615_616_512, 28 * 4 * 128 * 2 * 2)],
)
def test_shipped_model_configs_have_the_published_sizes(name, params, kv_bytes_per_token):
    config = AutoConfig.for_model(**json.loads((CONF_DIR / "model_configs" / f"{name}.json").read_text()))
    with torch.device("meta"):  # shapes only: no memory
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == params
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert config.num_hidden_layers * config.num_key_value_heads * head_dim * 2 * 2 == kv_bytes_per_token
    assert config.max_position_embeddings == 131072
