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

import torch  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from kvbench.harness import runner  # noqa: E402
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
    calls = []
    original = runner.shared_prefill
    monkeypatch.setattr(runner, "shared_prefill", lambda *a, **k: calls.append(len(a[1])) or original(*a, **k))
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


def direct_logprob(adapter: KVBenchLM, context_ids: list[int], continuation_ids: list[int]) -> float:
    """log p(continuation | context) from one transformers forward over context + continuation (sdpa attention,
    transformers' own cache handling: nothing of kvbench)."""
    model = reference_hflm(adapter).model
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits[len(context_ids) - 1 : -1], dim=-1)
    return float(logprobs.gather(1, torch.tensor(continuation_ids)[:, None]).sum())


@pytest.mark.parametrize("args", ["method=full", "method=full,compress=context,protect_tail=3"])
def test_full_cache_loglikelihood_equals_the_models_own_forward(args):
    adapter = KVBenchLM.create_from_arg_string(f"{TINY},{args}")
    requests = [
        Instance("loglikelihood", {}, (context, continuation), 0, ("t", 0, 1))
        for context, continuation in [
            ("The sky is blue and the grass is", " green and lush"),
            ("", "Hello there, world"),
        ]
    ]
    scored = adapter.loglikelihood(requests)
    for request, (logprob, _) in zip(requests, scored, strict=True):
        context, continuation = request.args
        if context:
            context_ids, continuation_ids = adapter._encode_pair(context, continuation)
        else:  # lm-eval's empty context: the prefix token alone, nothing for kvbench to prefill
            context_ids, continuation_ids = [adapter.prefix_token_id], adapter.tok_encode(continuation, False)
        assert len(continuation_ids) >= 2
        assert abs(logprob - direct_logprob(adapter, context_ids, continuation_ids)) < 1e-4


# Fields only one kind of row has: what decoding measures, and what scoring does.
GENERATION_ONLY = {
    "max_layer_len_decode", "decode_s", "tpot_s", "output_tokens", "output_ids", "prediction",
    "peak_mem_decode_bytes", "token_match", "first_divergence", "kl_full", "fidelity_reference",
}  # fmt: skip
SCORING_ONLY = {"continuation_tokens", "score_s", "logprob", "is_greedy"}


def test_scoring_rows_carry_the_generation_rows_measurements():
    adapter = KVBenchLM.create_from_arg_string(f"{TINY},method=window,budget=4,compress=context,protect_tail=3")
    ids = adapter.tok_encode("The grass is green and the sky is blue, said the farmer to the child")
    sample = adapter._sample("s", "", 4, {})
    job = adapter._job(sample)
    # The same tokens prefilled and compressed (ids[:-3]) and fed as the protected tail (ids[-3:]); the scoring
    # context holds one more token, which scoring feeds after the tail.
    _, generated = next(runner.run_sample(adapter.lm, sample, [job], adapter.options, prompt=adapter._prompt(ids)))
    split = len(ids) - 3
    scored = list(runner.score_continuations(adapter.lm, ids + [ids[0]], [ids[1:4]], job, adapter.options, split))
    row = scored[0].row
    assert set(row) - SCORING_ONLY == set(generated) - GENERATION_ONLY
    assert row["compressed_tokens"] == generated["compressed_tokens"] == split
    assert row["prompt_tokens"] == len(ids) + 1 and row["continuation_tokens"] == 3
    for name in (
        "compressed", "budget_entries", "kept_entries_compressed", "kept_per_layer_compressed",
        "kept_fraction_compressed", "kv_bytes_compressed", "kv_bytes_logical_compressed", "bits_per_element",
        "kv_bytes_full", "kept_entries_tail", "kv_bytes_tail", "prefill_mode", "prefill_max_cache_len",
    ):  # fmt: skip
        assert row[name] == generated[name], name
    layers, kv_heads = 4, 2
    assert row["kept_entries_compressed"] == 4 * layers * kv_heads
    assert row["kept_entries_tail"] == (4 + 3) * layers * kv_heads
    # End of the row: the tail and the 3 scored tokens ([ctx[-1]] + 2 continuation tokens) appended.
    assert row["kept_entries"] == (4 + 3 + 3) * layers * kv_heads
    assert row["kv_bytes_full"] == 2 * layers * kv_heads * split * 16 * 4  # K and V, head_dim 16, fp32


def test_rows_path_resume_answers_done_requests_from_their_rows(tmp_path, monkeypatch):
    args = f"{TINY},method=snapkv,budget=4,rows_path={tmp_path}"
    requests = [
        Instance("loglikelihood", {}, ("The sky is blue and the grass is", choice), idx, ("t", 0, 1))
        for idx, choice in enumerate([" green", " red"])
    ]
    generate = [Instance("generate_until", {}, ("The sky is", {"until": ["\n"], "max_gen_toks": 4}), 0, ("g", 0, 1))]
    first = KVBenchLM.create_from_arg_string(args)
    scored, generated = first.loglikelihood(requests[:1]), first.generate_until(generate)
    rows = read_jsonl(tmp_path / "samples.jsonl")
    assert len(rows) == 2 and len({r["key"] for r in rows}) == 2

    calls = []
    original = runner.shared_prefill
    monkeypatch.setattr(runner, "shared_prefill", lambda *a, **k: calls.append(len(a[1])) or original(*a, **k))
    again = KVBenchLM.create_from_arg_string(args)
    assert again.generate_until(generate) == generated and calls == []
    both = again.loglikelihood(requests)
    assert both[0] == scored[0] and len(calls) == 1  # only " red" was scored: one prefill
    rows = read_jsonl(tmp_path / "samples.jsonl")
    assert len(rows) == 3 and len({r["key"] for r in rows}) == 3
    assert [r["logprob"] for r in rows if r["meta"]["request"] == "loglikelihood"] == [b[0] for b in both]

    with pytest.raises(AdapterArgError, match=r"^rows_path .* holds rows of another setting"):
        KVBenchLM.create_from_arg_string(f"{TINY},method=snapkv,budget=8,rows_path={tmp_path}")


def test_rows_path_resume_of_a_quantiser_with_a_base_method(tmp_path, monkeypatch):
    """kivi over snapkv: the manifest's composed label (`kivi[snapkv](k_bits=4)`) is written and read back the same,
    so the rerun is accepted and answers from its rows; another base is refused."""
    args = f"{TINY},method=kivi,method.base=snapkv,method.k_bits=4,budget=8,rows_path={tmp_path}"
    generate = [Instance("generate_until", {}, ("The sky is", {"until": ["\n"], "max_gen_toks": 4}), 0, ("g", 0, 1))]
    first = KVBenchLM.create_from_arg_string(args)
    generated = first.generate_until(generate)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["lm_eval"]["method"] == "kivi[snapkv](k_bits=4)"
    [row] = read_jsonl(tmp_path / "samples.jsonl")
    assert row["method_label"] == "kivi[snapkv](k_bits=4)" and row["status"] == "ok"

    calls = []
    original = runner.shared_prefill
    monkeypatch.setattr(runner, "shared_prefill", lambda *a, **k: calls.append(len(a[1])) or original(*a, **k))
    # The same setting with its parameters in another order and a default spelled out.
    again = KVBenchLM.create_from_arg_string(
        f"{TINY},method=kivi,method.k_bits=4,method.v_bits=2,method.base=snapkv,budget=8,rows_path={tmp_path}"
    )
    assert again.generate_until(generate) == generated and calls == []
    assert len(read_jsonl(tmp_path / "samples.jsonl")) == 1
    with pytest.raises(AdapterArgError, match=r"holds rows of another setting"):
        KVBenchLM.create_from_arg_string(
            f"{TINY},method=kivi,method.base=h2o,method.k_bits=4,budget=8,rows_path={tmp_path}"
        )
