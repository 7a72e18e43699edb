"""Offline generators for InfiniteBench's synthetic retrieval tasks, built the way the benchmark builds them
(OpenBMB/InfiniteBench, data/construct_synthetic_dataset.py), deterministic from an RNG.

* passkey: lines of noise ("The grass is green. ... There and back again.") with the line "The pass key is
  {key}. Remember it. {key} is the pass key." after a given share of them; key = 5 random digits.
* number_string: the same with "The sequence of digits is {key}. ..."; key = 5 random digits, then 5 times a
  digit repeated in place (10 digits with runs).
* kv_retrieval: `JSON data:\\n{"<uuid4>": "<uuid4>", ...}` and the question for the key of one pair
  (lost-in-the-middle's KV records, which InfiniteBench uses).

The number of noise lines / pairs is the unit the task sizes with the model's tokenizer
(`kvbench.tasks.sizing.largest_fitting`).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "What is the pass key?"
NUMBER_NEEDLE = "The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n"
NUMBER_QUESTION = "What is the sequence of digits?"
KV_QUESTION = '\nKey: "{key}"\nThe value associated with the specified key is: '


@dataclass(frozen=True)
class Record:
    """A synthetic row in the hub's schema (context, input, answer) plus where the answer sits."""

    context: str
    input: str
    answer: str
    depth: float  # percent of the units before the answer
    units: int  # noise lines or key-value pairs


def passkey_key(rng: random.Random) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(5))


def number_string_key(rng: random.Random) -> str:
    digits = [str(rng.randint(0, 9)) for _ in range(5)]
    for extra in range(5):
        position = rng.randint(0, 5 + extra - 1)
        digits.insert(position, digits[position])
    return "".join(digits)


def noise_record(needle: str, question: str, key: str, lines: int, depth: float) -> Record:
    """`lines` noise lines with the needle after round(lines * depth%) of them."""
    before = round(lines * depth / 100)
    context = NOISE * before + needle.format(key=key) + NOISE * (lines - before)
    return Record(context, question, key, 100 * before / lines if lines else 0.0, lines)


class KVPairs:
    """uuid4 key -> uuid4 value pairs drawn lazily from one RNG, so the first n pairs never depend on n."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._pairs: list[tuple[str, str]] = []

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def first(self, count: int) -> list[tuple[str, str]]:
        while len(self._pairs) < count:
            self._pairs.append((self._uuid(), self._uuid()))
        return self._pairs[:count]


def kv_record(pairs: KVPairs, count: int, depth: float) -> Record:
    """A JSON object of `count` pairs; the question asks for the pair at `depth`% of them."""
    items = pairs.first(count)
    target = min(count - 1, int(count * depth / 100))
    body = ", ".join(f'"{key}": "{value}"' for key, value in items)
    key, value = items[target]
    return Record("JSON data:\n{" + body + "}", KV_QUESTION.format(key=key), value, 100 * target / count, count)
