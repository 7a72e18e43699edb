"""Small hand-made inputs shared by several test modules."""

from __future__ import annotations

from kvbench.harness.sample import Sample


def needle_sample(max_new_tokens: int = 10) -> Sample:
    """A short noise haystack with one magic number: enough tokens for budgets of 32-64 on the tiny model."""
    return Sample(
        sample_id="needle",
        context=" ".join(["The grass is green. The sky is blue."] * 20)
        + " The magic number is 4821937. "
        + " ".join(["The sun is yellow."] * 20),
        question="What is the magic number?",
        answer_prefix="The magic number is",
        answers=["4821937"],
        metric="string_match_all",
        max_new_tokens=max_new_tokens,
    )
