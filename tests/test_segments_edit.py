"""Segment reuse (task=segments), edited contexts (task=edit, PIE) and the shared RoPE re-rotation helper."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from kvbench import api
from kvbench.engine import rope
from kvbench.engine.attention import ATTN_IMPLEMENTATION
from kvbench.engine.generation import cache_argument, forward_tokens, prefill
from kvbench.engine.measure import Stopwatch
from kvbench.harness.sample import Sample
from kvbench.methods.base import CompressionContext
from kvbench.methods.streamingllm import StreamingLLM
from kvbench.scenarios.edit import Edit, edit_builders, edit_layout
from kvbench.scenarios.segments import SegmentStore, reuse_builder, segment_layout
from kvbench.tasks.edit import EditTask
from kvbench.tasks.segments import Segments
from tests.helpers import TINY, cli

ROPE_PARAMETERS = [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
]


def rotary_for(parameters: dict) -> LlamaRotaryEmbedding:
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=256)
    config.rope_parameters = dict(parameters)
    return LlamaRotaryEmbedding(config)


# -- the shared re-rotation helper --------------------------------------------------------------------------------


@pytest.mark.parametrize("parameters", ROPE_PARAMETERS, ids=lambda p: p["rope_type"])
def test_rerotating_a_rope_key_by_delta_equals_rope_at_the_shifted_position(parameters):
    rotary = rotary_for(parameters)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 8, 16, generator=generator)  # [Hkv, n, d], pre-RoPE
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]])
    delta = torch.tensor([[3, -1, 0, 5, -4, 2, 1, -7], [-7, 0, 2, 1, 4, -2, 6, 0]])
    post = rope.rope_keys(keys, positions, rotary)  # RoPE(p) k, with the variant's inv_freq and attention scaling
    moved = rope.rotate_keys(post[None], delta, rotary.inv_freq)[0]
    expected = rope.rope_keys(keys, positions + delta, rotary)
    assert torch.allclose(moved, expected, atol=1e-6, rtol=0)
    assert torch.equal(rope.rerotate(post[None], positions, positions + delta, rotary.inv_freq)[0], moved)
    assert not torch.allclose(post, expected, atol=1e-3)  # the shift really moved the keys


def test_rerotation_of_partial_rotary_keys_leaves_the_pass_through_dims():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))  # 8 rotary dims of 16
    keys = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(1))
    delta = torch.full((2, 5), 3)
    moved = rope.rotate_keys(keys, delta, inv_freq)
    assert torch.equal(moved[..., 8:], keys[..., 8:])
    angles = 3 * inv_freq
    cos, sin = torch.cat([angles, angles]).cos(), torch.cat([angles, angles]).sin()
    assert torch.allclose(moved[..., :8], keys[..., :8] * cos + rope.rotate_half(keys[..., :8]) * sin, atol=1e-6)


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_length_dependent_rope_is_refused_in_one_line(kind):
    module = torch.nn.Module()
    module.rotary = rotary_for({"rope_type": "default", "rope_theta": 10000.0})
    module.rotary.rope_type = kind
    with pytest.raises(ValueError, match=f"rope_type '{kind}' depends on the sequence length") as info:
        rope.check_shiftable_rope(module, "task=edit (pie)")
    assert "\n" not in str(info.value)
    for parameters in ROPE_PARAMETERS:  # every position-linear variant passes
        module.rotary = rotary_for(parameters)
        rope.check_shiftable_rope(module, "task=edit (pie)")


def test_streamingllm_rerotate_and_pie_use_the_one_shared_helper(tiny_lm, monkeypatch):
    calls = []
    original = rope.rerotate

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(rope, "rerotate", counting)
    pre = prefill(tiny_lm, list(range(5, 60)), 0, Stopwatch(tiny_lm.device))
    method = StreamingLLM(rerotate=True)
    cache = pre.cache.copy()
    ctx = CompressionContext.for_prompt(tiny_lm, 16, 55, pre, seed=0, input_ids=list(range(5, 60)))
    method.compress(cache, ctx)
    layers = tiny_lm.config.num_hidden_layers
    assert len(calls) == layers
    sample = edit_sample(tiny_lm, kind="delete")
    layout = edit_layout(tiny_lm.tokenizer, sample)
    original_cache = prefill(tiny_lm, layout.original_ids, 0, Stopwatch(tiny_lm.device)).cache
    edit_builders(tiny_lm, layout, original_cache, ["pie"])["pie"]()
    assert len(calls) == 2 * layers


# -- segment reuse -------------------------------------------------------------------------------------------------


def segments_sample(texts: list[str], modes=("joint", "reuse", "reuse_norotate"), template: bool = True) -> Sample:
    return Sample(
        sample_id="segments-test",
        context="".join(texts),
        question="What is the locker number?",
        answer_prefix="The locker number is",
        answers=["4821"],
        metric="string_match_all",
        max_new_tokens=4,
        separator="",
        use_chat_template=template,
        meta={"scenario": "segments", "segments": texts, "modes": list(modes)},
    )


SEGMENT_TEXTS = [
    "Instructions: answer briefly. The support desk code is 99120.\n\n",
    "Memories about the user:\n- The locker number is 4821.\n- The bike lock code is 3310.\n\n",
    "Document: tides\nThe sea rises and falls twice a day because of the Moon.\n\n",
]


def block_masked_reference(lm, layout) -> tuple[DynamicCache, torch.Tensor]:
    """The joint prompt in one forward where the opening and every segment see only themselves (the question sees
    everything): the block-diagonal attention that reused segments are equivalent to."""
    ids = layout.prompt_ids
    block = [0] * len(layout.head)
    for index, segment in enumerate(layout.segments):
        block += [index + 1] * len(segment)
    question = len(layout.segments) + 1
    block = torch.tensor(block + [question] * len(layout.tail))
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    query, key = block[:, None], block[None, :]
    visible = (key == query) | (query == question)
    mask = (causal & visible)[None, None]
    cache = DynamicCache()
    with torch.inference_mode():
        output = lm.model(
            input_ids=torch.tensor([ids]),
            position_ids=torch.arange(len(ids))[None],
            attention_mask=mask,
            **{cache_argument(type(lm.model)): cache},
            use_cache=True,
        )
    return cache, output.logits[0, -1]


def test_reused_segments_equal_a_block_masked_joint_encoding(tiny_lm):
    sample = segments_sample(SEGMENT_TEXTS)
    layout = segment_layout(tiny_lm.tokenizer, sample)
    built = reuse_builder(tiny_lm, layout, True, SegmentStore())()
    logits = forward_tokens(tiny_lm, built.cache, built.prefill_ids)
    reference, reference_logits = block_masked_reference(tiny_lm, layout)
    n = len(layout.prompt_ids)
    for index, layer in enumerate(built.cache.layers):
        assert torch.equal(layer.positions[0], torch.arange(n))
        assert torch.allclose(layer.keys, reference.layers[index].keys, atol=1e-5)
        assert torch.allclose(layer.values, reference.layers[index].values, atol=1e-5)
    assert torch.allclose(logits, reference_logits, atol=1e-4)
    # Without re-rotation the keys of every segment after the first one sit at the wrong angles.
    norotate = reuse_builder(tiny_lm, layout, False, SegmentStore())()
    later = slice(layout.starts()[1], layout.starts()[1] + len(layout.segments[1]))
    wrong = norotate.cache.layers[0].keys[:, :, later]
    assert not torch.allclose(wrong, reference.layers[0].keys[:, :, later], atol=1e-3)
    held = norotate.cache.layers[0].get_seq_length()
    assert torch.equal(norotate.cache.layers[0].positions, built.cache.layers[0].positions[:, :held])  # global


def test_reuse_of_one_segment_equals_joint_encoding(tiny_lm):
    sample = segments_sample(SEGMENT_TEXTS[1:2], template=False)  # no template opening: the prompt is one segment
    layout = segment_layout(tiny_lm.tokenizer, sample)
    assert not layout.head and len(layout.segments) == 1
    built = reuse_builder(tiny_lm, layout, True, SegmentStore())()
    logits = forward_tokens(tiny_lm, built.cache, built.prefill_ids)
    joint = prefill(tiny_lm, layout.prompt_ids, 0, Stopwatch(tiny_lm.device))
    for reused, whole in zip(built.cache.layers, joint.cache.layers, strict=True):
        assert torch.allclose(reused.keys, whole.keys, atol=1e-5)
        assert torch.allclose(reused.values, whole.values, atol=1e-5)
    assert torch.allclose(logits, joint.last_logits, atol=1e-4)
    rows = run_rows(tiny_lm, sample, ["full"])
    assert [row["mode"] for row in rows] == ["joint", "reuse", "reuse_norotate"]
    assert rows[1]["output_ids"] == rows[0]["output_ids"] and rows[1]["exact_match_ref"] == 1.0


def run_rows(lm, sample, methods, budgets=(None,), compress="prompt"):
    options = api.RunOptions(budgets=budgets, compress=compress)
    jobs = api.plan(lm, sample, [api.build_method(m) for m in methods], options)
    return list(api.iter_rows(lm, [(sample, jobs)], options))


def test_segment_store_is_shared_across_samples_and_counts_hits_and_bytes(tiny_lm, monkeypatch):
    from kvbench.scenarios import segments as scenario

    monkeypatch.setattr(scenario, "SEGMENT_STORE", SegmentStore())
    task = Segments(num_samples=3, document_pool=2, documents_per_sample=1, users=1, modes=["reuse"])
    samples = list(task.samples(tiny_lm.tokenizer, tiny_lm.max_context))
    assert samples == list(task.samples(tiny_lm.tokenizer, tiny_lm.max_context))  # deterministic
    config = tiny_lm.config
    slot_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4  # K+V, fp32
    seen: set[str] = set()
    for sample in samples:
        (row,) = run_rows(tiny_lm, sample, ["full"])
        layout = segment_layout(tiny_lm.tokenizer, sample)
        pieces = ["head", *sample.meta["segments"]]
        hits = [piece in seen for piece in pieces]
        seen.update(pieces)
        hit_tokens = sum(len(ids) for ids, hit in zip([layout.head, *layout.segments], hits, strict=True) if hit)
        assert row["status"] == "ok" and row["subtask"] == "segments/reuse"
        assert row["cache_hits"] == sum(hits) and row["cache_misses"] == len(hits) - sum(hits)
        assert row["bytes_reused"] == hit_tokens * slot_bytes
        assert row["prefill_tokens_saved"] == hit_tokens
        assert row["prefill_tokens"] == len(layout.prompt_ids) - hit_tokens
    assert len(scenario.SEGMENT_STORE.pieces) == len(seen)
    tight = SegmentStore(max_bytes=scenario.SEGMENT_STORE.nbytes() - 1)  # one piece too many: the oldest goes
    for key, piece in scenario.SEGMENT_STORE.pieces.items():
        tight.get_or_encode(key, lambda piece=piece: piece)
    assert list(tight.pieces) == list(scenario.SEGMENT_STORE.pieces)[1:]


def test_the_assembled_cache_is_compressed_by_the_jobs_method(tiny_lm):
    sample = segments_sample(SEGMENT_TEXTS)
    rows = run_rows(tiny_lm, sample, ["snapkv"], budgets=(32,))
    assert [row["status"] for row in rows] == ["ok"] * 3
    for row in rows:
        assert row["compressed"] and row["kept_entries_compressed"] == 32 * 4 * 2  # budget x layers x KV heads
        assert row["kv_bytes_compressed"] < row["kv_bytes_full"]
    refused = run_rows(tiny_lm, sample, ["snapkv"], budgets=(32,), compress="context")
    assert all(row["status"] == "error" for row in refused)
    assert "compress='context' is not supported with a compressing method" in refused[1]["error"]


def test_segments_that_do_not_fit_the_context_fail_in_one_line(tiny_lm):
    task = Segments(num_samples=1, document_paragraphs=4)
    with pytest.raises(ValueError, match=r"segment \d of 5 \(\w+, \d+ tokens\) ends at token \d+") as info:
        list(task.samples(tiny_lm.tokenizer, 400))
    assert "\n" not in str(info.value)


# -- edited contexts -----------------------------------------------------------------------------------------------


TEXT = (
    "Paragraph A: The harbour office opened in 1901 and kept records of every ship.\n\n"
    "Paragraph B: Its first keeper wrote each entry by hand in a red ledger.\n\n"
    "Paragraph C: The registration number of the harbour office is 5512093.\n\n"
    "Paragraph D: Visitors may read the ledgers on Tuesdays.\n"
)


def edit_sample(lm, kind: str = "delete", modes=("recompute", "pie", "no_rerotate")) -> Sample:
    middle = TEXT.index("Paragraph B")
    edit = {
        "delete": Edit(middle, TEXT.index("Paragraph C"), ""),
        "insert": Edit(middle, middle, "Paragraph X: A second office opened in 1950.\n\n"),
        "replace": Edit(middle, TEXT.index("Paragraph C"), "Paragraph B: Nobody knows who the keeper was.\n\n"),
        "append": Edit(len(TEXT), len(TEXT), "Paragraph E: The office closed in 1999.\n"),
    }[kind]
    return Sample(
        sample_id=f"edit-{kind}",
        context=edit.apply(TEXT),
        question="What is the registration number of the harbour office?",
        answer_prefix="The registration number is",
        answers=["5512093"],
        metric="string_match_all",
        max_new_tokens=6,
        meta={"scenario": "edit", "original": TEXT, "edit": edit.as_meta(), "modes": list(modes)},
    )


def test_an_append_only_edit_gives_pie_exactly_the_recompute_outputs(tiny_lm):
    sample = edit_sample(tiny_lm, "append")
    layout = edit_layout(tiny_lm.tokenizer, sample)
    assert not layout.post and not layout.old and layout.delta == len(layout.new)
    original = prefill(tiny_lm, layout.original_ids, 0, Stopwatch(tiny_lm.device)).cache
    builders = edit_builders(tiny_lm, layout, original, ["recompute", "pie"])
    recomputed, patched = builders["recompute"](), builders["pie"]()
    for a, b in zip(recomputed.cache.layers, patched.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and torch.equal(a.positions, b.positions)
    assert torch.equal(
        forward_tokens(tiny_lm, recomputed.cache, layout.tail), forward_tokens(tiny_lm, patched.cache, layout.tail)
    )
    rows = run_rows(tiny_lm, sample, ["full"])
    assert [row["mode"] for row in rows] == ["recompute", "pie", "no_rerotate"]
    assert rows[1]["output_ids"] == rows[0]["output_ids"] and rows[1]["exact_match_ref"] == 1.0
    assert rows[0]["tokens_reencoded"] == rows[1]["tokens_reencoded"] == len(layout.new)


@pytest.mark.parametrize("kind", ["delete", "insert", "replace"])
def test_pie_moves_every_later_key_by_the_shift_and_splices_new_tokens_in_order(tiny_lm, kind):
    sample = edit_sample(tiny_lm, kind)
    layout = edit_layout(tiny_lm.tokenizer, sample)
    assert layout.delta != 0 and layout.post
    stopwatch = Stopwatch(tiny_lm.device)
    original = prefill(tiny_lm, layout.original_ids, 0, stopwatch).cache
    builders = edit_builders(tiny_lm, layout, original, ["recompute", "pie", "no_rerotate"])
    recomputed, pie, stale = builders["recompute"](), builders["pie"](), builders["no_rerotate"]()
    rotary = rope.rotary_embedding(tiny_lm.model)
    at, n = layout.edit_at, len(layout.head + layout.pre + layout.new + layout.post)
    later_old = slice(at + len(layout.old), len(layout.original_ids))
    later_new = slice(at + len(layout.new), n)
    for index, layer in enumerate(pie.cache.layers):
        assert torch.equal(layer.positions[0], torch.arange(n))  # position order, edited numbering
        # Un-rotating a moved key at its new position gives the original pre-RoPE key: only the angle changed.
        moved = rope.unrotate_keys(layer.keys[0, :, later_new], layer.positions[:, later_new], rotary)
        before = original.layers[index]
        kept = rope.unrotate_keys(before.keys[0, :, later_old], before.positions[:, later_old], rotary)
        assert torch.allclose(moved, kept, atol=1e-5)
        assert torch.equal(layer.values[:, :, later_new], before.values[:, :, later_old])
        # The prefix is the original's; the new tokens are what recomputation computes there (one forward of
        # new + post there, of new alone here: equal up to GEMM rounding).
        recomputed_keys = recomputed.cache.layers[index].keys
        assert torch.equal(layer.keys[:, :, :at], before.keys[:, :, :at])
        inserted = slice(at, at + len(layout.new))
        assert torch.allclose(layer.keys[:, :, inserted], recomputed_keys[:, :, inserted], atol=1e-5)
        stale_keys = stale.cache.layers[index].keys[:, :, later_new]
        assert torch.equal(stale_keys, before.keys[:, :, later_old])  # no_rerotate: old angles, new positions
        assert not torch.allclose(stale_keys, layer.keys[:, :, later_new], atol=1e-3)
    assert pie.fields["tokens_reencoded"] == len(layout.new)
    assert recomputed.fields["tokens_reencoded"] == len(layout.new) + len(layout.post)


def test_edit_rows_compare_every_mode_with_recompute(tiny_lm):
    sample = edit_sample(tiny_lm, "replace")
    rows = run_rows(tiny_lm, sample, ["full", "streamingllm"], budgets=(24,))
    assert [(row["method"], row["mode"]) for row in rows] == [
        (method, mode) for method in ("full", "streamingllm") for mode in ("recompute", "pie", "no_rerotate")
    ]
    assert all(row["status"] == "ok" for row in rows)
    assert rows[0]["exact_match_ref"] == 1.0 and rows[0]["token_match_ref"] == 1.0
    assert [row.get("job_complete", False) for row in rows] == [False, False, True] * 2
    assert {row["subtask"] for row in rows} == {"edit/recompute", "edit/pie", "edit/no_rerotate"}
    layout = edit_layout(tiny_lm.tokenizer, sample)
    for row in rows:
        assert row["prefill_tokens"] == row["tokens_reencoded"] + len(layout.tail)
        assert row["prefill_tokens_saved"] == len(layout.edited_ids) - row["prefill_tokens"]
        assert row["edit_delta"] == layout.delta and row["reencode_s"] > 0


def test_edit_task_samples_are_deterministic_and_edit_their_middle(tiny_lm):
    task = EditTask(samples_per_edit=1)
    samples = list(task.samples(tiny_lm.tokenizer, tiny_lm.max_context))
    assert samples == list(task.samples(tiny_lm.tokenizer, tiny_lm.max_context))
    assert [(s.meta["source"] != "", s.meta["edit_kind"]) for s in samples] == [
        (True, kind) for _ in ("ielts", "python") for kind in ("insert", "delete", "replace")
    ]
    for sample in samples:
        edit, original = sample.meta["edit"], sample.meta["original"]
        assert 0.15 < edit["start"] / len(original) < 0.85
        assert sample.context == original[: edit["start"]] + edit["new"] + original[edit["end"] :]
        if sample.metric == "string_match_all":
            assert sample.answers[0] in sample.context


def test_an_edit_span_outside_the_text_and_dynamic_rope_fail_in_one_line(tiny_lm):
    with pytest.raises(ValueError, match=r"edit span \[0, 100000\) is outside the text of .* \(\d+ characters\)"):
        list(EditTask(samples_per_edit=1, sources=["ielts"], edit_span=[0, 100000]).samples(tiny_lm.tokenizer, 4096))
    config = tiny_lm.config.to_dict()
    config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    dynamic = LlamaForCausalLM._from_config(LlamaConfig.from_dict(config), attn_implementation=ATTN_IMPLEMENTATION)
    lm = dataclasses.replace(tiny_lm, model=dynamic)
    rows = run_rows(lm, edit_sample(lm, "delete"), ["full"])
    assert all(row["status"] == "error" for row in rows)
    assert "rope_type 'dynamic' depends on the sequence length" in rows[0]["error"]
    assert "\n" not in rows[0]["error"]
    for task in (EditTask(), Segments()):  # the CLI asks the task before any sample (kvbench.app)
        with pytest.raises(ValueError, match="rope_type 'dynamic' depends on the sequence length"):
            task.check_model(lm)
    EditTask(modes=["recompute"]).check_model(lm)  # recomputation never moves keys
    Segments(modes=["joint"]).check_model(lm)


@pytest.mark.parametrize(
    "bad, message",
    [
        (["task=segments", "model.max_context=300"], "segment 3 of 5 (memory, 107 tokens) ends at token 313"),
    ],
)
def test_bad_scenario_input_exits_in_one_line(tmp_path, bad, message):
    finished = cli(tmp_path, *TINY, f"results_dir={tmp_path / 'results'}", *bad)
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert finished.returncode == 2 and len(lines) == 1 and message in lines[0], finished.stderr[-2000:]
