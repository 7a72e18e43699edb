"""Prompt builder shared by all tasks.

Places the question before, after or on both sides of the context, applies the model's chat template
(when the tokenizer has one and the sample wants it), appends the answer prefix after the assistant turn
start, and tokenizes in two pieces: everything up to the end of the context (what compress=context
compresses) and the rest. Contexts that do not fit are truncated in the MIDDLE (first half + last half of
their tokens), and the row records it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbench.harness.sample import DEFAULT_SEPARATOR, QUESTION_POSITIONS, Sample

SEPARATOR = DEFAULT_SEPARATOR


@dataclass
class Prompt:
    input_ids: list[int]
    context_end: int  # input_ids[:context_end] ends with the context
    truncated_tokens: int  # context tokens removed by middle truncation

    def __len__(self) -> int:
        return len(self.input_ids)


def middle_truncate(ids: list[int], max_tokens: int) -> list[int]:
    """Keep the first half and the last half of `max_tokens` (LongBench's rule)."""
    if len(ids) <= max_tokens:
        return list(ids)
    head = max_tokens // 2
    tail = max_tokens - head
    return list(ids[:head]) + (list(ids[-tail:]) if tail else [])


def _user_message(sample: Sample, context: str) -> tuple[str, int]:
    """User text and the character offset where its context ends."""
    if sample.question_position not in QUESTION_POSITIONS:
        raise ValueError(
            f"unknown question_position '{sample.question_position}'. "
            f"Valid question_positions: {', '.join(QUESTION_POSITIONS)}."
        )
    before = sample.question + sample.separator if sample.question_position in ("before", "both") else ""
    after = sample.separator + sample.question if sample.question_position in ("after", "both") else ""
    return before + context + after, len(before) + len(context)


def _render(tokenizer: Any, sample: Sample, context: str) -> tuple[str, int]:
    user, context_end = _user_message(sample, context)
    if sample.use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        start = text.index(user)
        return text + sample.answer_prefix, start + context_end
    return user + sample.separator + sample.answer_prefix, context_end


def _encode(tokenizer: Any, text: str, first: bool, templated: bool) -> list[int]:
    # Chat templates already contain BOS and special tokens as text; raw prompts get the tokenizer's BOS.
    return tokenizer(text, add_special_tokens=first and not templated)["input_ids"]


def build_prompt(tokenizer: Any, sample: Sample, max_prompt_tokens: int | None = None) -> Prompt:
    templated = bool(sample.use_chat_template and getattr(tokenizer, "chat_template", None))
    context = sample.context
    truncated = 0
    for _ in range(4):  # re-tokenising decoded text can shift a few tokens; converge in a few rounds
        text, split = _render(tokenizer, sample, context)
        head = _encode(tokenizer, text[:split], True, templated)
        tail = _encode(tokenizer, text[split:], False, templated)
        excess = len(head) + len(tail) - (max_prompt_tokens or len(head) + len(tail))
        if excess <= 0:
            return Prompt(head + tail, len(head), truncated)
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        keep = len(context_ids) - excess
        if keep <= 0:
            raise ValueError(
                f"sample {sample.sample_id}: the prompt without its context already exceeds {max_prompt_tokens} tokens"
            )
        truncated += len(context_ids) - keep
        context = tokenizer.decode(middle_truncate(context_ids, keep))
    raise ValueError(f"sample {sample.sample_id}: could not truncate the context to {max_prompt_tokens} tokens")
