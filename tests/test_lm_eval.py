"""The lm-eval adapter on the tiny model and the local fixture tasks (tests/fixtures/lm_eval: 3 generate_until
docs, 2 multiple-choice docs): method=full equals lm-eval's own HF wrapper, window@4 changes outputs and its
side rows keep 4 entries per head, bad args / sampling requests fail in one line, the offline CLI works."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from kvbench.harness.results import read_jsonl  # noqa: E402
from kvbench.integrations.lm_eval import AdapterArgError, KVBenchLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "lm_eval"
TASKS = ["kvbench_tiny_gen", "kvbench_tiny_mc"]
TINY = "model=tiny_random,device=cpu"


@pytest.fixture(autouse=True)
def in_fixtures(monkeypatch):
    monkeypatch.chdir(ROOT)  # the task YAMLs name their JSONL files relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@functools.cache
def task_manager() -> TaskManager:
    return TaskManager(include_path=str(FIXTURES))  # indexes every lm-eval task: built once


def evaluate(model) -> dict[str, list]:
    """Per task, each doc's raw responses (loglikelihoods or generations), in doc order."""
    out = simple_evaluate(model=model, tasks=TASKS, task_manager=task_manager(), log_samples=True)
    return {
        task: [
            [r[0] if isinstance(r, list) else r for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])
        ]
        for task, samples in out["samples"].items()
    }


def reference_hflm(adapter: KVBenchLM, **kwargs) -> HFLM:
    """lm-eval's own HF wrapper on the same weights, with transformers' sdpa attention (not kvbench's)."""
    source = adapter.lm.model
    config = source.config.__class__.from_dict(source.config.to_dict())
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(source.state_dict())
    return HFLM(pretrained=model, tokenizer=adapter.lm.tokenizer, device="cpu", batch_size=1, **kwargs)


def test_full_method_equals_lm_eval_hf_wrapper_and_window_changes_outputs(tmp_path):
    full = KVBenchLM.create_from_arg_string(f"{TINY},method=full,rows_path={tmp_path / 'full'}")
    ours = evaluate(full)
    reference = evaluate(reference_hflm(full))
    assert len(ours["kvbench_tiny_gen"]) == 3 and len(ours["kvbench_tiny_mc"]) == 2
    assert ours["kvbench_tiny_gen"] == reference["kvbench_tiny_gen"]  # generations: identical strings
    assert any(ours["kvbench_tiny_gen"])
    for doc_ours, doc_ref in zip(ours["kvbench_tiny_mc"], reference["kvbench_tiny_mc"], strict=True):
        assert len(doc_ours) == 3
        for (logprob, greedy), (ref_logprob, ref_greedy) in zip(doc_ours, doc_ref, strict=True):
            assert abs(logprob - ref_logprob) < 1e-4 and greedy == ref_greedy

    window = KVBenchLM.create_from_arg_string(f"{TINY},method=window,budget=4,rows_path={tmp_path / 'window'}")
    compressed = evaluate(window)
    mc_diff = [
        abs(a[0] - b[0])
        for doc_a, doc_b in zip(compressed["kvbench_tiny_mc"], ours["kvbench_tiny_mc"], strict=True)
        for a, b in zip(doc_a, doc_b, strict=True)
    ]
    assert min(mc_diff) > 1e-3  # every continuation is scored on the 4-entry cache
    assert compressed["kvbench_tiny_gen"] != ours["kvbench_tiny_gen"]

    rows = read_jsonl(tmp_path / "window" / "samples.jsonl")
    layers, kv_heads = 4, 2
    assert [r["meta"]["request"] for r in rows].count("loglikelihood") == 6
    assert len(rows) == 3 + 6  # 3 generations, 2 docs x 3 choices
    for row in rows:
        assert row["method"] == "window" and row["budget"] == 4 and row["compressed"] is True
        assert row["kept_per_layer_compressed"] == [4.0] * layers  # what the compression kept
        assert row["kept_entries_compressed"] == 4 * layers * kv_heads
        assert row["kept_entries"] >= row["kept_entries_compressed"]  # end of row: scored / generated tokens appended
        assert row["kv_bytes"] < row["kv_bytes_full"]
    generated = [r for r in rows if r["meta"]["request"] == "generate_until"]
    assert len(generated) == 3 and all(r["ttft_s"] > 0 for r in generated)
    assert json.loads((tmp_path / "window" / "manifest.json").read_text())["lm_eval"]["budget"] == 4
    full_rows = read_jsonl(tmp_path / "full" / "samples.jsonl")
    assert all(r["compressed"] is False for r in full_rows)


def test_loglikelihood_prefills_each_shared_context_once(monkeypatch):
    import kvbench.integrations.lm_eval as adapter_module

    calls = []
    original = adapter_module.shared_prefill
    monkeypatch.setattr(adapter_module, "shared_prefill", lambda *a, **k: calls.append(len(a[1])) or original(*a, **k))
    adapter = KVBenchLM.create_from_arg_string(f"{TINY},method=snapkv,budget=4,method.window=2")
    assert adapter.method.window == 2
    requests = [
        Instance("loglikelihood", {}, ("The sky is blue and the grass is", choice), idx, ("t", 0, 1))
        for idx, choice in enumerate([" green", " red", " blue"])
    ]
    scored = adapter.loglikelihood(requests)
    assert len(calls) == 1 and len(scored) == 3
    assert len({round(logprob, 6) for logprob, _ in scored}) == 3


def test_rolling_loglikelihood_with_full_cache_equals_hf_wrapper_over_several_windows():
    adapter = KVBenchLM.create_from_arg_string(f"{TINY},method=full,max_length=16")
    text = "The grass is green and the sky is blue. " * 6  # about 60 tokens: four 16-token windows
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0, ("t", 0, 1))]
    ours = adapter.loglikelihood_rolling(requests)
    reference = reference_hflm(adapter, max_length=16).loglikelihood_rolling(requests)
    assert abs(ours[0] - reference[0]) < 1e-4


def test_bad_adapter_args_and_sampling_fail_in_one_line():
    with pytest.raises(AdapterArgError) as err:
        KVBenchLM.create_from_arg_string(f"{TINY},methd=snapkv")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("unknown kvbench model arg 'methd'. Valid args: ")
    for name in ("allow_sampling", "budget", "compress", "max_gen_toks", "method", "model", "rows_path", "seed"):
        assert name in message
    adapter = KVBenchLM.create_from_arg_string(TINY)
    request = Instance("generate_until", {}, ("Hello", {"until": ["\n"], "do_sample": True}), 0, ("t", 0, 1))
    with pytest.raises(AdapterArgError, match=r"^task t asks for sampling .*kvbench decodes greedily"):
        adapter.generate_until([request])


def test_offline_cli_runs_a_local_task_and_rejects_bad_args(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "kvbench.lm_eval", "--model", "kvbench", "--include_path", str(FIXTURES)]
    good = subprocess.run(
        [*base, "--model_args", f"{TINY},method=snapkv,budget=8", "--tasks", "kvbench_tiny_mc"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr[-2000:]
    assert "kvbench_tiny_mc" in good.stdout and "acc" in good.stdout
    bad = subprocess.run(
        [*base, "--model_args", f"{TINY},bogus=1", "--tasks", "kvbench_tiny_mc"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert (
        bad.stderr.strip().splitlines()[-1].startswith("kvbench: error: unknown kvbench model arg 'bogus'. Valid args:")
    )
